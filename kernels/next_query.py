"""Next-layer query estimate in one launch (--psa-prefetch next-layer; sglang_psa/lookahead.py).

    q_hat = RoPE(W_q . RMSNorm(hidden [+ residual]) [+ b_q])

The torch path (lookahead.estimate_query: SGLang's native RMSNorm, a linear over the q rows of
qkv_proj, native RoPE) is about 20 small kernels per layer, run on the prefetch stream beside the
layer it should hide behind. This kernel does all of it per (row block, query head): pass 1 sums the
squares of the row's stream, pass 2 normalizes each K block on the fly and accumulates the head's two
rotary halves with tl.dot, and the epilogue adds the bias, rounds to the model dtype (as the linear
would) and applies neox-style RoPE from SGLang's cos/sin cache. Rows are re-read once per head
(hidden x 2 bytes each; they stay in L2); the weight is read once.

Supported: neox-style RoPE over the whole head (rotary_dim == head_dim), head_dim in {32, 64, 128,
256}; the caller falls back to the torch path otherwise.

Shapes and dtypes:
    hidden, residual (optional) [T, K] model dtype (bf16 / fp16 / fp32), contiguous rows
    norm_weight [K]; eps float
    w_qkv [>= q_size, K] model dtype (qkv_proj.weight; only its first q_size rows are read)
    bias (optional) [>= q_size]
    cos_sin_cache [max_pos, head_dim] float (cos in [:, :head_dim/2], sin in [:, head_dim/2:])
    positions [T] int
    -> out [T, q_size] model dtype, q_size = num_heads x head_dim
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def next_query_ref(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    w_qkv: torch.Tensor,
    bias: torch.Tensor | None,
    q_size: int,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    head_dim: int,
) -> torch.Tensor:
    """Pure-torch reference: SGLang's RMSNorm (fp32 math, weight, cast), linear, neox RoPE."""
    dtype = hidden.dtype
    x = hidden.float() if residual is None else hidden.float() + residual.float()
    x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()).to(dtype)
    q = torch.nn.functional.linear(x, w_qkv[:q_size], None if bias is None else bias[:q_size])
    q = q.view(q.shape[0], -1, head_dim).float()
    cos, sin = cos_sin_cache.index_select(0, positions.long()).float().chunk(2, dim=-1)
    x1, x2 = q.chunk(2, dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.reshape(q.shape[0], q_size).to(dtype)


@triton.jit
def _stream_block(HID, RES, rows, row_ok, ks, K, stride_h, stride_r, HAS_RES: tl.constexpr):
    """[BLOCK_M, BLOCK_K] of the rows' stream, hidden (+ residual), in fp32 (both passes read it)."""
    m = row_ok[:, None] & (ks < K)[None, :]
    x = tl.load(HID + rows[:, None] * stride_h + ks[None, :], mask=m, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(RES + rows[:, None] * stride_r + ks[None, :], mask=m, other=0.0).to(tl.float32)
    return x


@triton.jit
def _next_query_kernel(
    HID, RES, NORM_W, W, BIAS, COS_SIN, POS, OUT,
    T, K, eps,
    stride_h, stride_r, stride_w, stride_cs, stride_o,
    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    head = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T
    # pass 1: the RMS of each row's stream (hidden + residual), in fp32
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = _stream_block(HID, RES, rows, row_ok, ks, K, stride_h, stride_r, HAS_RES)
        sumsq += tl.sum(x * x, axis=1)
    rstd = 1.0 / tl.sqrt(sumsq / K + eps)
    # pass 2: the head's two rotary halves, x normalized block by block
    d = tl.arange(0, HALF)
    n1 = head * (2 * HALF) + d
    n2 = n1 + HALF
    acc1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x = _stream_block(HID, RES, rows, row_ok, ks, K, stride_h, stride_r, HAS_RES)
        nw = tl.load(NORM_W + ks, mask=k_ok, other=0.0).to(tl.float32)
        xn = (x * rstd[:, None] * nw[None, :]).to(W.dtype.element_ty)
        w1 = tl.load(W + n1[None, :] * stride_w + ks[:, None], mask=k_ok[:, None], other=0.0)  # [BK, HALF]
        w2 = tl.load(W + n2[None, :] * stride_w + ks[:, None], mask=k_ok[:, None], other=0.0)
        acc1 = tl.dot(xn, w1, acc1)
        acc2 = tl.dot(xn, w2, acc2)
    if HAS_BIAS:
        acc1 += tl.load(BIAS + n1).to(tl.float32)[None, :]
        acc2 += tl.load(BIAS + n2).to(tl.float32)[None, :]
    # the linear's output is in the model dtype before RoPE
    acc1 = acc1.to(OUT.dtype.element_ty).to(tl.float32)
    acc2 = acc2.to(OUT.dtype.element_ty).to(tl.float32)
    pos = tl.load(POS + rows, mask=row_ok, other=0).to(tl.int64)
    cs = COS_SIN + pos[:, None] * stride_cs + d[None, :]
    cos = tl.load(cs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    sin = tl.load(cs + HALF, mask=row_ok[:, None], other=0.0).to(tl.float32)
    out = OUT + rows[:, None] * stride_o
    tl.store(out + n1[None, :], (acc1 * cos - acc2 * sin).to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(out + n2[None, :], (acc2 * cos + acc1 * sin).to(OUT.dtype.element_ty), mask=row_ok[:, None])


def next_query(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    w_qkv: torch.Tensor,
    bias: torch.Tensor | None,
    q_size: int,
    cos_sin_cache: torch.Tensor,
    positions: torch.Tensor,
    head_dim: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The estimate in one Triton launch (see the module docstring); out [T, q_size] optional."""
    t, k = hidden.shape
    if head_dim not in (32, 64, 128, 256) or q_size % head_dim:
        raise ValueError(f"head_dim must be 32, 64, 128 or 256 and divide q_size, got {head_dim}, {q_size}")
    if cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(f"cos_sin_cache covers {cos_sin_cache.shape[-1]} dims, not the head's {head_dim}")
    if w_qkv.shape[1] != k or w_qkv.shape[0] < q_size or norm_weight.shape != (k,):
        raise ValueError(f"w_qkv must be [>= {q_size}, {k}] and norm_weight [{k}]")
    for name, x in (("hidden", hidden), ("residual", residual), ("w_qkv", w_qkv)):
        if x is not None and x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(f"residual must be {list(hidden.shape)} like hidden")
    if out is None:
        out = torch.empty(t, q_size, dtype=hidden.dtype, device=hidden.device)
    if t == 0:
        return out
    block_m = 16
    grid = (triton.cdiv(t, block_m), q_size // head_dim)
    _next_query_kernel[grid](
        hidden, residual, norm_weight, w_qkv, bias, cos_sin_cache, positions, out,
        t, k, float(eps),
        hidden.stride(0), residual.stride(0) if residual is not None else 0, w_qkv.stride(0),
        cos_sin_cache.stride(0), out.stride(0),
        HAS_RES=residual is not None, HAS_BIAS=bias is not None, HALF=head_dim // 2,
        BLOCK_M=block_m, BLOCK_K=64,
    )  # fmt: skip
    return out
