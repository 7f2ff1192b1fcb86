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
    copy = res["streams"]["9"]["top"][0]
    assert copy["name"] == "_copy_pages_kernel" and copy["us_per_step"] == 20.0
    assert copy["beside_main_us_per_step"] == 15.0 and "beside_main_us_per_step" not in main["top"][0]


def test_beside_main_counts_each_main_interval_once():
    # main kernels overlap each other (two graph branches on one stream id): merged before counting
    events = [
        kernel("gemm", 1, 0, 100),
        kernel("attn", 1, 50, 100),  # main busy 0-150, 200-210
        kernel("norm", 1, 200, 10),
        kernel("_copy_pages_kernel", 2, 40, 200),  # 40-240: 110 + 10 beside main
        kernel("_copy_pages_kernel", 2, 300, 5),  # after main's last kernel: 0
    ]
    res = prof.summarize(events, 1)
    row = res["streams"]["2"]["top"][0]
    assert row["us_per_step"] == 205.0 and row["beside_main_us_per_step"] == 120.0
    assert res["overlapped_with_main_us_per_step"] == 120.0


def test_summary_refuses_a_trace_without_kernels():
    with pytest.raises(ValueError, match="no GPU kernels"):
        prof.summarize([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 1}], 1)
