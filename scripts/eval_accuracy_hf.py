#!/usr/bin/env python3
"""Offline accuracy of PSA's selection rules on the trained small model, with HF transformers (CPU ok).

The GPU suite (scripts/eval_accuracy.py) runs every setting through the real SGLang server. This
script is its machine-independent twin: the same trained model, tasks and settings, but decode runs
in HF transformers with an attention function that applies PSA's algorithm to the model's own KV
cache at every decode step and layer: per-page min/max key summaries -> Quest bounds and centers ->
selection (sglang_psa.kernels.select_pages_ref, the reference the Triton kernel is tested against;
certified mode: rounds of doubling size in bound order until the exact mass certifies tau) -> exact
attention over the selected pages only. It reports exact-match accuracy, the fraction of KV pages
read and the attention-mass recall, per setting. Prefill is dense (as in the server) and shared by
all settings of a prompt.

    python scripts/eval_accuracy_hf.py --model models/psa-llama-2m --lengths 4096,8192 --samples 10
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_accuracy import (  # noqa: E402
    LOCAL,
    PAGE,
    SINK,
    add_vs_dense,
    build_prompts,
    check_hybrid,
    lognormal_name,
    parse_ints_after_tau,
    plot,
    result_header,
    streaming_name,
)

from sglang_psa.config import MASS_ESTIMATES, PSAConfig  # noqa: E402
from sglang_psa.kernels import SelectParams, page_bounds_ref, select_pages_ref, select_streaming  # noqa: E402
from sglang_psa.kernels._common import compact_selection, page_layout, selection_mask  # noqa: E402
from sglang_psa.longctx_tasks import TASK_KINDS, score_answer  # noqa: E402


@dataclass
class Setting:
    name: str
    mode: str  # dense | estimated | progressive | certified | topk | error (exploratory, twin only)
    tau: float = 1.0  # error mode: the output-error threshold eps
    topk: int = 0
    sink: int = SINK
    local: int = LOCAL
    first_round: int = 16
    # estimated mode: --psa-mass-estimate (page_bounds' variance weight), --psa-rank-by, page floor/cap
    variance_weight: float = 0.0
    rank_by: str = "bound"
    min_pages: int = 0
    max_pages: int | None = None
    streaming_layers: frozenset[int] = frozenset()  # --psa-streaming-layers: sinks + local window only
    # per prompt length (the driver sets `length` before each prompt), summed over decode steps and
    # layers: [selected pages, all pages, recall sum, recall count]
    length: str = ""
    by_length: dict[str, list[float]] = field(default_factory=dict)
    # the same sums per layer: where the rule spends its pages and what mass they hold
    by_layer: dict[int, list[float]] = field(default_factory=dict)

    def total(self, i: int) -> float:
        return sum(v[i] for v in self.by_length.values())

    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # kind -> length -> scores


def settings_for(
    taus: list[float],
    topks: list[int],
    stream_pages: int,
    lognormal: tuple = (),
    progressive: str = "",
    error_rule: tuple = (),
) -> list[Setting]:
    """The GPU suite's families; lognormal: (tau, min_pages[, max_pages]) as eval_accuracy.py's;
    progressive: "tau:first_round[:ln],..." extra progressive settings (first round size; ln: the rest
    estimated with the lognormal mass estimate); error_rule: (eps, min_pages, max_pages) settings of
    the exploratory output-error stopping rule (error_pages)."""
    out = [Setting("dense", "dense")]
    for mode in ("estimated", "progressive", "certified"):
        out += [Setting(f"psa-{mode}-{t:g}", mode, tau=t) for t in taus]
    for item in filter(None, progressive.split(",")):
        tau, first, *ln = item.split(":")
        if ln not in ([], ["ln"]):
            raise ValueError(f"--progressive item {item!r}: tau:first_round or tau:first_round:ln")
        name = f"psa-progressive-{float(tau):g}-fr{int(first)}{'-ln' if ln else ''}"
        out.append(Setting(name, "progressive", tau=float(tau), first_round=int(first),
                           variance_weight=MASS_ESTIMATES["lognormal"] if ln else 0.0))  # fmt: skip
    for tau, lo, *hi in lognormal:
        out.append(Setting(lognormal_name(tau, lo, *hi), "estimated", tau=tau, rank_by="estimate",
                           variance_weight=MASS_ESTIMATES["lognormal"], min_pages=lo,
                           max_pages=hi[0] if hi else None))  # fmt: skip
    for item in error_rule:
        if len(item) != 3:
            raise ValueError(f"--error-rule items are eps:min_pages:max_pages, got {item}")
        eps, lo, hi = item
        out.append(Setting(f"psa-error-{eps:g}-min{lo}-max{hi}", "error", tau=eps, rank_by="estimate",
                           variance_weight=MASS_ESTIMATES["lognormal"], min_pages=lo,
                           max_pages=hi))  # fmt: skip
    out += [Setting(f"topk-{k}", "topk", topk=k) for k in topks]
    sink = max(1, stream_pages // 8)
    out.append(
        Setting(f"streaming-{stream_pages}", "topk", topk=stream_pages, sink=sink, local=stream_pages - sink)
    )
    return out


def page_summaries(key: torch.Tensor, n_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """key [Hkv, L, D] -> kmin, kmax [Hkv, n_pages, D] (the partial last page over its valid keys)."""
    hkv, length, d = key.shape
    pad = (0, 0, 0, n_pages * PAGE - length)
    kmin = torch.nn.functional.pad(key, pad, value=float("inf")).view(hkv, n_pages, PAGE, d).amin(2)
    kmax = torch.nn.functional.pad(key, pad, value=float("-inf")).view(hkv, n_pages, PAGE, d).amax(2)
    return kmin, kmax


def certified_pages(
    s: Setting,
    logits: torch.Tensor,
    bounds: torch.Tensor,
    length: int,
    n_pages: int,
    rest_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Certified mode: visit pages in bound order (sinks and local window first) in rounds of doubling
    size; stop once the exact mass Z of the visited pages satisfies Z >= tau (Z + R) for every query
    head of the group, R = sum of n_tokens * exp(bound) over the unvisited pages (the kernel's rule).
    logits [Hkv, G, L]; bounds [Hkv, N] -> page mask [Hkv, N], pages visited [Hkv].
    Progressive mode passes rest_logits = centers: R is then estimated, not bounded."""
    hkv = logits.shape[0]
    _, _, forced, ntok = page_layout(torch.tensor([length]), n_pages, PAGE, s.sink, s.local)
    ntok = ntok[0].float()
    prio = bounds.masked_fill(forced, float("inf"))
    order = torch.sort(prio, dim=-1, descending=True, stable=True).indices
    log_w = (bounds if rest_logits is None else rest_logits) + ntok.log()[None]
    tok_page = torch.arange(length) // PAGE
    log_slack = math.log1p(-s.tau) if s.tau < 1.0 else float("-inf")
    mask = torch.zeros(hkv, n_pages, dtype=torch.bool)
    counts = torch.zeros(hkv, dtype=torch.int64)
    for h in range(hkv):
        end = s.first_round
        while True:
            end = min(end, n_pages)
            vis = torch.zeros(n_pages, dtype=torch.bool)
            vis[order[h, :end]] = True
            z = torch.logsumexp(logits[h][:, vis[tok_page]], -1)  # [G]
            rest = torch.logsumexp(log_w[h][~vis], 0) if end < n_pages else torch.tensor(float("-inf"))
            if end >= n_pages or bool((z + log_slack >= math.log(s.tau) + rest).all()):
                break
            end *= 2
        mask[h], counts[h] = vis, end
    return mask, counts


def error_pages(s: Setting, centers: torch.Tensor, v: torch.Tensor, length: int, n_pages: int):
    """Exploratory stopping rule (twin only): pages in the estimate's order (sinks and the local window
    first); keep the fewest n in [floor, cap] whose estimated output error
        err(n) = (1 - M_S / M) * |vbar_rest - o_S| / |o|
    is <= eps (s.tau), where a page's estimated mass is n_tokens * exp(center), o_S / vbar_rest are the
    mass-weighted means of the pages' mean values inside / outside the first n, and o the mean over
    all. Unlike a mass threshold, a head whose mass is spread over pages with similar values stops
    early (the unread pages would not move its output), and a head with a few heavy, distinct pages
    reads until their values are in. centers [Hkv, N], v [Hkv, L, D] -> mask [Hkv, N], counts [Hkv]."""
    hkv, _, d = v.shape
    _, valid, forced, ntok = page_layout(torch.tensor([length]), n_pages, PAGE, s.sink, s.local)
    valid, forced, ntok = valid[0], forced[0], ntok[0].float()
    prio = centers.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
    order = torch.sort(prio, dim=-1, descending=True, stable=True).indices  # [Hkv, N]
    logm = (centers + ntok.clamp(min=1).log()).masked_fill(~valid, float("-inf"))
    m = torch.exp(logm - logm.max(-1, keepdim=True).values)  # [Hkv, N], 0 past the last page
    pad = torch.nn.functional.pad(v, (0, 0, 0, n_pages * PAGE - length))
    vbar = pad.view(hkv, n_pages, PAGE, d).sum(2) / ntok.clamp(min=1)[None, :, None]
    ms = torch.gather(m, 1, order)
    cm = torch.cumsum(ms, 1)
    cmv = torch.cumsum(ms[..., None] * torch.gather(vbar, 1, order[..., None].expand(-1, -1, d)), 1)
    tm, tmv = cm[:, -1:], cmv[:, -1:]
    tiny = 1e-30
    o_s = cmv / cm.clamp(min=tiny)[..., None]
    rest = (tm - cm).clamp(min=0)
    v_r = (tmv - cmv) / rest.clamp(min=tiny)[..., None]
    scale = (tmv[:, 0] / tm.clamp(min=tiny)).norm(dim=-1, keepdim=True).clamp(min=tiny)
    err = rest / tm.clamp(min=tiny) * (v_r - o_s).norm(dim=-1) / scale  # [Hkv, N]: after n = i + 1 pages
    npg = int(valid.sum())
    lo = max(min(s.min_pages, npg), int(forced.sum()), 1)
    hi = max(min(s.max_pages or npg, npg), lo)
    pos = torch.arange(n_pages)
    ok = (err <= s.tau) & (pos >= lo - 1) & (pos < hi)
    counts = torch.where(ok.any(1), ok.float().argmax(1) + 1, torch.full((hkv,), hi))
    mask = torch.zeros(hkv, n_pages, dtype=torch.bool)
    mask.scatter_(1, order, pos[None] < counts[:, None])
    return mask & valid[None], counts


class Sparsifier:
    """The attention function HF calls at every layer; applies the active Setting to decode steps."""

    def __init__(self) -> None:
        self.setting: Setting | None = None
        self.access_log = None  # optional sglang_psa.access_log.AccessLogger (begin_step by the caller)

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        # query [1, Hq, q_len, D]; key/value [1, Hkv, L, D] (the whole cache, not repeated)
        bsz, hq, q_len, d = query.shape
        hkv, length = key.shape[1], key.shape[2]
        g = hq // hkv
        assert bsz == 1 and q_len == 1, "the sparsifier only runs decode steps"
        q = query[0, :, 0].float().view(hkv, g, d)
        k, v = key[0].float(), value[0].float()
        logits = torch.einsum("hgd,hld->hgl", q, k) * scaling  # [Hkv, G, L]
        s = self.setting
        n_pages = -(-length // PAGE)
        streaming = s is not None and module.layer_idx in s.streaming_layers  # any mode, dense included
        if not streaming and (s is None or s.mode == "dense"):
            mask_tok = torch.ones(hkv, length, dtype=torch.bool)
            counts = torch.full((hkv,), n_pages)
        else:
            if streaming:
                idx, cnt = select_streaming(
                    torch.tensor([length]), hkv, s.sink + s.local, PAGE, s.sink, s.local
                )
                counts, mask_pg = cnt[0], selection_mask(idx[0], cnt[0], n_pages)
            else:
                mask_pg, counts = self._sparse_pages(s, q, k, v, logits, length, n_pages, scaling)
            mask_tok = mask_pg.repeat_interleave(PAGE, dim=1)[:, :length]
            if self.access_log is not None:
                self._log(module.layer_idx, mask_pg, length)
        if s is not None:
            recall = float((torch.softmax(logits, -1) * mask_tok[:, None]).sum())
            sums = (float(counts.sum()), n_pages * hkv, recall, hq)
            for acc in (
                s.by_length.setdefault(s.length, [0.0] * 4),
                s.by_layer.setdefault(module.layer_idx, [0.0] * 4),
            ):
                for i, x in enumerate(sums):
                    acc[i] += x
        prob = torch.softmax(logits.masked_fill(~mask_tok[:, None], float("-inf")), -1)
        out = torch.einsum("hgl,hld->hgd", prob, v).reshape(1, hq, 1, d).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    @staticmethod
    def _sparse_pages(s: Setting, q, k, v, logits, length: int, n_pages: int, scaling: float):
        """The setting's selection from the cache's own page summaries: mask [Hkv, N], counts [Hkv].
        q [Hkv, G, D], k / v [Hkv, L, D], logits [Hkv, G, L]."""
        hkv, g, d = q.shape
        # the cache's own pages: token t of the request sits in slot t, page j in block j
        kmin, kmax = (t.transpose(0, 1).contiguous() for t in page_summaries(k, n_pages))
        seq = torch.tensor([length])
        table = torch.arange(n_pages * PAGE, dtype=torch.int32)[None]
        row = torch.zeros(1, dtype=torch.int64)
        bnd, centers = page_bounds_ref(q.reshape(1, hkv * g, d), kmin, kmax, table, row, seq, PAGE, PAGE,
                                       scaling, n_pages, with_centers=True,
                                       variance_weight=s.variance_weight)  # fmt: skip
        bnd, centers = bnd[0], centers[0]
        if s.mode == "error":
            return error_pages(s, centers, v, length, n_pages)
        if s.mode in ("certified", "progressive"):
            rest = centers if s.mode == "progressive" else None
            return certified_pages(s, logits, bnd, length, n_pages, rest)
        cap = max(min(n_pages, s.max_pages or n_pages), s.sink + s.local)
        params = SelectParams(tau=s.tau if s.mode == "estimated" else 1.0, sink_pages=s.sink,
                              local_pages=s.local, max_pages=cap, min_pages=min(s.min_pages, cap),
                              topk=s.topk if s.mode == "topk" else None)  # fmt: skip
        mass = centers[None] if s.mode == "estimated" else None
        order = centers if s.rank_by == "estimate" else bnd  # the backend's --psa-rank-by
        idx, cnt = select_pages_ref(order[None], seq, PAGE, params, mass_logits=mass)
        return selection_mask(idx[0], cnt[0], n_pages), cnt[0]

    def _log(self, layer: int, mask_pg: torch.Tensor, length: int) -> None:
        """Record the selected pages of this layer: page_idx [1, Hkv, W] ascending, -1 padded."""
        width = self.access_log.width
        pages = torch.arange(mask_pg.shape[-1]).expand_as(mask_pg)
        page_idx, counts = compact_selection(pages, mask_pg)
        page_idx = torch.nn.functional.pad(
            page_idx[:, :width], (0, width - min(width, page_idx.shape[-1])), value=-1
        )
        self.access_log.record_layer(layer, page_idx[None], counts[None], torch.tensor([length]))


def load_with_sparsifier(path: str) -> tuple[Sparsifier, Any, Any]:
    """The tokenizer and fp32 model of `path`, and the Sparsifier HF calls as attention "psa_sim"
    (set model.config._attn_implementation to "psa_sim" for decode, "sdpa" for dense prefill)."""
    from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    sparsifier = Sparsifier()
    AttentionInterface.register("psa_sim", sparsifier)
    AttentionMaskInterface.register("psa_sim", sdpa_mask)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return sparsifier, tok, model


@torch.no_grad()
def greedy(model, past, first_logits, n_new: int, eos: int) -> list[int]:
    """Greedy decode from a prefilled cache (deep-copied by the caller)."""
    out: list[int] = []
    nxt = int(first_logits.argmax())
    for _ in range(n_new):
        if nxt == eos:
            break
        out.append(nxt)
        ids = torch.tensor([[nxt]])
        res = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = res.past_key_values
        nxt = int(res.logits[0, -1].argmax())
    return out


def run_prompts(model, tok, sparsifier: Sparsifier, prompts: list[dict], settings: list[Setting],
                t0: float | None = None) -> None:  # fmt: skip
    """Decode every prompt under every setting (one dense prefill per prompt, shared); scores and page
    counts accumulate in the settings. settings[0] is reported per (task, length) when t0 is given."""
    for i, p in enumerate(prompts):
        model.config._attn_implementation = "sdpa"
        with torch.no_grad():
            pre = model(input_ids=torch.tensor([p["input_ids"]]), use_cache=True)
        model.config._attn_implementation = "psa_sim"
        for s in settings:
            sparsifier.setting = s
            s.length = str(p["length"])
            new = greedy(model, copy.deepcopy(pre.past_key_values), pre.logits[0, -1], p["max_new"],
                         tok.eos_token_id)  # fmt: skip
            score = score_answer(tok.decode(new, skip_special_tokens=True), p["answer"])
            s.scores.setdefault(p["kind"], {}).setdefault(str(p["length"]), []).append(score)
        cell = (p["kind"], p["length"])
        last = i + 1 == len(prompts) or (prompts[i + 1]["kind"], prompts[i + 1]["length"]) != cell
        if t0 is not None and last:
            first = settings[0].scores[p["kind"]][str(p["length"])]
            print(f"{p['kind']} {p['length']}: {settings[0].name} {sum(first) / len(first):.2f} "
                  f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip


def summarize(settings: list[Setting]) -> list[dict]:
    """One result row per setting: accuracy per task and length, per-prompt scores, pages, recall."""
    rows = []
    for s in settings:
        acc = {k: {n: sum(v) / len(v) for n, v in d.items()} for k, d in s.scores.items()}
        flat = [x for d in s.scores.values() for v in d.values() for x in v]
        rows.append({
            "name": s.name, "mode": s.mode, "tau": s.tau, "topk": s.topk, "accuracy": acc,
            "mean_accuracy": sum(flat) / len(flat),
            "scores": flat,  # prompt order (task, length, sample): paired comparisons across settings
            "page_fraction": s.total(0) / s.total(1) if s.total(1) else 1.0,
            "recall": s.total(2) / s.total(3) if s.total(3) else None,
            "page_fraction_by_length": {n: v[0] / v[1] for n, v in s.by_length.items()},
            "recall_by_length": {n: v[2] / v[3] for n, v in s.by_length.items()},
            "page_fraction_by_layer": {str(n): v[0] / v[1] for n, v in sorted(s.by_layer.items())},
            "recall_by_layer": {str(n): v[2] / v[3] for n, v in sorted(s.by_layer.items())},
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/psa-llama-2m")
    ap.add_argument("--lengths", default="4096,8192")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--taus", default="0.8,0.9,0.95,0.99")
    ap.add_argument("--topks", default="8,16,32,64,128")
    ap.add_argument("--stream-pages", type=int, default=32)
    ap.add_argument("--lognormal", default="", help="tau:min_pages[:max_pages] settings (eval_accuracy.py's)")
    ap.add_argument("--progressive", default="", help="tau:first_round[:ln] progressive settings")
    ap.add_argument("--error-rule", default="", help="eps:min_pages:max_pages settings of error_pages")
    ap.add_argument("--streaming-layers", default="0-2", help="layers the --hybrid copies stream")
    ap.add_argument("--hybrid", default="", help="settings to repeat with those layers streaming")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", default="", help="comma-separated setting names (dense always runs)")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    sparsifier, tok, model = load_with_sparsifier(a.model)
    kinds = list(TASK_KINDS) if a.tasks == "all" else a.tasks.split(",")
    lengths = [int(x) for x in a.lengths.split(",")]
    settings = settings_for([float(t) for t in a.taus.split(",")], [int(k) for k in a.topks.split(",")],
                            a.stream_pages, parse_ints_after_tau(a.lognormal), a.progressive,
                            parse_ints_after_tau(a.error_rule))  # fmt: skip
    if a.hybrid:
        by_name = {s.name: s for s in settings}
        layers = PSAConfig(streaming_layers=a.streaming_layers).streaming_layer_ids()
        check_hybrid(a.hybrid.split(","), by_name)
        for name in a.hybrid.split(","):
            copy_ = dataclasses.replace(by_name[name], name=streaming_name(name, a.streaming_layers),
                                        streaming_layers=layers, by_length={}, by_layer={},
                                        scores={})  # fmt: skip
            settings.append(copy_)
    if a.only:
        keep = set(a.only.split(",")) | {"dense"}
        settings = [s for s in settings if s.name in keep]
    t0 = time.time()
    prompts = build_prompts(a.model, kinds, lengths, a.samples)
    run_prompts(model, tok, sparsifier, prompts, settings, t0)
    rows = summarize(settings)
    add_vs_dense(rows)
    for r in rows:
        print(f"{r['name']:22s} acc {r['mean_accuracy']:.3f} pages {r['page_fraction']:.3f} "
              f"recall {r['recall'] or 0:.4f}", flush=True)  # fmt: skip
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    res = result_header("eval_accuracy_hf", stamp, a.model, lengths, a.samples, kinds,
                        seconds=round(time.time() - t0))  # fmt: skip
    res["method"] = "offline twin of eval_accuracy.py: HF transformers decode + PSA's torch references"
    res["rows"] = rows
    os.makedirs(a.out, exist_ok=True)
    path = Path(a.out) / f"eval-accuracy-hf-{stamp}.json"
    path.write_text(json.dumps(res, indent=1))
    plot(rows, path.with_suffix(".png"), str(lengths[-1]))
    print("wrote", path)
    return res


if __name__ == "__main__":
    main()
