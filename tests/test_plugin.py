"""The plugin registers with SGLang 0.5.17 and its --psa-* flags travel to the scheduler."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest

pytest.importorskip("sglang")

from sglang_psa.plugin import ensure_registered  # noqa: E402

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
    "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "rope_theta": 10000.0,
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def registered():
    ensure_registered()


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(tmp_path)


def _prepare(argv):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(argv)


def test_backend_and_radix_cache_registered():
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.mem_cache.registry import registered_radix_cache_backends
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES

    assert "psa" in ATTENTION_BACKEND_CHOICES
    assert ATTENTION_BACKEND_CHOICES.count("psa") == 1
    assert "psa" in ATTENTION_BACKENDS
    assert "psa" in registered_radix_cache_backends()


def test_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="sglang.srt.plugins")}
    assert eps.get("psa") == "sglang_psa.plugin:register"


def test_psa_flags_parse_through_server_args_parser():
    from sglang.srt.server_args import ServerArgs

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    ns = parser.parse_args(
        ["--model-path", "x", "--attention-backend", "psa", "--psa-tau", "0.75",
         "--psa-mode", "certified", "--psa-max-pages", "128", "--psa-stats"]
    )  # fmt: skip
    assert ns.attention_backend == "psa"
    assert (ns.psa_tau, ns.psa_mode, ns.psa_max_pages, ns.psa_stats) == (
        0.75, "certified", 128, True,
    )  # fmt: skip
    with pytest.raises(SystemExit):
        parser.parse_args(["--model-path", "x", "--psa-mode", "fast"])
    # a flag on by default (write-through) parses on, stays on when named, turns off with --psa-no-*
    base = ["--model-path", "x", "--attention-backend", "psa"]
    assert parser.parse_args(base).psa_write_through is True
    assert parser.parse_args([*base, "--psa-write-through"]).psa_write_through is True
    assert parser.parse_args([*base, "--psa-no-write-through"]).psa_write_through is False


def test_server_args_carry_config_across_pickle(model_dir):
    sa = _prepare(["--model-path", model_dir, "--attention-backend", "psa", "--device", "cpu",
                   "--psa-tau", "0.8", "--psa-max-pages", "512"])  # fmt: skip
    assert sa.page_size == 32  # PSA's default page size replaces SGLang's 1
    assert sa._psa_config["tau"] == 0.8 and sa._psa_config["max_pages"] == 512
    clone = pickle.loads(pickle.dumps(sa))  # what spawn does for the scheduler process
    from sglang_psa.config import PSAConfig

    assert PSAConfig.from_server_args(clone).max_pages == 512


def test_yaml_config_file(model_dir, tmp_path):
    cfg = tmp_path / "psa.yaml"
    cfg.write_text(
        f"model-path: {model_dir}\nattention-backend: psa\ndevice: cpu\n"
        "psa-tau: 0.9\npsa-mode: topk\npsa-topk: 32\npsa-stats: true\npage-size: 64\n"
    )
    sa = _prepare(["--config", str(cfg)])
    assert sa.page_size == 64
    assert sa._psa_config["mode"] == "topk" and sa._psa_config["topk"] == 32
    assert sa._psa_config["stats"] is True


def test_bad_options_stop_at_start(model_dir):
    base = ["--model-path", model_dir, "--attention-backend", "psa", "--device", "cpu"]
    with pytest.raises(ValueError, match=r"--psa-tau must be in \(0, 1\], got 1.5"):
        _prepare(base + ["--psa-tau", "1.5"])
    with pytest.raises(ValueError, match="needs --page-size a power of two in 16..128"):
        _prepare(base + ["--page-size", "8"])


def test_engine_keyword_arguments(model_dir):
    from sglang.srt.server_args import ServerArgs

    sa = ServerArgs(model_path=model_dir, attention_backend="psa", device="cpu", psa_tau=0.6)
    assert sa._psa_config["tau"] == 0.6 and sa.page_size == 32


def test_other_backends_untouched(model_dir):
    sa = _prepare(["--model-path", model_dir, "--attention-backend", "triton", "--device", "cpu"])
    assert sa.page_size == 1


def test_cuda_graph_replay_view_carries_request_ids():
    """The access log tracks requests by id; SGLang's replay view must carry them (hooked)."""
    import types

    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.model_executor.runner import decode_cuda_graph_runner as runner

    bufs = types.SimpleNamespace(
        input_ids=torch.zeros(4), positions=torch.zeros(4), req_pool_indices=torch.zeros(4),
        seq_lens=torch.ones(4), seq_lens_cpu=torch.ones(4), encoder_lens=None, mamba_track_indices=None,
    )  # fmt: skip
    fb = types.SimpleNamespace(seq_lens_sum=10, seq_lens_cpu=torch.ones(2), forward_mode=ForwardMode.DECODE,
                               spec_info=None, rids=["a", "b"])  # fmt: skip
    view = runner.build_replay_fb_view(forward_batch=fb, buffers=bufs, bs=4, raw_bs=2, num_tokens=4,
                                       seq_len_fill_value=1, capture_forward_mode=ForwardMode.DECODE,
                                       is_encoder_decoder=False)  # fmt: skip
    assert view.rids == ["a", "b"] and view.batch_size == 4
