"""Shared builders for the kernel tests: a small skewed batch with its summaries."""

from __future__ import annotations

import torch

from sglang_psa.kernels import alloc_summaries, make_skewed_batch, update_page_summaries_ref

# Pairwise cover of page size x GQA group x head_dim x dtype (CI runs these on the interpreter).
CASES = [
    (16, 1, 64, torch.float32),
    (16, 4, 128, torch.bfloat16),
    (16, 8, 64, torch.float16),
    (32, 1, 128, torch.float16),
    (32, 4, 64, torch.float32),
    (32, 8, 128, torch.bfloat16),
    (64, 1, 64, torch.bfloat16),
    (64, 4, 128, torch.float16),
    (64, 8, 64, torch.float32),
]
CASE_IDS = [f"P{p}-G{g}-D{d}-{str(t).split('.')[-1]}" for p, g, d, t in CASES]

# relative-error budgets against float64 references, by input dtype
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def build(page_size, group, d, dtype, device, lens=None, hkv=2, seed=0, skew=0.7, block=None):
    """A batch of ragged lengths (a partial last page, a one-page request) plus its summaries."""
    if lens is None:
        lens = [page_size * 6 + 5, page_size * 9, 3]
    sb = make_skewed_batch(
        len(lens),
        hkv * group,
        hkv,
        d,
        lens,
        page_size,
        dtype=dtype,
        device=device,
        skew=skew,
        seed=seed,
    )
    block = block or page_size
    kmin, kmax = alloc_summaries(sb.k_cache.shape[0], hkv, d, block, dtype, device)
    update_page_summaries_ref(sb.k_cache, kmin, kmax, sb.written_slots, block)
    return sb, kmin, kmax


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    assert not torch.isnan(a).any(), "NaN in output"
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
