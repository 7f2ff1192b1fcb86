"""PSAAttnBackend glue on CPU: SGLang's real pools, the kernels' torch references, a stub prefill.

FlashInfer needs a GPU, so prefill runs through a stub with FlashInfer's contract (store K/V at
out_cache_loc). What is checked is the backend's own work: summaries after every write, decode
through bounds -> select -> sparse attention, the dense path for short requests, statistics.
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("sglang")

from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402

from sglang_psa.backend import PSAAttnBackend  # noqa: E402
from sglang_psa.config import PSAConfig  # noqa: E402
from sglang_psa.kernels import dense_decode_ref  # noqa: E402
from sglang_psa.tiered import host_kv_buffers  # noqa: E402

P, HQ, HKV, D, LAYERS = 16, 4, 2, 64, 2
SLOTS, CTX = P * 64, P * 16


class StubPrefill:
    """FlashInfer's side of the contract: forward_extend stores K/V at out_cache_loc."""

    def __init__(self, kv_pool):
        self.kv_pool = kv_pool
        self.calls = []

    def init_forward_metadata(self, fb):
        self.calls.append("init")

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        if save_kv_cache:
            self.kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        return torch.zeros(q.shape[0], HQ * D)

    def support_triton(self):
        return True


def make_backend(model=None, model_config_layers=None, **cfg):
    """A PSAAttnBackend over SGLang's real CPU pools; `model` is what model_runner.model holds."""
    r2t = ReqToTokenPool(size=8, max_context_len=CTX, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=SLOTS, page_size=P, dtype=torch.float32, head_num=HKV,
                          head_dim=D, layer_num=LAYERS, device="cpu", enable_memory_saver=False,
                          enable_alt_stream=False)  # fmt: skip
    if cfg.get("tiered"):  # what the plugin's pool hook does in tiered mode
        host_kv_buffers(kv)
    sa = types.SimpleNamespace(
        attention_backend="psa", prefill_attention_backend=None, decode_attention_backend=None,
        page_size=P, speculative_algorithm=None, kv_cache_dtype="auto", enable_metrics=False,
        disable_cuda_graph=True, _psa_config=PSAConfig(page_size=P, **cfg).to_dict(),
        radix_cache_backend="psa" if cfg.get("tiered") else None,
    )  # fmt: skip
    runner = types.SimpleNamespace(
        server_args=sa, page_size=P, device="cpu", use_mla_backend=False, tp_rank=0,
        model_config=types.SimpleNamespace(head_dim=D, num_hidden_layers=model_config_layers or LAYERS),
        req_to_token_pool=r2t,
        token_to_kv_pool=kv, model=model,
    )  # fmt: skip
    return PSAAttnBackend(runner, dense_backend=StubPrefill(kv))


def layer(i):
    return types.SimpleNamespace(
        layer_id=i, tp_q_head_num=HQ, tp_k_head_num=HKV, head_dim=D, v_head_dim=D,
        scaling=D**-0.5, k_scale=None, v_scale=None,
    )  # fmt: skip


class Batch:
    """Requests laid out the way SGLang's paged allocator does: page-contiguous slots."""

    def __init__(self, backend, lens, gen):
        self.b, self.gen, self.lens = backend, gen, list(lens)
        self.rows = list(range(1, len(lens) + 1))
        self.slots = []
        next_page = 1
        for row in self.rows:
            pages = torch.arange(next_page, next_page + CTX // P)
            next_page += CTX // P
            slots = (pages[:, None] * P + torch.arange(P)).reshape(-1)
            self.slots.append(slots)
            backend.req_to_token[row, : len(slots)] = slots.to(torch.int32)

    def _kv(self, n):
        return (torch.randn(n, HKV, D, generator=self.gen),
                torch.randn(n, HKV, D, generator=self.gen))  # fmt: skip

    def prefill(self):
        loc = torch.cat([s[:n] for s, n in zip(self.slots, self.lens)])
        fb = types.SimpleNamespace(forward_mode=ForwardMode.EXTEND, out_cache_loc=loc,
                                   batch_size=len(self.lens))  # fmt: skip
        self.b.init_forward_metadata(fb)
        for i in range(LAYERS):
            k, v = self._kv(len(loc))
            self.b.forward_extend(torch.zeros(len(loc), HQ * D), k, v, layer(i), fb)

    def begin_decode(self):
        """One more token per request: the decode step's forward batch, metadata initialised."""
        loc = torch.stack([s[n] for s, n in zip(self.slots, self.lens)])
        self.lens = [n + 1 for n in self.lens]
        fb = types.SimpleNamespace(
            forward_mode=ForwardMode.DECODE, out_cache_loc=loc, batch_size=len(self.lens),
            seq_lens=torch.tensor(self.lens), req_pool_indices=torch.tensor(self.rows),
            rids=[f"req{r}" for r in self.rows],
        )  # fmt: skip
        self.b.init_forward_metadata(fb)
        return fb

    def decode(self):
        fb = self.begin_decode()
        outs = []
        for i in range(LAYERS):
            q = torch.randn(len(self.lens), HQ * D, generator=self.gen)
            k, v = self._kv(len(self.lens))
            o = self.b.forward_decode(q, k, v, layer(i), fb)
            ref, _ = dense_decode_ref(
                q.view(-1, HQ, D), self.b.kv_pool.get_key_buffer(i),
                self.b.kv_pool.get_value_buffer(i), self.b.req_to_token, fb.req_pool_indices,
                fb.seq_lens, page_size=P, sm_scale=D**-0.5,
            )  # fmt: skip
            outs.append((o.view(-1, HQ, D), ref.to(o.dtype)))
        return outs

    def check_summaries(self):
        for i in range(LAYERS):
            k = self.b.kv_pool.get_key_buffer(i)
            kmin, kmax = self.b.summaries.get(i)
            for s, n in zip(self.slots, self.lens):
                for j in range(0, n, self.b.block_size):
                    blk = s[j].item() // self.b.block_size
                    keys = k[s[j : min(n, j + self.b.block_size)]]
                    assert torch.equal(kmin[blk], keys.amin(0))
                    assert torch.equal(kmax[blk], keys.amax(0))


def test_tau_one_equals_dense_and_summaries_follow_writes():
    b = make_backend(tau=1.0, max_pages=CTX // P, dense_below=0, block_size=8)
    batch = Batch(b, [40, 100, 7], torch.Generator().manual_seed(0))
    batch.prefill()
    batch.check_summaries()
    for _ in range(20):  # crosses page boundaries for every request
        for o, ref in batch.decode():
            torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-5)
        batch.check_summaries()


@pytest.mark.parametrize(
    "opts",
    [
        dict(mode="topk", topk=6),
        dict(mode="estimated", tau=0.3, max_pages=6),
        dict(mode="progressive", tau=0.3, max_pages=6, first_round_pages=2),
        dict(mode="certified", tau=0.3, max_pages=6, first_round_pages=2),
    ],
    ids=["topk", "estimated", "progressive", "certified"],
)
def test_short_requests_decode_densely_even_with_a_tiny_budget(opts):
    # 6 pages of budget; a 48-token request has 4 pages, dense_below 96 covers it; 200 tokens does not.
    b = make_backend(sink_pages=1, local_pages=1, dense_below=96, **opts)
    batch = Batch(b, [48, 200], torch.Generator().manual_seed(1))
    batch.prefill()
    outs = batch.decode()
    for o, ref in outs:
        torch.testing.assert_close(o[0], ref[0], rtol=1e-5, atol=1e-5)  # dense request
        if opts["mode"] != "certified":  # certified may legitimately need every page here
            assert not torch.allclose(o[1], ref[1], atol=1e-4)  # a few of 13 pages: sparse


def test_stats_count_selected_and_dense_pages():
    b = make_backend(mode="topk", topk=5, sink_pages=1, local_pages=1, dense_below=0,
                     stats=True, stats_interval=3)  # fmt: skip
    batch = Batch(b, [160, 30], torch.Generator().manual_seed(2))
    batch.prefill()
    for _ in range(3):
        batch.decode()
    snap = b.stats.last
    assert snap is not None and snap.steps == 3
    # the read-out happens at the start of step 3 (before its kernels): two steps are counted
    dense = 2 * HKV * ((161 + P - 1) // P + (31 + P - 1) // P + 1)
    assert snap.dense_pages == pytest.approx(dense, abs=2 * HKV)
    assert all(0 < s < snap.dense_pages for s in snap.selected_pages)
    assert 0 < snap.read_fraction < 1


def test_access_log_records_what_decode_selected(tmp_path):
    from sglang_psa.access_log import load_access_log

    b = make_backend(mode="topk", topk=5, sink_pages=1, local_pages=1, dense_below=0,
                     access_log=str(tmp_path), access_log_source="cpu-test")  # fmt: skip
    batch = Batch(b, [160, 70], torch.Generator().manual_seed(3))
    batch.prefill()
    for _ in range(3):
        batch.decode()
    b.access_log.close()
    trace = load_access_log(str(tmp_path / "tp0"))
    assert trace.source == "cpu-test"
    n = len(trace)
    assert n == 3 * LAYERS * HKV * 2  # steps x layers x kv heads x requests
    for i in range(n):
        pages = trace.pages_of(i)
        npages = -(-int(trace.seq_len[i]) // P)
        assert len(pages) == min(5, npages)
        assert 0 in list(pages) and npages - 1 in list(pages)  # sink and local window kept


@pytest.mark.parametrize("estimate,rank_by", [("lognormal", "bound"), ("lognormal", "estimate"),
                                              ("center", "estimate")])  # fmt: skip
def test_mass_estimate_and_rank_reach_the_kernels(estimate, rank_by):
    """The backend's decode equals bounds (with the chosen mass estimate) -> select (in the chosen
    order) -> sparse attention, computed here from the kernels' references."""
    from sglang_psa.config import MASS_ESTIMATES
    from sglang_psa.kernel_ops import select_params
    from sglang_psa.kernels import page_bounds_ref, select_pages_ref, sparse_decode_ref

    opts = dict(mode="estimated", tau=0.6, max_pages=8, sink_pages=1, local_pages=1, dense_below=0,
                mass_estimate=estimate, rank_by=rank_by)  # fmt: skip
    b = make_backend(**opts)
    batch = Batch(b, [150, 210], torch.Generator().manual_seed(5))
    batch.prefill()
    fb = batch.begin_decode()
    for i in range(LAYERS):
        q = torch.randn(len(batch.lens), HQ * D, generator=batch.gen)
        k, v = batch._kv(len(batch.lens))
        out = b.forward_decode(q, k, v, layer(i), fb).view(-1, HQ, D)
        q3 = q.view(-1, HQ, D)
        kmin, kmax = b.summaries.get(i)
        meta = (b.req_to_token, fb.req_pool_indices, fb.seq_lens)
        weight = MASS_ESTIMATES[estimate]
        bounds, centers = page_bounds_ref(q3, kmin, kmax, *meta, P, b.block_size, D**-0.5, b.max_pages_ctx,
                                          with_centers=True, variance_weight=weight)  # fmt: skip
        order = centers if rank_by == "estimate" else bounds
        idx, cnt = select_pages_ref(order, fb.seq_lens, P, select_params(b.cfg), mass_logits=centers,
                                    dense_below=0)  # fmt: skip
        ref, _ = sparse_decode_ref(q3, b.kv_pool.get_key_buffer(i), b.kv_pool.get_value_buffer(i), *meta,
                                   idx, cnt, P, D**-0.5)  # fmt: skip
        assert int(cnt.max()) < (210 + P) // P  # sparse: fewer pages than the longest request has
        torch.testing.assert_close(out, ref.to(out.dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["estimated", "certified"])
def test_streaming_layers_read_sinks_and_window_only(mode):
    """--psa-streaming-layers 1: layer 1 attends over its sink page and local window (whatever the
    mode), layer 0 still selects; the access log shows both."""
    from sglang_psa.kernels import select_streaming, sparse_decode_ref

    b = make_backend(mode=mode, tau=0.99, max_pages=12, sink_pages=1, local_pages=2, dense_below=0,
                     first_round_pages=2, streaming_layers="1", stats=True, stats_interval=100)  # fmt: skip
    batch = Batch(b, [150, 230], torch.Generator().manual_seed(6))
    batch.prefill()
    fb = batch.begin_decode()
    meta = (b.req_to_token, fb.req_pool_indices, fb.seq_lens)
    for i in range(LAYERS):
        q = torch.randn(len(batch.lens), HQ * D, generator=batch.gen)
        k, v = batch._kv(len(batch.lens))
        out = b.forward_decode(q, k, v, layer(i), fb).view(-1, HQ, D)
        idx, cnt = select_streaming(fb.seq_lens, HKV, b.width, P, 1, 2)
        ref, _ = sparse_decode_ref(q.view(-1, HQ, D), b.kv_pool.get_key_buffer(i),
                                   b.kv_pool.get_value_buffer(i), *meta, idx, cnt, P, D**-0.5)  # fmt: skip
        same = torch.allclose(out, ref.to(out.dtype), rtol=1e-5, atol=1e-5)
        assert same == (i == 1), f"layer {i}"
    assert int(b.stats.selected[1]) == 2 * HKV * 3  # requests x kv heads x (1 sink + 2 local) pages
    assert int(b.stats.selected[0]) > 2 * HKV * 3  # tau 0.99 selects more on layer 0


def test_streaming_layers_option_errors_name_the_flag():
    with pytest.raises(ValueError, match="streaming-layers"):
        PSAConfig(streaming_layers="2-1").validate()
    with pytest.raises(ValueError, match="streaming-layers"):
        PSAConfig(streaming_layers="a").validate()
    assert PSAConfig(streaming_layers="0-2, 5").validate().streaming_layer_ids() == {0, 1, 2, 5}
    with pytest.raises(ValueError, match="has 2 decoder layers"):
        make_backend(streaming_layers="0,2", model_config_layers=2)
