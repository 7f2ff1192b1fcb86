"""--psa-prefetch next-layer: the next layer's query estimated from SGLang's own Llama decoder layers (CPU),
and the backend's tiered decode with those predictions (same outputs, misses moved by prefetch)."""

from __future__ import annotations

import socket
import types

import pytest
import torch

pytest.importorskip("sglang")

from test_backend import HKV, HQ, LAYERS, Batch, layer, make_backend  # noqa: E402

from sglang_psa.lookahead import NextLayerQuery, estimate_query  # noqa: E402

HIDDEN = HQ * 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_layers():
    """LAYERS of SGLang's LlamaDecoderLayer (4 q / 2 kv heads of 64, Llama-3 RoPE), random weights."""
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.distributed import init_distributed_environment, initialize_model_parallel
    from sglang.srt.distributed.parallel_state import model_parallel_is_initialized
    from sglang.srt.models.llama import LlamaDecoderLayer
    from sglang.srt.runtime_context import get_context
    from transformers import LlamaConfig

    if not torch.distributed.is_initialized():
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{_free_port()}")  # fmt: skip
    if not model_parallel_is_initialized():
        initialize_model_parallel(1, 1)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024}  # fmt: skip
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_attention_heads=HQ,
                      num_key_value_heads=HKV, num_hidden_layers=LAYERS, rope_theta=500000.0,
                      max_position_embeddings=4096, rms_norm_eps=1e-5, rope_scaling=rope)  # fmt: skip
    override = get_context().override_server_args(model_path="unused")
    override.install()
    saved = rope_base._is_cpu  # SGLang's CPU-engine flag: RoPE without a CUDA / vllm kernel
    rope_base._is_cpu = True
    try:
        layers = torch.nn.ModuleList([LlamaDecoderLayer(cfg, layer_id=i) for i in range(LAYERS)])
    finally:
        rope_base._is_cpu = saved
        override.restore()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in layers.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if "norm" in name
                    else 0.05 * torch.randn(p.shape, generator=g))  # fmt: skip
    return layers


def _own_query(lay, positions, hidden, residual):
    """The query `lay` computes from its own inputs: its norm, full qkv projection split, RoPE."""
    attn = lay.self_attn
    norm = lay.input_layernorm
    x = norm.forward_native(hidden) if residual is None else norm.forward_native(hidden, residual)[0]
    qkv, _ = attn.qkv_proj(x)
    q, k, _v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, _k = attn.rotary_emb.forward_native(positions, q, k)
    return q


@pytest.mark.parametrize("with_residual", [False, True])
def test_estimate_equals_the_layers_own_query_on_the_same_stream(llama_layers, with_residual):
    g = torch.Generator().manual_seed(1)
    positions = torch.tensor([3, 700, 2100])
    hidden = torch.randn(3, HIDDEN, generator=g)
    residual = torch.randn(3, HIDDEN, generator=g) if with_residual else None
    got = estimate_query(llama_layers[1], positions, hidden, residual)
    want = _own_query(llama_layers[1], positions, hidden, residual)
    assert got.shape == (3, HQ * 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    other = _own_query(llama_layers[0], positions, hidden, residual)
    assert not torch.allclose(got, other, atol=1e-2)  # layer 1's weights, not layer 0's


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_estimate_equals_the_torch_path(llama_layers, with_residual):
    """kernels/next_query.py on SGLang's own Llama layer (Llama-3 RoPE cache, fp32 weights), through
    the Triton interpreter on CPU: the same query as the native torch path."""
    from sglang_psa.lookahead import fusable

    g = torch.Generator().manual_seed(2)
    positions = torch.tensor([3, 700, 2100, 4000])
    hidden = torch.randn(4, HIDDEN, generator=g)
    residual = torch.randn(4, HIDDEN, generator=g) if with_residual else None
    assert fusable(llama_layers[1])
    fused = estimate_query(llama_layers[1], positions, hidden, residual, fused=True)
    torch_path = estimate_query(llama_layers[1], positions, hidden, residual, fused=False)
    torch.testing.assert_close(fused, torch_path, rtol=1e-4, atol=1e-4)


def _model(layers):
    inner = types.SimpleNamespace(layers=layers, start_layer=0, end_layer=len(layers))
    return types.SimpleNamespace(model=inner)


def _call_pre_hooks(lay, *args):
    for hook in list(lay._forward_pre_hooks.values()):
        hook(lay, args, {})


def test_hooks_fire_at_decode_only_and_hand_over_the_next_layer(llama_layers):
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    seen = []
    hooks = NextLayerQuery(_model(llama_layers), lambda attn, q, fb: seen.append((attn.layer_id, q)))
    try:
        assert len(hooks.handles) == LAYERS - 1  # the last layer has no next one
        pos, h = torch.tensor([10, 20]), torch.randn(2, HIDDEN)
        _call_pre_hooks(llama_layers[0], pos, h, types.SimpleNamespace(forward_mode=ForwardMode.EXTEND), None)
        assert seen == []
        _call_pre_hooks(llama_layers[0], pos, h, types.SimpleNamespace(forward_mode=ForwardMode.DECODE), None)
        assert [lid for lid, _ in seen] == [1]
        torch.testing.assert_close(seen[0][1], _own_query(llama_layers[1], pos, h, None))
    finally:
        hooks.remove()
    assert not llama_layers[0]._forward_pre_hooks


def test_models_without_llama_layers_are_refused_at_start(llama_layers):
    with pytest.raises(ValueError, match="--psa-prefetch next-layer needs a model with Llama-style"):
        NextLayerQuery(types.SimpleNamespace(model=None), lambda *a: None)
    bare = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="decoder layer 0 .* lacks input_layernorm"):
        NextLayerQuery(_model(bare), lambda *a: None)


@torch.no_grad()  # as the server runs the model
def test_tiered_backend_with_next_layer_prefetch_equals_no_prefetch(llama_layers):
    """The backend in tiered mode, one decode step: layer l's pre-hook speculates layer l+1 from the
    residual stream, layer l's decode prefetches that union. Outputs equal the same step without
    prefetch (bit for bit: the pool miss path attends in one pass, so hits vs misses change no rounding);
    the predicted pages arrive by prefetch."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    opts = dict(mode="estimated", tau=0.7, max_pages=8, sink_pages=1, local_pages=1, dense_below=0,
                tiered=True, hot_pool_gb=0.02, miss_path="pool")  # fmt: skip
    runs = {}
    for prefetch in ("off", "next-layer"):
        b = make_backend(prefetch=prefetch, model=_model(llama_layers), **opts)
        batch = Batch(b, [150, 230], torch.Generator().manual_seed(4))
        batch.prefill()
        fb = batch.begin_decode()
        fb.forward_mode = ForwardMode.DECODE
        g = torch.Generator().manual_seed(9)
        stream = torch.randn(len(batch.lens), HIDDEN, generator=g)
        outs = []
        assert b.tiered.attn.pool.capacity > 100  # room for every page: hits come from prefetch alone
        for i in range(LAYERS):
            _call_pre_hooks(llama_layers[i], fb.seq_lens.long() - 1, stream, fb, None)  # the model's loop
            q = _own_query(llama_layers[i], fb.seq_lens.long() - 1, stream, None)  # layer i's real query
            k, v = batch._kv(len(batch.lens))
            outs.append(b.forward_decode(q, k, v, layer(i), fb))
        runs[prefetch] = (outs, b.tiered.attn.stats())
    for o_off, o_nl in zip(runs["off"][0], runs["next-layer"][0]):
        torch.testing.assert_close(o_nl, o_off, rtol=0, atol=0)
    off, nl = runs["off"][1], runs["next-layer"][1]
    assert off["prefetched"] == 0 and nl["prefetched"] > 0
    # the stream is the same for every layer here, so the prediction is exact: layer 1 fetches nothing
    assert nl["fetched"] + nl["overflow"] < off["fetched"] + off["overflow"]
