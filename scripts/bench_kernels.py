#!/usr/bin/env python3
"""Benchmark PSA's decode stages against FlashInfer dense decode on a synthetic skewed cache (GPU).

Llama-3.1-8B attention shape (32 q heads, 8 kv heads, head_dim 128, bf16), one layer's KV pool.
For every (context, batch, page size): time of each stage (summaries write, bounds, select, attend)
and of the whole PSA step, FlashInfer's dense paged decode on the same cache, FlashInfer's decode fed
with PSA's selection, pages and bytes read, achieved bandwidth of the attend stage against the
measured device copy bandwidth, attention-mass recall, certified mode, and Quest-style fixed top-k at
the smallest budget that reaches PSA's recall. Then a multi-layer recall study (per-layer skew) that
compares KV bytes read at equal recall. Writes one JSON under --out and prints a table.

    python scripts/bench_kernels.py --out benchmarks/results            # full sweep
    python scripts/bench_kernels.py --contexts 32768 --batches 8 --pages 32   # one point
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
import triton

from sglang_psa.kernels import (
    SelectParams,
    alloc_summaries,
    certified_decode,
    layer_skews,
    make_skewed_batch,
    page_bounds,
    select_pages,
    sparse_decode,
    update_page_summaries,
)
from sglang_psa.kernels._common import page_layout, selection_mask
from sglang_psa.kernels.flashinfer_decode import FlashInferDenseDecode, FlashInferSparseDecode
from sglang_psa.provenance import git_commit

HQ, HKV, D = 32, 8, 128
DTYPE = torch.bfloat16
DEV = "cuda"
ELEM = 2  # bytes per bf16


# ----------------------------------------------------------------------------- timing
def bench_ms(fn, graph: bool = True) -> dict:
    """Median time in ms: eager (events around back-to-back calls) and, if capturable, CUDA graph."""
    fn()
    torch.cuda.synchronize()
    res = {"eager_ms": triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")}
    if graph:
        try:
            res["graph_ms"] = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        except Exception as e:  # a path that syncs (FlashInfer plan) cannot be captured
            res["graph_error"] = type(e).__name__
            torch.cuda.synchronize()
    res["ms"] = min(v for k, v in res.items() if k.endswith("_ms"))
    return res


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * n / ms / 1e6


# ----------------------------------------------------------------------------- accounting
def page_mass(sb, n_pages: int) -> torch.Tensor:
    """Exact softmax mass of each logical page per query head: [bs, Hkv, G, N] float32."""
    bs = sb.q.shape[0]
    g = HQ // HKV
    p = sb.page_size
    out = torch.zeros(bs, HKV, g, n_pages, device=DEV)
    for b in range(bs):
        n = int(sb.seq_lens[b])
        k = sb.k_cache[sb.req_to_token[b, :n].long()]  # [n, Hkv, D]
        qb = sb.q[b].view(HKV, g, D)
        logits = torch.einsum("hgd,nhd->hgn", qb.float(), k.float()) * sb.sm_scale
        prob = torch.softmax(logits, dim=-1)
        pad = n_pages * p - n
        prob = torch.nn.functional.pad(prob, (0, pad)).view(HKV, g, n_pages, p).sum(-1)
        out[b] = prob
    return out


def recall_of(mass: torch.Tensor, mask: torch.Tensor) -> dict:
    r = (mass * mask[:, :, None, :]).sum(-1)  # [bs, Hkv, G]
    return {"mean": float(r.mean()), "min": float(r.min()), "p5": float(r.flatten().quantile(0.05))}


def tokens_in(mask: torch.Tensor, seq_lens: torch.Tensor, p: int) -> int:
    ntok = page_layout(seq_lens, mask.shape[-1], p)[3]  # [bs, N]
    return int((mask * ntok[:, None, :]).sum())


def kv_bytes(tokens_per_head_sum: int) -> int:
    return tokens_per_head_sum * 2 * D * ELEM  # K and V


# ----------------------------------------------------------------------------- one point
def bench_point(
    ctx: int,
    bs: int,
    p: int,
    tau: float,
    skew: torch.Tensor,
    copy_gbs: float,
    seed: int,
    prog_tau: float,
    max_frac: float = 1.0,
) -> dict:
    torch.manual_seed(seed)
    args_prog_tau = prog_tau
    n_pages = ctx // p
    sb = make_skewed_batch(bs, HQ, HKV, D, ctx, p, dtype=DTYPE, device=DEV, skew=skew, seed=seed)
    kmin, kmax = alloc_summaries(sb.k_cache.shape[0], HKV, D, p, DTYPE, DEV)
    update_page_summaries(sb.k_cache, kmin, kmax, sb.written_slots, p)
    cache = (sb.q, sb.k_cache, sb.v_cache, sb.req_to_token, sb.req_pool_indices, sb.seq_lens)
    meta = (sb.req_to_token, sb.req_pool_indices, sb.seq_lens)
    cap = n_pages if max_frac >= 1.0 else max(8, int(n_pages * max_frac))
    params = SelectParams(tau=tau, sink_pages=1, local_pages=4, max_pages=cap)
    step_loc = sb.req_to_token[:, ctx - 1].long().contiguous()  # one decode token per request

    def bounds_fn():
        return page_bounds(sb.q, kmin, kmax, *meta, p, p, sb.sm_scale, n_pages, with_centers=True)

    bounds, centers = bounds_fn()
    page_idx, counts = select_pages(bounds, sb.seq_lens, p, params, mass_logits=centers)

    def psa_step():
        b_, c_ = bounds_fn()
        i_, n_ = select_pages(b_, sb.seq_lens, p, params, mass_logits=c_)
        return sparse_decode(*cache, i_, n_, p, sb.sm_scale)

    t = {
        "summaries_write": bench_ms(lambda: update_page_summaries(sb.k_cache, kmin, kmax, step_loc, p)),
        "bounds": bench_ms(bounds_fn),
        "select": bench_ms(lambda: select_pages(bounds, sb.seq_lens, p, params, mass_logits=centers)),
        "attend": bench_ms(lambda: sparse_decode(*cache, page_idx, counts, p, sb.sm_scale)),
        "psa_total": bench_ms(psa_step),
    }
    fi = FlashInferDenseDecode(sb.q.device)
    fi.plan(*meta, p, HQ, HKV, D, DTYPE, sb.sm_scale)
    t["flashinfer_dense"] = bench_ms(lambda: fi.run(sb.q, sb.k_cache, sb.v_cache))
    out_psa_full, _ = psa_step()

    # correctness on this cache: PSA at tau=1 and FlashInfer dense agree with each other
    dense_out = fi.run(sb.q, sb.k_cache, sb.v_cache)
    all_params = SelectParams(tau=1.0, sink_pages=1, local_pages=4, max_pages=n_pages)
    i1, c1 = select_pages(bounds, sb.seq_lens, p, all_params)
    o1, _ = sparse_decode(*cache, i1, c1, p, sb.sm_scale)
    tau1_err = float((o1.float() - dense_out.float()).norm() / dense_out.float().norm())

    fis = FlashInferSparseDecode(sb.q.device)
    fis.plan(*meta, page_idx, counts, p, HQ, D, DTYPE, sb.sm_scale)
    t["flashinfer_sparse_run"] = bench_ms(lambda: fis.run(sb.q, sb.k_cache, sb.v_cache))
    fi_sparse_err = float(
        (fis.run(sb.q, sb.k_cache, sb.v_cache).float() - out_psa_full.float()).norm()
        / out_psa_full.float().norm()
    )

    def fi_sparse_step():
        b_, c_ = bounds_fn()
        i_, n_ = select_pages(b_, sb.seq_lens, p, params, mass_logits=c_)
        fis.plan(*meta, i_, n_, p, HQ, D, DTYPE, sb.sm_scale)
        return fis.run(sb.q, sb.k_cache, sb.v_cache)

    t["flashinfer_sparse_total"] = bench_ms(fi_sparse_step, graph=False)

    # certified (progressive) mode at the same tau
    def cert_fn():
        return certified_decode(*cache, bounds, p, sb.sm_scale, tau, 1, 4, 16)

    t["certified_attend"] = bench_ms(cert_fn)
    _, _, visited, order = cert_fn()

    # progressive mode: exact mass of the visited pages, the tail estimated from the centers
    def prog_step():
        b_, c_ = bounds_fn()
        return certified_decode(*cache, b_, p, sb.sm_scale, args_prog_tau, 1, 4, 8, rest_logits=c_)

    t["progressive_total"] = bench_ms(prog_step)
    _, _, pvisited, porder = prog_step()

    # accounting
    mass = page_mass(sb, n_pages)
    mask = selection_mask(page_idx, counts, n_pages)
    cmask = selection_mask(order.to(torch.int32), visited, n_pages)
    pmask = selection_mask(porder.to(torch.int32), pvisited, n_pages)
    prog_tokens = tokens_in(pmask, sb.seq_lens, p)
    psa_tokens = tokens_in(mask, sb.seq_lens, p)
    dense_tokens = bs * HKV * ctx
    bound_bytes = bs * HKV * n_pages * 2 * D * ELEM
    psa_recall = recall_of(mass, mask)

    # Quest-style fixed top-k: smallest budget (pages per request and head) reaching PSA's recall
    topk_pick = None
    k = 8
    while k <= n_pages:
        ti, tc = select_pages(bounds, sb.seq_lens, p, SelectParams(topk=k, sink_pages=1, local_pages=4))
        rk = recall_of(mass, selection_mask(ti, tc, n_pages))
        if rk["mean"] >= psa_recall["mean"] or k == n_pages:
            topk_pick = (k, ti, tc, rk)
            break
        k = min(n_pages, int(math.ceil(k * 1.25)))
    k, ti, tc, rk = topk_pick
    t["topk_attend"] = bench_ms(lambda: sparse_decode(*cache, ti, tc, p, sb.sm_scale))
    topk_tokens = tokens_in(selection_mask(ti, tc, n_pages), sb.seq_lens, p)

    attend_bytes = kv_bytes(psa_tokens)
    res = {
        "context": ctx, "batch": bs, "page_size": p, "tau": tau, "n_pages": n_pages, "max_pages": cap,
        "times": t,
        "speedup_vs_flashinfer_dense": t["flashinfer_dense"]["ms"] / t["psa_total"]["ms"],
        "speedup_fi_sparse_vs_dense": t["flashinfer_dense"]["ms"] / t["flashinfer_sparse_total"]["ms"],
        "selected_page_fraction": float(counts.float().mean() / n_pages),
        "selected_pages_mean": float(counts.float().mean()),
        "selected_pages_max": int(counts.max()),
        "recall": psa_recall,
        "bytes": {
            "dense_kv": kv_bytes(dense_tokens),
            "psa_bounds": bound_bytes,
            "psa_attend": attend_bytes,
            "psa_total": bound_bytes + attend_bytes,
            "topk_attend": kv_bytes(topk_tokens),
            "topk_total": bound_bytes + kv_bytes(topk_tokens),
            "certified_attend": kv_bytes(tokens_in(cmask, sb.seq_lens, p)),
        },
        "attend_gbs": attend_bytes / t["attend"]["ms"] / 1e6,
        "attend_fraction_of_copy_bw": attend_bytes / t["attend"]["ms"] / 1e6 / copy_gbs,
        "dense_gbs_flashinfer": kv_bytes(dense_tokens) / t["flashinfer_dense"]["ms"] / 1e6,
        "certified": {
            "visited_page_fraction": float(visited.float().mean() / n_pages),
            "recall": recall_of(mass, cmask),
        },
        "progressive": {
            "tau": prog_tau,
            "visited_page_fraction": float(pvisited.float().mean() / n_pages),
            "recall": recall_of(mass, pmask),
            "kv_bytes": bound_bytes + kv_bytes(prog_tokens),
            "speedup_vs_flashinfer_dense": t["flashinfer_dense"]["ms"] / t["progressive_total"]["ms"],
        },
        "topk_at_equal_recall": {"k": k, "recall": rk, "page_fraction": k / n_pages},
        "check": {"tau1_vs_flashinfer_rel_err": tau1_err, "fi_sparse_vs_psa_rel_err": fi_sparse_err},
    }  # fmt: skip
    return res


# ----------------------------------------------------------------------------- recall study
def recall_study(ctx: int, bs: int, p: int, num_layers: int, taus: list[float], seed: int) -> dict:
    """Per-layer skew: PSA (one tau for all layers) vs one fixed top-k budget for all layers.

    For each tau: mean recall over layers, heads, requests and query heads, and KV bytes read; the
    fixed top-k budget is the smallest that reaches the same mean recall over the same layers.
    """
    n_pages = ctx // p
    skews = layer_skews(num_layers, HKV, seed=seed)
    layers = []
    for layer in range(num_layers):
        sb = make_skewed_batch(bs, HQ, HKV, D, ctx, p, dtype=DTYPE, device=DEV, skew=skews[layer],
                               seed=seed + 100 + layer)  # fmt: skip
        kmin, kmax = alloc_summaries(sb.k_cache.shape[0], HKV, D, p, DTYPE, DEV)
        update_page_summaries(sb.k_cache, kmin, kmax, sb.written_slots, p)
        bounds, centers = page_bounds(sb.q, kmin, kmax, sb.req_to_token, sb.req_pool_indices, sb.seq_lens,
                                      p, p, sb.sm_scale, n_pages, with_centers=True)  # fmt: skip
        cache = (sb.q, sb.k_cache, sb.v_cache, sb.req_to_token, sb.req_pool_indices, sb.seq_lens)
        layers.append({"mass": page_mass(sb, n_pages), "bounds": bounds, "centers": centers,
                       "seq_lens": sb.seq_lens,
                       "cache": cache, "sm_scale": sb.sm_scale})  # fmt: skip
    dense_tokens = num_layers * bs * HKV * ctx

    def evaluate(sel_fn):
        rec, tok, heads_ok = [], 0, 0
        for lay in layers:
            mask = sel_fn(lay)
            r = (lay["mass"] * mask[:, :, None, :]).sum(-1)
            rec.append(r.flatten())
            tok += tokens_in(mask, lay["seq_lens"], p)
        allr = torch.cat(rec)
        heads_ok = float((allr >= 0.95).float().mean())
        return {"recall_mean": float(allr.mean()), "recall_p5": float(allr.quantile(0.05)),
                "heads_ge_0.95": heads_ok, "kv_fraction": tok / dense_tokens}  # fmt: skip

    def psa_sel(tau):
        prm = SelectParams(tau=tau, sink_pages=1, local_pages=4, max_pages=n_pages)
        return lambda lay: selection_mask(
            *select_pages(lay["bounds"], lay["seq_lens"], p, prm, mass_logits=lay["centers"]), n_pages
        )

    def cert_sel(tau, progressive=False):
        def f(lay):
            rest = lay["centers"] if progressive else None
            _, _, vis, order = certified_decode(
                *lay["cache"], lay["bounds"], p, lay["sm_scale"], tau, 1, 4, 8, rest_logits=rest
            )
            return selection_mask(order.to(torch.int32), vis, n_pages)

        return f

    def topk_sel(k):
        prm = SelectParams(topk=k, sink_pages=1, local_pages=4)
        return lambda lay: selection_mask(*select_pages(lay["bounds"], lay["seq_lens"], p, prm), n_pages)

    topk_curve = []
    k = 6
    while True:
        topk_curve.append({"k": k, **evaluate(topk_sel(k))})
        if k >= n_pages:
            break
        k = min(n_pages, int(math.ceil(k * 1.15)))
    rows = []
    modes = (
        ("estimated", psa_sel, taus),
        ("progressive", lambda t: cert_sel(t, progressive=True), [0.8, 0.9, 0.95, 0.98]),
        ("certified", cert_sel, taus[:2]),
    )
    for mode, sel, mode_taus in modes:
        for tau in mode_taus:
            r = {"mode": mode, "tau": tau, **evaluate(sel(tau))}
            match = next((c for c in topk_curve if c["recall_mean"] >= r["recall_mean"]), topk_curve[-1])
            r["topk_equal_recall"] = match
            r["kv_bytes_ratio_topk_over_psa"] = match["kv_fraction"] / max(r["kv_fraction"], 1e-12)
            rows.append(r)
    return {"context": ctx, "batch": bs, "page_size": p, "num_layers": num_layers,
            "layer_skews": skews.tolist(), "psa": rows, "topk_curve": topk_curve}  # fmt: skip


# ----------------------------------------------------------------------------- main
def _row(ctx: int, bs: int, p: int, r: dict) -> str:
    tm = r["times"]
    return (
        f"{ctx:>7} {bs:>3} {p:>3} | {tm['bounds']['ms']:7.3f} {tm['select']['ms']:7.3f} "
        f"{tm['attend']['ms']:7.3f} {tm['psa_total']['ms']:7.3f} {tm['flashinfer_dense']['ms']:8.3f} "
        f"{r['speedup_vs_flashinfer_dense']:5.1f} {tm['flashinfer_sparse_total']['ms']:7.3f} | "
        f"{100 * r['selected_page_fraction']:5.1f} {r['recall']['mean']:6.3f} "
        f"{100 * r['topk_at_equal_recall']['page_fraction']:5.1f} "
        f"{100 * r['attend_fraction_of_copy_bw']:4.0f} | {tm['progressive_total']['ms']:6.3f} "
        f"{r['progressive']['speedup_vs_flashinfer_dense']:5.1f} "
        f"{100 * r['progressive']['visited_page_fraction']:5.1f} {r['progressive']['recall']['mean']:6.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--pages", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument(
        "--tau", type=float, default=0.98, help="estimated mode needs tau above the recall target"
    )
    ap.add_argument(
        "--max-pages-frac",
        type=float,
        default=1.0,
        help="budget cap (max_pages) as a fraction of the context's pages; 1 = uncapped",
    )
    ap.add_argument("--prog-tau", type=float, default=0.9, help="tau of the progressive mode")
    ap.add_argument("--layer-skew", type=int, default=20, help="which of 32 layers' skew profile to use")
    ap.add_argument("--recall-study", default="32768,4,32,8", help="ctx,batch,page,layers ('' = skip)")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    prop = torch.cuda.get_device_properties(0)
    copy_gbs = copy_bandwidth_gbs()
    skew = layer_skews(32, HKV, seed=0)[args.layer_skew]
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(args.out, f"kernels-{args.tag + '-' if args.tag else ''}{stamp}.json")
    doc = {
        "benchmark": "bench_kernels", "date": stamp, "commit": git_commit(),
        "device": {"name": prop.name, "sms": prop.multi_processor_count,
                   "memory_gib": prop.total_memory / 2**30, "copy_gbs_read_plus_write": copy_gbs},
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "flashinfer": __import__("flashinfer").__version__},
        "config": {"hq": HQ, "hkv": HKV, "head_dim": D, "dtype": "bf16", "tau": args.tau,
                   "max_pages_frac": args.max_pages_frac,
                   "sink_pages": 1, "local_pages": 4, "skew_profile_layer": args.layer_skew,
                   "skew": skew.tolist(), "cache": "kernels.synthetic.make_skewed_batch"},
        "points": [],
    }  # fmt: skip
    print(f"device {prop.name}, copy bandwidth {copy_gbs:.0f} GB/s (read+write)", flush=True)
    hdr = (
        f"{'ctx':>7} {'bs':>3} {'P':>3} | {'bounds':>7} {'select':>7} {'attend':>7} {'psa':>7} "
        f"{'fi_dense':>8} {'x':>5} {'fi_sp':>7} | {'sel%':>5} {'recall':>6} {'topk%':>5} {'bw%':>4} | "
        f"{'prog':>6} {'x':>5} {'sel%':>5} {'recall':>6}"
    )
    print(hdr, flush=True)
    seed = 0
    for p in args.pages:
        for ctx in args.contexts:
            for bs in args.batches:
                t0 = time.time()
                try:
                    r = bench_point(
                        ctx, bs, p, args.tau, skew, copy_gbs, seed, args.prog_tau, args.max_pages_frac
                    )
                except torch.cuda.OutOfMemoryError as e:
                    r = {"context": ctx, "batch": bs, "page_size": p, "error": f"OOM: {e}"[:200]}
                    torch.cuda.empty_cache()
                seed += 1
                torch.cuda.empty_cache()
                r["wall_s"] = time.time() - t0
                doc["points"].append(r)
                with open(path, "w") as f:
                    json.dump(doc, f, indent=1)
                if "error" in r:
                    print(f"{ctx:>7} {bs:>3} {p:>3} | {r['error'][:60]}", flush=True)
                    continue
                print(_row(ctx, bs, p, r), flush=True)
    if args.recall_study:
        ctx, bs, p, nl = (int(x) for x in args.recall_study.split(","))
        t0 = time.time()
        doc["recall_study"] = recall_study(ctx, bs, p, nl, [0.9, 0.95, 0.98, 0.99, 0.995, 0.999], seed=7)
        doc["recall_study"]["wall_s"] = time.time() - t0
        for r in doc["recall_study"]["psa"]:
            m = r["topk_equal_recall"]
            print(
                f"recall study {r['mode']:>9} tau={r['tau']:.2f}: recall {r['recall_mean']:.3f} "
                f"kv {100 * r['kv_fraction']:.1f}% | topk k={m['k']} recall {m['recall_mean']:.3f} "
                f"kv {100 * m['kv_fraction']:.1f}% -> {r['kv_bytes_ratio_topk_over_psa']:.2f}x",
                flush=True,
            )
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
