"""Attention-mass recall of a page selection against exact softmax (eval and debugging only).

recall = the softmax mass (over all of a request's tokens) that falls on the selected pages. Needs
every key of every request, so it is a dense pass per layer: it syncs with the host (max length)
and is meant for --disable-cuda-graph runs (--psa-measure-recall), never for serving.

Shapes and dtypes:
    q                [bs, Hq, D]           fp16 / bf16 / fp32
    k_cache          [num_slots, Hkv, D]
    req_to_token     [max_reqs, max_context] int32
    req_pool_indices [bs], seq_lens [bs]   integer
    page_idx         [bs, Hkv, W] integer  selected logical pages in [:count] (any order)
    counts           [bs, Hkv] int32
    -> recall        [bs, Hq] float32 in [0, 1]
"""

from __future__ import annotations

import torch

from sglang_psa.kernels._common import selection_mask


def selection_recall(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    sm_scale: float,
) -> torch.Tensor:
    bs, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    length = int(seq_lens.max()) if bs else 0
    if length == 0:
        return torch.ones(bs, hq, dtype=torch.float32, device=q.device)
    n_pages = -(-length // page_size)
    pos = torch.arange(n_pages * page_size, device=q.device)
    slots = req_to_token[req_pool_indices.long()][:, : n_pages * page_size]  # [bs, L]
    if slots.shape[1] < pos.numel():  # the page table ends before the last page's padding
        slots = torch.nn.functional.pad(slots, (0, pos.numel() - slots.shape[1]))
    keys = k_cache[slots.long().clamp(min=0)].float()  # [bs, L, Hkv, D]
    logits = torch.einsum("bhgd,blhd->bhgl", q.float().view(bs, hkv, g, d), keys) * sm_scale
    valid = pos[None, :] < seq_lens[:, None]  # [bs, L]
    prob = torch.softmax(logits.masked_fill(~valid[:, None, None, :], float("-inf")), dim=-1)
    page_mass = prob.view(bs, hkv, g, n_pages, page_size).sum(-1)  # [bs, Hkv, G, pages]
    mask = selection_mask(page_idx, counts, n_pages)  # [bs, Hkv, pages]
    recall = (page_mass * mask[:, :, None, :]).sum(-1)  # [bs, Hkv, G]
    return recall.reshape(bs, hq).clamp(max=1.0)
