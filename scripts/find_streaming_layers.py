#!/usr/bin/env python3
"""Which decoder layers can stream (read only sinks + local window) without costing accuracy: the
calibration behind --psa-streaming-layers, on the offline twin (HF transformers decode on the CPU,
PSA's torch references; scripts/eval_accuracy_hf.py).

LServe and DuoAttention pick streaming heads by calibration; this does it a layer at a time, by task
accuracy on the long-context suite:
  1. every layer alone streaming, the others dense: prompts it loses against dense (paired);
  2. greedy, in order of fewest losses: add a layer to the streaming set while the set as a whole
     loses at most --max-lost prompts against dense (each candidate set re-run on the same prompts).

    python scripts/find_streaming_layers.py --model models/psa-llama-2m --lengths 8192 --samples 30

Writes benchmarks/results/streaming-layers-<stamp>.json with both passes and the flag to pass.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_accuracy import add_vs_dense, build_prompts, result_header  # noqa: E402
from eval_accuracy_hf import Setting, load_with_sparsifier, run_prompts, summarize  # noqa: E402


def flag(layers: list[int]) -> str:
    return ",".join(str(x) for x in sorted(layers))


def evaluate(ctx, layer_sets: list[list[int]], dense: dict | None = None) -> list[dict]:
    """Rows of dense and of one setting per streaming set, over the same prompts, with the prompts
    each loses against dense (add_vs_dense). Pass the dense row of an earlier call on the same prompts
    to reuse it instead of decoding dense again."""
    model, tok, sparsifier, prompts = ctx
    settings = [] if dense is not None else [Setting("dense", "dense")]
    settings += [Setting(f"stream-{flag(ls)}", "dense", streaming_layers=frozenset(ls)) for ls in layer_sets]
    run_prompts(model, tok, sparsifier, prompts, settings)
    rows = ([dense] if dense is not None else []) + summarize(settings)
    add_vs_dense(rows)
    for r in rows:
        r["lost"] = r["paired_vs_dense"]["lost"]
    return rows


def compact(row: dict) -> dict:
    """A row for the result file: scores as one character per prompt, no per-length recall."""
    dropped = ("recall_by_length", "accuracy_vs_dense", "paired_vs_dense")
    out = {k: v for k, v in row.items() if k not in dropped}
    out["scores"] = "".join(str(int(x)) for x in row["scores"])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/psa-llama-2m")
    ap.add_argument("--lengths", default="8192")
    ap.add_argument("--samples", type=int, default=30)
    ap.add_argument("--tasks", default="passkey,kv_retrieval")
    ap.add_argument("--max-lost", type=int, default=2, help="prompts the chosen set may lose against dense")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    t0 = time.time()
    sparsifier, tok, model = load_with_sparsifier(a.model)
    kinds, lengths = a.tasks.split(","), [int(x) for x in a.lengths.split(",")]
    ctx = (model, tok, sparsifier, build_prompts(a.model, kinds, lengths, a.samples))
    n_layers = model.config.num_hidden_layers

    single = evaluate(ctx, [[layer] for layer in range(n_layers)])
    for r in single[1:]:
        print(f"{r['name']}: lost {r['lost']}, pages {r['page_fraction']:.3f}", flush=True)
    order = sorted(range(n_layers), key=lambda layer: (single[1 + layer]["lost"], layer))
    chosen: list[int] = []
    greedy = []
    for layer in order:
        if single[1 + layer]["lost"] > a.max_lost:
            break  # alone it already loses too much; so does any set holding it
        row = evaluate(ctx, [chosen + [layer]], dense=single[0])[1]
        keep = row["lost"] <= a.max_lost
        greedy.append({"added": layer, "kept": keep, **compact(row)})
        print(f"{row['name']}: lost {row['lost']} -> {'keep' if keep else 'drop'} layer {layer}", flush=True)
        if keep:
            chosen.append(layer)

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = result_header("find_streaming_layers", stamp, a.model, lengths, a.samples, kinds,
                        max_lost=a.max_lost, seconds=round(time.time() - t0),
                        device_note="cpu, HF transformers, fp32 (offline twin)")  # fmt: skip
    res["single_layer"] = [compact(r) for r in single]
    res["greedy"] = greedy
    res["streaming_layers"] = flag(chosen)
    res["flag"] = f"--psa-streaming-layers {flag(chosen)}" if chosen else ""
    os.makedirs(a.out, exist_ok=True)
    path = Path(a.out) / f"streaming-layers-{stamp}.json"
    path.write_text(json.dumps(res, separators=(",", ":")))
    print("streaming layers:", flag(chosen) or "none", "| wrote", path)
    return res


if __name__ == "__main__":
    main()
