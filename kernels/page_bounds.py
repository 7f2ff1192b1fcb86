"""Stage 2 of a PSA step: the Quest upper bound of every page's attention logits.

For query q and a block with elementwise key bounds [kmin, kmax], every key k in the block satisfies
    q.k <= sum_d max(q_d * kmin_d, q_d * kmax_d) = relu(q).kmax + min(q, 0).kmin
so the bound of a page is two small matrix products. Symmetrically every logit is at least
relu(q).kmin + min(q, 0).kmax; the midpoint of that interval, q.(kmin + kmax) / 2 (the "center"), is
what select_pages uses to *estimate* a page's mass: n * exp(upper bound) overstates pages by their
bound slack, which differs by several logits from page to page, and under-selects badly.
The center alone is a flat estimate: a page's mass is sum_i exp(q.k_i) >= n * exp(q.mean) (Jensen), and
the gap grows with the spread of the page's logits. With variance_weight w > 0 the estimate becomes
    center + w * sm_scale^2 * sum_d q_d^2 (kmax_d - kmin_d)^2,
and w = 1/24 is the log-normal mass n * exp(mu + sigma^2 / 2) with each key dimension's variance taken
as range^2 / 12 (uniform keys; Gaussian keys give about the same at 16 keys a block) and the dimensions
independent (--psa-mass-estimate lognormal).
A kv head serves its whole GQA group, so a page's
bound is the max over the group's query heads; with logical sub-pages (block_size < page_size) it is
also the max over the page's valid sub-blocks (LServe hierarchical paging).

Shapes and dtypes:
    q                  [bs, Hq, D]                     fp16 / bf16 / fp32
    kmin, kmax         [num_slots // block_size, Hkv, D] dtype of the KV cache
    req_to_token       [max_reqs, max_context] int32   SGLang's page table (token slots)
    req_pool_indices   [bs] int32 / int64
    seq_lens           [bs] int32 / int64
    -> bounds          [bs, Hkv, max_pages] float32, scaled by sm_scale; -inf past the last page
                       (and for every page of a request shorter than skip_below); with fill=False
                       those entries are left unwritten
       centers         same shape (with_centers=True): max over the group of q.(kmin + kmax) / 2
                       (+ the variance term above when variance_weight > 0)
    keep_rows          optional [bs] bool / int8 / int32: rows that reuse an earlier selection
                       (--psa-reuse-steps) get no bounds at all: nothing of theirs is written
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    check_int,
    check_keep_rows,
    check_kv,
    check_page_size,
    f32_dot,
    next_pow2,
    num_pages_of,
    sm_count,
)


def _check(q, kmin, kmax, req_to_token, req_pool_indices, seq_lens, page_size, block_size):
    bs, hq, hkv, d, g = check_kv(q, kmin)
    check_page_size(page_size, block_size)
    if q.dtype != kmin.dtype:
        raise TypeError(f"q dtype {q.dtype} must match the summaries' dtype {kmin.dtype}")
    if kmax.shape != kmin.shape or kmax.dtype != kmin.dtype:
        raise ValueError(f"kmax {list(kmax.shape)} must match kmin {list(kmin.shape)}")
    for name, t in (("req_to_token", req_to_token), ("req_pool_indices", req_pool_indices)):
        check_int(name, t)
    check_int("seq_lens", seq_lens)
    if req_pool_indices.shape != (bs,) or seq_lens.shape != (bs,):
        raise ValueError(
            f"req_pool_indices and seq_lens must have shape [{bs}], "
            f"got {list(req_pool_indices.shape)} and {list(seq_lens.shape)}"
        )
    return bs, hq, hkv, d, g


def page_bounds_ref(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    block_size: int,
    sm_scale: float,
    max_pages: int,
    with_centers: bool = False,
    skip_below: int = 0,
    fill: bool = True,
    out: torch.Tensor | None = None,
    centers: torch.Tensor | None = None,
    keep_rows: torch.Tensor | None = None,
    variance_weight: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of page_bounds (float64 arithmetic); always fills (fill=False allows it).

    Rows flagged in keep_rows are left untouched in out / centers (when given; else -inf).
    """
    bs, hq, hkv, d, g = _check(q, kmin, kmax, req_to_token, req_pool_indices, seq_lens, page_size, block_size)
    keep = check_keep_rows(keep_rows, bs)
    nsub = page_size // block_size
    res = torch.full((bs, hkv, max_pages), float("-inf"), dtype=torch.float32, device=q.device)
    res_c = res.clone()
    npages = num_pages_of(seq_lens, page_size)
    for b in range(bs):
        n = min(int(npages[b]), max_pages)
        if keep is not None and bool(keep[b]):
            continue
        if n == 0 or int(seq_lens[b]) < skip_below:
            continue
        r = int(req_pool_indices[b])
        first = req_to_token[r, torch.arange(n, device=q.device) * page_size].to(torch.int64)
        sub = first[:, None] // block_size + torch.arange(nsub, device=q.device)  # [n, nsub]
        pos = (
            torch.arange(n, device=q.device)[:, None] * page_size
            + torch.arange(nsub, device=q.device) * block_size
        )
        sub_valid = pos < int(seq_lens[b])
        lo = kmin[sub].double()  # [n, nsub, Hkv, D]
        hi = kmax[sub].double()
        qg = q[b].double().view(hkv, g, d)  # [Hkv, G, D]
        u = (
            torch.einsum("hgd,nshd->hgns", qg.clamp(min=0), hi)
            + torch.einsum("hgd,nshd->hgns", qg.clamp(max=0), lo)
        ) * sm_scale
        u = u.masked_fill(~sub_valid[None, None], float("-inf"))
        res[b, :, :n] = u.amax(dim=(1, 3)).float()
        c = torch.einsum("hgd,nshd->hgns", qg, (lo + hi) / 2) * sm_scale
        if variance_weight:
            spread = torch.einsum("hgd,nshd->hgns", qg * qg, (hi - lo) ** 2) * sm_scale**2
            c = c + variance_weight * spread
        res_c[b, :, :n] = c.masked_fill(~sub_valid[None, None], float("-inf")).amax(dim=(1, 3)).float()
    live = slice(None) if keep is None else ~keep.to(device=q.device, dtype=torch.bool)
    if out is None:
        out = res
    else:
        if out.shape != (bs, hkv, max_pages) or out.dtype != torch.float32:
            raise ValueError(f"out must be [{bs}, {hkv}, {max_pages}] float32")
        out[live] = res[live]
    if with_centers:
        if centers is None:
            centers = res_c
        else:
            if centers.shape != res_c.shape or centers.dtype != torch.float32:
                raise ValueError(f"centers must be [{bs}, {hkv}, {max_pages}] float32 like out")
            centers[live] = res_c[live]
    return (out, centers) if with_centers else out


@triton.jit
def _page_bounds_kernel(
    Q,
    KMIN,
    KMAX,
    REQ_TO_TOKEN,
    RPI,
    SEQ,
    KEEP_ROWS,
    OUT,
    CENTERS,
    sm_scale,
    variance_weight,
    max_pages,
    skip_below,
    stride_qb,
    stride_qh,
    stride_sb,
    stride_sh,
    stride_rt,
    stride_ob,
    stride_oh,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_P: tl.constexpr,
    IEEE: tl.constexpr,
    WITH_CENTERS: tl.constexpr,
    WITH_SPREAD: tl.constexpr,
    FILL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SEQ + b).to(tl.int64)
    rpi = tl.load(RPI + b).to(tl.int64)
    # The programs of a row stride over its page blocks. The width spans the longest context the
    # server admits, so most blocks lie past a request's last page: with FILL they only store -inf,
    # without it they are skipped (as are whole rows below skip_below, which decode densely).
    n_pages = tl.minimum((seq_len + PAGE - 1) // PAGE, max_pages)
    n_live = tl.where(seq_len >= skip_below, (n_pages + BLOCK_P - 1) // BLOCK_P, 0)
    n_blocks = (max_pages + BLOCK_P - 1) // BLOCK_P if FILL else n_live
    if KEEP_ROWS is not None:  # None specializes away: the plain launch compiles as before
        # a row that reuses its earlier selection (--psa-reuse-steps) needs no bounds: no work at all
        n_blocks = tl.where(tl.load(KEEP_ROWS + b) != 0, 0, n_blocks)
    for pblk in range(tl.program_id(2), n_blocks, tl.num_programs(2)):
        j = pblk * BLOCK_P + tl.arange(0, BLOCK_P)
        best = tl.full([BLOCK_P], float("-inf"), tl.float32)
        best_center = tl.full([BLOCK_P], float("-inf"), tl.float32)
        if pblk < n_live:
            page_valid = (j * PAGE < seq_len) & (j < max_pages)
            best, best_center = _bound_block(
                Q, KMIN, KMAX, REQ_TO_TOKEN, b, h, rpi, seq_len, j, page_valid, sm_scale, variance_weight,
                stride_qb, stride_qh, stride_sb, stride_sh, stride_rt, G, G_PAD, D, BLOCK_D, PAGE, SUB,
                BLOCK_P, IEEE, WITH_CENTERS, WITH_SPREAD,
            )  # fmt: skip
        tl.store(OUT + b * stride_ob + h * stride_oh + j, best, mask=j < max_pages)
        if WITH_CENTERS:
            tl.store(CENTERS + b * stride_ob + h * stride_oh + j, best_center, mask=j < max_pages)


@triton.jit
def _bound_block(
    Q, KMIN, KMAX, REQ_TO_TOKEN, b, h, rpi, seq_len, j, page_valid, sm_scale, variance_weight, stride_qb,
    stride_qh, stride_sb, stride_sh, stride_rt, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGE: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
    IEEE: tl.constexpr, WITH_CENTERS: tl.constexpr, WITH_SPREAD: tl.constexpr,
):  # fmt: skip
    """Bounds (and centers) of the BLOCK_P pages j of request b, kv head h."""
    gi = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    qmask = (gi < G)[:, None] & (d < D)[None, :]
    q = tl.load(Q + b * stride_qb + (h * G + gi)[:, None] * stride_qh + d[None, :], mask=qmask)
    q_pos = tl.maximum(q, 0.0).to(q.dtype)  # exact: relu of a bf16 value is a bf16 value
    q_neg = tl.minimum(q, 0.0).to(q.dtype)
    first = tl.load(REQ_TO_TOKEN + rpi * stride_rt + j * PAGE, mask=page_valid, other=0).to(tl.int64)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    best_center = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for s in tl.static_range(PAGE // SUB):
        sub_valid = page_valid & (j * PAGE + s * SUB < seq_len)
        sidx = first // SUB + s
        smask = sub_valid[:, None] & (d < D)[None, :]
        off = sidx[:, None] * stride_sb + h * stride_sh + d[None, :]
        lo = tl.load(KMIN + off, mask=smask, other=0.0)
        hi = tl.load(KMAX + off, mask=smask, other=0.0)
        if IEEE:
            u = tl.dot(q_pos.to(tl.float32), tl.trans(hi.to(tl.float32)), input_precision="ieee")
            u += tl.dot(q_neg.to(tl.float32), tl.trans(lo.to(tl.float32)), input_precision="ieee")
        else:
            u = tl.dot(q_pos, tl.trans(hi))
            u += tl.dot(q_neg, tl.trans(lo))
        u = tl.where((gi < G)[:, None], u, float("-inf"))
        u_page = tl.max(u, axis=0) * sm_scale
        best = tl.maximum(best, tl.where(sub_valid, u_page, float("-inf")))
        if WITH_CENTERS:
            mid = (lo.to(tl.float32) + hi.to(tl.float32)) * 0.5
            if IEEE:
                c = tl.dot(q.to(tl.float32), tl.trans(mid), input_precision="ieee")
            else:
                c = tl.dot(q, tl.trans(mid.to(q.dtype)))
            c = c * sm_scale
            if WITH_SPREAD:  # the log-normal correction: sum_d (q_d * range_d)^2, in fp32
                q32 = q.to(tl.float32)
                rng = hi.to(tl.float32) - lo.to(tl.float32)
                if IEEE:
                    spread = tl.dot(q32 * q32, tl.trans(rng * rng), input_precision="ieee")
                else:
                    spread = tl.dot(q32 * q32, tl.trans(rng * rng))
                c += (variance_weight * sm_scale * sm_scale) * spread
            c = tl.max(tl.where((gi < G)[:, None], c, float("-inf")), axis=0)
            best_center = tl.maximum(best_center, tl.where(sub_valid, c, float("-inf")))
    return best, best_center


def _programs_per_row(rows: int, blocks: int, device: torch.device) -> int:
    """Programs per (request, kv head): enough for ~8 per SM over the batch, at most one per block.

    One program per block of the full width would launch bs x Hkv x N / BLOCK_P programs (8.8k at
    16 x 4k in a 140k-token server), nearly all of them with nothing to do.
    """
    sms = 4 if device.type != "cuda" else sm_count(device)
    return max(1, min(blocks, triton.cdiv(8 * sms, max(1, rows))))


def page_bounds(
    q: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    block_size: int,
    sm_scale: float,
    max_pages: int,
    out: torch.Tensor | None = None,
    with_centers: bool = False,
    centers: torch.Tensor | None = None,
    skip_below: int = 0,
    fill: bool = True,
    keep_rows: torch.Tensor | None = None,
    variance_weight: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Bound every page's logits for a decode batch (Triton). See the module docstring.

    Graph-safe: grid is (bs, Hkv, programs per row), fixed by the shapes; page counts are read on
    device, and each row's programs stride over its page blocks.
    skip_below: requests with seq_len < skip_below get -inf everywhere (they decode densely).
    fill=False leaves every entry past a request's last page, and every entry of a skipped request,
    unwritten: for consumers that mask by page count (select_pages, certified_decode), it saves
    storing -inf over the server's whole width each layer.
    keep_rows: optional [bs] flags (bool / int8 / int32, on q's device); a flagged row is skipped
    entirely, whatever fill says: nothing of it is written (its selection is reused).
    variance_weight: weight of the key-spread term in the centers (0: the plain midpoint; 1/24: the
    log-normal mass estimate, module docstring).
    """
    bs, hq, hkv, d, g = _check(q, kmin, kmax, req_to_token, req_pool_indices, seq_lens, page_size, block_size)
    check_keep_rows(keep_rows, bs)
    if out is None:
        out = torch.empty((bs, hkv, max_pages), dtype=torch.float32, device=q.device)
    elif out.shape != (bs, hkv, max_pages) or out.dtype != torch.float32:
        raise ValueError(f"out must be [{bs}, {hkv}, {max_pages}] float32")
    if with_centers and centers is None:
        centers = torch.empty_like(out)
    if with_centers and (centers.shape != out.shape or centers.stride() != out.stride()):
        raise ValueError(f"centers must be [{bs}, {hkv}, {max_pages}] float32 like out")
    if bs == 0 or max_pages == 0:
        return (out, centers) if with_centers else out
    if q.stride(2) != 1 or kmin.stride(2) != 1 or kmin.stride() != kmax.stride():
        raise ValueError("q, kmin and kmax must be contiguous in head_dim")
    block_p = 64 if max_pages >= 64 else max(16, next_pow2(max_pages))
    grid = (bs, hkv, _programs_per_row(bs * hkv, triton.cdiv(max_pages, block_p), q.device))
    _page_bounds_kernel[grid](
        q,
        kmin,
        kmax,
        req_to_token,
        req_pool_indices,
        seq_lens,
        keep_rows,
        out,
        centers if with_centers else out,
        sm_scale,
        float(variance_weight),
        max_pages,
        int(skip_below),
        q.stride(0),
        q.stride(1),
        kmin.stride(0),
        kmin.stride(1),
        req_to_token.stride(0),
        out.stride(0),
        out.stride(1),
        G=g,
        G_PAD=max(16, next_pow2(g)),
        D=d,
        BLOCK_D=next_pow2(d),
        PAGE=page_size,
        SUB=block_size,
        BLOCK_P=block_p,
        IEEE=f32_dot(q.dtype),
        WITH_CENTERS=with_centers,
        WITH_SPREAD=bool(with_centers and variance_weight),
        FILL=fill,
        num_warps=4,
    )
    return (out, centers) if with_centers else out
