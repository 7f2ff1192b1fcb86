#!/usr/bin/env python3
"""Long-context capacity and decode throughput of one running server (issue 6), standard library only.

Sends --n requests of --len random tokens at once (greedy, ignore_eos, --out-len new tokens each)
through SGLang's streaming /generate and timestamps every streamed token. From the timeline:
  peak_concurrency     most requests decoding at the same time (first token seen, not finished);
  decode_tok_s_at_peak tokens streamed while exactly that many decode, per second of that time
                       (prefill of late requests included if it overlaps: it is what the batch saw);
  token_capacity       the server's max_total_num_tokens (from /get_server_info).
`merge` folds several runs (one per backend) into one JSON with ratios against --baseline, and the
tiered fetch overlap their labels allow (scripts/gpu_e2e.sh's names): step_ms = 1000 x peak
concurrency / decode tok/s; a run X with a twin X_nocopy (same server, host copies skipped) exposes
step(X) - step(X_nocopy) ms of fetch a step (X_host may use X's twin: without copies there is no
miss path, nor a prefetch); an overlapping run (_nl / _prev / _ns prefetch, _host / _split miss paths,
or several of them) whose label without those tags and their _mN / _pN options (the pool path, nothing
fetched ahead) also has its exposed fetch hides 1 - exposed(run) / exposed(pool path) of it.
The runs may come from several device calls (one server start each).

    python scripts/bench_capacity.py run --n 8 --len 65536 --label flashinfer --out a.json
    python scripts/bench_capacity.py merge --baseline flashinfer --out res.json a.json b.json
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import re
import sys
import time
import urllib.request


def stream_one(url: str, ids: list[int], out_len: int, t0: float) -> dict:
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": out_len, "temperature": 0, "ignore_eos": True}}  # fmt: skip
    headers = {"Content-Type": "application/json"}
    req = urllib.request.Request(f"{url}/generate", json.dumps(body).encode(), headers)
    marks: list[tuple[float, int]] = []  # (seconds since t0, completion tokens so far)
    err = None
    try:
        with urllib.request.urlopen(req, timeout=3600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                d = json.loads(line[5:])
                if "error" in d:
                    err = str(d["error"])[:300]
                    break
                n = int(d.get("meta_info", {}).get("completion_tokens", 0))
                if n and (not marks or n > marks[-1][1]):
                    marks.append((time.perf_counter() - t0, n))
    except Exception as e:  # recorded, the run goes on
        err = repr(e)[:300]
    return {"marks": marks, "error": err, "tokens": marks[-1][1] if marks else 0}


def timeline(reqs: list[dict]) -> dict:
    """Peak decode concurrency and the token rate while it holds (see the module docstring)."""
    spans = [(r["marks"][0][0], r["marks"][-1][0]) for r in reqs if r["marks"]]
    edges = sorted({t for s in spans for t in s})
    best, peak_time = 0, 0.0
    per_level: dict[int, float] = {}
    for a, b in zip(edges, edges[1:]):
        c = sum(1 for s, e in spans if s <= a and e >= b)
        per_level[c] = per_level.get(c, 0.0) + (b - a)
        best = max(best, c)
    tokens = 0
    for a, b in zip(edges, edges[1:]):
        if sum(1 for s, e in spans if s <= a and e >= b) != best:
            continue
        peak_time += b - a
        for r in reqs:  # tokens streamed in (a, b]: a chunk may carry several under load
            m = r["marks"]
            tokens += sum(m[i][1] - m[i - 1][1] for i in range(1, len(m)) if a < m[i][0] <= b)
    return {
        "peak_concurrency": best,
        "seconds_at_peak": peak_time,
        "tokens_at_peak": tokens,
        "decode_tok_s_at_peak": tokens / peak_time if peak_time > 0 else 0.0,
        "seconds_by_concurrency": {str(k): round(v, 3) for k, v in sorted(per_level.items())},
    }


def server_info(url: str) -> dict:
    try:
        with urllib.request.urlopen(f"{url}/get_server_info", timeout=30) as r:
            info = json.loads(r.read())
    except Exception as e:
        return {"error": repr(e)}

    def find(d, key):
        if isinstance(d, dict):
            if key in d:
                return d[key]
            for v in d.values():
                x = find(v, key)
                if x is not None:
                    return x
        if isinstance(d, list):
            for v in d:
                x = find(v, key)
                if x is not None:
                    return x
        return None

    keys = ("max_total_num_tokens", "max_running_requests", "attention_backend", "mem_fraction_static",
            "enable_hierarchical_cache", "radix_cache_backend", "page_size")  # fmt: skip
    return {k: find(info, k) for k in keys}


def cmd_run(a) -> dict:
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(10, a.vocab) for _ in range(a.len)] for _ in range(a.n)]
    info = server_info(a.url)
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(a.n) as ex:
        reqs = list(ex.map(lambda p: stream_one(a.url, p, a.out_len, t0), prompts))
    wall = time.perf_counter() - t0
    cap = info.get("max_total_num_tokens")
    res = {"label": a.label, "n": a.n, "len": a.len, "out_len": a.out_len, "wall_s": wall, "server": info,
           "fits_by_tokens": (cap // (a.len + a.out_len)) if isinstance(cap, int) else None,
           "errors": [r["error"] for r in reqs if r["error"]], "tokens": [r["tokens"] for r in reqs],
           **timeline(reqs),
           "first_token_s": [round(r["marks"][0][0], 3) if r["marks"] else None for r in reqs],
           "finish_s": [round(r["marks"][-1][0], 3) if r["marks"] else None for r in reqs]}  # fmt: skip
    print(f"{a.label}: peak {res['peak_concurrency']} concurrent, "
          f"{res['decode_tok_s_at_peak']:.1f} tok/s at peak, "
          f"capacity {cap} tokens, errors {len(res['errors'])}, wall {wall:.1f} s", flush=True)  # fmt: skip
    return res


def cmd_merge(a) -> dict:
    runs = [json.load(open(p)) for p in a.files]
    base = next((r for r in runs if r["label"] == a.baseline), None)
    for r in runs:
        if base and base["peak_concurrency"] and base["decode_tok_s_at_peak"]:
            r["concurrency_vs_baseline"] = r["peak_concurrency"] / base["peak_concurrency"]
            r["throughput_vs_baseline"] = r["decode_tok_s_at_peak"] / base["decode_tok_s_at_peak"]
    return {"benchmark": "bench_capacity", "baseline": a.baseline, "runs": runs, "fetch": fetch_overlap(runs)}


# gpu_e2e.sh: next-layer / previous-step / next-step prefetch, misses attended from host memory / split
OVERLAP_TAGS = ("_nl", "_prev", "_ns", "_host", "_split")
PREFETCH_OPTS = re.compile(r"_[mp]\d+")  # gpu_e2e.sh: the prefetch's margin / copy programs


def pool_path(label: str) -> str:
    """The label without its overlap tags and their options: the same server on the pool path."""
    for tag in OVERLAP_TAGS:
        label = label.replace(tag, "")
    return PREFETCH_OPTS.sub("", label)


def step_ms(run: dict) -> float | None:
    """Milliseconds per decode step at the run's peak concurrency (None without a measurement)."""
    tok_s, c = run.get("decode_tok_s_at_peak"), run.get("peak_concurrency")
    return 1000.0 * c / tok_s if tok_s and c else None


def fetch_overlap(runs: list[dict]) -> dict:
    """Exposed fetch per step of every run with a _nocopy twin at the same concurrency, and the hidden
    fraction of every prefetching run against its no-prefetch twin (see the module docstring)."""
    by = {r["label"]: r for r in runs}
    exposed = {}
    for label, run in by.items():
        # _nocopy skips every host read and every prefetch, so where misses would be read (_host,
        # _split) or what is fetched ahead makes no difference to it: without a twin of its own, a run
        # is compared with the pool path's (no fetch, one attention pass, no prediction), so the cost
        # of a prediction counts as exposed fetch
        twin = by.get(label + "_nocopy") or by.get(pool_path(label) + "_nocopy")
        if twin is None or twin.get("peak_concurrency") != run.get("peak_concurrency"):
            continue
        a, b = step_ms(run), step_ms(twin)
        if a is not None and b is not None:
            exposed[label] = round(a - b, 3)
    hidden = {}
    for label, ms in exposed.items():
        base = pool_path(label)  # the fetch time: copies before attention, nothing ahead
        overlaps = any(tag in label for tag in OVERLAP_TAGS)  # a _pN option alone changes nothing there
        if overlaps and exposed.get(base, 0) > 0:
            hidden[label] = {"vs": base, "hidden_fraction": round(1 - ms / exposed[base], 3)}
    steps = {label: round(s, 3) for label, r in by.items() if (s := step_ms(r)) is not None}
    return {"step_ms": steps, "exposed_fetch_ms": exposed, "hidden": hidden}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=["run", "merge"])
    p.add_argument("--url", default="http://127.0.0.1:30000")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--len", type=int, default=65536)
    p.add_argument("--out-len", type=int, default=64)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", default="")
    p.add_argument("--baseline", default="flashinfer")
    p.add_argument("--meta", default="{}", help="merge: JSON object added to the result (device, commit...)")
    p.add_argument("--out", required=True)
    p.add_argument("files", nargs="*")
    a = p.parse_intermixed_args(argv)
    res = cmd_run(a) if a.cmd == "run" else cmd_merge(a)
    res.update(json.loads(a.meta))
    with open(a.out, "w") as f:
        json.dump(res, f, separators=(",", ":"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
