"""The accuracy suites and the trained-model tracer: settings are valid server flags, and the offline
twin and the tracer run end to end on the committed model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from script_loader import load_script

MODEL = Path(__file__).resolve().parent.parent / "models" / "psa-llama-2m"


def test_every_server_setting_parses_and_validates():
    pytest.importorskip("sglang")
    from sglang.srt.server_args import ServerArgs

    from sglang_psa.config import PSAConfig, validate_against_server
    from sglang_psa.plugin import ensure_registered

    ensure_registered()
    ev = load_script("eval_accuracy")
    lognormal = ev.parse_ints_after_tau("0.9:0,0.95:16,0.5:10:12,0.01:10:10")
    assert lognormal == ((0.9, 0), (0.95, 16), (0.5, 10, 12), (0.01, 10, 10))
    settings = ev.backend_settings([0.8, 0.95], [8, 64], 32, lognormal=lognormal)
    ev.add_streaming(settings, ["topk-64", "psa-lognormal-0.5-min10-max12"], "0-1,3")
    with pytest.raises(ValueError, match="'dense'"):
        ev.add_streaming(settings, ["dense"], "0")
    want = {"dense", "psa-estimated-0.8", "psa-certified-0.95", "topk-64", "streaming-32",
            "psa-lognormal-0.9", "psa-lognormal-0.95-min16", "psa-lognormal-0.5-min10-max12",
            "topk-lognormal-10", "topk-64-stream0-1_3",
            "psa-lognormal-0.5-min10-max12-stream0-1_3"}  # fmt: skip
    assert want <= set(settings)
    for name, flags in settings.items():
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        ns = parser.parse_args(
            ["--model-path", "x", "--page-size", str(ev.PAGE), "--disable-cuda-graph", *flags]
        )
        cfg = PSAConfig.from_namespace(ns).validate(ev.PAGE)
        ns.disable_cuda_graph = True
        if name != "dense":
            assert cfg.measure_recall and cfg.stats
        if "lognormal" in name:
            assert (cfg.mass_estimate, cfg.rank_by, cfg.mode) == ("lognormal", "estimate", "estimated")
            validate_against_server(cfg, ns)
        if name == "psa-lognormal-0.5-min10-max12":
            assert (cfg.tau, cfg.min_pages, cfg.max_pages) == (0.5, 10, 12)
        assert cfg.streaming_layer_ids() == ({0, 1, 3} if name.endswith("-stream0-1_3") else set())
        if name == "topk-lognormal-10":
            assert cfg.min_pages == cfg.max_pages == 10


def test_lognormal_spec_errors_name_the_item():
    ev = load_script("eval_accuracy")
    with pytest.raises(ValueError, match="'0.9'"):
        ev.parse_ints_after_tau("0.8:16,0.9")


def test_progressive_spec_errors_name_the_item():
    ev = load_script("eval_accuracy_hf")
    names = [s.name for s in ev.settings_for([], [], 32, (), "0.8:8,0.9:12:ln")]
    assert names[1:3] == ["psa-progressive-0.8-fr8", "psa-progressive-0.9-fr12-ln"]
    with pytest.raises(ValueError, match="'0.9:8:log'"):
        ev.settings_for([], [], 32, (), "0.9:8:log")


def test_offline_twin_runs_on_the_trained_model(tmp_path):
    ev = load_script("eval_accuracy_hf")
    only = ("psa-estimated-0.9,topk-8,psa-progressive-0.9,psa-lognormal-0.5-min6-max7,topk-lognormal-6,"
            "topk-8-stream0-2,psa-progressive-0.9-fr8-ln")  # fmt: skip
    res = ev.main(["--model", str(MODEL), "--lengths", "512", "--samples", "1", "--tasks", "passkey",
                   "--only", only, "--lognormal", "0.5:6:7,0.01:6:6", "--hybrid", "topk-8",
                   "--streaming-layers", "0-2", "--progressive", "0.9:8:ln",
                   "--out", str(tmp_path)])  # fmt: skip
    names = [r["name"] for r in res["rows"]]
    assert names == ["dense", "psa-estimated-0.9", "psa-progressive-0.9", "psa-progressive-0.9-fr8-ln",
                     "psa-lognormal-0.5-min6-max7", "topk-lognormal-6", "topk-8",
                     "topk-8-stream0-2"]  # fmt: skip
    by_name = {r["name"]: r for r in res["rows"]}
    # every (step, layer, kv head) reads exactly 6 pages with the fixed budget, 6 or 7 with floor + cap
    fixed = by_name["topk-lognormal-6"]["page_fraction"]
    assert 0 < fixed < 1
    assert fixed <= by_name["psa-lognormal-0.5-min6-max7"]["page_fraction"] <= fixed * 7 / 6 + 1e-9
    # 3 of 4 layers read 5 pages (sink 1 + local 4) instead of top-k's 8
    top8 = by_name["topk-8"]["page_fraction"]
    assert by_name["topk-8-stream0-2"]["page_fraction"] == pytest.approx(top8 * (3 * 5 + 8) / 32)
    dense = res["rows"][0]
    assert dense["page_fraction"] == 1.0 and dense["recall"] == pytest.approx(1.0)
    for r in res["rows"][1:]:
        assert 0.0 < r["page_fraction"] <= 1.0 and 0.0 < r["recall"] <= 1.0 + 1e-6
    files = list(tmp_path.glob("eval-accuracy-hf-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["rows"][0]["name"] == "dense"


def test_tracer_writes_a_log_of_the_trained_model(tmp_path):
    from sglang_psa.access_log import load_access_log

    tr = load_script("trace_trained_model")
    assert (
        tr.main(["--model", str(MODEL), "-o", str(tmp_path / "log"), "--lengths", "512", "--steps", "3"]) == 0
    )
    trace = load_access_log(str(tmp_path / "log"))
    assert len(trace) == 2 * 3 * 4 * 2  # 2 prompts x 3 steps x 4 layers x 2 kv heads


def test_lookahead_recall_queries_are_the_models_own(tmp_path):
    """layer_query(layer, the stream entering it) is the post-RoPE query HF's attention receives, so the
    script's next-layer estimate differs from the real query only by the stream it is given."""
    import torch
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    lr = load_script("lookahead_recall_hf")
    model = AutoModelForCausalLM.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    seen = {}

    def capture(module, query, key, value, attention_mask, **kw):
        seen[module.layer_idx] = query[0, :, -1].clone()
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kw)

    AttentionInterface.register("lookahead_test", capture)
    AttentionMaskInterface.register("lookahead_test", sdpa_mask)
    model.config._attn_implementation = "lookahead_test"

    streams = lr.record_layer_inputs(model.model.layers)
    pos = torch.arange(7)[None]
    with torch.no_grad():
        model(input_ids=torch.arange(10, 17)[None], position_ids=pos)
        cos, sin = model.model.rotary_emb(streams[0], pos[:, -1:])
        for i, lay in enumerate(model.model.layers):
            q = lr.layer_query(lay, streams[i][0, -1:], cos, sin)
            torch.testing.assert_close(q, seen[i], rtol=1e-5, atol=1e-5)
    res = lr.main(["--model", str(MODEL), "--lengths", "512", "--samples", "1", "--tasks", "passkey",
                   "--steps", "3", "--out", str(tmp_path)])  # fmt: skip
    for rows in res["layers"].values():
        assert 0.0 < rows["all"]["coverage"] <= 1.0 and set(rows) == {"L1", "L2", "L3", "all"}


def test_find_streaming_layers_runs_and_keeps_its_promise(tmp_path):
    fs = load_script("find_streaming_layers")
    res = fs.main(["--model", str(MODEL), "--lengths", "512", "--samples", "2", "--tasks", "passkey",
                   "--max-lost", "1", "--out", str(tmp_path)])  # fmt: skip
    single = res["single_layer"]
    assert [r["name"] for r in single] == ["dense"] + [f"stream-{i}" for i in range(4)]
    assert all(0 < r["page_fraction"] < 1 for r in single[1:])  # one of 4 layers reads 5 of ~30 pages
    kept = [g for g in res["greedy"] if g["kept"]]
    assert res["streaming_layers"] == ",".join(str(x) for x in sorted(g["added"] for g in kept))
    assert all(g["lost"] <= 1 for g in kept)
    assert list(tmp_path.glob("streaming-layers-*.json"))


def test_pages_at_equal_accuracy_interpolates_and_bootstraps(tmp_path):
    """accuracy_noise --equal-accuracy: the curve's pages at the target's accuracy by linear
    interpolation over its running best, the ratio, a paired bootstrap, and the merge of two result
    files of one prompt set (dense must agree)."""
    an = load_script("accuracy_noise")
    pts = [(0.02, 0.6), (0.03, 0.8), (0.04, 0.7), (0.05, 1.0)]  # 0.04 is no better than 0.03
    assert an.curve_pages_at(pts, 0.7) == (pytest.approx(0.025), "")
    assert an.curve_pages_at(pts, 0.9) == (pytest.approx(0.045), "")  # from (0.04, best 0.8)
    assert an.curve_pages_at(pts, 0.5) == (0.02, "below")
    assert an.curve_pages_at([(0.02, 0.6)], 0.7) == (0.02, "above")

    def row(name, pages, scores):
        return {"name": name, "page_fraction": pages, "scores": scores}

    dense = row("dense", 1.0, [1] * 8)
    a = {"rows": [dense, row("topk-1", 0.02, [1, 1, 1, 1, 0, 0, 0, 0]), row("topk-2", 0.04, [1] * 8)]}
    b = {"rows": [dense, row("psa", 0.025, [1, 1, 1, 1, 1, 1, 0, 0])]}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for p, d in zip(paths, (a, b)):
        p.write_text(json.dumps(d))
    eq = an.pages_at_equal_accuracy(an.merged_rows(paths), "psa", ["topk-1", "topk-2"], reps=200)
    assert eq["ratio"] == pytest.approx(0.025 / 0.03)  # accuracy 0.75 sits half way: 0.03 pages
    lo, hi = eq["bootstrap"]["ci95"]
    assert lo <= eq["ratio"] <= hi and 0 <= eq["bootstrap"]["p_ratio_below_1"] <= 1
    assert eq["paired"]["topk-1"] == {"target_won": 2, "target_lost": 0}
    an.main(["--results", ",".join(map(str, paths)), "--equal-accuracy", "psa", "--curve", "topk-1,topk-2",
             "--curve", "topk-2", "--reps", "50"])  # fmt: skip
    b["rows"][0] = row("dense", 1.0, [0] * 8)
    paths[1].write_text(json.dumps(b))
    with pytest.raises(ValueError, match="dense scored differently"):
        an.merged_rows(paths)


def test_error_rule_stops_early_where_unread_pages_would_not_move_the_output():
    """eval_accuracy_hf.error_pages: a head whose pages all hold the same values stops at the floor,
    whatever their masses; a head with one heavy page of distinct values reads until that page is in,
    and a page cap still caps it."""
    import torch

    hf = load_script("eval_accuracy_hf")
    page, n = hf.PAGE, 12
    length = n * page
    s = hf.Setting("e", "error", tau=0.05, rank_by="estimate", min_pages=6, max_pages=12)
    centers = torch.zeros(2, n)
    centers[1, 3] = 4.0  # head 1: page 3 holds most of the mass...
    v = torch.ones(2, length, 4)
    v[1, 3 * page : 4 * page] = -5.0  # ...and values unlike the rest
    centers[1, 2] = 3.9  # ranked just below page 3, same values as the others
    mask, counts = hf.error_pages(s, centers, v, length, n)
    assert counts.tolist()[0] == 6  # sink + local window (5 forced) + 1 to reach the floor
    assert bool(mask[1, 3]) and bool(mask[1, 2]) and counts[1] > 7  # the heavy pages, then some
    s.max_pages = 6
    mask, counts = hf.error_pages(s, centers, v, length, n)
    assert counts.tolist() == [6, 6] and bool(mask[1, 3])  # page 3 ranks first among the unforced
