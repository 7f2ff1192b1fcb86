#!/usr/bin/env python3
"""Launch-parameter sweep of PSA's attend kernel on dense rows, beside FlashInfer's dense decode (GPU).

At 16 x 4k every request is below --psa-dense-below and PSA's own attend kernel reads every page;
that kernel is ~10% slower than FlashInfer's decode there (profile-stages-*.json), which decides the
issue-4 bar at 16 x 4k. This times sparse_decode over all pages for each combination of split count,
pages per iteration, warps and pipeline stages (CUDA graphs, Llama-3.1-8B attention shape, bf16),
checks each against the default launch, and writes benchmarks/results/tune-attend-*.json.

    python scripts/tune_attend.py --sizes 16x4096,4x4096 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import DTYPE, HKV, HQ, D, bench_ms  # noqa: E402

from sglang_psa.kernels import make_skewed_batch, sparse_decode  # noqa: E402
from sglang_psa.kernels.flashinfer_decode import FlashInferDenseDecode  # noqa: E402
from sglang_psa.kernels.sparse_decode import default_num_splits  # noqa: E402
from sglang_psa.provenance import git_commit  # noqa: E402


def sweep_point(bs: int, ctx: int, p: int, grid: dict) -> dict:
    sb = make_skewed_batch(bs, HQ, HKV, D, ctx, p, dtype=DTYPE, device="cuda", skew=0.7, seed=0)
    npages = -(-ctx // p)
    idx = torch.arange(npages, dtype=torch.int32, device="cuda").expand(bs, HKV, npages).contiguous()
    cnt = torch.full((bs, HKV), npages, dtype=torch.int32, device="cuda")
    cache = (sb.q, sb.k_cache, sb.v_cache, sb.req_to_token, sb.req_pool_indices, sb.seq_lens)
    ref, _ = sparse_decode(*cache, idx, cnt, p, sb.sm_scale)
    fi = FlashInferDenseDecode(sb.q.device)
    fi.plan(sb.req_to_token, sb.req_pool_indices, sb.seq_lens, p, HQ, HKV, D, DTYPE, sb.sm_scale)
    fi_ms = bench_ms(lambda: fi.run(sb.q, sb.k_cache, sb.v_cache))["ms"]
    splits0 = default_num_splits(bs, HKV, npages, sb.q.device)
    row = {"bs": bs, "ctx": ctx, "page": p, "flashinfer_ms": fi_ms, "default_splits": splits0, "variants": []}
    row["default_ms"] = bench_ms(lambda: sparse_decode(*cache, idx, cnt, p, sb.sm_scale))["ms"]
    for splits, ppi, warps, stages in itertools.product(*grid.values()):
        tune = {"pages_per_iter": ppi, "num_warps": warps, "num_stages": stages}
        try:
            out, _ = sparse_decode(*cache, idx, cnt, p, sb.sm_scale, num_splits=splits, tuning=tune)
            err = float((out.float() - ref.float()).abs().max())

            def run(splits=splits, tune=tune):
                return sparse_decode(*cache, idx, cnt, p, sb.sm_scale, num_splits=splits, tuning=tune)

            ms = bench_ms(run)["ms"]
        except Exception as e:  # e.g. out of shared memory for large tiles x stages
            row["variants"].append({"splits": splits, **tune, "error": type(e).__name__})
            continue
        row["variants"].append({"splits": splits, **tune, "ms": ms, "max_abs_diff": err})
    ok = [v for v in row["variants"] if "ms" in v and v["max_abs_diff"] < 2e-2]
    best = min(ok, key=lambda v: v["ms"]) if ok else None
    row["best"] = best
    us = {k: row[k] * 1e3 for k in ("flashinfer_ms", "default_ms")}
    best_us = best["ms"] * 1e3 if best else float("nan")
    print(f"{bs} x {ctx}: flashinfer {us['flashinfer_ms']:.1f} us, default {us['default_ms']:.1f} us, "
          f"best {best_us:.1f} us {best}", flush=True)  # fmt: skip
    torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="16x4096,4x4096")
    ap.add_argument("--page", type=int, default=32)
    ap.add_argument("--splits", default="3,5,8")
    ap.add_argument("--pages-per-iter", default="2,4")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--stages", default="2,3")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    grid = {"splits": ints(args.splits), "ppi": ints(args.pages_per_iter), "warps": ints(args.warps),
            "stages": ints(args.stages)}  # fmt: skip
    rows = [
        sweep_point(*(int(x) for x in size.split("x")), args.page, grid) for size in args.sizes.split(",")
    ]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    commit = git_commit()
    out = {"benchmark": "tune_attend", "date": stamp, "commit": commit,
           "device": torch.cuda.get_device_properties(0).name, "config": vars(args),
           "note": "attend over every page (dense rows), ms per layer, CUDA graphs; flashinfer: dense",
           "rows": rows}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"tune-attend-{stamp}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
