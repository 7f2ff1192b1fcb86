"""scripts/bench_capacity.py merge: ratios against the baseline and the tiered fetch overlap."""

from __future__ import annotations

import json

from script_loader import load_script

cap = load_script("bench_capacity")


def run(label: str, tok_s: float, peak: int = 8) -> dict:
    return {"label": label, "peak_concurrency": peak, "decode_tok_s_at_peak": tok_s}


def test_merge_computes_exposed_and_hidden_fetch(tmp_path):
    runs = [run("flashinfer", 200.0, peak=4), run("tiered_head", 400.0), run("tiered_head_nocopy", 640.0),
            run("tiered_head_nl", 500.0), run("tiered_head_nl_nocopy", 640.0),
            run("tiered_head_prev", 300.0, peak=6), run("tiered_head_prev_nocopy", 640.0),
            run("tiered_head_ns_m64", 450.0), run("tiered_head_ns_m64_nocopy", 640.0),
            run("tiered_head_host", 600.0), run("tiered_head_split_ns_m96", 480.0),
            run("tiered_head_p132", 400.0)]  # fmt: skip
    files = []
    for r in runs:
        files.append(tmp_path / f"{r['label']}.json")
        files[-1].write_text(json.dumps(r))
    out = tmp_path / "merged.json"
    assert cap.main(["merge", "--baseline", "flashinfer", "--out", str(out), *map(str, files)]) == 0
    res = json.loads(out.read_text())
    tiered = next(r for r in res["runs"] if r["label"] == "tiered_head")
    assert tiered["concurrency_vs_baseline"] == 2 and tiered["throughput_vs_baseline"] == 2
    fetch = res["fetch"]
    assert fetch["step_ms"]["tiered_head"] == 20.0 and fetch["step_ms"]["tiered_head_nocopy"] == 12.5
    assert fetch["exposed_fetch_ms"] == {
        "tiered_head": 7.5,
        "tiered_head_nl": 3.5,  # prev: peaks differ
        "tiered_head_ns_m64": 5.278,
        "tiered_head_host": 0.833,  # against tiered_head_nocopy: no copies, no miss path
        "tiered_head_split_ns_m96": 4.167,  # no prefetch either
        "tiered_head_p132": 7.5,  # the pool path with another side-stream grid: nothing overlaps
    }
    # a prefetch's own options (_m64: next-step margin) leave the label it is compared with
    assert fetch["hidden"] == {
        "tiered_head_nl": {"vs": "tiered_head", "hidden_fraction": 0.533},
        "tiered_head_ns_m64": {"vs": "tiered_head", "hidden_fraction": 0.296},
        "tiered_head_host": {"vs": "tiered_head", "hidden_fraction": 0.889},
        # several tags: against the pool path without any of them
        "tiered_head_split_ns_m96": {"vs": "tiered_head", "hidden_fraction": 0.444},
    }
