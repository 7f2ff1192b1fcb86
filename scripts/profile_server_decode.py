#!/usr/bin/env python3
"""Where a running server's decode step spends its GPU time, by kernel and CUDA stream (issue 6).

The tiered runs expose ~4 ms of fetch a step (step time with copies minus without) for ~40-55 MiB,
about twice what the same bytes cost in scripts/bench_fetch_overlap.py, and moving half of the pages
ahead on the side stream (--psa-prefetch next-step) hid almost none of it. This tells which kernels
the time goes to, on which stream, through SGLang's own profiler endpoint (torch.profiler, GPU
activity only; kernels replayed from CUDA graphs are recorded too):

    capture    POST /start_profile {output_dir, num_steps, activities: [GPU]} on a server that is
               decoding, then wait for the trace file (SGLang writes it after num_steps forward steps);
    summarize  read the trace (*.trace.json.gz): per stream, kernel time per step by kernel name (top
               --top), busy time, and the time the streams overlap; for the kernels named by
               --hidden (default the tiered miss copy, _copy_pages_kernel): their time, the part of it
               any other kernel ran beside (on any stream: under CUDA-graph replay a graph's branches
               get their own stream ids, and the copy may be on the busiest one), and how many of them
               ended while another kernel still ran (the copy was not what the next kernel waited
               for). That fraction is the fetch hidden behind compute on the timeline; a copy that slows
               the kernels beside it still counts as hidden there, and the step-time twin
               (bench_capacity merge: step time with and without host copies) charges that; JSON out.

    python scripts/profile_server_decode.py capture --url http://127.0.0.1:30000 --steps 6 --dir /tmp/prof
    python scripts/profile_server_decode.py summarize /tmp/prof --steps 6 --out prof.json
"""

from __future__ import annotations

import argparse
import bisect
import glob
import gzip
import json
import os
import re
import sys
import time
import urllib.request
from collections import defaultdict


def capture(url: str, steps: int, out_dir: str, timeout: float = 180.0) -> str:
    """Start a GPU profile of `steps` forward steps; return the trace file once written."""
    os.makedirs(out_dir, exist_ok=True)
    body = {"output_dir": out_dir, "num_steps": steps, "activities": ["GPU"], "profile_id": "decode"}
    req = urllib.request.Request(url + "/start_profile", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    urllib.request.urlopen(req, timeout=60).read()
    end = time.time() + timeout
    while time.time() < end:
        files = _trace_files(out_dir)
        if files and all(_settled(f) for f in files):
            return files[0]
        time.sleep(2)
    raise TimeoutError(f"no trace in {out_dir} after {timeout:.0f} s")


def _trace_files(folder: str) -> list[str]:
    """The profiler's trace files anywhere under folder (SGLang nests them by profile id)."""
    return glob.glob(os.path.join(folder, "**", "*.trace.json*"), recursive=True)


def _settled(path: str) -> bool:
    """The file stopped growing (the profiler writes it in one go, but a gzip takes a moment)."""
    size = os.path.getsize(path)
    time.sleep(1)
    return size > 0 and os.path.getsize(path) == size


def _load(path: str) -> list[dict]:
    if os.path.isdir(path):
        files = _trace_files(path)
        if not files:
            raise FileNotFoundError(f"no *.trace.json* under {path}")
        path = files[0]
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def short_name(name: str) -> str:
    """A kernel's name without return type, namespaces, template arguments and parameter lists."""
    bare = re.sub(r"\(.*\)", "", re.sub(r"<.*>", "", name)).split("::")[-1].split()
    return bare[-1] if bare else name


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of spans as disjoint intervals, sorted."""
    out: list[list[float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _union_us(spans: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in _merged(spans))


def _inside_us(s: float, e: float, cover: list[tuple[float, float]], starts: list[float]) -> float:
    """Time of [s, e) inside the merged, sorted intervals cover (starts: their start times)."""
    i, total = max(bisect.bisect_right(starts, s) - 1, 0), 0.0
    while i < len(cover) and cover[i][0] < e:
        total += max(0.0, min(e, cover[i][1]) - max(s, cover[i][0]))
        i += 1
    return total


def hidden(kernels: list[dict], pattern: str, steps: int) -> dict:
    """The kernels whose short name matches `pattern` (regex): time per step, the part of it other
    kernels ran beside, the fraction, and the share of them that ended while another kernel ran."""
    rx = re.compile(pattern)
    mine, rest = [], []
    for e in kernels:
        (mine if rx.search(short_name(e["name"])) else rest).append(e)
    cover = _merged([(e["ts"], e["ts"] + e["dur"]) for e in rest])
    starts = [c[0] for c in cover]
    total = sum(e["dur"] for e in mine)
    beside = sum(_inside_us(e["ts"], e["ts"] + e["dur"], cover, starts) for e in mine)
    ended = sum(_inside_us(e["ts"] + e["dur"], e["ts"] + e["dur"] + 1e-3, cover, starts) > 0 for e in mine)
    durs = sorted(e["dur"] for e in mine)
    return {
        "pattern": pattern, "calls_per_step": round(len(mine) / steps, 1),
        "us_per_step": round(total / steps, 1), "beside_other_kernels_us_per_step": round(beside / steps, 1),
        "hidden_fraction": round(beside / total, 4) if total else None,
        "ended_beside_other_kernels": round(ended / len(mine), 4) if mine else None,
        "us_per_call_p10_p50_p90": [round(durs[int(q * (len(durs) - 1))], 1) for q in (0.1, 0.5, 0.9)]
        if durs else [],
    }  # fmt: skip


def _row(name: str, calls: int, us: float, steps: int) -> dict:
    return {"name": name, "calls_per_step": round(calls / steps, 1), "us_per_step": round(us / steps, 1),
            "us_per_call": round(us / calls, 2)}  # fmt: skip


def summarize(
    events: list[dict],
    steps: int,
    top: int = 25,
    hidden_pattern: str = "_copy_pages_kernel",
    max_streams: int = 0,
) -> dict:
    """Kernel time per step by stream and name; busy and overlapped time; the --hidden kernels' overlap
    (see the module docstring). max_streams > 0 lists only that many streams, busiest first."""
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]
    if not kernels:
        raise ValueError("the trace holds no GPU kernels (profile with activities GPU)")
    by_stream: dict[str, list[dict]] = defaultdict(list)
    for e in kernels:
        by_stream[str(e.get("args", {}).get("stream", e.get("tid")))].append(e)
    spans = {s: [(e["ts"], e["ts"] + e["dur"]) for e in ev] for s, ev in by_stream.items()}
    t0 = min(e["ts"] for e in kernels)
    t1 = max(e["ts"] + e["dur"] for e in kernels)
    streams = {}
    for s, ev in sorted(by_stream.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        names: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for e in ev:
            n = names[short_name(e["name"])]
            n[0] += 1
            n[1] += e["dur"]
        ranked = sorted(names.items(), key=lambda kv: -kv[1][1])
        streams[s] = {
            "kernels_per_step": round(len(ev) / steps, 1),
            "kernel_us_per_step": round(sum(e["dur"] for e in ev) / steps, 1),
            "busy_us_per_step": round(_union_us(spans[s]) / steps, 1),
            "top": [_row(k, c, us, steps) for k, (c, us) in ranked[:top]],
        }
    main = next(iter(streams))
    total_streams = len(streams)
    if max_streams > 0:
        streams = dict(list(streams.items())[:max_streams])
    others = [sp for s, sp in spans.items() if s != main]
    other_busy = _union_us([x for sp in others for x in sp])
    both = _union_us(spans[main]) + other_busy - _union_us([x for sp in spans.values() for x in sp])
    return {
        "steps": steps,
        "span_us_per_step": round((t1 - t0) / steps, 1),
        "main_stream": main,
        "other_streams_busy_us_per_step": round(other_busy / steps, 1),
        "overlapped_with_main_us_per_step": round(both / steps, 1),
        "hidden": hidden(kernels, hidden_pattern, steps),
        "streams_total": total_streams,
        "streams": streams,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=["capture", "summarize"])
    p.add_argument("path", nargs="?", help="summarize: a trace file or the folder holding it")
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--dir", default="/tmp/psa_profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--hidden", default="_copy_pages_kernel", help="regex: kernels whose overlap to report")
    p.add_argument("--max-streams", type=int, default=0, help="list only the N busiest streams (0: all)")
    p.add_argument("--meta", default="{}", help="JSON merged into the summary (device, commit, config)")
    p.add_argument("--out")
    a = p.parse_args(argv)
    if a.steps < 1:
        p.error("--steps must be >= 1")
    if a.cmd == "capture":
        print(capture(a.url, a.steps, a.dir))
        return 0
    if not a.path:
        p.error("summarize needs the trace path")
    res = {**json.loads(a.meta), **summarize(_load(a.path), a.steps, a.top, a.hidden, a.max_streams)}
    text = json.dumps(res, separators=(",", ":"))
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    main_s = res["streams"][res["main_stream"]]
    print(f"span {res['span_us_per_step']} us/step; main stream {main_s['busy_us_per_step']} us busy; "
          f"other streams {res['other_streams_busy_us_per_step']} us busy, "
          f"{res['overlapped_with_main_us_per_step']} us of it beside main")  # fmt: skip
    h = res["hidden"]
    print(f"{h['pattern']}: {h['us_per_step']} us/step, {h['beside_other_kernels_us_per_step']} us "
          f"beside other kernels (hidden {h['hidden_fraction']}); "
          f"{h['ended_beside_other_kernels']} of calls ended beside them")  # fmt: skip
    for s, v in res["streams"].items():
        print(f"stream {s}: {v['kernel_us_per_step']} us/step in {v['kernels_per_step']} kernels")
        for k in v["top"][:12]:
            print(f"   {k['us_per_step']:9.1f} us  {k['calls_per_step']:7.1f} x  {k['name'][:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
