"""Stage 3 of a PSA step: choose each (request, kv head)'s pages from their bounds.

Threshold mode (PSA): sink pages and the local window are always kept; the other pages are taken in
descending bound until the *estimated* attention mass reaches tau, where a page's estimated mass is
n_tokens * exp(e) with e the page's mass logit: the center of its Quest interval when page_bounds
gives centers (recommended: calibrated), else the upper bound itself (conservative ranking, but it
overstates every page by its own slack and under-selects). The count is then clamped to
[min_pages, max_pages]. Top-k mode (Quest-style,
for comparison): exactly `topk` pages, sinks and local window included.

No sort: the per-row threshold is found by bisection over the order-preserving integer image of the
fp32 bounds, the way top-p samplers search a threshold, over the candidates' own key range, stopping
as soon as the threshold separates the answer (typically ~10 steps, at most 33). The budget cap is
tested first: when even the cap's best pages miss the target, they are the answer and the mass
bisection is skipped; a request that takes every page (below dense_below, or a budget covering it)
needs no bisection at all. Everything stays on device with fixed shapes, so the step is CUDA-graph
capturable.

dense_below: requests with seq_len < dense_below select every page (when they fit the width W).

Shapes and dtypes:
    bounds    [bs, Hkv, N] float32 (page_bounds output; -inf past the last page)
    seq_lens  [bs] int32 / int64
    mass_logits  optional [bs, Hkv, N] float32 (page_bounds centers), same layout as bounds
    keep_rows optional [bs] bool / int8 / int32: rows that reuse the selection already held in the
              page_idx / counts buffers (--psa-reuse-steps); nothing of theirs is read or written
    -> page_idx [bs, Hkv, W] int32  selected logical page indices, ascending in [:count], -1 after
       counts   [bs, Hkv]    int32
    W = params.topk in top-k mode, else params.max_pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import check_int, check_keep_rows, next_pow2, page_layout, selection_mask


@dataclass(frozen=True)
class SelectParams:
    """Selection knobs. tau=1.0 with max_pages >= the context's pages selects every page (dense)."""

    tau: float = 0.9
    sink_pages: int = 1
    local_pages: int = 4
    min_pages: int = 0
    max_pages: int = 256
    topk: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        for name in ("sink_pages", "local_pages", "min_pages"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.topk is not None and self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.max_pages < 1:
            raise ValueError(f"max_pages must be >= 1, got {self.max_pages}")
        if self.sink_pages + self.local_pages > self.width:
            raise ValueError(
                f"sink_pages + local_pages ({self.sink_pages} + {self.local_pages}) must not "
                f"exceed the page budget {self.width}"
            )
        if self.min_pages > self.max_pages:
            raise ValueError(f"min_pages {self.min_pages} > max_pages {self.max_pages}")

    @property
    def width(self) -> int:
        """Static width W of the page_idx output."""
        return self.topk if self.topk is not None else self.max_pages


def select_pages_ref(
    bounds: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    params: SelectParams,
    mass_logits: torch.Tensor | None = None,
    dense_below: int = 0,
    page_idx: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    keep_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch reference of select_pages: a stable descending sort and a cumulative sum.

    Rows flagged in keep_rows are left untouched in page_idx / counts (when given; else -1 / 0).
    """
    bs, hkv, n = bounds.shape
    keep = check_keep_rows(keep_rows, bs)
    _, valid, forced, ntok = page_layout(seq_lens, n, page_size, params.sink_pages, params.local_pages)
    width = params.width
    out_idx, out_counts = page_idx, counts
    page_idx = torch.full((bs, hkv, width), -1, dtype=torch.int32, device=bounds.device)
    counts = torch.zeros((bs, hkv), dtype=torch.int32, device=bounds.device)
    for b in range(bs):
        if keep is not None and bool(keep[b]):
            continue
        for h in range(hkv):
            u = bounds[b, h].double()
            f, c = forced[b], valid[b] & ~forced[b]
            cand = torch.nonzero(c).flatten()
            # stable sort: ties keep ascending page order, as the kernel's tie-break does
            order = cand[torch.sort(-u[cand], stable=True).indices]
            nf, nc = int(f.sum()), int(c.sum())
            if int(seq_lens[b]) < dense_below and nf + nc <= width:
                k = nc  # short request: dense
            elif params.topk is not None:
                k = min(max(params.topk - nf, 0), nc)
            else:
                e = (mass_logits if mass_logits is not None else bounds)[b, h].double()
                m = e[valid[b]].max() if bool(valid[b].any()) else torch.tensor(0.0)
                w = ntok[b].double() * torch.exp(e - m)
                w = torch.where(valid[b], w, torch.zeros_like(w))
                wf, wc = float(w[f].sum()), float(w[c].sum())
                target = params.tau * (wf + wc) - wf
                if params.tau >= 1.0:
                    k_tau = nc  # dense: every page, whatever the (possibly underflowing) mass
                elif nc == 0 or target <= 0:
                    k_tau = 0
                else:
                    cum = torch.cumsum(w[order], 0)
                    i = int(torch.searchsorted(cum, torch.tensor(target, dtype=cum.dtype)))
                    i = min(i, nc - 1)
                    k_tau = int((u[cand] >= u[order[i]]).sum())  # ties at the threshold all count
                k = min(max(k_tau, params.min_pages - nf), params.max_pages - nf, nc)
                k = max(k, 0)
            sel = f.clone()
            sel[order[:k]] = True
            idx = torch.nonzero(sel).flatten()
            counts[b, h] = idx.numel()
            page_idx[b, h, : idx.numel()] = idx.to(torch.int32)
    if out_idx is None and out_counts is None:
        return page_idx, counts
    if out_idx is None:
        out_idx = torch.full_like(page_idx, -1)
    if out_counts is None:
        out_counts = torch.zeros_like(counts)
    if out_idx.shape != (bs, hkv, width) or out_counts.shape != (bs, hkv):
        raise ValueError(f"page_idx must be [{bs}, {hkv}, {width}] and counts [{bs}, {hkv}]")
    live = slice(None) if keep is None else ~keep.to(device=bounds.device, dtype=torch.bool)
    out_idx[live] = page_idx[live]
    out_counts[live] = counts[live]
    return out_idx, out_counts


def select_streaming(
    seq_lens: torch.Tensor,
    num_kv_heads: int,
    width: int,
    page_size: int,
    sink_pages: int,
    local_pages: int,
    dense_below: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selection of a streaming layer (--psa-streaming-layers): every kv head reads its request's
    sink pages and local window only (all pages when they are fewer, or below dense_below, as
    select_pages), no bounds needed. A handful of fixed-shape torch ops: CUDA-graph capturable.

    seq_lens [bs] int -> page_idx [bs, Hkv, width] int32 ascending, -1 after; counts [bs, Hkv] int32.
    Equal to select_pages in top-k mode with topk = sink_pages + local_pages (padded to width).
    """
    check_int("seq_lens", seq_lens)
    if sink_pages + local_pages > width:
        raise ValueError(f"sink_pages + local_pages ({sink_pages} + {local_pages}) exceed the width {width}")
    seq = seq_lens.to(torch.int64)
    npages = (seq + page_size - 1) // page_size  # [bs]
    w = torch.arange(width, device=seq.device)
    n_sink = npages.clamp(max=sink_pages)
    n_local = (npages - n_sink).clamp(max=local_pages)
    idx = torch.where(w < n_sink[:, None], w, (npages - n_local - n_sink)[:, None] + w)  # [bs, W]
    count = n_sink + n_local
    short = (seq < dense_below) & (npages <= width)  # below dense_below: every page
    idx = torch.where(short[:, None], w, idx)
    count = torch.where(short, npages, count)
    idx = torch.where(w < count[:, None], idx, -1).to(torch.int32)
    bs = seq.shape[0]
    return (idx[:, None].expand(bs, num_kv_heads, width).contiguous(),
            count.to(torch.int32)[:, None].expand(bs, num_kv_heads).contiguous())  # fmt: skip


def select_margin(
    order: torch.Tensor,
    seq_lens: torch.Tensor,
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    margin: int,
    dense_below: int = 0,
    keep_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The `margin` best pages each (request, kv head) ranked but did not select: the candidates of its
    next step's selection (--psa-prefetch next-step). A page enters a selection by climbing past the
    cut, so the pages just below it are where the next step's new pages mostly come from; the tiered
    pool copies them ahead on its side stream. Torch ops with static shapes: CUDA-graph capturable.

    order [bs, Hkv, N] float32: the ranking select_pages used (bounds or mass estimates); entries past
    a request's last page, of rows below dense_below and of keep_rows may be unwritten (never read)
    seq_lens [bs] int; page_idx [bs, Hkv, W] int32 / counts [bs, Hkv] int32: the selection
    keep_rows optional [bs] flags: rows that reused an older selection (no fresh ranking) get none
    -> margin_idx [bs, Hkv, M] int32 best first, -1 after; margin_counts [bs, Hkv] int32; M = min(margin, N)
    """
    check_int("seq_lens", seq_lens)
    if order.dim() != 3 or order.dtype != torch.float32:
        raise ValueError(f"order must be [bs, Hkv, N] float32, got {list(order.shape)} {order.dtype}")
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    bs, hkv, n = order.shape
    _, valid, _, _ = page_layout(seq_lens.to(order.device), n, page_size)
    rows = seq_lens.to(order.device) >= dense_below  # below it every page is selected: nothing to rank
    if keep_rows is not None:
        check_keep_rows(keep_rows, bs)
        rows = rows & (keep_rows == 0)
    live = (valid & rows[:, None])[:, None, :] & ~selection_mask(page_idx, counts, n)
    score = torch.where(live, order, float("-inf"))
    best, idx = score.topk(min(margin, n), dim=-1)  # descending
    ok = best > float("-inf")
    return torch.where(ok, idx, -1).to(torch.int32), ok.sum(-1, dtype=torch.int32)


@triton.jit
def _sortable_key(u):
    """Order-preserving map fp32 -> int32 (negative floats get their magnitude bits flipped).

    -0.0 maps to the key of +0.0: they compare equal as floats, so they must tie here too.
    """
    bits = u.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(u == 0.0, 0, key)


@triton.jit
def _add_pairs(a0, b0, a1, b1):
    return a0 + a1, b0 + b1


@triton.jit
def _smallest_key_from(key, cand, t):
    """The smallest candidate key >= t (t int64)."""
    return tl.min(tl.where(cand & (key >= t.to(tl.int32)), key, 2147483647), axis=0).to(tl.int64)


@triton.jit
def _kth_key(key, cand, k, lo, hi):
    """The k-th largest candidate key, given count(lo) >= k > count(hi) (int64 lo, hi).

    Bisection over [lo, hi) only: starting from the candidates' own key range (not the whole int32
    line) saves the steps that would only narrow empty space, and it stops as soon as a threshold
    admits exactly k candidates (their smallest key is the answer): about log2(range / gap at the
    k-th key) steps instead of the ~30 that pin the key itself. mid always lies in the int32 range of
    the keys, so the per-element compare stays 32-bit.
    """
    cnt_lo = k * 0 - 1  # count(lo), not known yet
    while (hi - lo > 1) & (cnt_lo != k):
        mid = (lo + hi) >> 1
        cnt = tl.sum((cand & (key >= mid.to(tl.int32))).to(tl.int32), axis=0)
        ok = cnt >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
        cnt_lo = tl.where(ok, cnt, cnt_lo)
    return _smallest_key_from(key, cand, lo)


@triton.jit
def _mass_key(key, cand, w, target, lo, hi, cnt_lo, cnt_hi):
    """Largest t with mass(cand & key >= t) >= target, given mass(lo) >= target > mass(hi) and the
    candidate counts at lo and hi.

    The answer is a candidate key. Once a single candidate lies in [lo, hi) it is that one, so the
    bisection stops there (mass and count come from one reduction per step).
    """
    while (hi - lo > 1) & (cnt_lo - cnt_hi > 1):
        mid = (lo + hi) >> 1
        above = cand & (key >= mid.to(tl.int32))
        mass, cnt = tl.reduce((tl.where(above, w, 0.0), above.to(tl.int32)), 0, _add_pairs)
        ok = mass >= target
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
        cnt_lo = tl.where(ok, cnt, cnt_lo)
        cnt_hi = tl.where(ok, cnt_hi, cnt)
    return _smallest_key_from(key, cand, lo)


@triton.jit
def _top_k_mask(key, cand, k, thr):
    """The k largest candidates when thr is the k-th largest key; ties broken by page index."""
    above = cand & (key > thr)
    tied = cand & (key == thr)
    n_above = tl.sum(above.to(tl.int32), axis=0)
    n_tied = tl.sum(tied.to(tl.int32), axis=0)
    # Ties only need ranking when they spill past k (a scan over every lane); usually none do.
    mask = above | tied
    if n_above + n_tied > k:
        tie_rank = tl.cumsum(tied.to(tl.int32), axis=0)
        mask = above | (tied & (tie_rank <= k - n_above))
    return mask & (k > 0)


@triton.jit
def _select_pages_kernel(
    BOUNDS,
    MASS_LOGITS,
    SEQ,
    KEEP_ROWS,
    OUT,
    COUNTS,
    n_pages_max,
    stride_bb,
    stride_bh,
    stride_ob,
    stride_oh,
    hkv,
    tau,
    dense_below,
    PAGE: tl.constexpr,
    SINK: tl.constexpr,
    LOCAL: tl.constexpr,
    MIN_PAGES: tl.constexpr,
    MAX_PAGES: tl.constexpr,
    TOPK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SEQ + b).to(tl.int64)
    npages = tl.minimum((seq_len + PAGE - 1) // PAGE, n_pages_max)
    # a request below dense_below takes every page (it fits: the config checks dense_below's pages)
    short = (seq_len < dense_below) & (npages <= MAX_PAGES)
    row = OUT + b * stride_ob + h * stride_oh
    wpos = tl.arange(0, BLOCK_W)
    if KEEP_ROWS is not None:  # None specializes away: the plain launch compiles as before
        # a row that reuses its earlier selection (--psa-reuse-steps) keeps what OUT / COUNTS hold
        live = tl.load(KEEP_ROWS + b) == 0
    else:
        live = True
    if live:
        if short:
            # pages 0..npages-1 in order: no bounds to read, nothing to rank
            tl.store(row + wpos, tl.where(wpos < npages, wpos, -1), mask=wpos < MAX_PAGES)
            tl.store(COUNTS + b * hkv + h, npages.to(tl.int32))
        else:
            _select_row(
                BOUNDS, MASS_LOGITS, COUNTS, row, b, h, seq_len, npages, stride_bb, stride_bh, hkv, tau,
                PAGE, SINK, LOCAL, MIN_PAGES, MAX_PAGES, TOPK, BLOCK_N, BLOCK_W,
            )  # fmt: skip


@triton.jit
def _select_row(
    BOUNDS, MASS_LOGITS, COUNTS, row, b, h, seq_len, npages, stride_bb, stride_bh, hkv, tau,
    PAGE: tl.constexpr, SINK: tl.constexpr, LOCAL: tl.constexpr, MIN_PAGES: tl.constexpr,
    MAX_PAGES: tl.constexpr, TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Threshold or top-k selection of one (request, kv head) row; writes its page list and count."""
    j = tl.arange(0, BLOCK_N)
    valid = j < npages
    forced = valid & ((j < SINK) | (j >= npages - LOCAL))
    cand = valid & ~forced
    n_forced = tl.sum(forced.to(tl.int32), axis=0)
    n_cand = tl.sum(cand.to(tl.int32), axis=0)
    row_in = b * stride_bb + h * stride_bh
    u = tl.load(BOUNDS + row_in + j, mask=cand, other=float("-inf"))
    key = _sortable_key(u)
    lo0 = tl.min(tl.where(cand, key, 2147483647), axis=0).to(tl.int64)  # count(lo0) = n_cand
    hi0 = tl.max(tl.where(cand, key, -2147483647 - 1), axis=0).to(tl.int64) + 1  # count(hi0) = 0

    # k_cap: the most candidates the budget allows (top-k: exactly that many); the final selection is
    # the top k candidates by (bound desc, page asc), thr the k-th largest key.
    if TOPK > 0:
        k_cap = tl.minimum(tl.maximum(TOPK - n_forced, 0), n_cand)
    else:
        k_cap = tl.minimum(tl.maximum(MAX_PAGES - n_forced, 0), n_cand)
    thr_cap = lo0
    if (k_cap > 0) & (k_cap < n_cand):
        thr_cap = _kth_key(key, cand, k_cap, lo0, hi0)
    k = k_cap
    thr = thr_cap

    if TOPK == 0:
        if (tau < 1.0) & (n_cand > 0):
            e = tl.load(MASS_LOGITS + row_in + j, mask=valid, other=float("-inf"))
            m = tl.max(e, axis=0)
            ntok = tl.minimum(tl.maximum(seq_len - j * PAGE, 0), PAGE).to(tl.float32)
            w = tl.where(valid, ntok * tl.exp(e - m), 0.0)
            w_forced = tl.sum(tl.where(forced, w, 0.0), axis=0)
            w_cand = tl.sum(tl.where(cand, w, 0.0), axis=0)
            target = tau * (w_forced + w_cand) - w_forced
            # The cap binds when even the k_cap best pages miss the target: then they are the answer
            # and one bisection was enough. Otherwise find the tau threshold itself.
            mass_cap = tl.sum(tl.where(_top_k_mask(key, cand, k_cap, thr_cap), w, 0.0), axis=0)
            if mass_cap >= target:
                thr_tau = hi0  # target <= 0: no candidate needed
                if target > 0.0:
                    thr_tau = _mass_key(key, cand, w, target, lo0, hi0, n_cand, n_cand * 0)
                k_tau = tl.sum((cand & (key >= thr_tau)).to(tl.int32), axis=0)  # ties all count
                k = tl.minimum(tl.maximum(k_tau, MIN_PAGES - n_forced), k_cap)
                k = tl.maximum(k, 0)
                thr = thr_tau
                if k == k_cap:  # ties past the cap: the cap's own threshold and tie-break
                    thr = thr_cap
                elif k != k_tau:  # min_pages raised it
                    thr = _kth_key(key, cand, k, lo0, hi0)

    sel = forced | _top_k_mask(key, cand, k, thr)
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(row + pos, j.to(tl.int32), mask=sel)
    count = tl.sum(sel.to(tl.int32), axis=0)
    wpos = tl.arange(0, BLOCK_W)
    tl.store(row + wpos, tl.full([BLOCK_W], -1, tl.int32), mask=(wpos >= count) & (wpos < MAX_PAGES))
    tl.store(COUNTS + b * hkv + h, count)


def default_select_warps(block_n: int) -> int:
    """Warps for one row of block_n lanes: few rows run at once (bs x Hkv programs), so each is latency
    bound; more warps keep every lane's key, weight and masks in registers across the bisection."""
    return 4 if block_n <= 2048 else 8


def select_pages(
    bounds: torch.Tensor,
    seq_lens: torch.Tensor,
    page_size: int,
    params: SelectParams,
    page_idx: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    mass_logits: torch.Tensor | None = None,
    dense_below: int = 0,
    num_warps: int | None = None,
    keep_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select pages per (request, kv head) on device (Triton). See the module docstring.

    num_warps: launch override (scripts/profile_decode_stages.py --select-warps); default by the row width N.
    keep_rows: optional [bs] flags (bool / int8 / int32, on bounds' device); a flagged row is skipped
    entirely (bounds not read, nothing written), so pass the page_idx / counts buffers that hold its
    earlier selection.
    """
    if bounds.dim() != 3 or bounds.dtype != torch.float32:
        raise ValueError(f"bounds must be [bs, Hkv, N] float32, got {list(bounds.shape)} {bounds.dtype}")
    check_int("seq_lens", seq_lens)
    bs, hkv, n = bounds.shape
    if seq_lens.shape != (bs,):
        raise ValueError(f"seq_lens must have shape [{bs}], got {list(seq_lens.shape)}")
    if bounds.stride(2) != 1:
        raise ValueError("bounds must be contiguous in its last dimension")
    if mass_logits is None:
        mass_logits = bounds
    elif mass_logits.shape != bounds.shape or mass_logits.stride() != bounds.stride():
        raise ValueError(f"mass_logits must match bounds {list(bounds.shape)} in shape and layout")
    width = params.width
    if page_idx is None:
        page_idx = torch.empty((bs, hkv, width), dtype=torch.int32, device=bounds.device)
    if counts is None:
        counts = torch.empty((bs, hkv), dtype=torch.int32, device=bounds.device)
    if page_idx.shape != (bs, hkv, width) or counts.shape != (bs, hkv):
        raise ValueError(f"page_idx must be [{bs}, {hkv}, {width}] and counts [{bs}, {hkv}]")
    check_keep_rows(keep_rows, bs)
    if bs == 0:
        return page_idx, counts
    block_n = next_pow2(max(n, 16))
    _select_pages_kernel[(bs, hkv)](
        bounds,
        mass_logits,
        seq_lens,
        keep_rows,
        page_idx,
        counts,
        n,
        bounds.stride(0),
        bounds.stride(1),
        page_idx.stride(0),
        page_idx.stride(1),
        hkv,
        float(params.tau),
        int(dense_below),
        PAGE=page_size,
        SINK=params.sink_pages,
        LOCAL=params.local_pages,
        MIN_PAGES=params.min_pages,
        MAX_PAGES=params.max_pages if params.topk is None else params.topk,
        TOPK=params.topk or 0,
        BLOCK_N=block_n,
        BLOCK_W=next_pow2(max(width, 16)),
        num_warps=num_warps or default_select_warps(block_n),
    )
    return page_idx, counts
