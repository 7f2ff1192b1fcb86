"""Stage 1 of a PSA step: keep per-block min/max of K (Quest page summaries).

Summaries live in a pool indexed by physical summary block (slot // block_size), parallel to SGLang's
KV pool, so prefixes shared through the radix tree share summaries for free. A block is rebuilt from
its first slot up to the last slot written in this batch: SGLang writes a block's slots in order, so
that range is exactly the valid part of a partly filled block, and a freed-then-reused block never
keeps min/max of tokens that no longer belong to it.

Shapes and dtypes:
    k_cache        [num_slots, Hkv, D]             fp16 / bf16 / fp32 (SGLang's k_buffer of one layer)
    kmin, kmax     [num_slots // block_size, Hkv, D] same dtype as k_cache, updated in place
    out_cache_loc  [n] int32 / int64                slots written by this forward batch
block_size is the physical page size, or a logical sub-page of it (LServe hierarchical paging).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dtype, check_int, next_pow2


def _check(k_cache, kmin, kmax, out_cache_loc, block_size):
    check_dtype("k_cache", k_cache)
    check_int("out_cache_loc", out_cache_loc)
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if k_cache.dim() != 3:
        raise ValueError(f"k_cache must have shape [num_slots, Hkv, D], got {list(k_cache.shape)}")
    n_blocks = k_cache.shape[0] // block_size
    want = (n_blocks, k_cache.shape[1], k_cache.shape[2])
    for name, t in (("kmin", kmin), ("kmax", kmax)):
        if tuple(t.shape) != want or t.dtype != k_cache.dtype:
            raise ValueError(
                f"{name} must be {list(want)} {k_cache.dtype} for block_size {block_size}, "
                f"got {list(t.shape)} {t.dtype}"
            )
    if out_cache_loc.dim() != 1:
        raise ValueError(f"out_cache_loc must be 1-D, got {list(out_cache_loc.shape)}")


def update_page_summaries_ref(
    k_cache: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    out_cache_loc: torch.Tensor,
    block_size: int,
) -> None:
    """Pure-torch reference of update_page_summaries (any written order within a block)."""
    _check(k_cache, kmin, kmax, out_cache_loc, block_size)
    if out_cache_loc.numel() == 0:
        return
    loc = out_cache_loc.to(torch.int64)
    blocks = loc // block_size
    last = torch.full((kmin.shape[0],), -1, dtype=torch.int64, device=loc.device)
    last.scatter_reduce_(0, blocks, loc % block_size, reduce="amax")
    for blk in torch.unique(blocks).tolist():
        start = blk * block_size
        keys = k_cache[start : start + int(last[blk]) + 1].float()
        kmin[blk] = keys.amin(dim=0).to(kmin.dtype)
        kmax[blk] = keys.amax(dim=0).to(kmax.dtype)


@triton.jit
def _page_summaries_kernel(
    K,
    KMIN,
    KMAX,
    LOC,
    n,
    stride_kt,
    stride_kh,
    stride_sb,
    stride_sh,
    BLOCK: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(LOC + i).to(tl.int64)
    blk = slot // BLOCK
    # Only the last write of a block in this batch rebuilds it (the others would redo the same work).
    nxt = tl.load(LOC + i + 1, mask=i + 1 < n, other=-1).to(tl.int64)
    is_last = (i + 1 >= n) | (nxt // BLOCK != blk) | (nxt <= slot)
    t = tl.arange(0, BLOCK)
    d = tl.arange(0, BLOCK_D)
    valid = (t <= slot - blk * BLOCK)[:, None] & (d < D)[None, :] & is_last
    ptr = K + (blk * BLOCK + t)[:, None] * stride_kt + h * stride_kh + d[None, :]
    keys = tl.load(ptr, mask=valid, other=0.0).to(tl.float32)
    kmin = tl.min(tl.where(valid, keys, float("inf")), axis=0)
    kmax = tl.max(tl.where(valid, keys, float("-inf")), axis=0)
    out = blk * stride_sb + h * stride_sh + d
    dmask = (d < D) & is_last
    tl.store(KMIN + out, kmin.to(KMIN.dtype.element_ty), mask=dmask)
    tl.store(KMAX + out, kmax.to(KMAX.dtype.element_ty), mask=dmask)


def update_page_summaries(
    k_cache: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    out_cache_loc: torch.Tensor,
    block_size: int,
) -> None:
    """Refresh kmin/kmax of every summary block touched by out_cache_loc (Triton, in place).

    Precondition (SGLang's allocator gives it): within one block, out_cache_loc lists the written
    slots in increasing order, consecutively. Graph-safe: no host sync, grid depends on len only.
    """
    _check(k_cache, kmin, kmax, out_cache_loc, block_size)
    n = out_cache_loc.numel()
    if n == 0:
        return
    hkv, d = k_cache.shape[1], k_cache.shape[2]
    if k_cache.stride(2) != 1 or kmin.stride(2) != 1 or kmin.stride() != kmax.stride():
        raise ValueError("k_cache, kmin and kmax must be contiguous in head_dim")
    _page_summaries_kernel[(n, hkv)](
        k_cache,
        kmin,
        kmax,
        out_cache_loc,
        n,
        k_cache.stride(0),
        k_cache.stride(1),
        kmin.stride(0),
        kmin.stride(1),
        BLOCK=block_size,
        D=d,
        BLOCK_D=next_pow2(d),
        num_warps=4 if block_size * d >= 4096 else 2,
    )


def alloc_summaries(
    num_slots: int, hkv: int, d: int, block_size: int, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty kmin/kmax for one layer: [num_slots // block_size, Hkv, D]."""
    shape = (num_slots // block_size, hkv, d)
    kmin = torch.zeros(shape, dtype=dtype, device=device)
    kmax = torch.zeros(shape, dtype=dtype, device=device)
    return kmin, kmax
