"""One PSA decode step for one layer: bounds -> select -> attend (estimated or certified mode)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .page_bounds import page_bounds
from .select_pages import SelectParams, select_pages
from .sparse_decode import certified_decode, sparse_decode


@dataclass
class PSADecodeResult:
    out: torch.Tensor  # [bs, Hq, D]
    lse: torch.Tensor  # [bs, Hq] float32
    page_idx: torch.Tensor  # [bs, Hkv, W] int32 (estimated/top-k) or visiting order [bs, Hkv, N] (certified)
    counts: torch.Tensor  # [bs, Hkv] int32 pages attended
    bounds: torch.Tensor  # [bs, Hkv, N] float32


def psa_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    block_size: int,
    sm_scale: float,
    params: SelectParams,
    max_pages: int,
    certified: bool = False,
    first_round_pages: int = 16,
    progressive: bool = False,
) -> PSADecodeResult:
    """Bounds for max_pages logical pages per request, then selection and exact sparse attention.

    certified: rounds in bound order until the exact mass certifies tau against the bound on the rest.
    progressive: the same rounds, with the rest *estimated* from the centers (no guarantee, calibrated).
    """
    use_centers = not certified  # certified bounds the tail with the upper bounds alone
    res = page_bounds(
        q, kmin, kmax, req_to_token, req_pool_indices, seq_lens, page_size, block_size, sm_scale,
        max_pages, with_centers=use_centers,
    )  # fmt: skip
    bounds, centers = res if use_centers else (res, None)
    if certified or progressive:
        out, lse, visited, order = certified_decode(
            q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, bounds, page_size,
            sm_scale, params.tau, params.sink_pages, params.local_pages, first_round_pages,
            rest_logits=None if certified else centers,
        )  # fmt: skip
        return PSADecodeResult(out, lse, order, visited, bounds)
    page_idx, counts = select_pages(bounds, seq_lens, page_size, params, mass_logits=centers)
    out, lse = sparse_decode(
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        page_idx,
        counts,
        page_size,
        sm_scale,
    )
    return PSADecodeResult(out, lse, page_idx, counts, bounds)
