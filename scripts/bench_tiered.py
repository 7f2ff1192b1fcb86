#!/usr/bin/env python3
"""Tiered decode on the device (issue 6): resident vs hot pool + pinned host tier, per decode step (GPU).

Llama-3.1-8B attention shape (32 q heads, 8 kv heads, head_dim 128, bf16, page 32), 32 layers. Each
layer's selection: sink page, 4 local pages and the top (budget - 5) pages of a score with a static
per-page popularity (shared by the layer's heads in part) plus an AR(1) drift across steps (--rho),
which gives the temporal locality a prefetch from the previous step relies on; the measured
step-to-step overlap of selections is in the JSON. Every step is one CUDA graph (32 layers):
  resident   sparse_decode over the full device cache;
  sync       DeviceTieredAttention: place, UVA fetch of misses + overflow, attention from the pool;
  host       sync with miss_path "host": misses attended straight from the host tier, their copy into
             the pool on the side stream (--psa-miss-path host);
  split      sync with miss_path "split": misses copied into their slots on the side stream beside
             the resident pages' attention, then attended and merged (--psa-miss-path split);
  overlap    the same as sync, plus layer l+1's prefetch (previous step's union) on a side stream during l;
  nofetch    sync with the host copies skipped (wrong output): the step's cost without fetching;
  direct     (once per shape, no pool) sparse_decode reading the selected pages straight from the
             pinned host tier over UVA (memory/host_kv.cuda_view).
Hot pool sizes are multiples of the per-step budget B (unique pages of all layers in one step, the
mean over steps), capped at the whole cache. Reported per pool size: ms per step, hit rate, bytes
fetched per step, fetch time (sync - nofetch) and the fraction of it hidden by the prefetch
((sync - overlap) / (sync - nofetch)) and by the host / split miss paths ((sync - host) / (sync - nofetch));
plus a micro-benchmark of the fetch kernel (GB/s for full copies, cost of an all-dummy call) for both
pads and several block quotas, and for the Triton compacted
copy (--fetch-backend triton selects it for the step too) at several blocks. The host tier holds one
layer's K/V for every layer (stride-0 layer dim): PCIe traffic is the same, 1 GiB of pinned memory
instead of 32. Writes <out>/tiered-<stamp>.json.

    python scripts/bench_tiered.py --out benchmarks/results           # H100: < 2 min
    python scripts/bench_tiered.py --fetch-backend triton --out benchmarks/results
    python scripts/bench_tiered.py --smoke --out /tmp/x               # CPU, tiny, seconds
    python scripts/bench_tiered.py --fetch-backend triton --placement clock --granularity page,head --out DIR
Each pool size runs per --placement (default lru,clock; recorded as "placement" in each pool row).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

from sglang_psa.kernels import sparse_decode
from sglang_psa.memory.device_pool import union_pages
from sglang_psa.memory.device_tiered import DeviceTieredAttention
from sglang_psa.memory.host_kv import cuda_view
from sglang_psa.memory.hot_pool import HostTier
from sglang_psa.memory.uva_fetch import PageFetcher
from sglang_psa.provenance import git_commit

FULL = dict(hq=32, hkv=8, d=128, page=32, layers=32, budget=160, shapes="1x131072,4x32768", steps=8,
            warmup=3, mults="1,2,4")  # fmt: skip
SMOKE = dict(hq=4, hkv=2, d=64, page=16, layers=2, budget=6, shapes="2x256", steps=2, warmup=1,
             mults="0.5")  # fmt: skip
LOCAL, SINK = 4, 1


class Timer:
    """ms of a callable: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)


def make_selections(steps, layers, bs, hkv, n, budget, rho, dev, seed=0) -> torch.Tensor:
    """page_idx [steps, layers, bs, Hkv, budget] int32 (logical pages; every row full)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    base = torch.randn(layers, bs, 1, n, generator=g, device=dev) + torch.randn(
        layers, bs, hkv, n, generator=g, device=dev
    )  # popularity: half shared by the layer's heads
    drift = torch.randn(layers, bs, hkv, n, generator=g, device=dev)
    j = torch.arange(n, device=dev)
    forced = (j < SINK) | (j >= n - LOCAL)
    out = []
    for _ in range(steps):
        drift = rho * drift + math.sqrt(1 - rho**2) * torch.randn(drift.shape, generator=g, device=dev)
        score = (base + drift).masked_fill(forced, float("inf"))
        out.append(torch.topk(score, budget, dim=-1).indices.to(torch.int32))
    return torch.stack(out)


def selection_overlap(sel: torch.Tensor, n: int) -> float:
    """Mean fraction of a row's pages that the same row selected one step earlier."""
    if sel.shape[0] < 2:
        return float("nan")
    m = torch.zeros(*sel.shape[:-1], n, dtype=torch.bool, device=sel.device)
    m.scatter_(-1, sel.long(), True)
    return float((m[1:] & m[:-1]).sum() / m[1:].sum())


class Shape:
    """One batch: contiguous physical pages per request, host tier, resident cache, selections."""

    def __init__(self, bs, ctx, cfg, dev, dtype, rho):
        p, hkv, d, nl = cfg["page"], cfg["hkv"], cfg["d"], cfg["layers"]
        self.bs, self.ctx, self.p, self.nl = bs, ctx, p, nl
        self.n = ctx // p
        self.num_pages = bs * self.n + 1  # page 0 unused, as in SGLang
        g = torch.Generator(device=dev).manual_seed(1)
        pg = 1 + torch.arange(bs * self.n, device=dev).view(bs, self.n)
        self.r2t = (pg[:, :, None] * p + torch.arange(p, device=dev)).reshape(bs, ctx).to(torch.int32)
        self.rpi = torch.arange(bs, device=dev)
        self.seq = torch.full((bs,), ctx, dtype=torch.int32, device=dev)
        self.q = torch.randn(bs, cfg["hq"], d, generator=g, device=dev).to(dtype)
        shape = (self.num_pages, p, hkv, d)
        self.k = torch.randn(shape, generator=g, device=dev).to(dtype)
        self.v = torch.randn(shape, generator=g, device=dev).to(dtype)
        # host tier: one layer's pages for all layers (stride 0), pinned on a GPU host
        pin = dev.type == "cuda"
        hk, hv = self.k.cpu(), self.v.cpu()
        if pin:
            hk, hv = hk.pin_memory(), hv.pin_memory()
        self.host = HostTier.wrap(hk.expand(nl, *shape), hv.expand(nl, *shape))  # no per-layer copies
        self.k_rows, self.v_rows = self.k.view(-1, hkv, d), self.v.view(-1, hkv, d)
        self.sm_scale = d**-0.5
        steps = cfg["warmup"] + cfg["steps"]
        self.sel = make_selections(steps, nl, bs, hkv, self.n, cfg["budget"], rho, dev)
        self.cnt = torch.full((bs, hkv), cfg["budget"], dtype=torch.int32, device=dev)
        self.width = DeviceTieredAttention.union_width(bs, hkv, cfg["budget"], self.num_pages)
        # per-step budget: unique (layer, physical page) keys of one step, mean over steps
        phys = (self.r2t[:, ::p].long() // p)[None, None, :, None, :].expand(steps, nl, bs, hkv, self.n)
        sel_phys = torch.gather(phys, -1, self.sel.long())
        uniq = [
            int((union_pages(sel_phys[s, layer], self.cnt, self.num_pages, self.width) >= 0).sum())
            for s in range(steps)
            for layer in range(nl)
        ]
        self.step_budget = sum(uniq) / steps
        self.union_mean = sum(uniq) / len(uniq)
        self.idx_buf = torch.empty_like(self.sel[0])


def prepare(shape: Shape, step_fn, graph: bool):
    """A runner of one decode step and a getter of its last outputs; step_fn(idx [L, bs, Hkv, W]) ->
    outputs. With graph, the step is run once eagerly (compiles, allocates) and then captured."""
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step_fn(shape.idx_buf)  # compile / allocate outside the capture
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            outs = step_fn(shape.idx_buf)
        run = g.replay
    else:

        def run():
            nonlocal outs
            outs = step_fn(shape.idx_buf)

        outs = None
    return run, lambda: outs


def bench_resident(shape, cfg, timer, graph, k_rows=None, v_rows=None):
    """sparse_decode over the device cache, or over (k_rows, v_rows) when given (the UVA host view)."""
    k_rows = shape.k_rows if k_rows is None else k_rows
    v_rows = shape.v_rows if v_rows is None else v_rows

    def step(idx):
        return [
            sparse_decode(
                shape.q,
                k_rows,
                v_rows,
                shape.r2t,
                shape.rpi,
                shape.seq,
                idx[layer],
                shape.cnt,
                shape.p,
                shape.sm_scale,
            )  # fmt: skip
            for layer in range(shape.nl)
        ]

    shape.idx_buf.copy_(shape.sel[0])
    run, outs = prepare(shape, step, graph)
    times, last = [], None
    for s in range(shape.sel.shape[0]):
        shape.idx_buf.copy_(shape.sel[s])
        ms = timer(run)
        if s >= cfg["warmup"]:
            times.append(ms)
        last = [o[0].clone() for o in outs()]
    return sum(times) / len(times), last


def bench_tiered(shape, cfg, timer, graph, capacity, fetch_kw, resident_last, granularity="page"):
    """capacity in pages of all kv heads; granularity "head": slots of one kv head's page, same bytes."""
    page_bytes = 2 * shape.k[0].numel() * shape.k.element_size()
    if granularity == "head":
        hkv = shape.k.shape[2]
        width = DeviceTieredAttention.union_width(
            shape.bs, hkv, cfg["budget"], shape.num_pages, head_pages=True
        )
        t = DeviceTieredAttention.build(capacity * hkv, shape.host, width, shape.q.device, head_pages=True,
                                        **fetch_kw)  # fmt: skip
        page_bytes //= hkv  # a slot, a fetch: one head's page
        res = {"capacity_pages": capacity, "granularity": "head",
               "pool_gib": (capacity * hkv + 1 + width) * page_bytes / 2**30}  # fmt: skip
    else:
        t = DeviceTieredAttention.build(capacity, shape.host, shape.width, shape.q.device, **fetch_kw)
        res = {"capacity_pages": capacity, "granularity": "page",
               "pool_gib": (capacity + 1 + shape.width) * page_bytes / 2**30}  # fmt: skip
    for mode in ("sync", "host", "split", "overlap", "nofetch"):
        pre, copy = mode == "overlap", mode != "nofetch"
        t.miss_path = mode if mode in ("host", "split") else "pool"  # read at each call: no rebuild needed

        def step(idx, pre=pre, copy=copy):
            t.begin_step(prefetch_first=pre)
            args = (shape.q, shape.r2t, shape.rpi, shape.seq)
            return [
                t.forward(layer, *args, idx[layer], shape.cnt, shape.sm_scale, prefetch_next=pre, copy=copy)
                for layer in range(shape.nl)
            ]

        shape.idx_buf.copy_(shape.sel[0])
        run, outs = prepare(shape, step, graph)
        t.reset()
        times, before = [], None
        for s in range(shape.sel.shape[0]):
            if s == cfg["warmup"]:
                before = t.stats()
            shape.idx_buf.copy_(shape.sel[s])
            ms = timer(run)
            if s >= cfg["warmup"]:
                times.append(ms)
        after = t.stats()
        d = {k: after[k] - before[k] for k in after}
        n = cfg["steps"]
        row = {
            "ms_per_step": sum(times) / len(times),
            "hit_rate": d["hits"] / max(d["needed"], 1),
            "pages_per_step": {k: v / n for k, v in d.items()},
            "fetched_mib_per_step": (d["fetched"] + d["overflow"] + d["prefetched"]) * page_bytes / n / 2**20,
        }
        if copy:
            diff = max(float((o[0].float() - r.float()).abs().max()) for o, r in zip(outs(), resident_last))
            row["max_abs_diff_vs_resident_last_step"] = diff
        res[mode] = row
    sync, nof = res["sync"]["ms_per_step"], res["nofetch"]["ms_per_step"]
    res["fetch_ms_per_step"] = sync - nof
    hidden_keys = (("overlap", "hidden_fraction"), ("host", "host_hidden_fraction"),
                   ("split", "split_hidden_fraction"))  # fmt: skip
    for mode, key in hidden_keys:
        res[key] = (sync - res[mode]["ms_per_step"]) / (sync - nof) if sync - nof > 1e-6 else float("nan")
    return res


def bench_fetch(shape, timer, pads, quotas, reps=5, triton_blocks=(), host_ptr="auto"):
    """Fetch kernel alone: `width` pages copied (full), every other one (half) and an all-dummy call, per
    pad and block quota of the sgl-kernel path, and per block (elements per program) of the Triton
    compacted copy."""
    dev = shape.q.device
    m = min(shape.width, shape.num_pages - 1)  # distinct host pages (page 0 excluded)
    dst_k = torch.empty(m + 1, *shape.k.shape[1:], dtype=shape.k.dtype, device=dev)
    dst_v = torch.empty_like(dst_k)
    pages = torch.randperm(shape.num_pages - 1, device=dev)[:m].to(torch.int32) + 1
    slots = torch.arange(m, device=dev)
    page_bytes = 2 * shape.k[0].numel() * shape.k.element_size()
    rows = []
    configs = [{"pad": pad, "block_quota": bq} for pad in pads for bq in quotas]
    configs += [{"backend": "triton", "block": blk, "host_ptr": host_ptr} for blk in triton_blocks]
    half = torch.arange(m, device=dev) % 2 == 0
    for kw in configs:
        f = PageFetcher(shape.host, dst_k, dst_v, sink_slot=m, **kw)
        r = {"pad": f.pad, "backend": f.backend, "block_quota": kw.get("block_quota"), "pages": m}
        if f.backend == "triton":
            r.update(pad=None, block=f.block, host_ptr=f.host_ptr)
        for name, mask in (("full", torch.ones(m, dtype=torch.bool, device=dev)), ("half", half),
                           ("dummy", torch.zeros(m, dtype=torch.bool, device=dev))):  # fmt: skip
            f.copy(0, pages, slots, mask)  # warm-up
            ms = min(timer(lambda f=f, mask=mask: f.copy(0, pages, slots, mask)) for _ in range(reps))
            r[f"{name}_ms"] = ms
        r["full_gbs"] = m * page_bytes / r["full_ms"] / 1e6
        if f.backend == "torch" and dev.type == "cuda":
            r["note"] = "torch fallback (host-side gather), eager"
        rows.append(r)
    return rows


def _write(doc: dict, path: str, t0: float) -> None:
    doc["wall_s"] = time.perf_counter() - t0
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny config (runs on the CPU)")
    ap.add_argument("--shapes", help="bs x ctx list, e.g. 1x131072,4x32768")
    ap.add_argument("--mults", help="hot pool sizes as multiples of the per-step budget")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--rho", type=float, default=0.9, help="step-to-step correlation of page scores")
    ap.add_argument("--pad", default="device", choices=["device", "host"])
    ap.add_argument("--block-quota", type=int, default=8)
    ap.add_argument(
        "--fetch-backend",
        default="sgl",
        choices=["sgl", "triton"],
        help="sgl: sgl-kernel transfer_kv (M*P items); triton: compacted copy (page_copy.py)",
    )
    ap.add_argument("--fetch-block", type=int, default=4096, help="triton: elements per program")
    ap.add_argument(
        "--host-ptr",
        default="auto",
        choices=["auto", "tensor", "int"],
        help="triton: how the pinned host tier reaches the kernel",
    )
    ap.add_argument("--prefetch-programs", type=int, default=66,
                    help="grid of the side-stream copies (prefetch, host / split miss paths); the server's "
                    "--psa-prefetch-programs default; 0: the main copy's grid (8 per SM)")  # fmt: skip
    ap.add_argument("--no-graph", action="store_true")
    ap.add_argument(
        "--placement",
        default="lru,clock",
        help="pool policies to run, comma-separated: lru (torch ops, global LRU) and/or clock "
        "(fused Triton union/place/table, memory/fused_place.py); default both",
    )
    ap.add_argument(
        "--granularity",
        default="page",
        help="hot-pool slots: page (all kv heads) and/or head (one kv head's page, head_pages; needs "
        "--fetch-backend triton); comma-separated",
    )
    args = ap.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)
    for k in ("shapes", "mults", "steps"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.smoke:
        sys.exit("bench_tiered.py needs a CUDA GPU (or --smoke)")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    graph = dev.type == "cuda" and not args.no_graph
    timer = Timer(dev)
    fetch_kw = {"pad": args.pad, "block_quota": args.block_quota}
    if args.fetch_backend == "triton":
        fetch_kw = {"backend": "triton", "block": args.fetch_block, "host_ptr": args.host_ptr}
    fetch_kw["prefetch_programs"] = args.prefetch_programs or None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    doc = {
        "benchmark": "bench_tiered", "date": stamp, "commit": git_commit(),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "config": {**cfg, "dtype": str(dtype), "rho": args.rho, "cuda_graph": graph, **fetch_kw,
                   "sink_pages": SINK, "local_pages": LOCAL, "smoke": args.smoke},
        "shapes": [],
    }  # fmt: skip
    placements = args.placement.split(",")
    if not placements or any(x not in ("lru", "clock") for x in placements):
        sys.exit(f"--placement: lru and/or clock, got {args.placement!r}")
    doc["config"]["placements"] = placements
    granularities = args.granularity.split(",")
    if not granularities or any(x not in ("page", "head") for x in granularities):
        sys.exit(f"--granularity: page and/or head, got {args.granularity!r}")
    if "head" in granularities and args.fetch_backend != "triton":
        sys.exit("--granularity head copies a strided head slice: it needs --fetch-backend triton")
    doc["config"]["granularities"] = granularities
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tiered-{'smoke-' if args.smoke else ''}{stamp}.json")
    for spec in cfg["shapes"].split(","):
        bs, ctx = (int(x) for x in spec.split("x"))
        shape = Shape(bs, ctx, cfg, dev, dtype, args.rho)
        row = {"bs": bs, "ctx": ctx, "pages_per_request": shape.n, "union_width": shape.width,
               "union_mean_pages_per_layer": shape.union_mean, "step_budget_pages": shape.step_budget,
               "selection_overlap_step_to_step": selection_overlap(shape.sel, shape.n)}  # fmt: skip
        row["resident_ms_per_step"], last = bench_resident(shape, cfg, timer, graph)
        if dev.type == "cuda":  # no pool: the attention kernel reads the selected pages over PCIe
            hk, hv = (cuda_view(t[0]).view(-1, *t.shape[-2:]) for t in (shape.host.k, shape.host.v))
            row["direct_uva_ms_per_step"], d_last = bench_resident(shape, cfg, timer, graph, hk, hv)
            row["direct_uva_max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(d_last, last))
            print(f"{spec}: resident {row['resident_ms_per_step']:.2f} ms/step, direct over UVA "
                  f"{row['direct_uva_ms_per_step']:.2f} ms/step", flush=True)  # fmt: skip
        row["pools"] = []
        for mult in (float(x) for x in cfg["mults"].split(",")):
            cap = min(int(round(mult * shape.step_budget)), shape.nl * shape.num_pages)
            for placement, gran in ((p_, g_) for p_ in placements for g_ in granularities):
                kw = {**fetch_kw, "policy": placement}  # build() passes the policy to the pool(s)
                r = bench_tiered(shape, cfg, timer, graph, cap, kw, last, gran)
                row["pools"].append({"mult": mult, "placement": placement, **r})
                if graph:
                    torch.cuda.empty_cache()  # the pool (and its graphs) are gone: give the memory back
                print(f"{spec} pool {mult}x ({cap} pages) {placement} {gran}: resident "
                      f"{row['resident_ms_per_step']:.2f} ms, "
                      f"sync {r['sync']['ms_per_step']:.2f}, host {r['host']['ms_per_step']:.2f}, "
                      f"split {r['split']['ms_per_step']:.2f}, "
                      f"overlap {r['overlap']['ms_per_step']:.2f}, "
                      f"nofetch {r['nofetch']['ms_per_step']:.2f} ms/step, hit {r['sync']['hit_rate']:.2f}, "
                      f"hidden {r['hidden_fraction']:.2f} (host path {r['host_hidden_fraction']:.2f}, "
                      f"split {r['split_hidden_fraction']:.2f})",
                      flush=True)  # fmt: skip
        pads = ["device", "host"] if dev.type == "cuda" else ["host"]
        quotas = [2, 8, 32] if dev.type == "cuda" else [2]
        doc["shapes"].append(row)
        _write(doc, path, t0)  # after each part, so a later failure keeps what was measured
        blocks = [2048, 4096, 8192] if dev.type == "cuda" else [1024]
        hp = args.host_ptr
        row["fetch_kernel"] = bench_fetch(shape, timer, pads, quotas, triton_blocks=blocks, host_ptr=hp)
        _write(doc, path, t0)
        del shape
    print(f"wrote {path} ({doc['wall_s']:.1f} s)")
    doc["path"] = path
    return doc


if __name__ == "__main__":
    main()
