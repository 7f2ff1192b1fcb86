"""scripts/profile_server_decode.py summarize: kernel time per step by stream, busy and overlapped time."""

from __future__ import annotations

import gzip
import json

import pytest
from script_loader import load_script

prof = load_script("profile_server_decode")


def kernel(name: str, stream: int, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}


def test_summary_splits_streams_and_counts_overlap(tmp_path):
    events = [
        kernel("void gemm<float, 128>(float*, int)", 7, 0, 60),
        kernel("_copy_pages_kernel", 7, 60, 20),
        kernel("void gemm<float, 128>(float*, int)", 7, 100, 60),
        kernel("_copy_pages_kernel", 9, 10, 30),  # beside main's gemm: 30 us overlapped
        kernel("_copy_pages_kernel", 9, 85, 10),  # main idle: not overlapped
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500},  # not a kernel
    ]
    path = tmp_path / "decode-TP-0.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = tmp_path / "s.json"
    args = ["summarize", str(tmp_path), "--steps", "2", "--out", str(out), "--meta", '{"run": "x"}']
    assert prof.main(args) == 0
    res = json.loads(out.read_text())
    assert res["run"] == "x" and res["main_stream"] == "7" and res["span_us_per_step"] == 80.0
    main = res["streams"]["7"]
    assert main["kernel_us_per_step"] == 70.0 and main["busy_us_per_step"] == 70.0
    assert main["top"][0] == {"name": "gemm", "calls_per_step": 1.0, "us_per_step": 60.0, "us_per_call": 60.0}
    assert res["other_streams_busy_us_per_step"] == 20.0 and res["overlapped_with_main_us_per_step"] == 15.0
    # copies: 20 us (main, beside nothing), 30 us (beside the gemm), 10 us (alone): 30 of 60 hidden
    assert res["streams_total"] == 2
    assert res["hidden"] == {
        "pattern": "_copy_pages_kernel", "calls_per_step": 1.5, "us_per_step": 30.0,
        "beside_other_kernels_us_per_step": 15.0, "hidden_fraction": 0.5,
        "ended_beside_other_kernels": 0.3333,
        "us_per_call_p10_p50_p90": [10.0, 20.0, 20.0],
    }  # fmt: skip


def test_hidden_counts_any_stream_and_each_interval_once():
    # under graph replay the copy may sit on the busiest stream and the layer's attention on branches
    events = [
        kernel("gemm", 1, 0, 300),
        kernel("_copy_pages_kernel", 1, 300, 50),  # 300-350: beside attn on 2 and 3 (overlapping: once)
        kernel("attn", 2, 290, 40),
        kernel("attn", 3, 310, 60),  # runs past the copy's end: the copy ended beside it
        kernel("_copy_pages_kernel", 1, 400, 20),  # alone: not hidden, ended alone
    ]
    res = prof.summarize(events, 1, max_streams=1)
    assert res["main_stream"] == "1" and list(res["streams"]) == ["1"] and res["streams_total"] == 3
    h = res["hidden"]
    assert h["us_per_step"] == 70.0 and h["beside_other_kernels_us_per_step"] == 50.0
    assert h["hidden_fraction"] == round(50 / 70, 4) and h["ended_beside_other_kernels"] == 0.5
    assert prof.summarize(events, 1, hidden_pattern="nothing")["hidden"]["hidden_fraction"] is None


def test_summary_refuses_a_trace_without_kernels():
    with pytest.raises(ValueError, match="no GPU kernels"):
        prof.summarize([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1}], 1)
