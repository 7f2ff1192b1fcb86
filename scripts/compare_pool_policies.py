#!/usr/bin/env python
"""Hot-pool policy options of issue 6 on recorded access logs: one shared LRU pool (what tiered mode
runs) against per-layer quotas, fixed or adapting to each layer's recent selection size, and against
the shared pool with sink / local-window pages pinned; Belady's optimum as the ceiling.

    python scripts/compare_pool_policies.py benchmarks/access_trained benchmarks/access_server_trained

Capacities are multiples of the per-step budget (mean units selected per decode step); the first step
of every log only fills the pool. Writes benchmarks/results/pool-policies-<date>.json (hit rates).

--device-pool also replays each log through the device pool tiered mode runs (memory/device_pool.py:
CLOCK placement, one call per layer and step, its Triton kernels; on a CPU under TRITON_INTERPRET=1),
shared and with --psa-hot-quota adaptive every --intervals steps: the built policies, not a model of them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_psa.access_log import load_access_log  # noqa: E402
from sglang_psa.memory import cache_sim as C  # noqa: E402
from sglang_psa.provenance import git_commit  # noqa: E402

WARMUP = 1


def policies(stream: C.AccessStream, cap: float, intervals: list[int]) -> dict[str, float]:
    out = {
        "shared_lru": C.simulate(stream, cap, "lru", warmup_steps=WARMUP).hit_rate,
        "shared_lru_pinned": C.simulate_pinned(stream, cap, warmup_steps=WARMUP).hit_rate,
        "static_quota_lru": C.simulate_quota(stream, cap, policy="lru", warmup_steps=WARMUP).hit_rate,
        "belady": C.simulate(stream, cap, "belady", warmup_steps=WARMUP).hit_rate,
    }
    for n in intervals:
        r = C.simulate_adaptive_quota(stream, cap, interval=n, warmup_steps=WARMUP)
        out[f"adaptive_quota_lru_every{n}"] = r.hit_rate
    return {k: round(v, 4) for k, v in out.items()}


def device_pool_hit_rate(stream: C.AccessStream, cap: float, quota: str = "off", interval: int = 8) -> float:
    """Hit rate of DevicePagePool (clock) over the stream, after WARMUP steps: each (step, layer) group,
    in stream order, is one place() call of that layer's units (dense ids per layer), new_step() between
    steps. Units stand for pages: the pool holds one per slot, whatever their size."""
    import torch

    from sglang_psa.memory.device_pool import DevicePagePool

    ids = np.zeros(len(stream), dtype=np.int64)
    for lyr in range(stream.num_layers):
        m = stream.layer == lyr
        ids[m] = np.unique(stream.keys[m], return_inverse=True)[1]
    num_units = int(ids.max()) + 1 if len(stream) else 1
    pool = DevicePagePool(int(cap), stream.num_layers, num_units, 1, 1, 1, torch.float16, policy="clock",
                          quota=quota, quota_interval=interval)  # fmt: skip
    group = stream.step * stream.num_layers + stream.layer
    cuts = np.flatnonzero(np.diff(group)) + 1
    hits = needed = 0
    cur_step = -1
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(stream)]):
        st, lyr = int(stream.step[lo]), int(stream.layer[lo])
        if st != cur_step:
            pool.new_step()
            cur_step = st
        pages = torch.from_numpy(np.unique(ids[lo:hi]).astype(np.int32))
        hit = pool.place(lyr, pages).hit
        if st >= WARMUP:
            hits += int(hit.sum())
            needed += pages.numel()
    return hits / max(needed, 1)


def device_policies(stream: C.AccessStream, cap: float, intervals: list[int]) -> dict[str, float]:
    out = {"device_clock": device_pool_hit_rate(stream, cap)}
    for n in intervals:
        out[f"device_clock_quota_every{n}"] = device_pool_hit_rate(stream, cap, "adaptive", n)
    return {k: round(v, 4) for k, v in out.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("logs", nargs="+", help="access-log directories or .npz files")
    ap.add_argument("--multiples", default="1,1.5,2,3")
    ap.add_argument("--intervals", default="8,32", help="steps between two quota updates")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--device-pool", action="store_true", help="also replay through DevicePagePool")
    ap.add_argument("--units", default="head_page,page", help="head_page (per kv head) and / or page")
    ap.add_argument("--name", default="pool-policies", help="result file prefix")
    a = ap.parse_args(argv)
    units = a.units.split(",")
    multiples = [float(m) for m in a.multiples.split(",")]
    intervals = [int(n) for n in a.intervals.split(",")]
    rows = []
    for log in a.logs:
        trace = load_access_log(log)
        for unit, merge in (("head_page", False), ("page", True)):
            if unit not in units:
                continue
            stream = C.build_stream(trace, merge_heads=merge)
            budget = stream.budget_units()
            for m in multiples:
                rows.append({"log": log, "source": trace.source, "unit": unit, "multiple": m,
                             "capacity_units": round(m * budget, 1), "steps": stream.num_steps,
                             "forced_share": round(float(stream.forced.mean()), 4),
                             "hit_rate": policies(stream, m * budget, intervals)})  # fmt: skip
                if a.device_pool:
                    rows[-1]["hit_rate"].update(device_policies(stream, m * budget, intervals))
                print(json.dumps(rows[-1]), flush=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    res = {
        "benchmark": "compare_pool_policies", "date": now.isoformat(timespec="seconds"),
        "commit": git_commit(), "device": "cpu (offline replay of recorded selections)",
        "config": {"multiples": multiples, "intervals": intervals, "warmup_steps": WARMUP,
                   "device_pool": a.device_pool}, "rows": rows,
    }  # fmt: skip
    os.makedirs(a.out, exist_ok=True)
    path = Path(a.out) / f"{a.name}-{now.strftime('%Y%m%d')}.json"
    path.write_text(json.dumps(res, separators=(",", ":")))
    print("wrote", path)
    return res


if __name__ == "__main__":
    main()
