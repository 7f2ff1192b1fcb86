"""Shared checks and small helpers for the PSA stage kernels."""

from __future__ import annotations

import functools
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_PAGE_SIZES = (16, 32, 64, 128)


def interpret_mode() -> bool:
    """True when Triton runs on the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def f32_dot(dtype: torch.dtype) -> bool:
    """Whether kernels should run tl.dot in fp32 ("ieee") for this input dtype.

    fp32 inputs always (tf32 would loosen the bounds). bf16 inputs only under the CPU interpreter:
    Triton 3.6's interpreter returns garbage for bf16 tl.dot (fp16 is fine), while a bf16 x bf16
    product is exact in fp32, so upcasting there computes the same function the GPU path does.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpret_mode())


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (launch sizing; queried once per device)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_page_size(page_size: int, block_size: int | None = None) -> None:
    if page_size not in SUPPORTED_PAGE_SIZES:
        raise ValueError(f"page_size must be one of {SUPPORTED_PAGE_SIZES} for PSA, got {page_size}")
    if block_size is not None:
        if block_size < 1 or block_size & (block_size - 1) or page_size % block_size:
            raise ValueError(
                f"block_size (logical sub-page) must be a power of two dividing page_size "
                f"{page_size}, got {block_size}"
            )


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_int(name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """Check t.shape against shape, where None entries match anything."""
    ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def check_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor | None = None) -> tuple:
    """Validate q [bs, Hq, D] against a [num_slots, Hkv, D] cache; return (bs, Hq, Hkv, D, G)."""
    check_dtype("q", q)
    check_dtype("k_cache", k_cache)
    if q.dim() != 3:
        raise ValueError(f"q must have shape [bs, Hq, D], got {list(q.shape)}")
    if k_cache.dim() != 3:
        raise ValueError(f"k_cache must have shape [num_slots, Hkv, D], got {list(k_cache.shape)}")
    bs, hq, d = q.shape
    hkv = k_cache.shape[1]
    if k_cache.shape[2] != d:
        raise ValueError(f"head_dim mismatch: q has {d}, k_cache has {k_cache.shape[2]}")
    if d not in (64, 128, 256):
        raise ValueError(f"head_dim must be 64, 128 or 256, got {d}")
    if hq % hkv:
        raise ValueError(f"num q heads {hq} must be a multiple of num kv heads {hkv}")
    if v_cache is not None:
        check_dtype("v_cache", v_cache)
        if v_cache.shape != k_cache.shape:
            raise ValueError(f"v_cache shape {list(v_cache.shape)} != k_cache shape {list(k_cache.shape)}")
    return bs, hq, hkv, d, hq // hkv


def num_pages_of(seq_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Pages per request: ceil(seq_len / page_size) as int64."""
    return (seq_lens.to(torch.int64) + page_size - 1) // page_size


def page_layout(
    seq_lens: torch.Tensor, n_pages: int, page_size: int, sink_pages: int = 0, local_pages: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per request over N logical pages: (npages [bs], valid [bs, N], forced [bs, N], ntok [bs, N]).

    npages is clamped to N; forced marks the sink pages and the local window (always kept); ntok is
    each page's number of valid tokens (page_size, fewer on a partial last page, 0 past the end).
    """
    npages = num_pages_of(seq_lens, page_size).clamp(max=n_pages)
    j = torch.arange(n_pages, device=seq_lens.device)
    valid = j[None, :] < npages[:, None]
    forced = valid & ((j[None, :] < sink_pages) | (j[None, :] >= npages[:, None] - local_pages))
    ntok = (seq_lens.to(torch.int64)[:, None] - j[None, :] * page_size).clamp(0, page_size)
    return npages, valid, forced, ntok


def selection_mask(page_idx: torch.Tensor, counts: torch.Tensor, n_pages: int) -> torch.Tensor:
    """page_idx [..., W] (selected logical pages in [:count], any order) -> mask [..., n_pages] bool."""
    keep = torch.arange(page_idx.shape[-1], device=page_idx.device) < counts[..., None]
    mask = torch.zeros(*page_idx.shape[:-1], n_pages + 1, dtype=torch.bool, device=page_idx.device)
    mask.scatter_(-1, torch.where(keep, page_idx.long().clamp(0, n_pages), n_pages), True)
    return mask[..., :n_pages]


def compact_selection(page_idx: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept entries of each row of page_idx [..., W], in order, -1 padded (int32); and their counts."""
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    counts = keep.sum(-1).to(torch.int32)
    idx = torch.gather(page_idx, -1, order)
    idx = torch.where(torch.arange(idx.shape[-1], device=idx.device) < counts[..., None], idx, -1)
    return idx.to(torch.int32).contiguous(), counts.contiguous()


def check_keep_rows(keep_rows: torch.Tensor | None, bs: int) -> torch.Tensor | None:
    """keep_rows: None, or [bs] bool / int8 / int32 flags (nonzero: the row reuses its selection)."""
    if keep_rows is None:
        return None
    if keep_rows.shape != (bs,) or keep_rows.dtype not in (torch.bool, torch.int8, torch.int32):
        raise ValueError(
            f"keep_rows must be [{bs}] bool, int8 or int32, got {list(keep_rows.shape)} {keep_rows.dtype}"
        )
    return keep_rows
