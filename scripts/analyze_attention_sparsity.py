#!/usr/bin/env python3
"""Why does PSA's estimated rule at tau=0.95 read ~38% of pages? Oracle vs estimate, per layer / kv head.

Runs the trained small model in HF transformers on CPU (dense prefill, as the server does) on the
suite's long-context tasks (scripts/eval_accuracy.build_prompts: same seeds, same scoring) and
measures, at every decode step, layer and kv head:

* phase A (dense decode, recorded): the exact softmax mass of every page, summed over the kv head's
  GQA group (mean over its query heads, as the server's recall metric does) and
  - oracle: fewest pages (sink + local window always kept, then pages by true mass) reaching tau of
    the true mass; also per query head alone and the union of those per-head sets (the GQA cost);
  - estimated: pages the estimated rule selects (select_pages_ref, mass logits = Quest centers) and
    the true mass they hold; the same order (bounds) with an exact stop, and centers as the order;
  - top-k: true mass of the Quest top-k pages and of the oracle top-k pages;
  - calibration of the centers: per page and query head, the residual of the true log-mean-exp
    logit of the page against its center, regressed (within a row) on the interval half-width;
  - mass on the pages of the answer's needle(s).
* phase B (--rules): decode under alternative selection rules and report task accuracy (greedy exact
  match, as the suite), the teacher-forced answer NLL and KL to dense (continuous, far less noisy
  than exact match), pages read and recall, per layer / kv head.

Rule syntax (--rules, comma separated): dense | est:TAU (centers, the server's estimated mode) |
bound:TAU (upper bounds as mass logits) | calib:TAU:beta=B|fit (center + beta * half-width, beta per
layer fitted in phase A or --calib-from) | calib2:TAU (center + b1 w + b2 w^2, fitted) | oracle:TAU
(exact page masses; not implementable, a reference) | topk:K; options :min=K (page floor), :max=K
(page cap, the server's --psa-max-pages), :cap=L.H/K+L.H/K (page cap of layer L, kv head H),
:ltau=L/TAU+L/TAU (tau of layer L).

    python scripts/analyze_attention_sparsity.py --samples 4 --lengths 8192 \
        --rules dense,est:0.95,est:0.8,topk:32,oracle:0.95,est:0.8:min=32
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_accuracy import LOCAL, PAGE, SINK, result_header  # noqa: E402
from eval_accuracy_hf import greedy  # noqa: E402

from sglang_psa.config import MASS_ESTIMATES  # noqa: E402
from sglang_psa.kernels import SelectParams, select_pages_ref  # noqa: E402
from sglang_psa.kernels._common import page_layout, selection_mask  # noqa: E402
from sglang_psa.longctx_tasks import (  # noqa: E402
    TASK_KINDS,
    FillerCorpus,
    as_encoders,
    find_local_text,
    make_tasks,
    score_answer,
)

REC_KEYS = (
    "oracle_frac",  # pages (forced first, then by true group mass) to reach tau, / all pages
    "oracle_free_frac",  # same without privileging sink/local pages
    "perq_oracle_frac",  # per query head alone, mean over the group
    "union_perq_frac",  # union over the group of the per-query-head oracle sets
    "est_frac",  # estimated rule (centers) at tau
    "est_recall",  # true group mass of the estimated selection
    "bound_order_frac",  # bound order (forced first) with an exact stop at tau
    "center_order_frac",  # center order (forced first) with an exact stop at tau
    "topk_recall",  # true mass of the Quest top-k (bounds) selection
    "oracle_topk_recall",  # true mass of forced + best (k - forced) pages by true mass
    "forced_true",  # true mass on sink + local pages
    "forced_est",  # estimated (centers) share of sink + local pages
    "eff_pages_frac",  # exp(entropy of the page distribution) / pages
    "needle_mass",  # true mass on the pages of the answer's needle(s)
)


def page_sum(x: torch.Tensor, n_pages: int, page: int) -> torch.Tensor:
    """[..., L] -> [..., n_pages]: sum over each page's tokens (zero padded)."""
    pad = n_pages * page - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad)).unflatten(-1, (n_pages, page)).sum(-1)


def count_to_tau(mass: torch.Tensor, order_score: torch.Tensor, forced: torch.Tensor, valid: torch.Tensor,
                 tau: float) -> torch.Tensor:  # fmt: skip
    """mass, order_score [R, N]: pages needed (forced first, then by order_score desc) to reach tau
    of each row's total mass -> [R] counts; and the mask of those pages [R, N]."""
    total = (mass * valid).sum(-1, keepdim=True)
    fmass = (mass * forced).sum(-1)
    cand = valid & ~forced
    s = order_score.masked_fill(~cand, float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    m_sorted = torch.gather(mass * cand, -1, order)
    cum = fmass[:, None] + torch.cumsum(m_sorted, -1)
    need = (cum < tau * total - 1e-12).sum(-1)  # candidates still below the target
    k = torch.where(fmass >= tau * total[:, 0], torch.zeros_like(need), (need + 1).clamp(max=int(cand.sum())))
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    mask = forced[None] | (cand & (rank < k[:, None]))
    return mask.sum(-1), mask


class Probe:
    """HF attention function: dense (recording statistics) or a selection rule, at decode steps."""

    def __init__(self, page: int, sink: int, local: int, tau: float, topk: int) -> None:
        self.page, self.sink, self.local, self.tau, self.topk = page, sink, local, tau, topk
        self.rule: dict | None = None
        self.record = False
        self.needle_tokens: list[tuple[int, int]] = []
        self.rec: dict[tuple[int, int], list[float]] = {}  # (layer, kv head) -> sums of REC_KEYS + count
        self.kind = ""
        self.rec_task: dict[str, list[float]] = {}  # task kind -> sums over all kv heads
        self.perq: dict[tuple[int, int], list[float]] = {}  # (layer, q head) -> [oracle frac sum, n]
        self.calib: dict[int, dict] = {}  # layer -> within-row least-squares sums (see _record)
        self.use: dict[str, dict[tuple[int, int], list[float]]] = {}  # rule -> (l,h) -> [sel, all, rec, n]
        self.betas: dict[int, float] = {}
        self.joint: dict[int, tuple[float, float]] = {}

    # ------------------------------------------------------------------ summaries
    def summaries(self, q: torch.Tensor, k: torch.Tensor, scaling: float, n_pages: int):
        """Per query head Quest bound, center and key spread sm_scale^2 sum_d q_d^2 range_d^2 [Hkv, G, N]
        (float64)."""
        hkv, length, d = k.shape
        pad = (0, 0, 0, n_pages * self.page - length)
        kd = k.double()
        kmin = torch.nn.functional.pad(kd, pad, value=float("inf")).view(hkv, n_pages, self.page, d).amin(2)
        kmax = torch.nn.functional.pad(kd, pad, value=float("-inf")).view(hkv, n_pages, self.page, d).amax(2)
        qd = q.double()
        upper = (torch.einsum("hgd,hnd->hgn", qd.clamp(min=0), kmax)
                 + torch.einsum("hgd,hnd->hgn", qd.clamp(max=0), kmin)) * scaling  # fmt: skip
        center = torch.einsum("hgd,hnd->hgn", qd, (kmin + kmax) / 2) * scaling
        spread = torch.einsum("hgd,hnd->hgn", qd * qd, (kmax - kmin).nan_to_num(0.0) ** 2) * scaling**2
        return upper, center, spread

    def __call__(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
        bsz, hq, q_len, d = query.shape
        hkv, length = key.shape[1], key.shape[2]
        g = hq // hkv
        assert bsz == 1 and q_len == 1, "decode steps only"
        layer = module.layer_idx
        q = query[0, :, 0].float().view(hkv, g, d)
        k, v = key[0].float(), value[0].float()
        logits = torch.einsum("hgd,hld->hgl", q, k) * scaling  # [Hkv, G, L]
        n_pages = -(-length // self.page)
        seq = torch.tensor([length])
        _, valid, forced, ntok = page_layout(seq, n_pages, self.page, self.sink, self.local)
        valid, forced, ntok = valid[0], forced[0], ntok[0]
        prob = torch.softmax(logits.double(), -1)
        pm = page_sum(prob, n_pages, self.page)  # [Hkv, G, N]
        gm = pm.mean(1)  # [Hkv, N] the group's mass (sums to 1)
        upper, center, spread = self.summaries(q, k, scaling, n_pages)
        bnd, ctr = upper.amax(1).float(), center.amax(1).float()
        if self.rule is None:
            mask_pg = torch.ones(hkv, n_pages, dtype=torch.bool)
            if self.record:
                self._record(
                    layer, logits, pm, gm, upper, center, bnd, ctr, valid, forced, ntok, seq, n_pages
                )
        else:
            mask_pg = self._select(layer, gm, upper, center, spread, bnd, ctr, valid, forced, seq, n_pages)
            acc = self.use.setdefault(self.rule["name"], {})
            rec = (gm * mask_pg).sum(-1)
            cnt = mask_pg.sum(-1)
            for h in range(hkv):
                a = acc.setdefault((layer, h), [0.0, 0.0, 0.0, 0.0])
                a[0] += float(cnt[h])
                a[1] += n_pages
                a[2] += float(rec[h])
                a[3] += 1
        mask_tok = mask_pg.repeat_interleave(self.page, dim=1)[:, :length]
        p = torch.softmax(logits.masked_fill(~mask_tok[:, None], float("-inf")), -1)
        out = torch.einsum("hgl,hld->hgd", p, v).reshape(1, hq, 1, d).to(query.dtype)
        return out.transpose(1, 2).contiguous(), None

    # ------------------------------------------------------------------ rules
    def _select(
        self, layer, gm, upper, center, spread, bnd, ctr, valid, forced, seq, n_pages
    ) -> torch.Tensor:
        r = self.rule
        kind, hkv = r["kind"], gm.shape[0]
        if kind == "dense":
            return torch.ones(hkv, n_pages, dtype=torch.bool)
        if kind == "oracle":
            _, mask = count_to_tau(gm, gm, forced, valid, r["tau"])
        else:
            mass = None
            if kind == "est":
                mass = ctr
            elif kind == "calib":
                beta = self.betas.get(layer, 0.0) if r["beta"] == "fit" else float(r["beta"])
                mass = (center + beta * (upper - center)).amax(1).float()
            elif kind == "var":  # log-normal page mass (page_bounds' variance_weight), scaled by :scale=
                weight = MASS_ESTIMATES["lognormal"] * float(r.get("scale", 1.0))
                mass = (center + weight * spread).amax(1).float()
            elif kind == "calib2":
                b1, b2 = self.joint.get(layer, (0.0, 0.0))
                w = upper - center
                mass = (center + b1 * w + b2 * w * w).amax(1).float()
            tau = r.get("ltau", {}).get(layer, r.get("tau", 1.0))
            params = SelectParams(
                tau=tau if kind != "topk" else 1.0, sink_pages=self.sink, local_pages=self.local,
                min_pages=min(r.get("min", 0), n_pages),
                max_pages=max(min(n_pages, r.get("max", n_pages)), self.sink + self.local),
                topk=r["k"] if kind == "topk" else None,
            )  # fmt: skip
            # rank=est: order the pages by the mass estimate itself instead of the Quest bound
            order = mass if r.get("rank") == "est" and mass is not None else bnd
            idx, cnt = select_pages_ref(order[None], seq, self.page, params, mass_logits=None if mass is None
                                        else mass[None])  # fmt: skip
            mask = selection_mask(idx[0], cnt[0], n_pages)
        for (lay, h), cap in r.get("cap", {}).items():
            if lay == layer and int(mask[h].sum()) > cap:
                p = SelectParams(tau=1.0, sink_pages=self.sink, local_pages=self.local, topk=cap)
                idx, cnt = select_pages_ref(bnd[None, h : h + 1], seq, self.page, p)
                mask[h] = selection_mask(idx[0, 0], cnt[0, 0], n_pages)
        return mask

    # ------------------------------------------------------------------ statistics
    def _record(self, layer, logits, pm, gm, upper, center, bnd, ctr, valid, forced, ntok, seq, n_pages):
        hkv, g, _ = pm.shape
        tau, n = self.tau, float(n_pages)
        o_cnt, _ = count_to_tau(gm, gm, forced, valid, tau)
        nof = torch.zeros_like(forced)
        of_cnt, _ = count_to_tau(gm, gm, nof, valid, tau)
        pq_cnt, pq_mask = count_to_tau(pm.flatten(0, 1), pm.flatten(0, 1), forced, valid, tau)
        union = pq_mask.view(hkv, g, -1).any(1).sum(-1)
        b_cnt, _ = count_to_tau(gm, bnd.double(), forced, valid, tau)
        c_cnt, _ = count_to_tau(gm, ctr.double(), forced, valid, tau)
        params = SelectParams(tau=tau, sink_pages=self.sink, local_pages=self.local,
                              max_pages=max(n_pages, self.sink + self.local))  # fmt: skip
        idx, cnt = select_pages_ref(bnd[None], seq, self.page, params, mass_logits=ctr[None])
        est_mask = selection_mask(idx[0], cnt[0], n_pages)
        kk = min(self.topk, n_pages)
        tp = SelectParams(tau=1.0, sink_pages=self.sink, local_pages=self.local, topk=kk)
        idx, cnt = select_pages_ref(bnd[None], seq, self.page, tp)
        tk_mask = selection_mask(idx[0], cnt[0], n_pages)
        free = max(kk - int(forced.sum()), 0)
        cand_sorted = torch.sort(gm.masked_fill(~(valid & ~forced), 0.0), -1, descending=True).values
        otk = (gm * forced).sum(-1) + cand_sorted[:, :free].sum(-1)
        w = ntok.double() * torch.exp(ctr.double() - ctr.double().max(-1, keepdim=True).values)
        w = w * valid
        f_est = (w * forced).sum(-1) / w.sum(-1)
        ent = -(gm.clamp(min=1e-30).log() * gm).sum(-1)
        needle = torch.zeros(n_pages, dtype=torch.bool)
        for a, b in self.needle_tokens:
            needle[a // self.page : (b - 1) // self.page + 1] = True
        vals = torch.stack([
            o_cnt / n, of_cnt / n, pq_cnt.view(hkv, g).double().mean(1) / n, union / n, est_mask.sum(-1) / n,
            (gm * est_mask).sum(-1), b_cnt / n, c_cnt / n, (gm * tk_mask).sum(-1), otk,
            (gm * forced).sum(-1), f_est, ent.exp() / n, (gm * needle).sum(-1),
        ], -1).double()  # fmt: skip
        for h in range(hkv):
            a = self.rec.setdefault((layer, h), [0.0] * (len(REC_KEYS) + 1))
            for i, x in enumerate(vals[h].tolist()):
                a[i] += x
            a[-1] += 1
            t = self.rec_task.setdefault(self.kind, [0.0] * (len(REC_KEYS) + 1))
            for i, x in enumerate(vals[h].tolist()):
                t[i] += x
            t[-1] += 1
            for j in range(g):
                b = self.perq.setdefault((layer, h * g + j), [0.0, 0.0])
                b[0] += float(pq_cnt[h * g + j]) / n
                b[1] += 1
        # calibration: true log-mean-exp logit of a page vs its center, within each (query head) row;
        # features: half-width w of the Quest interval and w^2 (a Jensen / variance correction)
        lg = logits.double()
        pad = n_pages * self.page - lg.shape[-1]
        lme = torch.nn.functional.pad(lg, (0, pad), value=float("-inf")).unflatten(-1, (n_pages, self.page))
        lme = torch.logsumexp(lme, -1) - ntok.double().clamp(min=1).log()
        cand = valid & ~forced
        res = (lme - center)[:, :, cand].flatten(0, 1)  # [rows, pages]
        wid = (upper - center)[:, :, cand].flatten(0, 1)
        feats = torch.stack([wid, wid * wid], -1)
        rc = res - res.mean(-1, keepdim=True)
        fc = feats - feats.mean(-2, keepdim=True)
        zero = {"xtx": torch.zeros(2, 2, dtype=torch.float64), "xty": torch.zeros(2, dtype=torch.float64)}
        c = self.calib.setdefault(layer, {**zero, "yy": 0.0, "n": 0})
        npg = rc.shape[-1]
        c["xtx"] += torch.einsum("rpi,rpj->ij", fc, fc) / npg
        c["xty"] += torch.einsum("rpi,rp->i", fc, rc) / npg
        c["yy"] += float((rc * rc).mean(-1).sum())
        c["n"] += rc.shape[0]

    def fit(self) -> dict[str, dict[str, float]]:
        """Per layer: linear slope of the residual on w, joint [w, w^2] fit, residual std before/after."""
        out = {}
        for lay, c in sorted(self.calib.items()):
            xtx, xty, n = c["xtx"], c["xty"], c["n"]
            b1 = float(xty[0] / xtx[0, 0])
            bj = torch.linalg.solve(xtx, xty)
            out[f"L{lay}"] = {
                "beta": round(b1, 4), "joint_w": round(float(bj[0]), 4), "joint_w2": round(float(bj[1]), 4),
                "resid_std": round(math.sqrt(c["yy"] / n), 4),
                "resid_std_linear": round(math.sqrt(max(c["yy"] - b1 * float(xty[0]), 0) / n), 4),
                "resid_std_joint": round(math.sqrt(max(c["yy"] - float(bj @ xty), 0) / n), 4),
                "halfwidth_std": round(math.sqrt(float(xtx[0, 0]) / n), 4),
            }  # fmt: skip
            self.betas[lay] = b1
            self.joint[lay] = (float(bj[0]), float(bj[1]))
        return out


def parse_rule(spec: str) -> dict[str, Any]:
    parts = spec.split(":")
    r: dict[str, Any] = {"name": spec, "kind": parts[0]}
    if parts[0] == "topk":
        r["k"] = int(parts[1])
    elif parts[0] != "dense":
        r["tau"] = float(parts[1])
    for opt in parts[2:]:
        key, val = opt.split("=", 1)
        if key in ("min", "max"):
            r[key] = int(val)
        elif key == "ltau":
            r["ltau"] = {int(x.split("/")[0]): float(x.split("/")[1]) for x in val.split("+")}
        elif key == "rank":
            r["rank"] = val
        elif key == "scale":
            r["scale"] = float(val)
        elif key == "beta":
            r["beta"] = val
        elif key == "cap":
            caps = {}
            for item in val.split("+"):
                lh, kcap = item.split("/")
                lay, h = lh.split(".")
                caps[(int(lay), int(h))] = int(kcap)
            r["cap"] = caps
        else:
            raise ValueError(f"unknown option {opt!r} in {spec!r}")
    return r


def build_prompts(model: str, kinds: list[str], lengths: list[int], n: int, tok, seed: int) -> list[dict]:
    """eval_accuracy.build_prompts plus the needle token spans and answer ids (same seeds)."""
    encode, encode_batch = as_encoders(tok)
    corpus = FillerCorpus(find_local_text(max_bytes=16_000_000), encode=encode, encode_batch=encode_batch)
    prompts = []
    for kind in kinds:
        for length in lengths:
            for task in make_tasks(kind, corpus, length, n, seed=seed):
                ids = tok(task.prompt, add_special_tokens=True)["input_ids"]
                off = len(ids) - len(task.input_ids)
                assert list(ids[off:]) == [int(x) for x in task.input_ids], (
                    "prompt ids differ from the task's"
                )
                spans = [task.needle_token_spans[i] for i in task.target_needles]
                prompts.append({
                    "kind": kind, "length": length, "input_ids": ids, "answer": task.answer,
                    "max_new": len(encode(task.answer)) + 4,
                    "answer_ids": [int(x) for x in task.completion_ids],
                    "needles": [(a + off, b + off) for a, b in spans],
                })  # fmt: skip
    return prompts


@torch.no_grad()
def teacher_forced(model, past, first_logits, ans: list[int]) -> list[torch.Tensor]:
    """Log-probs of the next token at every answer position (the first from the dense prefill)."""
    out = [torch.log_softmax(first_logits.double(), -1)]
    for t in ans[:-1]:
        res = model(input_ids=torch.tensor([[t]]), past_key_values=past, use_cache=True)
        past = res.past_key_values
        out.append(torch.log_softmax(res.logits[0, -1].double(), -1))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/psa-llama-2m")
    ap.add_argument("--lengths", default="8192")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--page", type=int, default=PAGE)
    ap.add_argument("--tau", type=float, default=0.95)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--rules", default="dense,est:0.95,topk:32,oracle:0.95")
    ap.add_argument("--seed", type=int, default=100_000, help="task seeds (the suite uses 100000)")
    ap.add_argument("--calib-from", default="", help="take the calib/calib2 fits from this result JSON")
    ap.add_argument("--no-tf", action="store_true", help="skip the teacher-forced pass of phase B")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default="")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    probe = Probe(a.page, SINK, LOCAL, a.tau, a.topk)
    AttentionInterface.register("psa_probe", probe)
    AttentionMaskInterface.register("psa_probe", sdpa_mask)
    tok = PreTrainedTokenizerFast.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    cfg = model.config
    kinds = list(TASK_KINDS) if a.tasks == "all" else a.tasks.split(",")
    lengths = [int(x) for x in a.lengths.split(",")]
    rules = [parse_rule(s) for s in a.rules.split(",") if s]
    t0 = time.time()
    prompts = build_prompts(a.model, kinds, lengths, a.samples, tok, a.seed)
    print(f"{len(prompts)} prompts ({time.time() - t0:.0f}s)", flush=True)

    # phase A: dense decode, recorded
    pres, dense_scores = [], []
    for p in prompts:
        cfg._attn_implementation = "sdpa"
        with torch.no_grad():
            pre = model(input_ids=torch.tensor([p["input_ids"]]), use_cache=True)
        pres.append(pre)
        cfg._attn_implementation = "psa_probe"
        probe.rule, probe.record, probe.needle_tokens, probe.kind = None, True, p["needles"], p["kind"]
        new = greedy(
            model, copy.deepcopy(pre.past_key_values), pre.logits[0, -1], p["max_new"], tok.eos_token_id
        )
        dense_scores.append(score_answer(tok.decode(new, skip_special_tokens=True), p["answer"]))
    probe.record = False
    print(f"phase A done ({time.time() - t0:.0f}s)", flush=True)
    calib = probe.fit()
    if a.calib_from:  # fits from another run (other prompts): out-of-sample calibration
        other = json.loads(Path(a.calib_from).read_text())["calibration"]
        for name, c in other.items():
            probe.betas[int(name[1:])] = c["beta"]
            probe.joint[int(name[1:])] = (c["joint_w"], c["joint_w2"])

    # phase B: rules
    dense_lp: list[list[torch.Tensor]] = []
    rows = []
    for r in rules:
        probe.rule = r
        em, tf_em, nll, kl = [], [], [], []
        for i, p in enumerate(prompts):
            pre = pres[i]
            new = greedy(model, copy.deepcopy(pre.past_key_values), pre.logits[0, -1], p["max_new"],
                         tok.eos_token_id)  # fmt: skip
            em.append(score_answer(tok.decode(new, skip_special_tokens=True), p["answer"]))
            if a.no_tf:
                continue
            lp = teacher_forced(model, copy.deepcopy(pre.past_key_values), pre.logits[0, -1], p["answer_ids"])
            if r["kind"] == "dense" and len(dense_lp) < len(prompts):
                dense_lp.append(lp)
            ans = p["answer_ids"]
            tf_em.append(float(all(int(x.argmax()) == t for x, t in zip(lp, ans))))
            nll.append(-sum(float(x[t]) for x, t in zip(lp, ans)) / len(ans))
            if len(dense_lp) == len(prompts):
                kl.append(sum(float((d.exp() * (d - x)).sum()) for d, x in zip(dense_lp[i], lp)) / len(ans))
        use = probe.use.get(r["name"], {})
        tot = [sum(v[i] for v in use.values()) for i in range(4)]
        by_task: dict[str, list[float]] = {}
        for p, s in zip(prompts, em):
            by_task.setdefault(p["kind"], []).append(s)
        row = {
            "rule": r["name"],
            "accuracy": {kk: sum(v) / len(v) for kk, v in by_task.items()},
            "scores": em,
            "mean_accuracy": sum(em) / len(em),
            "tf_exact": sum(tf_em) / len(tf_em) if tf_em else None,
            "tf_nll": sum(nll) / len(nll) if nll else None,
            "tf_kl_to_dense": sum(kl) / len(kl) if kl else None,
            "page_fraction": tot[0] / tot[1] if tot[1] else 1.0,
            "recall": tot[2] / tot[3] if tot[3] else 1.0,
            "per_head": {
                f"L{lay}H{h}": {"pages": round(v[0] / v[1], 4), "recall": round(v[2] / v[3], 4)}
                for (lay, h), v in sorted(use.items())
            },  # fmt: skip
        }
        rows.append(row)
        print(f"{r['name']:32s} acc {row['mean_accuracy']:.3f} tfEM {row['tf_exact'] or 0:.3f} "
              f"nll {row['tf_nll'] or 0:.3f} kl {row['tf_kl_to_dense'] or 0:.4f} "
              f"pages {row['page_fraction']:.3f} recall {row['recall']:.3f} ({time.time() - t0:.0f}s)",
              flush=True)  # fmt: skip

    table = {}
    for (lay, h), v in sorted(probe.rec.items()):
        table[f"L{lay}H{h}"] = {kk: round(v[i] / v[-1], 4) for i, kk in enumerate(REC_KEYS)}
        table[f"L{lay}H{h}"]["steps"] = int(v[-1])
    overall = {kk: round(sum(v[i] for v in probe.rec.values()) / sum(v[-1] for v in probe.rec.values()), 4)
               for i, kk in enumerate(REC_KEYS)}  # fmt: skip
    by_task = {kind: {kk: round(v[i] / v[-1], 4) for i, kk in enumerate(REC_KEYS)}
               for kind, v in probe.rec_task.items()}  # fmt: skip
    perq = {f"L{lay}Q{h}": round(v[0] / v[1], 4) for (lay, h), v in sorted(probe.perq.items())}
    print(f"{'head':6s} " + " ".join(f"{k[:12]:>12s}" for k in REC_KEYS))
    for name, v in {**table, "all": overall, **by_task}.items():
        print(f"{name[:6]:6s} " + " ".join(f"{v[k]:12.3f}" for k in REC_KEYS))
    print("per q head oracle frac:", perq)
    print("calibration:", calib)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    cfg_extra = {
        "page": a.page,
        "tau": a.tau,
        "topk": a.topk,
        "seed": a.seed,
        "seconds": round(time.time() - t0),
    }
    res = result_header("analyze_attention_sparsity", stamp, a.model, lengths, a.samples, kinds, **cfg_extra)
    res["dense_scores"] = dense_scores
    res["prompts"] = [{"kind": p["kind"], "length": p["length"], "needles": p["needles"]} for p in prompts]
    res["record_keys"] = list(REC_KEYS)
    res["per_kv_head"] = table
    res["overall"] = overall
    res["overall_by_task"] = by_task
    res["per_q_head_oracle_frac"] = perq
    res["calibration"] = calib
    res["rules"] = rows
    Path(a.out).mkdir(parents=True, exist_ok=True)
    path = Path(a.out) / f"attention-sparsity-hf-{stamp}{('-' + a.tag) if a.tag else ''}.json"
    path.write_text(json.dumps(res, indent=1))
    print("wrote", path)
    return res


if __name__ == "__main__":
    main()
