#!/usr/bin/env python3
"""Task accuracy of sparse decode through the real SGLang server: dense vs PSA vs top-k vs streaming.

For every backend setting a stock `python -m sglang.launch_server` is started on the trained small
model (scripts/train_small_model.py), the long-context tasks of sglang_psa.longctx_tasks are sent
as input_ids with greedy decoding, answers are scored by exact match, and PSA's own statistics
(--psa-stats --psa-measure-recall, read from Prometheus /metrics) give the fraction of KV pages
read and the attention-mass recall of each selection. Servers run several at a time on one GPU
(the model is tiny); CUDA graphs are off because recall needs a dense pass.

    python scripts/eval_accuracy.py --model models/psa-llama-2m --lengths 4096,8192 --samples 20

Writes benchmarks/results/eval-accuracy-<date>.json and a plot of accuracy vs pages read.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sglang_psa.longctx_tasks import (  # noqa: E402
    TASK_KINDS,
    FillerCorpus,
    as_encoders,
    find_local_text,
    make_tasks,
    score_answer,
)
from sglang_psa.provenance import git_commit  # noqa: E402

PAGE = 16  # Quest's page size; 8k tokens = 512 pages
SINK, LOCAL = 1, 4  # pages always kept by every PSA / top-k setting (streaming uses its own)


def backend_settings(
    taus: list[float],
    topks: list[int],
    stream_pages: int,
    capped: tuple = (),
    floored: tuple = (),
    lognormal: tuple = (),
) -> dict[str, list[str]]:
    """name -> server flags for every setting compared.

    capped / floored: (tau, pages) pairs for estimated mode under a budget cap (--psa-max-pages) or
    above a page floor (--psa-min-pages). The offline study (attention-sparsity-hf-*.json) found
    accuracy follows a minimum of pages per kv head more than the attention-mass recall, and that a
    cap stops diffuse heads (tau-only reads) while peaked heads still stop early.
    lognormal: (tau, min_pages[, max_pages]) for estimated mode with the log-normal mass estimate,
    pages ranked by it (--psa-mass-estimate lognormal --psa-rank-by estimate); see lognormal_name.
    """
    psa = ["--attention-backend", "psa", "--psa-max-pages", "2048", "--psa-dense-below", "0",
           "--psa-sink-pages", str(SINK), "--psa-local-pages", str(LOCAL), "--psa-stats",
           "--psa-stats-interval", "1", "--psa-measure-recall"]  # fmt: skip
    out: dict[str, list[str]] = {"dense": ["--attention-backend", "flashinfer"]}
    for mode in ("estimated", "certified"):
        for tau in taus:
            out[f"psa-{mode}-{tau:g}"] = [*psa, "--psa-mode", mode, "--psa-tau", str(tau)]
    for tau, pages in capped:
        flags = [*psa[:2], "--psa-max-pages", str(pages), *psa[4:]]
        out[f"psa-estimated-{tau:g}-max{pages}"] = [*flags, "--psa-mode", "estimated", "--psa-tau", str(tau)]
    for tau, pages in floored:
        out[f"psa-estimated-{tau:g}-min{pages}"] = [*psa, "--psa-mode", "estimated", "--psa-tau", str(tau),
                                                    "--psa-min-pages", str(pages)]  # fmt: skip
    for tau, lo, *hi in lognormal:
        cap = hi[0] if hi else 2048
        flags = [*psa[:2], "--psa-max-pages", str(cap), *psa[4:]]
        out[lognormal_name(tau, lo, *hi)] = [*flags, "--psa-mode", "estimated", "--psa-tau", str(tau),
                                            "--psa-min-pages", str(lo), "--psa-mass-estimate", "lognormal",
                                            "--psa-rank-by", "estimate"]  # fmt: skip
    for k in topks:
        out[f"topk-{k}"] = [*psa, "--psa-mode", "topk", "--psa-topk", str(k)]
    # streaming: sinks + local window only (LServe's streaming heads): top-k with no free slot
    sink = max(1, stream_pages // 8)
    out[f"streaming-{stream_pages}"] = [*psa, "--psa-mode", "topk", "--psa-topk", str(stream_pages),
                                        "--psa-sink-pages", str(sink), "--psa-local-pages",
                                        str(stream_pages - sink)]  # fmt: skip
    return out


def lognormal_name(tau: float, min_pages: int, max_pages: int | None = None) -> str:
    """Setting name of estimated mode with the log-normal estimate, ranked by it: psa-lognormal-<tau>
    [-min<n>][-max<n>]; min_pages == max_pages is a fixed budget, "topk-lognormal-<n>" (top-k with the
    log-normal estimate as its order instead of Quest's bound: it tells the ranking's share of a gain
    from the threshold's)."""
    if max_pages is not None and max_pages == min_pages:
        return f"topk-lognormal-{max_pages}"
    return (f"psa-lognormal-{tau:g}" + (f"-min{min_pages}" if min_pages else "")
            + (f"-max{max_pages}" if max_pages is not None else ""))  # fmt: skip


def parse_ints_after_tau(spec: str) -> tuple[tuple, ...]:
    """ "0.8:16,0.5:10:12" -> ((0.8, 16), (0.5, 10, 12)): a tau, then one or more page counts."""
    out = []
    for item in filter(None, spec.split(",")):
        tau, *pages = item.split(":")
        if not pages:
            raise ValueError(f"expected tau:pages[:pages], got {item!r}")
        out.append((float(tau), *(int(n) for n in pages)))
    return tuple(out)


def streaming_name(name: str, layers: str) -> str:
    """The name of `name` with --psa-streaming-layers `layers` added: topk-12 -> topk-12-stream0-2."""
    return f"{name}-stream{layers.replace(',', '_')}"


def check_hybrid(names: list[str], available) -> None:
    """--hybrid copies sparse settings of this run (not dense): a ValueError names the stranger."""
    for name in names:
        if name not in available or name == "dense":
            raise ValueError(f"--hybrid names PSA settings of this run; {name!r} is not one")


def add_streaming(settings: dict[str, list[str]], names: list[str], layers: str) -> None:
    """Add a copy of each setting in `names` whose `layers` read only sinks + local window
    (LServe's streaming heads, per layer), e.g. the layers a per-layer sensitivity sweep finds the
    answer does not depend on."""
    check_hybrid(names, settings)
    for name in names:
        settings[streaming_name(name, layers)] = [*settings[name], "--psa-streaming-layers", layers]


def _post(url: str, body: dict, timeout: float = 600) -> dict | None:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except (urllib.error.URLError, TimeoutError, ConnectionError):
        return None


def _metrics(url: str) -> dict[str, float]:
    """Sum of every sglang:psa_* sample by metric name (labels dropped)."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    for line in text.splitlines():
        m = re.match(r"^(sglang:psa_\w+?)(?:_total)?(?:\{[^}]*\})?\s+([-\d.e+]+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


class Server:
    """One launch_server process on its own port."""

    def __init__(self, model: str, port: int, flags: list[str], log: Path, mem: float):
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--port", str(port),
               "--page-size", str(PAGE), "--context-length", "32768", "--max-total-tokens", "300000",
               "--max-running-requests", "32", "--mem-fraction-static", str(mem), "--disable-cuda-graph",
               "--disable-piecewise-cuda-graph", "--enable-metrics", *flags]  # fmt: skip
        env = dict(os.environ, SGLANG_FLASHINFER_USE_TENSOR_CORE="true")
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 240) -> bool:
        t = time.time()
        while time.time() - t < timeout:
            if self.proc.poll() is not None:
                return False
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                return True
            except Exception:
                time.sleep(2)
        return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_setting(name: str, flags: list[str], prompts: list[dict], a: argparse.Namespace, port: int) -> dict:
    log = Path(a.log_dir) / f"server-{name}.log"
    srv = Server(a.model, port, flags, log, a.mem_fraction)
    t0 = time.time()
    try:
        if not srv.wait_ready():
            tail = log.read_text()[-3000:] if log.exists() else ""
            return {"name": name, "flags": flags, "error": "server did not start", "log_tail": tail}
        ready_s = time.time() - t0

        def one(p: dict) -> dict:
            body = {"input_ids": p["input_ids"], "sampling_params": {"max_new_tokens": p["max_new"],
                                                                      "temperature": 0}}  # fmt: skip
            d = _post(f"{srv.url}/generate", body)
            text = d.get("text", "") if isinstance(d, dict) else None
            score = score_answer(text, p["answer"]) if text is not None else 0.0
            return {"kind": p["kind"], "length": p["length"], "score": score, "ok": text is not None}

        # one prompt length at a time, the server's counters read after each: pages read per length
        results, met_after = [None] * len(prompts), {}
        for length in sorted({p["length"] for p in prompts}):
            idx = [i for i, p in enumerate(prompts) if p["length"] == length]
            with cf.ThreadPoolExecutor(a.concurrency) as ex:
                for i, r in zip(idx, ex.map(one, [prompts[i] for i in idx])):
                    results[i] = r
            met_after[str(length)] = _metrics(srv.url)
        met = met_after[max(met_after, key=int)]
    finally:
        srv.stop()
    acc: dict[str, dict[str, float]] = {}
    for kind in sorted({r["kind"] for r in results}):
        acc[kind] = {}
        for length in sorted({r["length"] for r in results}):
            rs = [r["score"] for r in results if r["kind"] == kind and r["length"] == length]
            acc[kind][str(length)] = sum(rs) / max(1, len(rs))
    sel, dense = met.get("sglang:psa_selected_pages", 0.0), met.get("sglang:psa_dense_pages", 0.0)
    rsum, rn = met.get("sglang:psa_recall_sum", 0.0), met.get("sglang:psa_recall_count", 0.0)
    is_psa = "psa" in flags
    by_length, before = {}, {}
    sel_key, dense_key = "sglang:psa_selected_pages", "sglang:psa_dense_pages"
    for length, m in met_after.items():  # counter deltas per length (the read-out lags one step)
        dp = m.get(dense_key, 0.0) - before.get(dense_key, 0.0)
        by_length[length] = (m.get(sel_key, 0.0) - before.get(sel_key, 0.0)) / dp if dp else None
        before = m
    return {
        "name": name,
        "flags": flags,
        "accuracy": acc,
        "mean_accuracy": sum(r["score"] for r in results) / max(1, len(results)),
        "scores": [r["score"] for r in results],  # prompt order: paired comparisons across settings
        "failed_requests": sum(not r["ok"] for r in results),
        "page_fraction": (sel / dense if dense else None) if is_psa else 1.0,
        "page_fraction_by_length": by_length if is_psa else dict.fromkeys(met_after, 1.0),
        "recall": (rsum / rn if rn else None) if is_psa else 1.0,
        "server_ready_s": round(ready_s, 1),
        "seconds": round(time.time() - t0, 1),
    }


def build_prompts(model: str, kinds: list[str], lengths: list[int], n: int) -> list[dict]:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model)
    encode, encode_batch = as_encoders(tok)
    corpus = FillerCorpus(find_local_text(max_bytes=16_000_000), encode=encode, encode_batch=encode_batch)
    prompts = []
    for kind in kinds:
        for length in lengths:
            for task in make_tasks(kind, corpus, length, n, seed=100_000):
                ids = tok(task.prompt, add_special_tokens=True)["input_ids"]
                max_new = len(encode(task.answer)) + 4
                prompts.append({"kind": kind, "length": length, "input_ids": ids, "answer": task.answer,
                                "max_new": max_new})  # fmt: skip
    return prompts


def add_vs_dense(rows: list[dict]) -> None:
    """accuracy_vs_dense[kind][length] = accuracy / the dense setting's (None where dense scored 0),
    and paired_vs_dense: prompts this setting lost / won against dense on the same prompts."""
    dense = next((r for r in rows if r["name"] == "dense" and "accuracy" in r), None)
    for r in rows:
        if dense and "scores" in r and "scores" in dense:
            pairs = list(zip(dense["scores"], r["scores"]))
            r["paired_vs_dense"] = {"lost": sum(d > x for d, x in pairs), "won": sum(x > d for d, x in pairs)}
        if dense and "accuracy" in r:
            base = dense["accuracy"]
            r["accuracy_vs_dense"] = {
                k: {n: (v / base[k][n] if base[k][n] else None) for n, v in d.items()}
                for k, d in r["accuracy"].items()
            }


def _pages_at(row: dict, length: str) -> float:
    """Fraction of pages read at one prompt length when the run recorded it, else over all prompts."""
    return row.get("page_fraction_by_length", {}).get(length, row["page_fraction"])


def plot(rows: list[dict], path: Path, length: str, dpi: int = 90, zoom: bool = False) -> None:
    """Mean accuracy at `length` vs fraction of pages read, one curve per family of settings; zoom: a
    linear page axis over the sparse settings' range (settings a few tenths of a percent apart)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = {
        "PSA estimated": r"psa-estimated-[\d.]+$", "PSA estimated, capped": r"psa-estimated-.*-max",
        "PSA estimated, floor": r"psa-estimated-.*-min", "PSA progressive": "psa-progressive",
        "PSA log-normal": r"psa-lognormal-[\d.]+$", "PSA log-normal, floor": r"psa-lognormal-.*-min\d+$",
        "PSA log-normal, floor + cap": r"psa-lognormal-.*-max\d+$",
        "top-k, log-normal order": r"topk-lognormal-\d+$",
        "PSA certified": "psa-certified", "top-k (Quest)": r"topk-\d+$", "streaming": "streaming-",
        "streaming layers + top-k (Quest)": r"topk-\d+-stream", "streaming layers + PSA": r"psa-.*-stream",
        "streaming layers + top-k, log-normal order": r"topk-lognormal-\d+-stream",
        "output-error rule (twin, exploratory)": r"psa-error-[\d.]+-min6-max16$",
    }  # fmt: skip
    for label, pattern in groups.items():
        pts = sorted(
            (_pages_at(r, length), sum(v[length] for v in r["accuracy"].values()) / len(r["accuracy"]))
            for r in rows
            if re.match(pattern, r["name"]) and r.get("page_fraction") is not None
        )
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    dense = [r for r in rows if r["name"] == "dense" and "accuracy" in r]
    if dense:
        acc = sum(v[length] for v in dense[0]["accuracy"].values()) / len(dense[0]["accuracy"])
        ax.axhline(acc, color="k", ls="--", label="dense")
    from matplotlib.ticker import NullFormatter, PercentFormatter

    if zoom:
        xs = [_pages_at(r, length) for r in rows if r["name"] != "dense" and r.get("page_fraction")]
        ax.set_xlim(0.95 * min(xs), 1.05 * max(xs))
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=2))
    else:
        ax.set_xscale("log")
        ax.set_xticks([0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.xaxis.set_minor_formatter(NullFormatter())  # log-axis minor labels overlap the major ones
    ax.set_xlabel("fraction of KV pages read per decode step")
    ax.set_ylabel(f"mean exact-match accuracy ({length} tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/psa-llama-2m")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--samples", type=int, default=20, help="prompts per task and length")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--taus", default="0.8,0.9,0.95,0.99")
    ap.add_argument("--topks", default="8,10,12,16,32,64", help="top-k budgets in pages of 16 tokens")
    ap.add_argument("--stream-pages", type=int, default=32)
    ap.add_argument("--capped", default="0.95:32,0.95:64", help="tau:max_pages settings (estimated mode)")
    ap.add_argument("--floored", default="0.8:32", help="tau:min_pages settings (estimated mode)")
    ap.add_argument("--lognormal", default="0.8:0,0.9:0,0.95:0,0.8:16,0.9:16,0.95:16,0.5:10:12,0.01:10:10",
                    help="tau:min_pages[:max_pages] settings, log-normal mass estimate ranked by it "
                         "(min 0: no floor; min == max: topk-lognormal-<n>)")  # fmt: skip
    ap.add_argument("--streaming-layers", default="0-2", help="layers the --hybrid copies stream")
    ap.add_argument("--hybrid", default="", help="settings to repeat with --psa-streaming-layers")
    ap.add_argument("--only", default="", help="comma-separated setting names (default: all)")
    ap.add_argument("--parallel", type=int, default=6, help="servers at a time on the GPU")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight per server")
    ap.add_argument("--mem-fraction", type=float, default=0.3)
    ap.add_argument("--port", type=int, default=31000)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--log-dir", default="/tmp/eval_logs")
    ap.add_argument("--access-log", default="", help="record the selections of --access-log-setting here")
    ap.add_argument("--access-log-setting", default="psa-estimated-0.95")
    a = ap.parse_args(argv)
    os.makedirs(a.log_dir, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)

    kinds = list(TASK_KINDS) if a.tasks == "all" else a.tasks.split(",")
    lengths = [int(x) for x in a.lengths.split(",")]
    pairs = lambda v: tuple((float(t), int(n)) for t, n in (x.split(":") for x in v.split(",") if x))  # noqa: E731
    taus, topks = [float(t) for t in a.taus.split(",")], [int(k) for k in a.topks.split(",")]
    settings = backend_settings(taus, topks, a.stream_pages, pairs(a.capped), pairs(a.floored),
                                parse_ints_after_tau(a.lognormal))  # fmt: skip
    if a.hybrid:
        add_streaming(settings, a.hybrid.split(","), a.streaming_layers)
    if a.only:
        settings = {k: v for k, v in settings.items() if k in a.only.split(",")}
    if a.access_log and a.access_log_setting in settings:
        src = f"trained-{Path(a.model).name}-{a.access_log_setting}"
        settings[a.access_log_setting] += ["--psa-access-log", a.access_log, "--psa-access-log-source", src]
    prompts = build_prompts(a.model, kinds, lengths, a.samples)
    print(f"{len(prompts)} prompts x {len(settings)} settings", flush=True)

    rows = []
    with cf.ThreadPoolExecutor(a.parallel) as ex:
        futs = {}
        for i, (name, flags) in enumerate(settings.items()):
            futs[ex.submit(run_setting, name, flags, prompts, a, a.port + i)] = name
            time.sleep(5 if i < a.parallel else 0)  # stagger the first wave's memory profiling
        for f in cf.as_completed(futs):
            r = f.result()
            rows.append(r)
            keys = ("name", "mean_accuracy", "page_fraction", "recall", "failed_requests", "error", "seconds")
            print(json.dumps({k: r.get(k) for k in keys}), flush=True)
    order = list(settings)
    rows.sort(key=lambda r: order.index(r["name"]))
    add_vs_dense(rows)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = result_header("eval_accuracy", stamp, a.model, lengths, a.samples, kinds, cuda_graph=False)
    res["rows"] = rows
    path = Path(a.out) / f"eval-accuracy-{stamp}.json"
    path.write_text(json.dumps(res, indent=1))
    try:
        plot([r for r in rows if "accuracy" in r], path.with_suffix(".png"), str(max(lengths)))
    except Exception as e:  # a plot is a convenience; the JSON is the result
        print("plot failed:", repr(e))
    print("wrote", path)
    return res


def result_header(benchmark: str, stamp: str, model: str, lengths: list[int], samples: int, kinds: list[str],
                  **config: Any) -> dict[str, Any]:  # fmt: skip
    """The fields every accuracy result JSON starts with (device, commit, date, config)."""
    return {
        "benchmark": benchmark,
        "date": stamp,
        "commit": git_commit(),
        "device": _device(),
        "model": model,
        "config": {
            "lengths": lengths,
            "samples": samples,
            "tasks": kinds,
            "page_size": PAGE,
            "sink_pages": SINK,
            "local_pages": LOCAL,
            **config,
        },  # fmt: skip
    }


def _device() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception:
        return "unknown"


if __name__ == "__main__":
    main()
