"""Stage 4 of a PSA step: exact attention over the selected pages only.

One program per (request, kv head, split) attends the whole GQA group over its share of the page
list (split-K), keeping an online softmax; a second kernel merges the splits by log-sum-exp. Lengths
are read on device, so the launch shapes depend only on static maxima (CUDA-graph capturable).

Progressive (certified) mode visits pages in descending bound order, in rounds of doubling size, and
stops a (request, kv head) once every query head of its group has captured mass Z with
    Z >= tau * (Z + R),   R = sum over unvisited pages of n_tokens * exp(bound) >= their true mass,
which guarantees that at least tau of the exact softmax mass was attended. Rounds past the stop are
no-ops on device, so there is no host sync either. With Quest's box bounds at head_dim 128 the bound
on R is loose by several logits per page, so certification often needs most pages; passing
rest_logits=centers (page_bounds' interval midpoints) instead estimates R, which gives the
progressive mode: exact mass for what was visited, a calibrated estimate only for the tail.

Shapes and dtypes:
    q                 [bs, Hq, D]            fp16 / bf16 / fp32
    k_cache, v_cache  [num_slots, Hkv, D]    same dtype as q
    req_to_token      [max_reqs, max_context] int32 (token slots; a page's P slots are contiguous)
    req_pool_indices, seq_lens  [bs] int
    page_idx          [bs, Hkv, W] int32 logical page indices (select_pages), counts [bs, Hkv] int32
    page_table        optional [bs, N] int32: where logical page j of request b lives in k_cache /
                      v_cache, in pages (token rows page_table[b, j] * P ...); replaces req_to_token
                      (tiered mode reads the hot pool's slots this way). [bs, Hkv, N]: one table
                      per kv head (tiered mode with one-head slots; k_cache / v_cache are then
                      the slots' single head expanded to Hkv, head stride 0)
    host_k, host_v    optional [host_rows, Hkv, D] (tiered mode: the layer's pinned host tier, read
                      over UVA); a page_table entry e >= host_base is host page e - host_base (token
                      rows (e - host_base) * P ...) of these instead: tiered decode reads the pages
                      it misses straight from host memory while their copy into the pool runs beside
    merge_with        optional (o [bs, Hq, D] contiguous, lse [bs, Hq] float32): a previous attention
                      state over other keys, merged into the result by log-sum-exp (tiered mode's
                      split miss path: the resident pages first, the copied ones after); o float32
                      keeps the first pass unrounded (out= may be float32 too)
    -> out [bs, Hq, D] q.dtype, lse [bs, Hq] float32 (natural log of the softmax normaliser)
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (
    check_int,
    check_kv,
    check_page_size,
    f32_dot,
    interpret_mode,
    next_pow2,
    num_pages_of,
    page_layout,
    sm_count,
)

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


# ----------------------------------------------------------------------------- references
def _gather_tokens(req_to_token, rpi, seq_len, pages, page_size, table_row=None):
    """Token slots of the given logical pages of one request, clipped to seq_len."""
    dev = req_to_token.device
    tok = pages[:, None].to(torch.int64) * page_size + torch.arange(page_size, device=dev)
    tok = tok.flatten()
    tok = tok[tok < seq_len]
    if table_row is not None:  # page-granular location table (tiered mode)
        return table_row[tok // page_size].to(torch.int64) * page_size + tok % page_size
    return req_to_token[rpi, tok].to(torch.int64)


def _rows(cache, host, host_base, slots, h, page_size):
    """Rows [T, D] of kv head h at token slots [T]; slots from a table entry >= host_base (in pages)
    are rows of `host` (see the module docstring)."""
    if host is None:
        return cache[slots, h].cpu()
    on_host = slots >= host_base * page_size
    dev_rows = cache[torch.where(on_host, 0, slots), h].cpu()
    host_rows = host[torch.where(on_host, slots - host_base * page_size, 0).cpu(), h].cpu()
    return torch.where(on_host.cpu()[:, None], host_rows, dev_rows)


def _attend_ref(q_group, keys, values, sm_scale):
    """q_group [G, D], keys/values [T, D] -> out [G, D], lse [G] in float64."""
    if keys.shape[0] == 0:
        g, d = q_group.shape
        return torch.zeros(g, d, dtype=torch.float64), torch.full((g,), float("-inf"), dtype=torch.float64)
    s = (q_group.double() @ keys.double().T) * sm_scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.softmax(s, dim=-1) @ values.double()
    return out, lse


def sparse_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    sm_scale: float,
    page_table: torch.Tensor | None = None,
    host_k: torch.Tensor | None = None,
    host_v: torch.Tensor | None = None,
    host_base: int = 0,
    merge_with: tuple[torch.Tensor, torch.Tensor] | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch (float64) reference of sparse_decode (out: written in its dtype and returned)."""
    bs, hq, hkv, d, g = check_kv(q, k_cache, v_cache)
    res = torch.zeros(bs, hq, d, dtype=torch.float64)
    lse = torch.full((bs, hq), float("-inf"), dtype=torch.float64)
    for b in range(bs):
        r, n = int(req_pool_indices[b]), int(seq_lens[b])
        for h in range(hkv):
            pages = page_idx[b, h, : int(counts[b, h])]
            row = None if page_table is None else page_table[b] if page_table.dim() == 2 else page_table[b, h]
            slots = _gather_tokens(req_to_token, r, n, pages, page_size, row)
            o, l_ = _attend_ref(
                q[b, h * g : (h + 1) * g].cpu(),
                _rows(k_cache, host_k, host_base, slots, h, page_size),
                _rows(v_cache, host_v, host_base, slots, h, page_size),
                sm_scale,
            )
            res[b, h * g : (h + 1) * g], lse[b, h * g : (h + 1) * g] = o, l_
    if merge_with is not None:
        res, lse = merge_states(res, lse, *(t.double().cpu() for t in merge_with))
    if out is not None:
        out.copy_(res)
        return out, lse.float().to(q.device)
    return res.to(q.dtype).to(q.device), lse.float().to(q.device)


def merge_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from each one's (out [..., D], lse [...]), in
    torch (at least float32; float64 inputs stay float64). An empty set (lse -inf) merges as nothing."""
    ct = torch.promote_types(out_a.dtype, torch.float32)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    den = wa + wb
    out = (wa[..., None] * out_a.to(ct) + wb[..., None] * out_b.to(ct)) / den.clamp(min=1e-30)[..., None]
    lse = torch.where(den > 0, m + torch.log(den.clamp(min=1e-30)), torch.full_like(m, float("-inf")))
    return out.to(out_a.dtype), lse


def dense_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention over every token of each request (float64), the ground truth."""
    bs, hq, hkv, d, g = check_kv(q, k_cache, v_cache)
    npages = int(num_pages_of(seq_lens, page_size).max()) if bs else 0
    page_idx = torch.arange(npages, dtype=torch.int32).expand(bs, hkv, npages).contiguous()
    counts = num_pages_of(seq_lens, page_size).to(torch.int32)[:, None].expand(bs, hkv).contiguous()
    return sparse_decode_ref(
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        page_idx.to(q.device),
        counts.to(q.device),
        page_size,
        sm_scale,
    )


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _attend_pages_kernel(
    Q,
    K,
    V,
    REQ_TO_TOKEN,
    RPI,
    SEQ,
    PAGE_IDX,
    START,
    END,
    PART_O,
    PART_LSE,
    PAGE_TABLE,
    stride_tb,
    stride_th,
    HOST_K,
    HOST_V,
    host_base,
    stride_hkt,
    stride_hkh,
    stride_hvt,
    stride_hvh,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_rt,
    stride_pb,
    stride_ph,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    HKV: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
    PAGES_PER_ITER: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    HAS_START: tl.constexpr,
    HAS_TABLE: tl.constexpr,
    HAS_HOST: tl.constexpr,
    IEEE: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // HKV
    h = bh % HKV
    seq_len = tl.load(SEQ + b).to(tl.int64)
    rpi = tl.load(RPI + b).to(tl.int64)
    if HAS_START:
        start = tl.load(START + bh)
    else:
        start = 0
    end = tl.load(END + bh)
    per_split = (tl.maximum(end - start, 0) + NUM_SPLITS - 1) // NUM_SPLITS
    lo = start + split * per_split
    hi = tl.minimum(lo + per_split, end)

    gi = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(
        Q + b * stride_qb + (h * G + gi)[:, None] * stride_qh + d[None, :],
        mask=(gi < G)[:, None] & dmask[None, :],
        other=0.0,
    )
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    t = tl.arange(0, PAGES_PER_ITER * PAGE)
    t_page = t // PAGE
    t_off = t % PAGE
    row = PAGE_IDX + b * stride_pb + h * stride_ph
    for i in range(lo, hi, PAGES_PER_ITER):
        pi = i + t_page
        pvalid = pi < hi
        page = tl.load(row + pi, mask=pvalid, other=0).to(tl.int64)
        if HAS_TABLE:
            entry = tl.load(PAGE_TABLE + b * stride_tb + h * stride_th + page, mask=pvalid, other=0)
            entry = entry.to(tl.int64)
            if HAS_HOST:  # entries from host_base on: pages of the host tier
                on_host = entry >= host_base
                entry = tl.where(on_host, entry - host_base, entry)
            first = entry * PAGE
        else:
            first = tl.load(REQ_TO_TOKEN + rpi * stride_rt + page * PAGE, mask=pvalid, other=0)
        tvalid = pvalid & (page * PAGE + t_off < seq_len)
        slot = first.to(tl.int64) + t_off
        kv_mask = tvalid[:, None] & dmask[None, :]
        k_at = K + slot[:, None] * stride_kt + h * stride_kh + d[None, :]
        v_at = V + slot[:, None] * stride_vt + h * stride_vh + d[None, :]
        if HAS_HOST:  # each row from one of the two sources (the other load is masked off)
            host_mask = kv_mask & on_host[:, None]
            dev_mask = kv_mask & ~on_host[:, None]
            hk_at = HOST_K + slot[:, None] * stride_hkt + h * stride_hkh + d[None, :]
            k = tl.where(
                host_mask, tl.load(hk_at, mask=host_mask, other=0.0), tl.load(k_at, mask=dev_mask, other=0.0)
            )
        else:
            k = tl.load(k_at, mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(tvalid[None, :], s * qk_scale, float("-inf"))  # log2 domain
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a tile with nothing valid yet must not give -inf - -inf
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_HOST:
            hv_at = HOST_V + slot[:, None] * stride_hvt + h * stride_hvh + d[None, :]
            v = tl.where(
                host_mask, tl.load(hv_at, mask=host_mask, other=0.0), tl.load(v_at, mask=dev_mask, other=0.0)
            )
        else:
            v = tl.load(v_at, mask=kv_mask, other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    hq = h * G + gi
    gmask = gi < G
    tl.store(
        PART_O + b * stride_ob + hq[:, None] * stride_oh + split * stride_os + d[None, :],
        o,
        mask=gmask[:, None] & dmask[None, :],
    )
    tl.store(PART_LSE + b * stride_lb + hq * stride_lh + split, lse, mask=gmask)


@triton.jit
def _merge_splits_kernel(
    PART_O,
    PART_LSE,
    PREV_O,
    PREV_LSE,
    OUT,
    OUT_LSE,
    n_splits,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_outb,
    stride_outh,
    HQ: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    smask = s < n_splits
    lse = tl.load(PART_LSE + b * stride_lb + hq * stride_lh + s, mask=smask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    if HAS_PREV:
        prev_lse = tl.load(PREV_LSE + b * HQ + hq)
        m = tl.maximum(m, prev_lse)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    o = tl.load(
        PART_O + b * stride_ob + hq * stride_oh + s[:, None] * stride_os + d[None, :],
        mask=smask[:, None] & (d < D)[None, :],
        other=0.0,
    )
    num = tl.sum(w[:, None] * o, axis=0)
    den = tl.sum(w, axis=0)
    if HAS_PREV:
        wp = tl.exp(prev_lse - m_safe)
        num += wp * tl.load(PREV_O + (b * HQ + hq) * D + d, mask=d < D, other=0.0)
        den += wp
    has = den > 0.0
    out = num / tl.where(has, den, 1.0)
    tl.store(OUT + b * stride_outb + hq * stride_outh + d, out.to(OUT.dtype.element_ty), mask=d < D)
    tl.store(
        OUT_LSE + b * HQ + hq,
        tl.where(has, m_safe + tl.log(tl.where(has, den, 1.0)), float("-inf")),
    )


def default_num_splits(bs: int, hkv: int, max_items: int, device: torch.device) -> int:
    """Static split count: enough programs to fill the GPU, never more splits than pages."""
    if device.type != "cuda" or interpret_mode():
        return max(1, min(4, max_items))
    sms = sm_count(device)
    want = triton.cdiv(4 * sms, max(1, bs * hkv))
    return int(max(1, min(64, want, triton.cdiv(max_items, 2))))


def _pages_per_iter(page_size: int, pages_per_split: int) -> int:
    """Pages one loop iteration loads: 64 tokens, or 128 when a split has >= 512 tokens of work.

    64 tokens keep several loads in flight; long splits (dense rows: 16 x 4k with 5 splits is ~26
    pages of 32 per split) run faster with 128 (107 -> 100 us per layer on the H100,
    tune-attend-20261123T145632Z.json), while short splits (a capped selection spread over many
    splits, 2-10 pages each) keep 64 and their measured speed.
    """
    tokens = 128 if pages_per_split * page_size >= 512 else 64
    return max(1, tokens // page_size)


class _Workspace:
    """Partial-output buffers kept per shape (plan once, run many).

    Never freed: a CUDA graph captured with one of them keeps pointing at it, so dropping a buffer
    when another batch size comes along would leave the graph reading freed memory. Shapes are few
    (one per captured batch size) and small (bs * Hq * splits * D floats).
    """

    def __init__(self) -> None:
        self._bufs: dict = {}

    def get(self, bs: int, hq: int, splits: int, d: int, device) -> tuple:
        key = (bs, hq, splits, d, str(device))
        if key not in self._bufs:
            self._bufs[key] = (
                torch.empty(bs, hq, splits, d, dtype=torch.float32, device=device),
                torch.empty(bs, hq, splits, dtype=torch.float32, device=device),
            )
        return self._bufs[key]


_WORKSPACE = _Workspace()


def _attend(
    q,
    k_cache,
    v_cache,
    req_to_token,
    rpi,
    seq_lens,
    pages,
    start,
    end,
    page_size,
    sm_scale,
    num_splits,
    part_o,
    part_lse,
    page_table=None,
    tuning=None,
    max_items=None,
    host=None,
):
    # tuning: {"pages_per_iter", "num_warps", "num_stages"} overrides (scripts/tune_attend.py)
    items = pages.shape[-1] if max_items is None else max_items  # most pages one row attends
    tune = {
        "pages_per_iter": _pages_per_iter(page_size, -(-items // num_splits)),
        "num_warps": 4,
        "num_stages": 2,
    }
    tune.update(tuning or {})
    bs, hq, d = q.shape
    hkv = k_cache.shape[1]
    g = hq // hkv
    host_k, host_v, host_base = host if host is not None else (k_cache, v_cache, 0)
    _attend_pages_kernel[(bs * hkv, num_splits)](
        q,
        k_cache,
        v_cache,
        req_to_token,
        rpi,
        seq_lens,
        pages,
        start if start is not None else end,
        end,
        part_o,
        part_lse,
        page_table if page_table is not None else end,
        page_table.stride(0) if page_table is not None else 0,
        page_table.stride(1) if page_table is not None and page_table.dim() == 3 else 0,
        host_k,
        host_v,
        host_base,
        host_k.stride(0),
        host_k.stride(1),
        host_v.stride(0),
        host_v.stride(1),
        sm_scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        req_to_token.stride(0),
        pages.stride(0),
        pages.stride(1),
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        HKV=hkv,
        G=g,
        G_PAD=max(16, next_pow2(g)),
        D=d,
        BLOCK_D=next_pow2(d),
        PAGE=page_size,
        PAGES_PER_ITER=tune["pages_per_iter"],
        NUM_SPLITS=num_splits,
        HAS_START=start is not None,
        HAS_TABLE=page_table is not None,
        HAS_HOST=host is not None,
        IEEE=f32_dot(q.dtype),
        num_warps=tune["num_warps"],
        num_stages=tune["num_stages"],
    )


def _merge(part_o, part_lse, num_splits, out, out_lse, prev_o=None, prev_lse=None):
    bs, hq, _, d = part_o.shape
    _merge_splits_kernel[(bs, hq)](
        part_o,
        part_lse,
        prev_o if prev_o is not None else out,
        prev_lse if prev_lse is not None else out_lse,
        out,
        out_lse,
        num_splits,
        part_o.stride(0),
        part_o.stride(1),
        part_o.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        out.stride(0),
        out.stride(1),
        HQ=hq,
        D=d,
        BLOCK_D=next_pow2(d),
        BLOCK_S=next_pow2(max(num_splits, 2)),
        HAS_PREV=prev_o is not None,
        num_warps=4,
    )


def _check_common(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, page_size):
    dims = check_kv(q, k_cache, v_cache)
    check_page_size(page_size)
    if q.dtype != k_cache.dtype:
        raise TypeError(f"q dtype {q.dtype} must match the KV cache dtype {k_cache.dtype}")
    for name, t in (
        ("req_to_token", req_to_token),
        ("req_pool_indices", req_pool_indices),
        ("seq_lens", seq_lens),
    ):
        check_int(name, t)
    if q.stride(2) != 1 or k_cache.stride(2) != 1 or v_cache.stride(2) != 1:
        raise ValueError("q, k_cache and v_cache must be contiguous in head_dim")
    return dims


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    sm_scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    page_table: torch.Tensor | None = None,
    tuning: dict | None = None,
    host_k: torch.Tensor | None = None,
    host_v: torch.Tensor | None = None,
    host_base: int = 0,
    merge_with: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of each (request, kv head) over its selected pages (Triton split-K).

    page_table [bs, N] or [bs, Hkv, N] int32 (optional): page locations in k_cache / v_cache; see the
    module docstring. host_k / host_v [host_rows, Hkv, D] (with a page_table): entries >= host_base
    are pages of these (on a GPU: pinned host memory, read over UVA). merge_with (o, lse): merge a
    previous attention state (other keys) into the result.
    tuning: launch overrides for the attend kernel (pages_per_iter, num_warps, num_stages); for tuning runs.
    """
    bs, hq, hkv, d, g = _check_common(
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, page_size
    )
    if page_idx.dim() != 3 or page_idx.shape[:2] != (bs, hkv) or page_idx.stride(2) != 1:
        raise ValueError(f"page_idx must be [{bs}, {hkv}, W] contiguous, got {list(page_idx.shape)}")
    if counts.shape != (bs, hkv) or counts.dtype != torch.int32 or not counts.is_contiguous():
        raise ValueError(f"counts must be contiguous [{bs}, {hkv}] int32")
    if page_table is not None and (
        page_table.dim() not in (2, 3) or page_table.shape[0] != bs or page_table.dtype != torch.int32
        or page_table.stride(-1) != 1 or (page_table.dim() == 3 and page_table.shape[1] != hkv)
    ):  # fmt: skip
        raise ValueError(f"page_table must be [{bs}, N] or [{bs}, {hkv}, N] int32, contiguous in N")
    host = _check_host(host_k, host_v, host_base, page_table, k_cache)
    prev = _check_merge(merge_with, bs, hq, d)
    if num_splits is None:
        num_splits = default_num_splits(bs, hkv, page_idx.shape[2], q.device)
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(bs, hq, dtype=torch.float32, device=q.device)
    if bs == 0:
        return out, lse
    part_o, part_lse = _WORKSPACE.get(bs, hq, num_splits, d, q.device)
    _attend(
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        page_idx,
        None,
        counts,
        page_size,
        sm_scale,
        num_splits,
        part_o,
        part_lse,
        page_table,
        tuning,
        host=host,
    )
    _merge(part_o, part_lse, num_splits, out, lse, *prev)
    return out, lse


def _check_merge(merge_with, bs, hq, d) -> tuple:
    """sparse_decode's merge_with -> (prev_o, prev_lse) or ()."""
    if merge_with is None:
        return ()
    o, lse = merge_with
    if o.shape != (bs, hq, d) or not o.is_contiguous() or lse.shape != (bs, hq) or lse.dtype != torch.float32:
        raise ValueError(f"merge_with must be (o [{bs}, {hq}, {d}] contiguous, lse [{bs}, {hq}] float32)")
    return o, lse.contiguous()


def _check_host(host_k, host_v, host_base, page_table, k_cache) -> tuple | None:
    """sparse_decode's host tier arguments -> (host_k, host_v, host_base) or None."""
    if host_k is None and host_v is None:
        return None
    if host_k is None or host_v is None or page_table is None:
        raise ValueError("host_k and host_v come together, with a page_table that points into them")
    hkv, d = k_cache.shape[1:]
    for name, t in (("host_k", host_k), ("host_v", host_v)):
        if t.dim() != 3 or t.shape[1:] != (hkv, d) or t.dtype != k_cache.dtype or t.stride(2) != 1:
            raise ValueError(f"{name} must be [rows, {hkv}, {d}] {k_cache.dtype}, contiguous in head_dim")
    if not 0 <= host_base < 2**31:
        raise ValueError(f"host_base must be in [0, 2**31), got {host_base}")
    return host_k, host_v, int(host_base)


_NEVER_CERTIFIED = 1e4  # a log-mass no attention state reaches (finite: no inf - inf in logcumsumexp)


def certified_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    bounds: torch.Tensor,
    page_size: int,
    sm_scale: float,
    tau: float,
    sink_pages: int = 1,
    local_pages: int = 4,
    first_round_pages: int = 16,
    rest_logits: torch.Tensor | None = None,
    dense_below: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Progressive attention with a certified mass threshold (see the module docstring).

    rest_logits: per-page logits [bs, Hkv, N] used to bound (default: bounds, certified) or estimate
    (centers: progressive mode) the mass of the pages not visited yet.
    dense_below: requests with seq_len < dense_below visit every page, in page order (their bounds
    are not read, so page_bounds may skip them).

    Returns (out, lse, visited [bs, Hkv] int32 pages attended, order [bs, Hkv, N] int64 visiting order).
    Sinks and the local window are visited first. The number of rounds is static (log2 of N).
    """
    bs, hq, hkv, d, g = _check_common(
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, page_size
    )
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if first_round_pages < 1:
        raise ValueError(f"first_round_pages must be >= 1, got {first_round_pages}")
    if bounds.dim() != 3 or bounds.shape[:2] != (bs, hkv) or bounds.dtype != torch.float32:
        raise ValueError(f"bounds must be [{bs}, {hkv}, N] float32, got {list(bounds.shape)}")
    dev = q.device
    n = bounds.shape[2]
    npages, valid, forced, ntok = page_layout(seq_lens, n, page_size, sink_pages, local_pages)
    short = (seq_lens < dense_below)[:, None]  # [bs, 1]
    forced = forced | (short & valid)
    prio = bounds.masked_fill(forced[:, None], float("inf")).masked_fill(~valid[:, None], float("-inf"))
    order = torch.sort(prio, dim=-1, descending=True, stable=True).indices  # [bs, Hkv, N]
    if rest_logits is not None and rest_logits.shape != bounds.shape:
        raise ValueError(f"rest_logits must have the shape of bounds {list(bounds.shape)}")
    rest = bounds if rest_logits is None else rest_logits
    # a short request's unvisited pages count as unbounded mass, so it never stops before the end
    rest = rest.masked_fill((short & valid)[:, None], _NEVER_CERTIFIED)
    log_w = rest + torch.log(ntok.float())[:, None]  # -inf for empty pages
    log_w = torch.gather(log_w.masked_fill(~valid[:, None], float("-inf")), 2, order)
    # log_rest[..., i]: log of the bound on the mass of pages order[i:], -inf once none is left
    log_rest = torch.logcumsumexp(log_w.flip(-1), dim=-1).flip(-1)
    log_rest = torch.cat([log_rest, log_rest.new_full((bs, hkv, 1), float("-inf"))], dim=-1)
    log_slack = math.log1p(-tau) if tau < 1.0 else float("-inf")
    log_tau = math.log(tau)

    order32 = order.to(torch.int32)
    state_o = torch.zeros(bs, hq, d, dtype=torch.float32, device=dev)
    state_lse = torch.full((bs, hq), float("-inf"), dtype=torch.float32, device=dev)
    visited = torch.zeros(bs, hkv, dtype=torch.int32, device=dev)
    done = torch.zeros(bs, hkv, dtype=torch.bool, device=dev)
    npages_h = npages.to(torch.int32)[:, None].expand(bs, hkv)
    round_start, round_end = 0, first_round_pages
    while round_start < max(n, 1):
        size = round_end - round_start
        splits = default_num_splits(bs, hkv, size, dev)
        part_o, part_lse = _WORKSPACE.get(bs, hq, splits, d, dev)
        start = torch.clamp(npages_h, max=round_start).contiguous()
        end = torch.where(done, start, torch.clamp(npages_h, max=round_end)).contiguous()
        _attend(
            q,
            k_cache,
            v_cache,
            req_to_token,
            req_pool_indices,
            seq_lens,
            order32,
            start,
            end,
            page_size,
            sm_scale,
            splits,
            part_o,
            part_lse,
            max_items=size,
        )
        _merge(part_o, part_lse, splits, state_o, state_lse, state_o, state_lse)
        visited = torch.where(done, visited, end)
        rest = torch.gather(log_rest, 2, visited.to(torch.int64)[..., None])  # [bs, Hkv, 1]
        lse_g = state_lse.view(bs, hkv, g)
        ok = (lse_g + log_slack >= log_tau + rest).all(dim=-1) | (visited >= npages_h)
        done = done | ok
        round_start, round_end = round_end, round_end * 2
    return state_o.to(q.dtype), state_lse, visited, order
