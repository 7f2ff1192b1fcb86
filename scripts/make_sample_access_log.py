#!/usr/bin/env python
"""Write an access log from the standalone PSA kernels on the synthetic skewed cache (CPU).

Each layer gets its own skewed cache (`make_skewed_batch`, per-head skews from `layer_skews`). Decode
steps then run the torch references of stages 2-3 (`page_bounds_ref`, `select_pages_ref`) with:
  * a growing sequence: every step one more token becomes valid and its page summary is refreshed
    (`update_page_summaries_ref` on the new slot), so the local window slides and new pages appear;
  * a moving query: per (request, query head) an AR(1) random walk around the batch's query,
    q_t = q_0 + a (q_{t-1} - q_0) + sigma * rms(q_0) * eps, so selections drift between steps and
    persistence and working sets mean something.
The cache holds the final length's keys from the start (only the first n_t are valid at step t), so
the synthetic boosts (sinks, heavy hitters, recency) are those of the final length.

    python scripts/make_sample_access_log.py -o benchmarks/access_sample
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import torch

from sglang_psa.access_log import AccessLogger, load_access_log
from sglang_psa.kernels import (
    SelectParams,
    alloc_summaries,
    layer_skews,
    make_skewed_batch,
    page_bounds_ref,
    select_pages_ref,
    update_page_summaries_ref,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", default="benchmarks/access_sample", help="log directory (replaced)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hq", type=int, default=16)
    p.add_argument("--hkv", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=32)
    p.add_argument(
        "--lens", type=int, nargs="+", default=[6144, 12288], help="start lengths, one per request"
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--max-pages", type=int, default=256)
    p.add_argument("--sink-pages", type=int, default=1)
    p.add_argument("--local-pages", type=int, default=4)
    p.add_argument("--walk-a", type=float, default=0.95, help="AR(1) coefficient of the query walk")
    p.add_argument("--walk-sigma", type=float, default=0.2, help="step noise, in units of rms(q0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-bytes-per-file", type=int, default=4 << 20)
    p.add_argument("--max-files", type=int, default=64)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    torch.manual_seed(a.seed)
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    P, B, bs = a.page_size, a.page_size, len(a.lens)
    final = [n + a.steps for n in a.lens]
    npages = -(-max(final) // P)
    params = SelectParams(
        tau=a.tau, sink_pages=a.sink_pages, local_pages=a.local_pages, max_pages=a.max_pages
    )
    skews = layer_skews(a.layers, a.hkv, seed=a.seed)
    rids = [f"synthetic-{b}" for b in range(bs)]
    layers = []
    for lyr in range(a.layers):
        batch = make_skewed_batch(
            bs,
            a.hq,
            a.hkv,
            a.head_dim,
            final,
            P,
            dtype=torch.float32,
            skew=skews[lyr],
            seed=a.seed * 1000 + lyr,
        )
        kmin, kmax = alloc_summaries(batch.k_cache.shape[0], a.hkv, a.head_dim, B, torch.float32, "cpu")
        prefix = torch.cat([batch.req_to_token[b, :n] for b, n in enumerate(a.lens)]).to(torch.int64)
        update_page_summaries_ref(batch.k_cache, kmin, kmax, prefix, B)
        layers.append((batch, kmin, kmax, batch.q.float().clone()))
    gen = torch.Generator().manual_seed(a.seed + 1)
    logger = AccessLogger(
        a.out,
        source="synthetic-kernels",
        num_layers=a.layers,
        num_kv_heads=a.hkv,
        width=params.width,
        page_size=P,
        head_dim=a.head_dim,
        elem_bytes=2,
        max_requests=bs,
        max_bytes_per_file=a.max_bytes_per_file,
        max_files=a.max_files,
        meta={
            "generator": "scripts/make_sample_access_log.py",
            "tau": a.tau,
            "mode": "estimated",
            "sink_pages": a.sink_pages,
            "local_pages": a.local_pages,
            "max_pages": a.max_pages,
            "hq": a.hq,
            "start_lens": a.lens,
            "steps": a.steps,
            "walk_a": a.walk_a,
            "walk_sigma": a.walk_sigma,
            "seed": a.seed,
            "note": "elem_bytes=2 assumes a bf16 KV cache for the byte counts",
        },
    )
    t0 = time.time()
    for step in range(a.steps):
        seq = torch.tensor([n + step for n in a.lens], dtype=torch.int32)
        for lyr, (batch, kmin, kmax, q) in enumerate(layers):
            if step > 0:  # the token of position n-1 was just written: refresh its block's summary
                new = torch.stack([batch.req_to_token[b, int(seq[b]) - 1] for b in range(bs)]).to(torch.int64)
                update_page_summaries_ref(batch.k_cache, kmin, kmax, new, B)
                q0 = batch.q.float()
                rms = q0.pow(2).mean(-1, keepdim=True).sqrt()
                q.copy_(q0 + a.walk_a * (q - q0) + a.walk_sigma * rms * torch.randn(q.shape, generator=gen))
            bounds, centers = page_bounds_ref(
                q, kmin, kmax, batch.req_to_token, batch.req_pool_indices, seq, P, B,
                batch.sm_scale, npages, with_centers=True,
            )  # fmt: skip
            page_idx, counts = select_pages_ref(bounds, seq, P, params, mass_logits=centers)
            logger.record(step, lyr, page_idx, counts, seq, rids)
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}/{a.steps} ({time.time() - t0:.1f}s)", file=sys.stderr)
    logger.close()
    tr = load_access_log(a.out)
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    print(
        f"wrote {a.out}: {len(tr)} records, {tr.pages.size} page accesses, "
        f"{logger.files_written} file(s), {size / 1024:.0f} KiB, mean pages/record {tr.count.mean():.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
