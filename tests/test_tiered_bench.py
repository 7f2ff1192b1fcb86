"""scripts/bench_tiered.py runs end to end in its tiny --smoke configuration and writes its JSON."""

from __future__ import annotations

import json

from script_loader import load_script


def test_bench_tiered_smoke(tmp_path):
    bench = load_script("bench_tiered")
    doc = bench.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads(open(doc["path"]).read())
    assert saved["commit"] and saved["date"] and saved["device"]
    (shape,) = saved["shapes"]
    assert saved["config"]["placements"] == ["lru", "clock"]
    assert sorted(pool["placement"] for pool in shape["pools"]) == ["clock", "lru"]
    assert shape["resident_ms_per_step"] > 0 and shape["fetch_kernel"]
    for pool in shape["pools"]:
        for mode in ("sync", "host", "overlap"):
            assert pool[mode]["max_abs_diff_vs_resident_last_step"] < 1e-5  # exact: same keys, fp32
            pages = pool[mode]["pages_per_step"]
            assert pages["hits"] + pages["fetched"] + pages["overflow"] == pages["needed"] > 0
        assert 0 <= pool["sync"]["hit_rate"] <= 1


def test_bench_tiered_smoke_per_head_pools(tmp_path):
    bench = load_script("bench_tiered")
    args = ["--smoke", "--out", str(tmp_path), "--placement", "clock", "--fetch-backend", "triton"]
    doc = bench.main([*args, "--granularity", "page,head"])
    (shape,) = json.loads(open(doc["path"]).read())["shapes"]
    assert sorted(pool["granularity"] for pool in shape["pools"]) == ["head", "page"]
    for pool in shape["pools"]:
        assert pool["sync"]["max_abs_diff_vs_resident_last_step"] < 1e-5
        assert pool["host"]["max_abs_diff_vs_resident_last_step"] < 1e-5


def test_bench_fetch_overlap_smoke(tmp_path):
    """scripts/bench_fetch_overlap.py's tiny eager configuration: every variant timed, JSON written."""
    bench = load_script("bench_fetch_overlap")
    doc = bench.main(["--smoke", "--out", str(tmp_path)])
    (saved,) = [json.loads(p.read_text()) for p in tmp_path.glob("fetch-overlap-*.json")]
    assert saved["commit"] and saved["device"] == doc["device"]
    (case,) = saved["cases"]
    assert case["misses_per_layer"] == 8 and case["mib_fetched_per_step"] > 0
    assert {"compute", "serial", "fetch-0", "overlap-0", "fetch-2", "overlap-2"} <= set(case["ms_per_step"])
