#!/usr/bin/env python
"""Analyse PSA access logs (sglang_psa.access_log): plots and a JSON summary.

    python scripts/analyze_access.py LOG [LOG ...] -o DIR

LOG is a log directory or one .npz. For each log (labelled by the source stored in it) it measures,
per layer and overall:
  * selection size distribution per layer and per kv head (PSA's skew);
  * working set of `--window` (50) consecutive decode steps, as a multiple of the per-step selection;
  * persistence: for how many consecutive steps a selected page stays selected;
  * lookback: how far behind the current position selected pages lie, as a fraction of the length;
  * the hot-pool simulation (sglang_psa.memory.cache_sim): hit rate and bytes fetched per step for
    LRU (page / token granularity), LFU and Belady's optimum, shared by all layers, plus per-layer
    quotas, over capacities 1x..8x the per-step budget.
Working set, persistence and lookback are given for all selected pages and for the dynamic ones only
(without the sink pages and local window PSA always keeps).

Writes DIR/summary.json, DIR/<source>-{selection_sizes,working_set,persistence,lookback,cache}.png
and DIR/lru_vs_belady_2x.png (every source side by side, at 1x and 2x the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sglang_psa.access_log import AccessTrace, load_access_log  # noqa: E402
from sglang_psa.memory import access_stats as S  # noqa: E402
from sglang_psa.memory import cache_sim as C  # noqa: E402

DPI = 80
POLICY_STYLE = {
    "lru": ("LRU (page)", "C0", "-"),
    "lru_token": ("LRU (token)", "C1", "--"),
    "lfu": ("LFU", "C2", "-"),
    "belady": ("Belady (optimum)", "k", ":"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", help="access log directories or .npz files")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--window", type=int, default=50, help="working-set window (steps)")
    p.add_argument("--stride", type=int, default=10, help="working-set window stride (steps)")
    p.add_argument(
        "--multiples",
        type=float,
        nargs="+",
        default=[1, 1.25, 1.5, 2, 3, 4, 6, 8],
        help="pool capacities as multiples of the per-step budget",
    )
    p.add_argument("--warmup-steps", type=int, default=1, help="steps not counted in hit rates")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def _q(x: np.ndarray, qs=(10, 50, 90)) -> dict:
    if x.size == 0:
        return {"n": 0}
    p = np.percentile(x, qs)
    return {"n": int(x.size), "mean": float(x.mean()), **{f"p{q}": float(v) for q, v in zip(qs, p)}}


def _per_layer(vals: np.ndarray, lays: np.ndarray, L: int) -> list[dict]:
    return [_q(vals[lays == lyr]) for lyr in range(L)]


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s) or "unknown"


def analyze(tr: AccessTrace, a: argparse.Namespace, bar) -> tuple[dict, dict]:
    """Statistics and simulation of one trace. Returns (summary for JSON, arrays for plots)."""
    L = tr.num_layers
    out: dict = {
        "source": tr.source,
        "meta": tr.meta,
        "records": len(tr),
        "steps": int(np.unique(tr.step).size),
        "requests": len(tr.request_ids),
        "page_accesses": int(tr.pages.size),
    }
    arrays: dict = {}
    out["selection_sizes"] = S.selection_sizes(tr)
    bar.update(1)
    for tag, dyn in (("all", False), ("dynamic", True)):
        ws, ws_l = S.working_set(tr, window=a.window, stride=a.stride, dynamic_only=dyn)
        pr, pr_l = S.persistence(tr, dynamic_only=dyn)
        lb, lb_l = S.lookback(tr, dynamic_only=dyn)
        arrays[tag] = {"ws": (ws, ws_l), "pers": (pr, pr_l), "lb": (lb, lb_l)}
        out.setdefault("working_set", {})[tag] = {
            "window": a.window,
            "overall": _q(ws),
            "per_layer": _per_layer(ws, ws_l, L),
        }
        pers = _q(pr.astype(np.float64))
        pers["frac_runs_ge_10"] = float((pr >= 10).mean()) if pr.size else 0.0
        pers["frac_runs_eq_1"] = float((pr == 1).mean()) if pr.size else 0.0
        out.setdefault("persistence", {})[tag] = {
            "overall": pers,
            "per_layer": _per_layer(pr.astype(np.float64), pr_l, L),
        }
        out.setdefault("lookback", {})[tag] = {"overall": _q(lb), "per_layer": _per_layer(lb, lb_l, L)}
        bar.update(1)

    stream = C.build_stream(tr)
    sw = C.sweep(stream, tuple(a.multiples), warmup_steps=a.warmup_steps, progress=bar.update)
    merged = C.build_stream(tr, merge_heads=True)
    m2 = {
        p: C.simulate(merged, 2 * merged.budget_units(), p, warmup_steps=a.warmup_steps).to_dict()
        for p in ("lru", "belady")
    }
    bar.update(1)

    def at(mult: float, pol: str, pool: str = "shared") -> dict:
        return next(d for d in sw if d["multiple"] == mult and d["policy"] == pol and d["pool"] == pool)

    out["cache"] = {
        "unit": "(request, layer, kv head, page): K+V of one page for one layer and one kv head",
        "unit_bytes": stream.unit_bytes,
        "budget_units_per_step": stream.budget_units(),
        "budget_bytes_per_step": stream.budget_units() * stream.unit_bytes,
        "budget_units_per_step_per_layer": stream.layer_budget_units().tolist(),
        "warmup_steps": a.warmup_steps,
        "sweep": sw,
        "merged_heads_2x": {
            "unit": "(request, layer, page), all kv heads",
            "budget_units_per_step": merged.budget_units(),
            **{p: {"hit_rate": d["hit_rate"], "bytes_per_step": d["bytes_per_step"]} for p, d in m2.items()},
        },
    }
    for m in (1, 2):
        if float(m) in a.multiples:
            out[f"headline_{m}x"] = {p: at(float(m), p)["hit_rate"] for p in C.POLICIES} | {
                "lru_per_layer_quota": at(float(m), "lru", "per_layer_quota")["hit_rate"],
                "belady_per_layer_quota": at(float(m), "belady", "per_layer_quota")["hit_rate"],
            }
    arrays["stream"] = stream
    arrays["sweep"] = sw
    return out, arrays


# ------------------------------------------------------------------------------------ plots
def plot_selection(tr: AccessTrace, path: str) -> None:
    L, H = tr.num_layers, tr.num_kv_heads
    fig, ax = plt.subplots(figsize=(7, 3.6))
    data = [tr.count[tr.layer == lyr] for lyr in range(L)]
    ax.boxplot(data, positions=range(L), widths=0.6, showfliers=False)
    for lyr in range(L):
        for h in range(H):
            m = (tr.layer == lyr) & (tr.head == h)
            if m.any():
                ax.plot(lyr + (h - (H - 1) / 2) * 0.5 / max(H, 1), tr.count[m].mean(), "o", ms=3, color="C3")
    ax.set_xlabel("layer (red dots: per-kv-head means)")
    ax.set_ylabel("pages selected per step")
    ax.set_title(f"Selection size per layer and head [{tr.source}]", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _boxes(ax, vals: np.ndarray, lays: np.ndarray, L: int, offset: float, color: str, label: str) -> None:
    data = [vals[lays == lyr] if (lays == lyr).any() else np.array([np.nan]) for lyr in range(L)]
    bp = ax.boxplot(
        data,
        positions=np.arange(L) + offset,
        widths=0.35,
        showfliers=False,
        patch_artist=True,
        manage_ticks=False,
    )
    for b in bp["boxes"]:
        b.set_facecolor(color)
        b.set_alpha(0.6)
    bp["boxes"][0].set_label(label)


def plot_working_set(arr: dict, L: int, window: int, source: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    _boxes(ax, *arr["all"]["ws"], L, -0.2, "C0", "all selected pages")
    _boxes(ax, *arr["dynamic"]["ws"], L, 0.2, "C1", "without sinks / local window")
    ax.set_xticks(range(L))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"|union over {window} steps| / per-step size")
    ax.set_title(f"Working set of {window} consecutive steps [{source}]", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_persistence(arr: dict, source: str, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for tag, color, label in (("all", "C0", "all pages"), ("dynamic", "C1", "without sinks / local")):
        r = np.sort(arr[tag]["pers"][0])
        if r.size:
            ccdf = 1.0 - np.arange(r.size) / r.size
            ax.step(r, ccdf, where="post", color=color, label=f"{label} (median {np.median(r):.0f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("run length: consecutive steps a page stays selected")
    ax.set_ylabel("fraction of runs >= x")
    ax.set_title(f"Persistence [{source}]", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_lookback(arr: dict, L: int, source: str, path: str) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.4))
    bins = np.linspace(0, 1, 41)
    for tag, color, label in (("all", "C0", "all pages"), ("dynamic", "C1", "without sinks / local")):
        lb, lays = arr[tag]["lb"]
        if lb.size:
            a1.hist(lb, bins=bins, density=True, alpha=0.55, color=color, label=label)
            med = [np.median(lb[lays == lyr]) if (lays == lyr).any() else np.nan for lyr in range(L)]
            a2.plot(range(L), med, "o-", color=color, label=label)
    a1.set_xlabel("lookback / current length")
    a1.set_ylabel("density")
    a1.legend(fontsize=7)
    a2.set_xlabel("layer")
    a2.set_ylabel("median lookback fraction")
    a2.set_ylim(0, 1)
    fig.suptitle(f"Lookback distance [{source}]", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_cache(sw: list[dict], source: str, budget_bytes: float, path: str) -> None:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for pool, extra in (("shared", ""), ("per_layer_quota", " per-layer quota")):
        for pol, (label, color, ls) in POLICY_STYLE.items():
            pts = sorted((d["multiple"], d) for d in sw if d["policy"] == pol and d["pool"] == pool)
            if not pts:
                continue
            xs = [m for m, _ in pts]
            style = dict(
                color=color, ls=ls if pool == "shared" else "-.", marker="o" if pool == "shared" else "x"
            )
            a1.plot(xs, [d["hit_rate"] for _, d in pts], label=label + extra, ms=3, **style)
            a2.plot(xs, [d["bytes_per_step"] / 2**20 for _, d in pts], ms=3, **style)
    a1.set_xlabel("pool capacity / per-step budget")
    a1.set_ylabel("hit rate")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    a2.set_xlabel("pool capacity / per-step budget")
    a2.set_ylabel("MiB fetched per step")
    a2.axhline(budget_bytes / 2**20, color="gray", lw=0.8, ls="--")
    a2.text(a2.get_xlim()[1], budget_bytes / 2**20, " no pool", fontsize=7, va="center", ha="right")
    a2.set_yscale("log")
    a2.grid(alpha=0.3)
    fig.suptitle(f"Hot-page pool simulation (shared by all layers) [{source}]", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_headline(summaries: list[dict], path: str) -> None:
    """Hit rate of every policy at 1x and 2x the per-step budget, one group per (source, capacity)."""
    groups = [
        (s["source"], m, s[f"headline_{m}x"]) for s in summaries for m in (1, 2) if f"headline_{m}x" in s
    ]
    if not groups:
        return
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(groups), 3.4))
    pols = ["lru", "lru_token", "lfu", "belady"]
    w = 0.8 / len(pols)
    for i, pol in enumerate(pols):
        vals = [g[2][pol] for g in groups]
        label, color, _ = POLICY_STYLE[pol]
        bars = ax.bar(np.arange(len(groups)) + (i - 1.5) * w, vals, w, label=label, color=color, alpha=0.8)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.3f}", ha="center", va="bottom", fontsize=6)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{src}\ncapacity {m}x" for src, m, _ in groups], fontsize=8)
    ax.set_ylim(0.0, 1.08)
    ax.set_ylabel("hit rate")
    ax.set_title("Hot-pool hit rate: LRU vs Belady (1x, 2x budget)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    traces = [load_access_log(p) for p in a.logs]
    total = sum(3 + 1 + len(a.multiples) * (len(C.POLICIES) + 2) + 5 for _ in traces)
    summaries = []
    with tqdm(total=total, desc="analyze", disable=a.no_progress, file=sys.stderr) as bar:
        for tr in traces:
            s, arr = analyze(tr, a, bar)
            summaries.append(s)
            pre = os.path.join(a.out, slug(tr.source) + "-")
            plot_selection(tr, pre + "selection_sizes.png")
            plot_working_set(arr, tr.num_layers, a.window, tr.source, pre + "working_set.png")
            plot_persistence(arr, tr.source, pre + "persistence.png")
            plot_lookback(arr, tr.num_layers, tr.source, pre + "lookback.png")
            plot_cache(arr["sweep"], tr.source, s["cache"]["budget_bytes_per_step"], pre + "cache.png")
            bar.update(5)
    plot_headline(summaries, os.path.join(a.out, "lru_vs_belady_2x.png"))
    headline = [
        {
            "source": s["source"],
            **{f"{k}_hit_rate_{m}x": v for m in (1, 2) for k, v in s.get(f"headline_{m}x", {}).items()},
        }
        for s in summaries
    ]
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump({"headline": headline, "logs": summaries}, f, indent=1)
    for h in headline:
        print(
            f"{h['source']}: LRU@2x {h.get('lru_hit_rate_2x', float('nan')):.4f}  "
            f"Belady@2x {h.get('belady_hit_rate_2x', float('nan')):.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
