#!/usr/bin/env python3
"""Can the tiered fetch hide behind a decode layer's compute? The mechanism alone (issue 6, GPU).

The server's tiered runs hide ~5% of their fetch time with next-layer prefetch
(benchmarks/results/tiered-overlap-*.json), which mixes three things: how well layer l+1's pages are
predicted, what the prediction costs, and whether a copy on a side stream overlaps compute at all.
This takes the last one alone, with a perfect prediction. L layers, each:
  compute   `gemms` x (x [bs, hidden] @ W [hidden, N]): W is one Llama-3.1-8B layer's linear weights
            (436 MiB, larger than L2), so a GEMM streams HBM like a decode step's projections;
  fetch     PageFetcher.copy of `misses` random head pages (the server's per-layer miss count at 98.5%
            hits) out of a union of `width` entries (compaction included), from a pinned host tier of
            `host_gib`, over UVA (memory/page_copy.py, the tiered mode's copy).
Each variant is one CUDA graph of L layers, timed over replays (median):
  compute        the GEMMs only
  fetch-P        the fetches only, P programs (0 = page_copy's default grid, 8 per SM)
  serial         fetch(l) then compute(l) on one stream (tiered mode without prefetch)
  overlap-P      fetch(l+1) on a side stream with P programs while compute(l) runs, joined before
                 layer l+1 (next-layer prefetch with a perfect prediction; layer 0's fetch is exposed)
hidden(P) = (serial - overlap-P) / (serial - compute). Two host tier sizes tell whether scattered reads
of a large pinned tier (66 GiB in the server runs) are slower than of a small one.

    python scripts/bench_fetch_overlap.py --out benchmarks/results              # H100/H200: ~1 min
    TRITON_INTERPRET=1 python scripts/bench_fetch_overlap.py --smoke --out /tmp/x   # CPU, eager
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_psa.memory.hot_pool import HostTier  # noqa: E402
from sglang_psa.memory.uva_fetch import PageFetcher  # noqa: E402
from sglang_psa.provenance import git_commit  # noqa: E402

FULL = dict(layers=32, bs=8, hidden=4096, weights_mib=436, gemms=4, hkv=8, d=128, page=32, width=10240,
            misses="160,640", host_gib="1,32", programs="0,264,66,16", reps=20)  # fmt: skip
SMOKE = dict(layers=3, bs=2, hidden=64, weights_mib=1, gemms=1, hkv=2, d=16, page=4, width=64,
             misses="8", host_gib="0.001", programs="0,2", reps=1)  # fmt: skip


class Layers:
    """The weights, the host tier, the pool and each layer's fetch arguments."""

    def __init__(self, c: argparse.Namespace, misses: int, host_gib: float, dev: torch.device):
        self.c, self.dev, self.cuda = c, dev, dev.type == "cuda"
        dt = torch.bfloat16 if self.cuda else torch.float16
        n = max(1, int(c.weights_mib * 2**20) // (c.hidden * 2))
        self.x = torch.randn(c.bs, c.hidden, device=dev, dtype=dt)
        self.w = torch.randn(c.hidden, n, device=dev, dtype=dt) * 0.01
        page_bytes = 2 * c.page * c.hkv * c.d * 2  # K + V of one page (all kv heads)
        num_pages = max(c.width, int(host_gib * 2**30) // page_bytes)
        shape = (num_pages, c.page, c.hkv, c.d)
        # torch.empty: the bytes need not be set for timing, and pinning tens of GiB is slow enough as it is
        hk = torch.empty(shape, dtype=dt, pin_memory=self.cuda)
        hv = torch.empty(shape, dtype=dt, pin_memory=self.cuda)
        self.host = HostTier.wrap(hk.expand(c.layers, *shape), hv.expand(c.layers, *shape))
        self.host_gib = 2 * hk.numel() * hk.element_size() / 2**30
        self.dst_k = torch.zeros(c.width + 1, c.page, 1, c.d, device=dev, dtype=dt)  # head-page slots
        self.dst_v = torch.zeros_like(self.dst_k)
        self.fetcher = PageFetcher(self.host, self.dst_k, self.dst_v, sink_slot=c.width, backend="triton",
                                   head_pages=True)  # fmt: skip
        g = torch.Generator().manual_seed(0)
        # head page h * num_pages + p, anywhere in the tier (a repeat now and then copies twice)
        self.pages = torch.randint(num_pages * c.hkv, (c.layers, c.width), generator=g).to(dev, torch.int32)
        self.slots = torch.arange(c.width, device=dev, dtype=torch.int32)
        mask = torch.zeros(c.layers, c.width, dtype=torch.bool)
        for layer in range(c.layers):
            mask[layer, torch.randperm(c.width, generator=g)[:misses]] = True
        self.mask = mask.to(dev)
        self.side = torch.cuda.Stream(device=dev) if self.cuda else None
        self.events = [torch.cuda.Event() for _ in range(c.layers)] if self.cuda else []

    def compute(self) -> None:
        for _ in range(self.c.gemms):
            torch.matmul(self.x, self.w)

    def fetch(self, layer: int, programs: int) -> None:
        mask, grid = self.mask[layer], programs or None
        self.fetcher.copy(layer, self.pages[layer], self.slots, mask, max_programs=grid)

    # ------------------------------------------------------------------ the variants (one step each)
    def step_compute(self) -> None:
        for _ in range(self.c.layers):
            self.compute()

    def step_fetch(self, programs: int) -> None:
        for layer in range(self.c.layers):
            self.fetch(layer, programs)

    def step_serial(self) -> None:
        for layer in range(self.c.layers):
            self.fetch(layer, 0)
            self.compute()

    def step_overlap(self, programs: int) -> None:
        if not self.cuda:  # eager CPU smoke: the same calls, in order
            self.step_serial()
            return
        main = torch.cuda.current_stream(self.dev)
        self.fetch(0, 0)
        for layer in range(self.c.layers):
            nxt = layer + 1 < self.c.layers
            if nxt:
                self.side.wait_stream(main)  # the pool state main wrote so far comes first
                with torch.cuda.stream(self.side):
                    self.fetch(layer + 1, programs)
                    self.events[layer + 1].record(self.side)
            self.compute()
            if nxt:
                main.wait_event(self.events[layer + 1])


def time_step(fn, reps: int, cuda: bool) -> float:
    """Median ms of one replay of fn captured as a CUDA graph (eager on the CPU)."""
    if not cuda:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile and allocate outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def run_case(c: argparse.Namespace, misses: int, host_gib: float, programs: list[int], dev) -> dict:
    lay = Layers(c, misses, host_gib, dev)
    ms = {"compute": time_step(lay.step_compute, c.reps, lay.cuda),
          "serial": time_step(lay.step_serial, c.reps, lay.cuda)}  # fmt: skip
    for p in programs:
        ms[f"fetch-{p}"] = time_step(lambda p=p: lay.step_fetch(p), c.reps, lay.cuda)
        ms[f"overlap-{p}"] = time_step(lambda p=p: lay.step_overlap(p), c.reps, lay.cuda)
    fetch_exposed = ms["serial"] - ms["compute"]
    mib = c.layers * misses * 2 * c.page * c.d * 2 / 2**20  # head pages: K + V of one kv head
    row = {"misses_per_layer": misses, "host_gib": round(lay.host_gib, 3), "ms_per_step": ms,
           "mib_fetched_per_step": round(mib, 2), "fetch_ms_serial": fetch_exposed,
           "fetch_gb_s": {p: mib * 2**20 / ms[f"fetch-{p}"] / 1e6 for p in programs},
           "hidden_fraction": {p: (ms["serial"] - ms[f"overlap-{p}"]) / fetch_exposed if fetch_exposed > 0
                               else None for p in programs}}  # fmt: skip
    return row


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, eager (CPU with TRITON_INTERPRET=1)")
    for k, v in FULL.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=None)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    for k, v in (SMOKE if a.smoke else FULL).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    programs = [int(p) for p in a.programs.split(",")]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    doc = {"benchmark": "bench_fetch_overlap", "date": stamp, "commit": git_commit(),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "config": {k: getattr(a, k) for k in FULL}, "cases": []}  # fmt: skip
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"fetch-overlap-{stamp}.json")
    for host_gib in (float(h) for h in a.host_gib.split(",")):
        for misses in (int(m) for m in a.misses.split(",")):
            row = run_case(a, misses, host_gib, programs, dev)
            doc["cases"].append(row)
            hid = ", ".join(f"P={p}: {h:.2f}" for p, h in row["hidden_fraction"].items() if h is not None)
            ms = row["ms_per_step"]
            print(f"host {row['host_gib']:.1f} GiB, {misses} misses/layer: compute {ms['compute']:.2f}, "
                  f"serial {ms['serial']:.2f} ms; hidden {hid}", flush=True)  # fmt: skip
            with open(path, "w") as f:  # after every case: a timeout keeps what was measured
                json.dump(doc, f, indent=1)
    print("wrote", path)
    return doc


if __name__ == "__main__":
    main()
