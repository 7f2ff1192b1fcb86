#!/usr/bin/env python3
"""Access log of PSA selections on the trained small model (real attention, CPU ok).

Dummy weights give flat attention, so the access-pattern study needs a model that really attends.
This runs models/psa-llama-2m in HF transformers with PSA's selection applied at every decode step
and layer (scripts/eval_accuracy_hf.Sparsifier: page summaries -> bounds/centers -> select_pages_ref
-> attention over the selected pages) and records the selections with sglang_psa.access_log, source
`trained-psa-llama-2m-hf`. Prompts: long stretches of the model's training-domain text (continued
for --steps tokens) and long-context tasks, one request at a time.

    python scripts/trace_trained_model.py -o benchmarks/access_trained
    python scripts/analyze_access.py benchmarks/access_trained -o docs/access_patterns_trained
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from eval_accuracy_hf import PAGE, Setting, load_with_sparsifier  # noqa: E402

from sglang_psa.access_log import AccessLogger  # noqa: E402
from sglang_psa.longctx_tasks import FillerCorpus, as_encoders, find_local_text, make_task  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/psa-llama-2m")
    ap.add_argument("-o", "--out", default="benchmarks/access_trained")
    ap.add_argument("--lengths", default="8192,16384", help="prompt lengths (text and task prompts each)")
    ap.add_argument("--steps", type=int, default=200, help="decode steps per request")
    ap.add_argument("--tau", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    sp, tok, model = load_with_sparsifier(a.model)
    cfg = model.config
    encode, encode_batch = as_encoders(tok)
    corpus = FillerCorpus(find_local_text(max_bytes=8_000_000), encode=encode, encode_batch=encode_batch)
    rng = random.Random(a.seed)
    prompts = []
    for n in (int(x) for x in a.lengths.split(",")):
        prompts.append((f"text-{n}", [tok.bos_token_id, *corpus.sample_ids(rng, n - 1).tolist()]))
        task = make_task("kv_retrieval", corpus, n, rng=rng)
        prompts.append((f"kv_retrieval-{n}", tok(task.prompt, add_special_tokens=True)["input_ids"]))
    if os.path.isdir(a.out):
        shutil.rmtree(a.out)
    width = -(-(max(len(p) for _, p in prompts) + a.steps) // PAGE)
    setting = Setting(f"psa-estimated-{a.tau:g}", "estimated", tau=a.tau)
    log = AccessLogger(
        a.out, source=f"trained-{Path(a.model).name}-hf", num_layers=cfg.num_hidden_layers,
        num_kv_heads=cfg.num_key_value_heads, width=width, page_size=PAGE, head_dim=cfg.head_dim,
        elem_bytes=2, max_requests=1, max_bytes_per_file=8 << 20,
        meta={"model": a.model, "mode": "estimated", "tau": a.tau, "sink_pages": setting.sink,
              "local_pages": setting.local, "decode": "hf-transformers + PSA torch references"},
    )  # fmt: skip
    step = 0
    with torch.no_grad():
        for rid, ids in prompts:
            model.config._attn_implementation = "sdpa"
            out = model(input_ids=torch.tensor([ids]), use_cache=True)
            past, nxt = copy.deepcopy(out.past_key_values), int(out.logits[0, -1].argmax())
            model.config._attn_implementation = "psa_sim"
            sp.setting, sp.access_log = setting, log
            for _ in range(a.steps):
                log.begin_step(step, [rid])
                res = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
                past, nxt = res.past_key_values, int(res.logits[0, -1].argmax())
                step += 1
            sp.access_log = None
            print(f"{rid}: {len(ids)} tokens, {a.steps} steps; pages read so far "
                  f"{setting.total(0) / max(1, setting.total(1)):.3f}, recall "
                  f"{setting.total(2) / max(1, setting.total(3)):.4f}", flush=True)  # fmt: skip
    log.close()
    print(f"wrote {log.files_written} files, {log.records_written} records to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
