#!/usr/bin/env python3
"""How much of an accuracy difference can the accuracy suite resolve with n prompts per task and length?

Exact match is a Bernoulli score per prompt, so an accuracy over n prompts has a binomial error, and two
settings scored on the same prompts differ by the prompts that flipped (a paired, McNemar-style
comparison: only discordant prompts carry information). This prints, for n in --ns:

* the Wilson 95% interval of an accuracy p (e.g. 9/10 = 0.90 -> [0.60, 0.98]);
* the fewest one-directional flips (prompts right under dense, wrong under the sparse setting) that are
  significant at 5% (two-sided exact sign test), and the accuracy gap that is;
* the n needed to observe at least one flip with 80% probability when a setting truly loses a fraction
  f of prompts (f = 2%, the issue's 98%-of-dense bar), and the n at which zero observed flips bounds
  the loss below f with 95% confidence (rule of three: n >= 3 / f);

and, with --results (an eval-accuracy or eval-accuracy-hf JSON), the Wilson interval of every cell.

With --equal-accuracy TARGET --curve A,B,... (fixed-budget settings, e.g. Quest top-k at several k)
it answers the suite's third question, "at equal accuracy, does TARGET read fewer pages than the
curve?": the curve's page fraction at TARGET's accuracy (linear interpolation between its points, in
page order, over their running best accuracy), the ratio TARGET pages / curve pages there, and a paired
bootstrap over prompts (every setting is scored on the same prompts) for its 95% interval. Page
fractions are held fixed (fixed or capped budgets barely move between prompts). --results may name
several JSONs of one prompt set (settings split over processes); their dense scores must agree.

    python scripts/accuracy_noise.py --results benchmarks/results/eval-accuracy-20261123T143955Z.json
    python scripts/accuracy_noise.py --results A.json,B.json --equal-accuracy psa-lognormal-0.8-min10-max12 \
        --curve topk-10,topk-11,topk-12,topk-13
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path
from typing import Any


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def min_significant_flips(alpha: float = 0.05) -> int:
    """Fewest discordant prompts, all in one direction, with two-sided sign-test p < alpha."""
    b = 1
    while 2 * 0.5**b >= alpha:
        b += 1
    return b


def noise_table(ns: list[int], f: float = 0.02) -> dict[str, Any]:
    b = min_significant_flips()
    rows = []
    for n in ns:
        rows.append({
            "n": n,
            "wilson_at_1.0": [round(x, 3) for x in wilson(n, n)],
            "wilson_at_0.9": [round(x, 3) for x in wilson(round(0.9 * n), n)],
            "significant_gap": round(b / n, 3) if b <= n else None,
            "p_see_a_flip_if_loss_f": round(1 - (1 - f) ** n, 3),
        })  # fmt: skip
    return {
        "min_significant_one_way_flips": b,
        "loss_fraction_f": f,
        "n_for_80pct_chance_to_see_a_flip": math.ceil(math.log(0.2) / math.log(1 - f)),
        "n_to_bound_loss_below_f_with_zero_flips": math.ceil(3 / f),
        "by_n": rows,
    }


def cells(path: Path) -> list[dict[str, Any]]:
    """Wilson interval of every (setting, task, length) accuracy of a suite result."""
    res = json.loads(path.read_text())
    n = res["config"]["samples"]
    out = []
    for r in res["rows"]:
        for kind, d in r.get("accuracy", {}).items():
            for length, acc in d.items():
                k = round(acc * n)
                out.append({"setting": r["name"], "task": kind, "length": length, "acc": acc,
                            "wilson95": [round(x, 3) for x in wilson(k, n)]})  # fmt: skip
    return out


def merged_rows(paths: list[Path]) -> list[dict[str, Any]]:
    """The rows of suite results run on one prompt set (dense scored identically in each), merged."""
    rows: dict[str, dict[str, Any]] = {}
    for path in paths:
        for r in json.loads(path.read_text())["rows"]:
            if r["name"] in rows and rows[r["name"]]["scores"] != r["scores"]:
                raise ValueError(f"{r['name']} scored differently in {path}: not one prompt set")
            rows.setdefault(r["name"], r)
    return list(rows.values())


def curve_pages_at(points: list[tuple[float, float]], acc: float) -> tuple[float, str]:
    """Page fraction at which a curve of (pages, accuracy) points reaches acc: linear between points in
    page order over their running best accuracy. -> (pages, "") or, outside the curve, the nearest end
    with "below" (acc under the curve's first point: pages is an upper bound) / "above" (never reached)."""
    pts = sorted(points)
    best = []
    for _, a in pts:
        best.append(max(a, best[-1]) if best else a)
    if acc <= best[0]:
        return pts[0][0], "below" if acc < best[0] else ""
    for i in range(1, len(pts)):
        if best[i] >= acc:
            (p0, a0), (p1, a1) = (pts[i - 1][0], best[i - 1]), (pts[i][0], best[i])
            return p0 + (acc - a0) / (a1 - a0) * (p1 - p0), ""
    return pts[-1][0], "above"


def pages_at_equal_accuracy(rows: list[dict[str, Any]], target: str, curve: list[str], reps: int = 2000,
                            seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """TARGET's page fraction over the curve's at TARGET's accuracy (module docstring), with a paired
    bootstrap over prompts: ratio < 1 means TARGET reads fewer pages at equal accuracy."""
    by = {r["name"]: r for r in rows}
    missing = [n for n in [target, *curve] if n not in by]
    if missing:
        raise ValueError(f"no result rows for {missing}")
    scores = {n: [int(x) for x in by[n]["scores"]] for n in [target, *curve]}
    n = len(scores[target])
    if any(len(v) != n for v in scores.values()):
        raise ValueError("settings were scored on different numbers of prompts")
    pages = {name: by[name]["page_fraction"] for name in scores}

    def ratio(idx: list[int]) -> tuple[float, str]:
        acc = {name: sum(v[i] for i in idx) / len(idx) for name, v in scores.items()}
        at, edge = curve_pages_at([(pages[c], acc[c]) for c in curve], acc[target])
        return pages[target] / at, edge

    point, edge = ratio(list(range(n)))
    rng = random.Random(seed)
    draws = [ratio([rng.randrange(n) for _ in range(n)]) for _ in range(reps)]
    rs = sorted(r for r, _ in draws)
    pairs = {c: list(zip(scores[target], scores[c])) for c in curve}
    paired = {c: {"target_won": sum(a > b for a, b in p), "target_lost": sum(a < b for a, b in p)}
              for c, p in pairs.items()}  # fmt: skip
    return {
        "target": target, "curve": curve, "prompts": n, "target_pages": pages[target],
        "target_accuracy": sum(scores[target]) / n,
        "curve_points": [{"name": c, "pages": pages[c], "accuracy": sum(scores[c]) / n} for c in curve],
        "ratio": point, "ratio_edge": edge,
        "bootstrap": {"reps": reps, "median": rs[reps // 2],
                      "ci95": [rs[int(0.025 * reps)], rs[int(0.975 * reps)]],
                      "p_ratio_below_1": sum(r < 1 for r in rs) / reps,
                      "edges": {e: sum(d == e for _, d in draws) for e in ("below", "above")}},
        "paired": paired,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="10,20,50,100,150,200")
    ap.add_argument("--loss", type=float, default=0.02, help="true fraction of prompts lost (f)")
    ap.add_argument("--results", default="", help="suite result JSON(s), comma-separated: Wilson intervals")
    ap.add_argument("--equal-accuracy", default="", help="target setting: its pages vs the --curve's")
    ap.add_argument(
        "--curve",
        action="append",
        default=[],
        help="comma-separated fixed-budget settings (e.g. topk-10,...); repeat for more curves",
    )
    ap.add_argument("--write", default="", help="with --equal-accuracy: the merged rows, the analysis and "
                    "their accuracy-vs-pages plot (.png beside it) as one result JSON")  # fmt: skip
    ap.add_argument("--reps", type=int, default=2000, help="bootstrap resamples")
    a = ap.parse_args(argv)
    out = noise_table([int(x) for x in a.ns.split(",")], a.loss)
    print(json.dumps({k: v for k, v in out.items() if k != "by_n"}))
    print(f"{'n':>5s} {'CI at 1.0':>16s} {'CI at 0.9':>16s} {'sig. gap':>9s} {'P(see flip)':>12s}")
    for r in out["by_n"]:
        print(f"{r['n']:5d} {str(r['wilson_at_1.0']):>16s} {str(r['wilson_at_0.9']):>16s} "
              f"{r['significant_gap'] or float('nan'):9.3f} {r['p_see_a_flip_if_loss_f']:12.3f}")  # fmt: skip
    paths = [Path(x) for x in a.results.split(",") if x]
    if len(paths) == 1:
        out["cells"] = cells(paths[0])
        for c in out["cells"]:
            if c["task"] in ("passkey", "kv_retrieval"):
                print(f"{c['setting']:22s} {c['task']:14s} {c['length']:>5s} {c['acc']:.2f} {c['wilson95']}")
    if a.equal_accuracy:
        rows = merged_rows(paths)
        out["equal_accuracy"] = [pages_at_equal_accuracy(rows, a.equal_accuracy, c.split(","), a.reps)
                                 for c in a.curve]  # fmt: skip
        for eq in out["equal_accuracy"]:
            print(json.dumps({k: eq[k] for k in ("target", "curve", "ratio", "bootstrap")}))
        if a.write:
            write_merged(paths, rows, out["equal_accuracy"], Path(a.write))
    return out


def write_merged(paths: list[Path], rows: list[dict], equal: list[dict], dst: Path) -> None:
    """One result JSON (the first file's header) of merged rows and the equal-accuracy analysis, and
    eval_accuracy's plot of it at the longest length."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from eval_accuracy import plot

    res = json.loads(paths[0].read_text())
    res.update(merged_from=[p.name for p in paths], rows=rows, equal_accuracy=equal)
    dst.write_text(json.dumps(res, separators=(",", ":")))
    plot(rows, dst.with_suffix(".png"), str(max(int(x) for x in res["config"]["lengths"])), zoom=True)
    print("wrote", dst)


if __name__ == "__main__":
    main()
