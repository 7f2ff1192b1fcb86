#!/usr/bin/env python3
"""Per-stage cost of one PSA decode layer at the shapes the server really runs (GPU).

The server sizes the bounds to its longest possible context (N = context_len / page_size pages),
not to the batch, so a 4k request in a server that admits 140k tokens still pays for N bounds
columns. This script times bounds / select / attend (CUDA graphs) for the bench_one_batch sizes of
issue 4 at that N, next to FlashInfer's dense decode of the same cache, so the decode-step overhead
can be split into stages. Llama-3.1-8B attention shape, bf16, synthetic skewed cache.

    python scripts/profile_decode_stages.py --server-pages 4400 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DTYPE, HKV, HQ, D, bench_ms  # noqa: E402

from sglang_psa.kernels import (  # noqa: E402
    SelectParams,
    alloc_summaries,
    make_skewed_batch,
    page_bounds,
    select_pages,
    sparse_decode,
    update_page_summaries,
)
from sglang_psa.kernels.flashinfer_decode import FlashInferDenseDecode  # noqa: E402
from sglang_psa.provenance import git_commit  # noqa: E402


def profile_point(
    bs: int, ctx: int, p: int, n_server: int, params: SelectParams, centers: bool, dense_below: int = 0,
    select_warps: tuple[int, ...] = (),
) -> dict:  # fmt: skip
    sb = make_skewed_batch(bs, HQ, HKV, D, ctx, p, dtype=DTYPE, device="cuda", skew=0.7, seed=0)
    kmin, kmax = alloc_summaries(sb.k_cache.shape[0], HKV, D, p, DTYPE, "cuda")
    update_page_summaries(sb.k_cache, kmin, kmax, sb.written_slots, p)
    meta = (sb.req_to_token, sb.req_pool_indices, sb.seq_lens)
    cache = (sb.q, sb.k_cache, sb.v_cache, *meta)

    # as the backend calls them: the unused width unwritten, rows below dense_below skipped
    def bounds_fn():
        return page_bounds(sb.q, kmin, kmax, *meta, p, p, sb.sm_scale, n_server, with_centers=centers,
                           skip_below=dense_below, fill=False)  # fmt: skip

    def select_fn(b_, c_, warps=None):
        return select_pages(b_, sb.seq_lens, p, params, mass_logits=c_, dense_below=dense_below,
                            num_warps=warps)  # fmt: skip

    res = bounds_fn()
    bounds, cent = res if centers else (res, None)
    idx, cnt = select_fn(bounds, cent)

    def step():
        r = bounds_fn()
        b_, c_ = r if centers else (r, None)
        i_, n_ = select_fn(b_, c_)
        return sparse_decode(*cache, i_, n_, p, sb.sm_scale)

    fi = FlashInferDenseDecode(sb.q.device)
    fi.plan(*meta, p, HQ, HKV, D, DTYPE, sb.sm_scale)
    t = {
        "bounds": bench_ms(bounds_fn)["ms"],
        "select": bench_ms(lambda: select_fn(bounds, cent))["ms"],
        "attend": bench_ms(lambda: sparse_decode(*cache, idx, cnt, p, sb.sm_scale))["ms"],
        "psa_layer": bench_ms(step)["ms"],
        "flashinfer_dense": bench_ms(lambda: fi.run(sb.q, sb.k_cache, sb.v_cache))["ms"],
    }
    for w in select_warps:  # launch sweep; the selection itself must not change
        same = all(torch.equal(a, b) for a, b in zip(select_fn(bounds, cent, w), (idx, cnt)))
        t[f"select_warps{w}"] = bench_ms(lambda w=w: select_fn(bounds, cent, w))["ms"] if same else None
    t["mean_pages"] = float(cnt.float().mean())
    t["pages_per_request"] = -(-ctx // p)
    torch.cuda.empty_cache()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16x4096,4x32768,1x131072", help="BSxCTX,...")
    ap.add_argument("--page", type=int, default=32)
    ap.add_argument("--server-pages", type=int, default=4400, help="N: context_len / page of the server")
    ap.add_argument("--tau", type=float, default=0.9)
    ap.add_argument("--max-pages", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32, help="to scale per-layer times to a decode step")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    ap.add_argument("--select-warps", default="", help="also time select at these num_warps, e.g. 4,8,16")
    args = ap.parse_args()
    warps = tuple(int(w) for w in args.select_warps.split(",") if w)

    rows = []
    for size in args.sizes.split(","):
        bs, ctx = (int(x) for x in size.split("x"))
        # short: every request below --psa-dense-below (the server's path at 16 x 4k: bounds skipped,
        # select writes all pages without ranking)
        modes = (("estimated", args.tau, True), ("topk", None, False), ("dense", 1.0, False),
                 ("short", args.tau, True))  # fmt: skip
        for mode, tau, centers in modes:
            if mode == "short" and -(-ctx // args.page) > args.max_pages:
                continue  # a request longer than the cap cannot decode densely
            cap = -(-ctx // args.page) if mode == "dense" else args.max_pages
            topk = args.max_pages if mode == "topk" else None
            params = SelectParams(tau=tau or 1.0, sink_pages=1, local_pages=4, max_pages=cap, topk=topk)
            below = ctx + 1 if mode == "short" else 0
            t = profile_point(bs, ctx, args.page, args.server_pages, params, centers, below, warps)
            t.update(bs=bs, ctx=ctx, mode=mode)
            t["psa_step_overhead_ms"] = (t["psa_layer"] - t["flashinfer_dense"]) * args.layers
            rows.append(t)
            print(
                f"{bs:3d} x {ctx:6d} {mode:9s} bounds {t['bounds'] * 1e3:7.1f} us  select "
                f"{t['select'] * 1e3:7.1f} us  attend {t['attend'] * 1e3:7.1f} us  layer "
                f"{t['psa_layer'] * 1e3:7.1f} us  flashinfer {t['flashinfer_dense'] * 1e3:7.1f} us  "
                f"pages {t['mean_pages']:.0f}/{t['pages_per_request']}",
                flush=True,
            )
    prop = torch.cuda.get_device_properties(0)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = {
        "benchmark": "profile_decode_stages",
        "date": stamp,
        "commit": git_commit(),
        "device": prop.name,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "note": "times in ms per layer (CUDA graph); N = server_pages bounds columns, as the server runs",
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    name = f"profile-stages{'-' + args.tag if args.tag else ''}-{stamp}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", os.path.join(args.out, name))


if __name__ == "__main__":
    main()
