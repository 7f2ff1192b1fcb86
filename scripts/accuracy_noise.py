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

    python scripts/accuracy_noise.py --results benchmarks/results/eval-accuracy-20261123T143955Z.json
"""

from __future__ import annotations

import argparse
import json
import math
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns", default="10,20,50,100,150,200")
    ap.add_argument("--loss", type=float, default=0.02, help="true fraction of prompts lost (f)")
    ap.add_argument("--results", default="", help="suite result JSON: Wilson interval of every cell")
    a = ap.parse_args(argv)
    out = noise_table([int(x) for x in a.ns.split(",")], a.loss)
    print(json.dumps({k: v for k, v in out.items() if k != "by_n"}))
    print(f"{'n':>5s} {'CI at 1.0':>16s} {'CI at 0.9':>16s} {'sig. gap':>9s} {'P(see flip)':>12s}")
    for r in out["by_n"]:
        print(f"{r['n']:5d} {str(r['wilson_at_1.0']):>16s} {str(r['wilson_at_0.9']):>16s} "
              f"{r['significant_gap'] or float('nan'):9.3f} {r['p_see_a_flip_if_loss_f']:12.3f}")  # fmt: skip
    if a.results:
        out["cells"] = cells(Path(a.results))
        for c in out["cells"]:
            if c["task"] in ("passkey", "kv_retrieval"):
                print(f"{c['setting']:22s} {c['task']:14s} {c['length']:>5s} {c['acc']:.2f} {c['wilson95']}")
    return out


if __name__ == "__main__":
    main()
