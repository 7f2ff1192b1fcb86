"""PSAConfig validation: every bad option fails with a message naming the flag and the fix."""

from __future__ import annotations

import types

import pytest

from sglang_psa.config import PSAConfig, validate_against_server, validate_model


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tau": 1.5}, r"--psa-tau must be in \(0, 1\], got 1.5"),
        ({"tau": 0.0}, r"--psa-tau must be in \(0, 1\]"),
        ({"mode": "fast"}, "--psa-mode must be one of estimated, progressive, certified, topk"),
        ({"max_pages": 0}, "--psa-max-pages must be >= 1"),
        ({"topk": 0}, "--psa-topk must be >= 1"),
        ({"min_pages": -1}, "--psa-min-pages must be >= 0"),
        ({"min_pages": 10, "max_pages": 5}, "--psa-min-pages .* must not exceed --psa-max-pages"),
        ({"sink_pages": 4, "local_pages": 4, "max_pages": 6}, "raise --psa-max-pages"),
        ({"mode": "topk", "topk": 3}, "raise --psa-topk"),
        ({"page_size": 24}, "--psa-page-size must be a power of two in 16..128"),
        ({"page_size": 256}, "--psa-page-size must be a power of two in 16..128"),
        ({"block_size": 12}, "--psa-block-size must be 0"),
        ({"reuse_steps": 0}, "--psa-reuse-steps must be >= 1"),
        (
            {"reuse_steps": 4, "mode": "certified"},
            "--psa-reuse-steps 4 .* --psa-mode certified .* use --psa-mode estimated or topk, or "
            "--psa-reuse-steps 1",
        ),
        ({"reuse_steps": 2, "mode": "progressive"}, "--psa-reuse-steps 2 .* --psa-mode progressive"),
        ({"stats_interval": 0}, "--psa-stats-interval must be >= 1"),
        ({"mass_estimate": "mean"}, "--psa-mass-estimate must be one of center, lognormal"),
        ({"prefetch": True}, "--psa-prefetch must be one of off, previous-step, next-layer, next-step"),
        ({"prefetch_margin": 0}, "--psa-prefetch-margin must be an integer >= 1"),
        ({"miss_path": "disk"}, "--psa-miss-path must be one of pool, host, split"),
        ({"prefetch": "next-layer"}, "--psa-prefetch next-layer .* add --psa-tiered"),
        ({"hot_pin_window": True}, "--psa-hot-pin-window pins pages .* add --psa-tiered"),
        ({"hot_quota": "adaptive"}, "--psa-hot-quota adaptive sets per-layer quotas .* add --psa-tiered"),
        ({"hot_quota": "static"}, "--psa-hot-quota must be one of off, adaptive"),
        ({"hot_quota_interval": 0}, "--psa-hot-quota-interval must be an integer >= 1"),
        ({"hot_quota_smoothing": 0.0}, r"--psa-hot-quota-smoothing must be a number in \(0, 1\]"),
        (
            {"tiered": True, "hot_quota": "adaptive", "hot_policy": "lru"},
            "--psa-hot-quota adaptive is built into the clock placement; use --psa-hot-policy clock",
        ),
        ({"prefetch_programs": -1}, "--psa-prefetch-programs must be an integer >= 0"),
        ({"rank_by": "mass"}, "--psa-rank-by must be one of bound, estimate"),
        ({"rank_by": "estimate", "mode": "progressive"}, "--psa-rank-by estimate .* --psa-mode progressive"),
    ],
)
def test_invalid_options_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PSAConfig(**kwargs).validate()


@pytest.mark.parametrize("mode", ["estimated", "topk"])
def test_reuse_steps_accepted_in_list_modes(mode):
    cfg = PSAConfig(reuse_steps=4, mode=mode, topk=64).validate(page_size=32)
    assert cfg.reuse_steps == 4
    PSAConfig(reuse_steps=1, mode="certified").validate(page_size=32)  # R = 1: any mode


def test_defaults_are_valid():
    cfg = PSAConfig().validate(page_size=32)
    assert cfg.select_width() == cfg.max_pages
    assert PSAConfig(mode="topk", topk=16).select_width() == 16


@pytest.mark.parametrize("page_size", [None, 1, 8, 24, 256])
def test_unsupported_page_size(page_size):
    with pytest.raises(ValueError, match="needs --page-size a power of two in 16..128"):
        PSAConfig().validate_page_size(page_size)


def test_block_size_must_divide_page():
    with pytest.raises(ValueError, match="--psa-block-size .* must divide --page-size"):
        PSAConfig(block_size=64).validate(page_size=32)
    PSAConfig(block_size=16).validate(page_size=32)


def test_dense_below_must_fit_the_page_arrays():
    with pytest.raises(ValueError, match="--psa-dense-below 8192 spans 512 pages .* raise"):
        PSAConfig(dense_below=8192, max_pages=256).validate(page_size=16)
    PSAConfig(dense_below=8192, max_pages=512).validate(page_size=16)


def test_dict_and_env_round_trip(monkeypatch):
    cfg = PSAConfig(tau=0.8, mode="certified", stats=True)
    assert PSAConfig.from_dict(cfg.to_dict()) == cfg
    monkeypatch.setenv("SGLANG_PSA_CONFIG", cfg.to_json())
    assert PSAConfig.from_env() == cfg
    sa = types.SimpleNamespace()
    assert PSAConfig.from_server_args(sa) == cfg  # falls back to the environment
    sa._psa_config = PSAConfig(tau=0.5).to_dict()
    assert PSAConfig.from_server_args(sa).tau == 0.5
    with pytest.raises(ValueError, match="unknown PSA option"):
        PSAConfig.from_dict({"taux": 1})


def _server(**kw):
    base = dict(
        attention_backend="psa", prefill_attention_backend=None, decode_attention_backend=None,
        page_size=32, speculative_algorithm=None, kv_cache_dtype="auto",
        enable_hierarchical_cache=False, enable_hisparse=False, enable_two_batch_overlap=False,
        enable_pdmux=False, enable_dp_attention=False,
    )  # fmt: skip
    base.update(kw)
    return types.SimpleNamespace(**base)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"speculative_algorithm": "EAGLE"}, "does not support speculative decoding"),
        ({"page_size": 1}, "needs --page-size a power of two"),
        ({"kv_cache_dtype": "fp8_e4m3"}, "needs a 16-bit KV cache.*--kv-cache-dtype auto"),
        ({"enable_hierarchical_cache": True}, "remove --enable-hierarchical-cache"),
        ({"enable_hisparse": True}, "remove --enable-hisparse"),
        ({"enable_dp_attention": True}, "--enable-dp-attention"),
        ({"prefill_attention_backend": "triton"}, "drop --prefill-attention-backend"),
    ],
)
def test_server_combinations(kw, match):
    with pytest.raises(ValueError, match=match):
        validate_against_server(PSAConfig(), _server(**kw))


def test_access_log_runs_with_and_without_cuda_graphs():
    validate_against_server(PSAConfig(access_log="/tmp/x"), _server())
    validate_against_server(PSAConfig(access_log="/tmp/x"), _server(disable_cuda_graph=True))


def test_measure_recall_needs_stats_and_eager_decode():
    with pytest.raises(ValueError, match="--psa-measure-recall .* --disable-cuda-graph"):
        validate_against_server(PSAConfig(measure_recall=True, stats=True), _server())
    with pytest.raises(ValueError, match="--psa-stats"):
        validate_against_server(PSAConfig(measure_recall=True), _server(disable_cuda_graph=True))
    validate_against_server(PSAConfig(measure_recall=True, stats=True), _server(disable_cuda_graph=True))


def test_server_ok():
    validate_against_server(PSAConfig(), _server())


@pytest.mark.parametrize(
    "mc, match",
    [
        (dict(attention_arch=types.SimpleNamespace(name="MLA")), "this model uses MLA"),
        (dict(is_encoder_decoder=True), "encoder-decoder"),
        (dict(is_hybrid_swa=True), "sliding-window"),
        (dict(hf_text_config=types.SimpleNamespace(attn_logit_softcapping=50.0)), "soft-capping"),
        (dict(head_dim=512), "head_dim 64, 128 or 256"),
        (dict(head_dim=96), "head_dim 64, 128 or 256"),
    ],
)
def test_model_checks(mc, match):
    with pytest.raises(ValueError, match=match):
        validate_model(PSAConfig(), types.SimpleNamespace(**mc))
