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
from bench_kernels import DTYPE, HKV, HQ, D, bench_ms, git_commit  # noqa: E402

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


def profile_point(bs: int, ctx: int, p: int, n_server: int, params: SelectParams, centers: bool) -> dict:
    sb = make_skewed_batch(bs, HQ, HKV, D, ctx, p, dtype=DTYPE, device="cuda", skew=0.7, seed=0)
    kmin, kmax = alloc_summaries(sb.k_cache.shape[0], HKV, D, p, DTYPE, "cuda")
    update_page_summaries(sb.k_cache, kmin, kmax, sb.written_slots, p)
    meta = (sb.req_to_token, sb.req_pool_indices, sb.seq_lens)
    cache = (sb.q, sb.k_cache, sb.v_cache, *meta)

    def bounds_fn():
        return page_bounds(sb.q, kmin, kmax, *meta, p, p, sb.sm_scale, n_server, with_centers=centers)

    res = bounds_fn()
    bounds, cent = res if centers else (res, None)
    idx, cnt = select_pages(bounds, sb.seq_lens, p, params, mass_logits=cent)

    def step():
        r = bounds_fn()
        b_, c_ = r if centers else (r, None)
        i_, n_ = select_pages(b_, sb.seq_lens, p, params, mass_logits=c_)
        return sparse_decode(*cache, i_, n_, p, sb.sm_scale)

    fi = FlashInferDenseDecode(sb.q.device)
    fi.plan(*meta, p, HQ, HKV, D, DTYPE, sb.sm_scale)
    t = {
        "bounds": bench_ms(bounds_fn)["ms"],
        "select": bench_ms(lambda: select_pages(bounds, sb.seq_lens, p, params, mass_logits=cent))["ms"],
        "attend": bench_ms(lambda: sparse_decode(*cache, idx, cnt, p, sb.sm_scale))["ms"],
        "psa_layer": bench_ms(step)["ms"],
        "flashinfer_dense": bench_ms(lambda: fi.run(sb.q, sb.k_cache, sb.v_cache))["ms"],
    }
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
    args = ap.parse_args()

    rows = []
    for size in args.sizes.split(","):
        bs, ctx = (int(x) for x in size.split("x"))
        modes = (("estimated", args.tau, True), ("topk", None, False), ("dense", 1.0, False))
        for mode, tau, centers in modes:
            cap = -(-ctx // args.page) if mode == "dense" else args.max_pages
            topk = args.max_pages if mode == "topk" else None
            params = SelectParams(tau=tau or 1.0, sink_pages=1, local_pages=4, max_pages=cap, topk=topk)
            t = profile_point(bs, ctx, args.page, args.server_pages, params, centers)
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
