#!/usr/bin/env python3
"""How well does --psa-prefetch next-layer predict what a layer selects, on a model with real weights?

Runs the trained small model in HF transformers on CPU (dense prefill and greedy decode, the suite's
prompts) and, at every decode step and layer l+1 >= 1, selects pages twice with PSA's rule (the
kernels' torch references over layer l+1's cached keys): once with layer l+1's real query and once with
the estimate sglang_psa/lookahead.py makes, layer l+1's norm, q projection and RoPE applied to the
residual stream entering layer l. Reports per layer:

* coverage: of the (kv head, page) pairs the real query selects, the share the estimate selected too
  (what next-layer prefetch would have brought in ahead of time, before any pool);
* new_coverage: the same restricted to pairs the layer did not select at the previous step (the ones a
  hot pool misses; a previous-step prediction covers none of them);
* spec_pages / real_pages: selection sizes (extra pages are bandwidth a wrong prediction wastes).

    python scripts/lookahead_recall_hf.py --samples 2 --lengths 8192 --steps 24
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from analyze_attention_sparsity import build_prompts  # noqa: E402
from eval_accuracy import LOCAL, PAGE, SINK, result_header  # noqa: E402

from sglang_psa.config import MASS_ESTIMATES  # noqa: E402
from sglang_psa.kernels import (  # noqa: E402
    SelectParams,
    alloc_summaries,
    page_bounds_ref,
    select_pages_ref,
    update_page_summaries_ref,
)
from sglang_psa.kernels._common import selection_mask  # noqa: E402


def layer_query(layer, stream: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF Llama layer's post-RoPE query of one token from its input stream [1, hidden]: [Hq, D]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    q = attn.q_proj(layer.input_layernorm(stream)).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return q[0, :, 0]


def record_layer_inputs(layers) -> dict[int, torch.Tensor]:
    """Forward pre-hooks keeping the residual stream entering each HF decoder layer (HF does not fuse
    it into the norm): {layer index: hidden_states [b, t, hidden]}, overwritten at every forward."""
    streams: dict[int, torch.Tensor] = {}

    def keep(i: int):
        def hook(module, args, kwargs):
            streams[i] = kwargs.get("hidden_states", args[0] if args else None)

        return hook

    for i, lay in enumerate(layers):
        lay.register_forward_pre_hook(keep(i), with_kwargs=True)
    return streams


def select(q: torch.Tensor, keys: torch.Tensor, scaling: float, rule: dict) -> torch.Tensor:
    """PSA's selection of one decode token: q [Hq, D], keys [Hkv, L, D] -> mask [Hkv, N pages]."""
    hkv, length, d = keys.shape
    n = -(-length // PAGE)
    k = torch.nn.functional.pad(keys.permute(1, 0, 2), (0, 0, 0, 0, 0, n * PAGE - length))  # slots 0..
    kmin, kmax = alloc_summaries(n * PAGE, hkv, d, PAGE, k.dtype, k.device)
    update_page_summaries_ref(k, kmin, kmax, torch.arange(length), PAGE)  # the server's summaries
    r2t = torch.arange(n * PAGE, dtype=torch.int32)[None]
    seq = torch.tensor([length])
    meta = (r2t, torch.zeros(1, dtype=torch.int32), seq, PAGE, PAGE, scaling, n)
    bounds, centers = page_bounds_ref(q[None], kmin, kmax, *meta, with_centers=True,
                                      variance_weight=MASS_ESTIMATES[rule["estimate"]])  # fmt: skip
    order = centers if rule["rank_by"] == "estimate" else bounds
    params = SelectParams(tau=rule["tau"], sink_pages=SINK, local_pages=LOCAL,
                          min_pages=min(rule["min_pages"], n), max_pages=n)  # fmt: skip
    idx, cnt = select_pages_ref(order, seq, PAGE, params, mass_logits=centers)
    return selection_mask(idx[0], cnt[0], n)


RULES = {
    "lognormal-0.95-min16": {"tau": 0.95, "estimate": "lognormal", "rank_by": "estimate", "min_pages": 16},
    "center-0.9": {"tau": 0.9, "estimate": "center", "rank_by": "bound", "min_pages": 0},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/psa-llama-2m")
    ap.add_argument("--lengths", default="8192")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--tasks", default="passkey,kv_retrieval,multi_needle")
    ap.add_argument("--steps", type=int, default=24, help="decode steps per prompt")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    layers = model.model.layers
    streams = record_layer_inputs(layers)
    lengths, kinds = [int(x) for x in a.lengths.split(",")], a.tasks.split(",")
    prompts = build_prompts(a.model, kinds, lengths, a.samples, tok, 100_000)
    # per rule and layer: covered, real, new covered, new, spec pages, steps
    acc = {name: {i: [0.0] * 6 for i in range(1, len(layers))} for name in RULES}
    t0 = time.time()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p["input_ids"]])
            res = model(input_ids=ids, use_cache=True)
            past, nxt = res.past_key_values, int(res.logits[0, -1].argmax())
            prev: dict[tuple[str, int], torch.Tensor] = {}
            for step in range(a.steps):
                pos = torch.tensor([[ids.shape[1] + step]])
                res = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True,
                            position_ids=pos)  # fmt: skip
                past, nxt = res.past_key_values, int(res.logits[0, -1].argmax())
                cos, sin = model.model.rotary_emb(streams[0], pos)
                for li in range(1, len(layers)):
                    lay = layers[li]
                    real = layer_query(lay, streams[li][0], cos, sin)
                    spec = layer_query(lay, streams[li - 1][0], cos, sin)  # the stream entering layer l-1
                    keys = past.layers[li].keys[0] if hasattr(past, "layers") else past.key_cache[li][0]
                    for name, rule in RULES.items():
                        m_real = select(real, keys, lay.self_attn.scaling, rule)
                        m_spec = select(spec, keys, lay.self_attn.scaling, rule)
                        s = acc[name][li]
                        s[0] += float((m_real & m_spec).sum())
                        s[1] += float(m_real.sum())
                        old = prev.get((name, li))
                        if old is not None:
                            new = m_real.clone()
                            new[:, : old.shape[1]] &= ~old
                            s[2] += float((new & m_spec).sum())
                            s[3] += float(new.sum())
                        s[4] += float(m_spec.sum())
                        s[5] += 1
                        prev[(name, li)] = m_real
            print(f"{p['kind']} {p['length']} done ({time.time() - t0:.0f}s)", flush=True)
    out_rows = {}
    for name, per in acc.items():
        rows = {}
        for li, s in per.items():
            n = max(s[5], 1)
            rows[f"L{li}"] = {
                "coverage": round(s[0] / max(s[1], 1), 4), "new_coverage": round(s[2] / max(s[3], 1), 4),
                "new_pairs_per_step": round(s[3] / n, 2), "real_pages_per_step": round(s[1] / n, 1),
                "spec_pages_per_step": round(s[4] / n, 1),
            }  # fmt: skip
        tot = [sum(s[i] for s in per.values()) for i in range(6)]
        rows["all"] = {
            "coverage": round(tot[0] / max(tot[1], 1), 4),
            "new_coverage": round(tot[2] / max(tot[3], 1), 4),
        }
        out_rows[name] = rows
        print(name, json.dumps(rows))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = result_header("lookahead_recall_hf", stamp, a.model, lengths, a.samples, kinds, steps=a.steps,
                        rules=RULES, device_note="cpu, HF transformers, fp32")  # fmt: skip
    res["layers"] = out_rows
    path = Path(a.out) / f"lookahead-recall-hf-{stamp}.json"
    path.write_text(json.dumps(res, separators=(",", ":")))
    print("wrote", path)
    return res


if __name__ == "__main__":
    main()
