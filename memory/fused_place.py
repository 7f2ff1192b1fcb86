"""One layer's tiered placement in three Triton launches: union, CLOCK place, page table.

DevicePagePool's LRU `place` and device_tiered.py's torch path spend ~a hundred tiny torch kernels
per layer (docs/TIERED.md, cause 1: ~0.5 ms per layer on an H100, independent of the pool size).
This module does the same work in three single-purpose kernels, each beside its pure-torch
reference (same results, readable, host loops allowed):

1. `union_selected` (ref `union_selected_ref`): physical page of every selected logical page
   (req_to_token[rpi[b], page_idx * P] // P) and their sorted unique union [width] int32, -1
   padded; equal to device_pool.union_pages of the gathered selection. One program: mark a byte
   bitmap over physical pages, then one pass over the bitmap in blocks with a running count
   (compaction by cumsum), clearing the bitmap behind it (so it is all zero between calls).
   Cost: O(bs*Hkv*W + num_pages) in one CTA (num_pages / 4096 loop iterations); a sort of the
   bs*Hkv*W entries would be O(entries) instead, but tl.sort takes seconds under the CPU
   interpreter the tests run on.
2. `clock_place` (ref `clock_place_ref`): CLOCK (second-chance) placement of pages [M] into the
   pool, described below. Three launches: lookup/touch (a program per block of pages), the window
   scan (one program), install (a program per block; misses ranked across blocks by their counts).
3. `page_table` (ref `page_table_ref`): table [bs, N] int32, logical page j of request b -> loc of
   its physical page in the union (binary search of the sorted union), 0 where not in the union.
   Grid (bs, cdiv(N, 1024)).

CLOCK policy (`DevicePagePool(policy="clock")`), per call place(layer, pages [M], pin):
  - state: a reference bit per slot (`ref` [C + 1] int8) and a hand (`hand` [] int64, a slot index),
    besides the LRU pool's map, `last_use` (here: the stamp of the last call that used the slot,
    = `tick`, and `tick` += 1 per call) and `pinned`;
  - hits (page resident): ref = 1, last_use = stamp, pinned |= pin (pinned = pin with pin leases);
  - misses (in page order) take victims found by scanning slots hand, hand + 1, ... (mod C) over at
    most S = min(window * M, C) slots (window: a static multiple, default 4): a free slot is a
    victim; a pinned slot (with leases: pinned and used since the previous step's start, `pin_floor`)
    or one used in the current step (last_use >= step_start, this call's hits included) is skipped
    untouched; a referenced slot has its bit cleared and is skipped (second
    chance); any other slot is a victim. The scan stops at the victim of the last miss; the hand
    moves past the last slot examined. Victim r (in scan order) goes to miss r (in page order):
    its old key is evicted, the page installed with ref = 1, last_use = stamp, pinned = pin.
  - with per-layer quotas (DevicePagePool(quota="adaptive"); layer_used / layer_quota [L]): an
    evictable slot (neither free, protected nor referenced) is a victim only while its layer's
    allowance lasts: a layer over its quota gives up to its excess (used - quota), the calling layer
    up to the misses that take it past its own (used + misses - quota); free slots are always
    victims (a layer borrows room). Evictable slots past their layer's allowance are kept in scan
    order and serve, after the allowed victims, the misses those leave, so a quota never makes a page
    overflow that the plain scan would place. The scan stops at the last miss's allowed victim, or
    past `quota_span` x misses slots once the fallback ones suffice (a bound on its cost);
    layer_used follows every install and free, layer_demand [L] adds each decode placement's pages;
  - misses beyond the victims found in the window overflow (slot -1; with `scratch_base`, loc =
    scratch_base + overflow rank, the tiered path's scratch slots): exact, just not cached.
  - counters: pool.counters += (hits, misses, evictions, overflow), all on the device.
No global sort, fixed shapes, no host sync. The scan stops at the last miss's victim; the lookup and
install are parallel over blocks of the union (padding blocks store constants), so a call costs
O(slots examined) sequential work plus O(M / BLOCK) programs.

Shapes and dtypes (C = capacity, L layers, NP physical pages, M = width):
    req_to_token [R, T] int32/int64; req_pool_indices [bs] int; page_idx [bs, Hkv, W] int (valid in
    [:count]); counts [bs, Hkv] int  ->  union [M] int32 (ascending unique, -1 padded)
    pool state: slot_of [L * NP + 1] int32, slot_layer / slot_page / last_use [C + 1] int64,
    pinned [C + 1] bool, ref [C + 1] int8, tick / step_start / pin_floor / hand [] int64, counters [4] int64
    clock_place -> slots [M] int32, fetch [M] bool, hit [M] bool, loc [M] int32, copy [M] bool,
        copy_keys / copy_loc [M] int32 (the copy list: pages with copy set and their loc, in page
        order, valid below ncopy [1] int32), stamp [1] int64 (the call's; fill_stamp [C + 1 + scratch]
        int64 gets it at every copied loc, so later kernels tell rows filled by this call)
    page_table(union [M] int32, loc [M] int32) -> table [bs, N] int32, N = ceil(T / P)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sglang_psa.kernels._common import compact_selection

BLOCK = 1024  # elements per loop iteration of the single-program kernels (per program of the clock's)
QUOTA_BLOCK = 128  # slots per iteration of the quota scan (its per-layer ranks compare QB x QB pairs)


# ============================================================================ union
def selected_physical_pages(
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, page_idx: torch.Tensor, page_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch: phys [bs, N] int64, the physical page of each logical page (req_to_token[rpi, j * P] // P),
    and sel [bs, Hkv, W] int64, the physical page of each selection entry (page_idx clamped to [0, N))."""
    phys = req_to_token[req_pool_indices.long()][:, ::page_size].long() // page_size
    bs, hkv, _ = page_idx.shape
    n = phys.shape[1]
    phys = phys.to(page_idx.device)
    sel = torch.gather(phys[:, None, :].expand(bs, hkv, n), 2, page_idx.long().clamp(0, n - 1))
    return phys, sel


def union_selected_ref(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    num_pages: int,
    width: int,
) -> torch.Tensor:
    """Reference: [width] int32 sorted unique physical pages of the selection, -1 padded."""
    from .device_pool import union_pages

    _, sel = selected_physical_pages(req_to_token, req_pool_indices, page_idx, page_size)
    return union_pages(sel, counts, num_pages, width)


@triton.jit
def _entry_keys(
    e, E, r2t_ptr, r2t_s0, rpi_ptr, idx_ptr, idx_s0, idx_s1, idx_s2, cnt_ptr, cnt_s0, cnt_s1,
    HKV, W, N, P, NP,
):  # fmt: skip
    """Selection entry e = (b, h, w) -> (head page key h * NP + physical page, kept, b, h, logical
    page j): the physical page of req_to_token[rpi[b], page_idx[b, h, w] * P] // P, j clamped."""
    em = e < E
    b = e // (HKV * W)
    h = (e // W) % HKV
    w = e % W
    c = tl.load(cnt_ptr + b * cnt_s0 + h * cnt_s1, mask=em, other=0)
    keep = em & (w < c)
    j = tl.load(idx_ptr + b * idx_s0 + h * idx_s1 + w * idx_s2, mask=keep, other=0).to(tl.int64)
    j = tl.minimum(tl.maximum(j, 0), N - 1)
    r = tl.load(rpi_ptr + b, mask=keep, other=0).to(tl.int64)
    tok = tl.load(r2t_ptr + r * r2t_s0 + j * P, mask=keep, other=0).to(tl.int64)
    ph = tl.minimum(tl.maximum(tok // P, 0), NP - 1)
    return h * NP + ph, keep, b, h, j


@triton.jit
def _union_kernel(
    r2t_ptr, r2t_s0, rpi_ptr, idx_ptr, idx_s0, idx_s1, idx_s2, cnt_ptr, cnt_s0, cnt_s1,
    bitmap_ptr, out_ptr,
    E, HKV, W, N, P, NP, WIDTH,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.arange(0, BLOCK)
    # phase A: mark the physical page of every kept entry
    for e0 in range(0, E, BLOCK):
        key, keep, _b, h, _j = _entry_keys(e0 + offs, E, r2t_ptr, r2t_s0, rpi_ptr, idx_ptr, idx_s0, idx_s1,
                                           idx_s2, cnt_ptr, cnt_s0, cnt_s1, HKV, W, N, P, NP)  # fmt: skip
        tl.store(bitmap_ptr + key - h * NP, tl.full([BLOCK], 1, tl.int8), mask=keep)
    tl.debug_barrier()
    # phase B: compact the marked pages in ascending order, clear the bitmap
    total = tl.zeros([], dtype=tl.int32)
    for p0 in range(0, NP, BLOCK):
        pg = p0 + offs
        pm = pg < NP
        mark = tl.load(bitmap_ptr + pg, mask=pm, other=0) != 0
        pos = total + tl.cumsum(mark.to(tl.int32), axis=0) - 1
        tl.store(out_ptr + pos, pg.to(tl.int32), mask=mark & (pos < WIDTH))
        tl.store(bitmap_ptr + pg, tl.zeros([BLOCK], tl.int8), mask=mark)
        total += tl.sum(mark.to(tl.int32), axis=0)
    for o0 in range(0, WIDTH, BLOCK):
        o = o0 + offs
        tl.store(out_ptr + o, tl.full([BLOCK], -1, tl.int32), mask=(o < WIDTH) & (o >= total))


def union_selected(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    num_pages: int,
    width: int,
    bitmap: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One launch: union_selected_ref's result, written to out [width] int32 (allocated if None).

    bitmap [num_pages] int8, all zero (left all zero): a workspace kept by the caller.
    """
    bs, hkv, w = page_idx.shape
    if out is None:
        out = torch.empty(width, dtype=torch.int32, device=page_idx.device)
    if bitmap.shape != (num_pages,) or bitmap.dtype != torch.int8:
        raise ValueError(f"bitmap must be [{num_pages}] int8, got {list(bitmap.shape)} {bitmap.dtype}")
    n = -(-req_to_token.shape[1] // page_size)
    _union_kernel[(1,)](
        req_to_token, req_to_token.stride(0), req_pool_indices,
        page_idx, *page_idx.stride(), counts, *counts.stride(),
        bitmap, out, bs * hkv * w, hkv, w, n, page_size, num_pages, width,
        BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    return out


# ============================================================================ clock placement
def clock_place_ref(pool, layer: int, pages: torch.Tensor, pin: torch.Tensor | None, window: int,
                    scratch_base: int = -1, demand: bool = True):  # fmt: skip
    """Reference CLOCK placement (module docstring), slot by slot with host reads.

    pool: a DevicePagePool (its state tensors are updated in place). pages [M] int (ascending
    unique, -1 = padding), pin [M] bool or None, window: the scan covers min(window * M, C) slots.
    Returns (slots [M] int32, fetch [M] bool, hit [M] bool, loc [M] int32, copy [M] bool, copy_keys
    [M] int32, copy_loc [M] int32 (the pages to copy and their loc, in page order, -1 after ncopy),
    ncopy [1] int32, stamp [1] int64); pool.fill_stamp[loc] = stamp for every page to copy (rows
    past fill_stamp, i.e. a scratch_base beyond the pool's own scratch rows, are not stamped).
    With quotas (pool.quota != "off"), the scan's victims follow the quota order of the module
    docstring and demand adds the call's valid pages to pool.layer_demand[layer].
    """
    c, npg, m = pool.capacity, pool.num_pages, pages.shape[0]
    pg = pages.tolist()
    pn = [False] * m if pin is None else [bool(x) for x in pin.tolist()]
    stamp, step_start, floor = int(pool.tick), int(pool.step_start), int(pool.pin_floor)
    slot_of, lyr, pag = pool.slot_of, pool.slot_layer, pool.slot_page
    last, pinned, ref = pool.last_use, pool.pinned, pool.ref
    slots, fetch, hit, over = [-1] * m, [False] * m, [False] * m, [False] * m
    misses = []
    for i, p in enumerate(pg):  # lookup; touch the hits
        if p < 0:
            continue
        s = int(slot_of[layer * npg + p])
        if s >= 0:
            hit[i], slots[i] = True, s
            last[s], ref[s] = stamp, 1
            pinned[s] = pn[i] if pool.pin_lease else bool(pinned[s]) or pn[i]
        else:
            misses.append(i)
    quota = pool.quota != "off"
    if quota:  # eviction allowances: each layer's excess over its quota; the calling layer's own
        used, q = pool.layer_used.tolist(), pool.layer_quota.tolist()
        give = [max(0, u - qq) for u, qq in zip(used, q)]
        give[layer] = max(0, used[layer] + len(misses) - q[layer])
        if demand:
            pool.layer_demand[layer] += sum(p >= 0 for p in pg)
    victims, fallback, examined, hand = [], [], 0, int(pool.hand)
    span = pool.quota_span * len(misses) if quota else 0
    while len(victims) < len(misses) and examined < min(window * m, c):  # the scan
        if quota and len(victims) + len(fallback) >= len(misses) and examined >= span:
            break  # the search for allowed victims is over: the fallback ones serve the rest
        s = (hand + examined) % c
        examined += 1
        if int(lyr[s]) < 0:
            victims.append(s)
        elif (bool(pinned[s]) and int(last[s]) >= floor) or int(last[s]) >= step_start:
            continue
        elif int(ref[s]):
            ref[s] = 0
        elif not quota:
            victims.append(s)
        elif give[int(lyr[s])] > 0:
            give[int(lyr[s])] -= 1
            victims.append(s)
        else:  # any evictable slot, if the allowed ones run short (the first misses-many serve)
            fallback.append(s)
    victims += fallback[: len(misses) - len(victims)]
    if c:
        pool.hand.fill_((hand + examined) % c)
    evictions = 0
    for r, i in enumerate(misses):  # install, in page order
        if r >= len(victims):
            over[i] = True
            continue
        s = victims[r]
        if int(lyr[s]) >= 0:
            slot_of[int(lyr[s]) * npg + int(pag[s])] = -1
            evictions += 1
            if quota:
                pool.layer_used[int(lyr[s])] -= 1
        if quota:
            pool.layer_used[layer] += 1
        slot_of[layer * npg + pg[i]] = s
        lyr[s], pag[s], last[s], ref[s], pinned[s] = layer, pg[i], stamp, 1, pn[i]
        slots[i], fetch[i] = s, True
    pool.tick += 1
    nh, nm, no = sum(hit), len(misses), sum(over)
    pool.counters += torch.tensor([nh, nm, evictions, no], device=pool.counters.device)
    loc, r = list(slots), 0
    for i in range(m):
        if over[i]:
            loc[i] = scratch_base + r if scratch_base >= 0 else -1
            r += 1
    dev = pool.device
    as_t = lambda x, dt: torch.tensor(x, dtype=dt, device=dev)
    copy = [f or (o and scratch_base >= 0) for f, o in zip(fetch, over)]
    todo = [i for i in range(m) if copy[i]]  # the copy list, in page order
    for i in todo:
        if loc[i] < pool.fill_stamp.shape[0]:  # rows past the pool's own scratch are not stamped
            pool.fill_stamp[loc[i]] = stamp
    pad = [-1] * (m - len(todo))
    return (as_t(slots, torch.int32), as_t(fetch, torch.bool), as_t(hit, torch.bool),
            as_t(loc, torch.int32), as_t(copy, torch.bool), as_t([pg[i] for i in todo] + pad, torch.int32),
            as_t([loc[i] for i in todo] + pad, torch.int32), as_t([len(todo)], torch.int32),
            as_t([stamp], torch.int64))  # fmt: skip


@triton.jit
def _clock_touch_kernel(
    pages_ptr, pin_ptr, M, layer, NP,
    slot_of_ptr, last_use_ptr, pinned_ptr, ref_ptr, tick_ptr,
    bvalid_ptr, bmiss_ptr, slots_ptr, fetch_ptr, hit_ptr, loc_ptr, copy_ptr,
    HAS_PIN: tl.constexpr, LEASE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Launch 1 of 3, a program per block of BLOCK pages: look them up, touch the hits (they become
    protected), write the final outputs of hits and padding, count the block's valid pages and misses.
    The union is unique, so no two programs touch one slot."""
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    im = i < M
    pg = tl.load(pages_ptr + i, mask=im, other=-1).to(tl.int64)
    valid = pg >= 0
    cur = tl.load(slot_of_ptr + layer * NP + pg, mask=valid, other=-1)
    hit = valid & (cur >= 0)
    tl.store(last_use_ptr + cur, tl.zeros([BLOCK], tl.int64) + tl.load(tick_ptr), mask=hit)
    tl.store(ref_ptr + cur, tl.full([BLOCK], 1, tl.int8), mask=hit)
    if HAS_PIN:
        pn = tl.load(pin_ptr + i, mask=valid, other=0) != 0
        if not LEASE:  # sticky pins accumulate; a lease is renewed (or dropped) by every use
            pn = pn | (tl.load(pinned_ptr + cur, mask=hit, other=0) != 0)
        tl.store(pinned_ptr + cur, pn, mask=hit)
    elif LEASE:
        tl.store(pinned_ptr + cur, tl.zeros([BLOCK], tl.int1), mask=hit)
    none = tl.zeros([BLOCK], tl.int1)
    tl.store(slots_ptr + i, cur, mask=im)  # -1 for misses and padding; the install sets placed misses'
    tl.store(loc_ptr + i, cur, mask=im)
    tl.store(hit_ptr + i, hit, mask=im)
    tl.store(fetch_ptr + i, none, mask=im)
    tl.store(copy_ptr + i, none, mask=im)
    tl.store(bvalid_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))
    tl.store(bmiss_ptr + pid, tl.sum((valid & ~hit).to(tl.int32), axis=0))


@triton.jit
def _window_slots(j, jm, hand, C1, slot_layer_ptr, last_use_ptr, pinned_ptr, ref_ptr, step_start, pin_floor):
    """The scan kernels' read of window positions j (valid where jm): slot s = (hand + j) mod C, its
    layer (-1 = free, also where not jm), protected (pin held, or used this step), referenced."""
    s = (hand + j) % C1
    owner = tl.load(slot_layer_ptr + s, mask=jm, other=-1)
    last = tl.load(last_use_ptr + s, mask=jm, other=0)
    prot = ((tl.load(pinned_ptr + s, mask=jm, other=0) != 0) & (last >= pin_floor)) | (last >= step_start)
    refd = tl.load(ref_ptr + s, mask=jm, other=0) != 0
    return s, owner, prot, refd


@triton.jit
def _clock_scan_kernel(
    bvalid_ptr, bmiss_ptr, NB, S, C1,
    slot_layer_ptr, last_use_ptr, pinned_ptr, ref_ptr,
    tick_ptr, step_start_ptr, pin_floor_ptr, hand_ptr, counters_ptr, acc_ptr, victims_ptr, ws_ptr, ncopy_ptr,
    scratch_base,
    ACC_MODE: tl.constexpr, BLOCK: tl.constexpr, NB_PAD: tl.constexpr,
):  # fmt: skip
    """Launch 2 of 3, one program: the window scan from the hand (sequential by nature), victims in scan
    order -> victims[0 ..); the hand, the tick and the counters but evictions; ws = (stamp, ntaken);
    ncopy = the length of the copy list the install writes (every miss with a scratch, else the placed)."""
    b = tl.arange(0, NB_PAD)
    nvalid = tl.sum(tl.load(bvalid_ptr + b, mask=b < NB, other=0), axis=0)
    nmiss = tl.sum(tl.load(bmiss_ptr + b, mask=b < NB, other=0), axis=0)
    offs = tl.arange(0, BLOCK)
    step_start = tl.load(step_start_ptr)
    pin_floor = tl.load(pin_floor_ptr)
    hand = tl.load(hand_ptr)
    zero = tl.zeros([], dtype=tl.int32)
    ncand, nexam, j0 = zero, zero, zero
    while (j0 < S) & (ncand < nmiss):  # past the last miss's victim nothing changes: stop there
        j = j0 + offs
        jm = j < S
        s, owner, prot, refd = _window_slots(j, jm, hand, C1, slot_layer_ptr, last_use_ptr, pinned_ptr,
                                             ref_ptr, step_start, pin_floor)  # fmt: skip
        free = owner < 0
        cand = jm & (free | (~prot & ~refd))
        incl = ncand + tl.cumsum(cand.to(tl.int32), axis=0)
        examined = jm & (incl - cand.to(tl.int32) < nmiss)
        tl.store(victims_ptr + incl - 1, s.to(tl.int32), mask=cand & examined)
        tl.store(ref_ptr + s, tl.zeros([BLOCK], tl.int8), mask=examined & ~free & ~prot & refd)
        ncand += tl.sum(cand.to(tl.int32), axis=0)
        nexam += tl.sum(examined.to(tl.int32), axis=0)
        j0 += BLOCK
    _scan_finish(nvalid, nmiss, tl.minimum(ncand, nmiss), nexam, hand, C1, hand_ptr, tick_ptr, counters_ptr,
                 acc_ptr, ws_ptr, ncopy_ptr, scratch_base, ACC_MODE)  # fmt: skip


@triton.jit
def _scan_finish(nvalid, nmiss, ntaken, nexam, hand, C1, hand_ptr, tick_ptr, counters_ptr, acc_ptr, ws_ptr,
                 ncopy_ptr, scratch_base, ACC_MODE: tl.constexpr):  # fmt: skip
    """The scan kernels' common end: move the hand, stamp the call, add the counters."""
    nhit = nvalid - nmiss
    nover = nmiss - ntaken
    tl.store(hand_ptr, (hand + nexam) % C1)
    stamp = tl.load(tick_ptr)
    tl.store(ws_ptr + 0, stamp)
    tl.store(ws_ptr + 1, ntaken.to(tl.int64))
    tl.store(ncopy_ptr, tl.where(scratch_base >= 0, nmiss, ntaken))
    tl.store(tick_ptr, stamp + 1)
    tl.store(counters_ptr + 0, tl.load(counters_ptr + 0) + nhit)
    tl.store(counters_ptr + 1, tl.load(counters_ptr + 1) + nmiss)
    tl.store(counters_ptr + 3, tl.load(counters_ptr + 3) + nover)
    if ACC_MODE == 1:  # DeviceTieredAttention.forward: needed, hits, fetched, overflow
        tl.store(acc_ptr + 0, tl.load(acc_ptr + 0) + nvalid)
        tl.store(acc_ptr + 1, tl.load(acc_ptr + 1) + nhit)
        tl.store(acc_ptr + 2, tl.load(acc_ptr + 2) + ntaken)
        tl.store(acc_ptr + 3, tl.load(acc_ptr + 3) + nover)
    if ACC_MODE == 2:  # DeviceTieredAttention prefetch: prefetched
        tl.store(acc_ptr + 4, tl.load(acc_ptr + 4) + ntaken)


@triton.jit
def _clock_scan_quota_kernel(
    bvalid_ptr, bmiss_ptr, NB, S, C1, layer, L, span_mult,
    slot_layer_ptr, last_use_ptr, pinned_ptr, ref_ptr,
    tick_ptr, step_start_ptr, pin_floor_ptr, hand_ptr, counters_ptr, acc_ptr, victims_ptr, ws_ptr, ncopy_ptr,
    scratch_base, used_ptr, quota_ptr, demand_ptr, give_ptr, fallback_ptr,
    ACC_MODE: tl.constexpr, DEMAND: tl.constexpr, QB: tl.constexpr, NB_PAD: tl.constexpr,
    L_PAD: tl.constexpr,
):  # fmt: skip
    """Launch 2 of 3 with per-layer quotas, one program: the window scan of _clock_scan_kernel, where an
    evictable slot (not free, protected or referenced) is a victim only while its layer's allowance
    lasts (give [L] int64 workspace: each layer's excess over its quota, the calling layer's own: the
    misses that take it past its quota); the others go to `fallback` [M] int32 in scan order and
    serve, after the allowed victims, the misses those leave. The search for allowed victims ends
    past span_mult x misses slots once the fallback ones suffice (it bounds the scan's cost when
    allowed victims are rare). Blocks of QB slots: a slot's rank among the block's evictable slots of
    its layer is a QB x QB comparison; a slot is examined while the allowed and fallback victims
    before it leave the scan going (once one slot is not examined, no later slot is)."""
    b = tl.arange(0, NB_PAD)
    nvalid = tl.sum(tl.load(bvalid_ptr + b, mask=b < NB, other=0), axis=0)
    nmiss = tl.sum(tl.load(bmiss_ptr + b, mask=b < NB, other=0), axis=0)
    lo = tl.arange(0, L_PAD)
    lm = lo < L
    used = tl.load(used_ptr + lo, mask=lm, other=0)
    quota = tl.load(quota_ptr + lo, mask=lm, other=0)
    own_give = tl.sum(tl.where(lo == layer, used + nmiss - quota, 0), axis=0)
    give = tl.maximum(tl.where(lo == layer, own_give, used - quota), 0)
    tl.store(give_ptr + lo, give, mask=lm)
    if DEMAND:
        tl.store(demand_ptr + layer, tl.load(demand_ptr + layer) + nvalid)
    tl.debug_barrier()
    offs = tl.arange(0, QB)
    earlier = offs[None, :] < offs[:, None]  # [i, j]: slot j comes before slot i in the block
    step_start = tl.load(step_start_ptr)
    pin_floor = tl.load(pin_floor_ptr)
    hand = tl.load(hand_ptr)
    zero = tl.zeros([], dtype=tl.int32)
    ncand, nfb, nexam, j0 = zero, zero, zero, zero
    span = span_mult * nmiss
    while (j0 < S) & (ncand < nmiss) & ((ncand + nfb < nmiss) | (j0 < span)):
        j = j0 + offs
        jm = j < S
        s, owner, prot, refd = _window_slots(j, jm, hand, C1, slot_layer_ptr, last_use_ptr, pinned_ptr,
                                             ref_ptr, step_start, pin_floor)  # fmt: skip
        free = jm & (owner < 0)
        evict = jm & ~free & ~prot & ~refd
        same = (owner[:, None] == owner[None, :]) & evict[None, :] & earlier
        rank = tl.sum(same.to(tl.int32), axis=1)
        # volatile: past the L1, which need not see the atomics (done in L2) of the block before
        allowed = evict & (rank < tl.load(give_ptr + owner, mask=evict, other=0, volatile=True))
        cand = free | allowed
        fb_any = evict & ~allowed
        incl = ncand + tl.cumsum(cand.to(tl.int32), axis=0)
        fincl = nfb + tl.cumsum(fb_any.to(tl.int32), axis=0)
        before = incl - cand.to(tl.int32)  # allowed / free victims before this slot
        fb_before = fincl - fb_any.to(tl.int32)
        examined = jm & (before < nmiss) & ((before + fb_before < nmiss) | (j < span))
        tl.store(victims_ptr + incl - 1, s.to(tl.int32), mask=cand & examined)
        fb = fb_any & examined
        fpos = fincl - 1
        tl.store(fallback_ptr + fpos, s.to(tl.int32), mask=fb & (fpos < nmiss))
        tl.store(ref_ptr + s, tl.zeros([QB], tl.int8), mask=examined & ~free & ~prot & refd)
        tl.atomic_add(give_ptr + owner, tl.full([QB], -1, tl.int64), mask=allowed & examined)
        tl.debug_barrier()  # the next block reads the allowances left
        ncand += tl.sum((cand & examined).to(tl.int32), axis=0)  # the span may end the scan mid-block
        nfb += tl.sum(fb.to(tl.int32), axis=0)
        nexam += tl.sum(examined.to(tl.int32), axis=0)
        j0 += QB
    nallowed = tl.minimum(ncand, nmiss)
    nfill = tl.minimum(nfb, nmiss - nallowed)
    tl.debug_barrier()
    for f0 in range(0, nfill, QB):  # the fallback victims follow the allowed ones
        f = f0 + offs
        v = tl.load(fallback_ptr + f, mask=f < nfill, other=0)
        tl.store(victims_ptr + nallowed + f, v, mask=f < nfill)
    _scan_finish(nvalid, nmiss, nallowed + nfill, nexam, hand, C1, hand_ptr, tick_ptr, counters_ptr, acc_ptr,
                 ws_ptr, ncopy_ptr, scratch_base, ACC_MODE)  # fmt: skip


@triton.jit
def _clock_install_kernel(
    pages_ptr, pin_ptr, M, layer, NP, scratch_base, bmiss_ptr,
    slot_of_ptr, slot_layer_ptr, slot_page_ptr, last_use_ptr, pinned_ptr, ref_ptr,
    counters_ptr, victims_ptr, ws_ptr, slots_ptr, fetch_ptr, hit_ptr, loc_ptr, copy_ptr,
    copy_keys_ptr, copy_loc_ptr, fill_stamp_ptr, stamp_rows, used_ptr,
    HAS_PIN: tl.constexpr, QUOTA: tl.constexpr, BLOCK: tl.constexpr, NB_PAD: tl.constexpr,
):  # fmt: skip
    """Launch 3 of 3, a program per block: the block's misses, in page order after the misses of the
    blocks before it, take victims[rank] (evict the old key, install) or overflow. Victims are distinct
    and never hold a page of this call, so programs write disjoint keys and slots. Every page to copy
    also goes to the copy list at its miss rank (dense: with a scratch every miss is copied, without
    one the placed misses are ranks < ntaken) and stamps its row (slot or scratch row)."""
    pid = tl.program_id(0)
    b = tl.arange(0, NB_PAD)
    rank0 = tl.sum(tl.load(bmiss_ptr + b, mask=b < pid, other=0), axis=0)
    stamp = tl.load(ws_ptr + 0)
    ntaken = tl.load(ws_ptr + 1).to(tl.int32)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    im = i < M
    pg = tl.load(pages_ptr + i, mask=im, other=-1).to(tl.int64)
    miss = (pg >= 0) & (tl.load(hit_ptr + i, mask=im, other=0) == 0)
    rank = rank0 + tl.cumsum(miss.to(tl.int32), axis=0) - 1
    placed = miss & (rank < ntaken)
    v = tl.load(victims_ptr + rank, mask=placed, other=0).to(tl.int64)
    old_l = tl.load(slot_layer_ptr + v, mask=placed, other=-1)
    old_p = tl.load(slot_page_ptr + v, mask=placed, other=0)
    ev = placed & (old_l >= 0)
    tl.store(slot_of_ptr + old_l * NP + old_p, tl.full([BLOCK], -1, tl.int32), mask=ev)
    tl.store(slot_of_ptr + layer * NP + pg, v.to(tl.int32), mask=placed)
    tl.store(slot_layer_ptr + v, tl.zeros([BLOCK], tl.int64) + layer, mask=placed)
    tl.store(slot_page_ptr + v, pg, mask=placed)
    tl.store(last_use_ptr + v, tl.zeros([BLOCK], tl.int64) + stamp, mask=placed)
    tl.store(ref_ptr + v, tl.full([BLOCK], 1, tl.int8), mask=placed)
    if HAS_PIN:
        pn = tl.load(pin_ptr + i, mask=placed, other=0) != 0
    else:
        pn = tl.zeros([BLOCK], tl.int1)
    tl.store(pinned_ptr + v, pn, mask=placed)
    over = miss & ~placed
    slot = tl.where(placed, v.to(tl.int32), -1)
    tl.store(slots_ptr + i, slot, mask=miss)
    tl.store(fetch_ptr + i, placed, mask=miss)
    if scratch_base >= 0:
        lc = tl.where(over, scratch_base + rank - ntaken, slot)
        cp = miss
    else:
        lc = slot
        cp = placed
    tl.store(loc_ptr + i, lc, mask=miss)
    tl.store(copy_ptr + i, cp, mask=miss)
    tl.store(copy_keys_ptr + rank, pg.to(tl.int32), mask=cp)
    tl.store(copy_loc_ptr + rank, lc, mask=cp)
    tl.store(fill_stamp_ptr + lc, tl.zeros([BLOCK], tl.int64) + stamp, mask=cp & (lc < stamp_rows))
    tl.atomic_add(counters_ptr + 2, tl.sum(ev.to(tl.int64), axis=0))
    if QUOTA:  # slots held per layer: the evicted layers lose one each, this layer gains the placed
        tl.atomic_add(used_ptr + old_l, tl.full([BLOCK], -1, tl.int64), mask=ev)
        tl.atomic_add(used_ptr + layer, tl.sum(placed.to(tl.int64), axis=0))


def clock_place(pool, layer: int, pages: torch.Tensor, pin: torch.Tensor | None, window: int,
                scratch_base: int = -1, acc: torch.Tensor | None = None, acc_mode: int = 0,
                demand: bool = True):  # fmt: skip
    """Three launches: clock_place_ref's results and state updates (the copy list past ncopy is
    left undefined: the copy kernel reads only below the count).

    Only the window scan is sequential (one program); the lookup / touch before it and the install
    after it run a program per BLOCK pages (one program walking a 10k-entry union in 1024-page
    blocks took ~65 us a layer on the H200, profile-decode-tiered-f88f00f-h200.json).
    acc (optional) [5] int64 gets DeviceTieredAttention's counters: acc_mode 1 adds (valid pages,
    hits, placed, overflow) at [0:4], acc_mode 2 adds placed at [4].
    """
    dev, m = pool.device, pages.shape[0]
    pages = pages.to(dev).contiguous()
    slots = torch.empty(m, dtype=torch.int32, device=dev)
    loc = torch.empty_like(slots)
    victims = torch.empty(max(m, 1), dtype=torch.int32, device=dev)
    fetch = torch.empty(m, dtype=torch.bool, device=dev)
    hit, copy = torch.empty_like(fetch), torch.empty_like(fetch)
    nb = max(1, triton.cdiv(m, BLOCK))
    bvalid, bmiss = (torch.empty(nb, dtype=torch.int32, device=dev) for _ in range(2))
    ws = torch.empty(2, dtype=torch.int64, device=dev)  # (stamp, misses that got a victim)
    copy_keys, copy_loc = torch.empty_like(slots), torch.empty_like(slots)
    ncopy = torch.empty(1, dtype=torch.int32, device=dev)
    has_pin = pin is not None
    pin_t = pin.to(dev, torch.bool).contiguous() if has_pin else fetch
    nb_pad = triton.next_power_of_2(nb)
    _clock_touch_kernel[(nb,)](
        pages, pin_t, m, layer, pool.num_pages, pool.slot_of, pool.last_use, pool.pinned, pool.ref,
        pool.tick, bvalid, bmiss, slots, fetch, hit, loc, copy, HAS_PIN=has_pin, LEASE=pool.pin_lease,
        BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    scan_args = (
        pool.slot_layer, pool.last_use, pool.pinned, pool.ref, pool.tick, pool.step_start, pool.pin_floor,
        pool.hand, pool.counters, acc if acc is not None else pool.counters, victims, ws, ncopy, scratch_base,
    )  # fmt: skip
    acc_mode = acc_mode if acc is not None else 0
    quota = pool.quota != "off"
    if quota:
        give = torch.empty(pool.num_layers, dtype=torch.int64, device=dev)
        fallback = torch.empty_like(victims)
        _clock_scan_quota_kernel[(1,)](
            bvalid, bmiss, nb, min(window * m, pool.capacity), max(pool.capacity, 1), layer, pool.num_layers,
            pool.quota_span, *scan_args, pool.layer_used, pool.layer_quota, pool.layer_demand, give, fallback,
            ACC_MODE=acc_mode, DEMAND=demand, QB=QUOTA_BLOCK, NB_PAD=nb_pad,
            L_PAD=triton.next_power_of_2(pool.num_layers), num_warps=4,
        )  # fmt: skip
    else:
        _clock_scan_kernel[(1,)](
            bvalid, bmiss, nb, min(window * m, pool.capacity), max(pool.capacity, 1), *scan_args,
            ACC_MODE=acc_mode, BLOCK=BLOCK, NB_PAD=nb_pad, num_warps=4,
        )  # fmt: skip
    _clock_install_kernel[(nb,)](
        pages, pin_t, m, layer, pool.num_pages, scratch_base, bmiss, pool.slot_of, pool.slot_layer,
        pool.slot_page, pool.last_use, pool.pinned, pool.ref, pool.counters, victims, ws,
        slots, fetch, hit, loc, copy, copy_keys, copy_loc, pool.fill_stamp, pool.fill_stamp.shape[0],
        pool.layer_used if quota else pool.counters,
        HAS_PIN=has_pin, QUOTA=quota, BLOCK=BLOCK, NB_PAD=nb_pad, num_warps=4,
    )  # fmt: skip
    return slots, fetch, hit, loc, copy, copy_keys, copy_loc, ncopy, ws[:1]


# ============================================================================ page table
def page_table_ref(req_to_token, req_pool_indices, page_size, num_pages, union, loc) -> torch.Tensor:
    """Reference: [bs, N] int32, loc of each logical page's physical page in the union, else 0."""
    phys = req_to_token[req_pool_indices.long()][:, ::page_size].long() // page_size
    valid = union >= 0
    where = torch.zeros(num_pages + 1, dtype=torch.int32, device=union.device)
    where[torch.where(valid, union.long(), num_pages)] = loc.clamp(min=0).to(torch.int32)
    return where[phys.clamp(0, num_pages - 1)].contiguous()


@triton.jit
def _page_table_kernel(
    r2t_ptr, r2t_s0, rpi_ptr, union_ptr, loc_ptr, table_ptr, tab_s0, N, P, NP, M,
    STEPS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    jm = j < N
    r = tl.load(rpi_ptr + b).to(tl.int64)
    tok = tl.load(r2t_ptr + r * r2t_s0 + j.to(tl.int64) * P, mask=jm, other=0).to(tl.int64)
    ph = tl.minimum(tl.maximum(tok // P, 0), NP - 1)
    # lower bound of ph in union (ascending, then -1 padding = +inf): steps 2^(STEPS-1) .. 1
    pos = tl.zeros([BLOCK], dtype=tl.int64)
    for k in tl.static_range(STEPS):
        nxt = pos + (1 << (STEPS - 1 - k))
        ok = jm & (nxt <= M)
        u = tl.load(union_ptr + nxt - 1, mask=ok, other=-1).to(tl.int64)
        pos = tl.where(ok & (u >= 0) & (u < ph), nxt, pos)
    found = jm & (pos < M)
    u = tl.load(union_ptr + pos, mask=found, other=-1).to(tl.int64)
    found = found & (u == ph)
    lc = tl.load(loc_ptr + pos, mask=found, other=0)
    tl.store(table_ptr + b * tab_s0 + j, tl.where(found, tl.maximum(lc, 0), 0).to(tl.int32), mask=jm)


def page_table(req_to_token, req_pool_indices, page_size, num_pages, union, loc) -> torch.Tensor:
    """One launch: page_table_ref's table [bs, N] int32 (union [M] int32 sorted, loc [M] int32)."""
    bs = req_pool_indices.shape[0]
    n = -(-req_to_token.shape[1] // page_size)
    m = union.shape[0]
    table = torch.empty(bs, n, dtype=torch.int32, device=union.device)
    steps = max(1, m.bit_length())  # 2^(steps-1) <= m: the largest first step
    _page_table_kernel[(bs, triton.cdiv(n, BLOCK))](
        req_to_token, req_to_token.stride(0), req_pool_indices, union, loc, table, table.stride(0),
        n, page_size, num_pages, m, STEPS=steps, BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip
    return table


# ======================================================================= head pages (one kv head per slot)
# With --psa-hot-granularity head, a pool slot holds one kv head's page and the pool is keyed by
# head page hp = h * NP + physical page: the heads of a layer select different pages, so keying by
# head moves only what each head reads. All heads of a layer go through one union, one placement,
# one copy and one attention launch (a loop over heads made Hkv x the launches: ~4x a page-mode
# step on the H100). The union is not sorted: a scatter of entry ids picks one owner per key and
# the owners claim union positions with one atomic add per block, so a call costs O(bs x Hkv x W),
# never a scan over the Hkv x NP keys. Entries' positions are kept in `pos_of` [Hkv * NP] int32
# (written for this call's keys; other entries hold stale positions nobody reads), which gives the
# page table without a search. Union order differs between GPU runs (block order); the set, the
# placement's hit / miss counts and the attention output do not.
@triton.jit
def _claim_kernel(
    r2t_ptr, r2t_s0, rpi_ptr, idx_ptr, idx_s0, idx_s1, idx_s2, cnt_ptr, cnt_s0, cnt_s1,
    owner_ptr, out_ptr, count_ptr, E, HKV, W, N, P, NP, M,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    e = pid * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + e, tl.full([BLOCK], -1, tl.int32), mask=e < M)  # the union's padding (M <= E)
    if pid == 0:
        tl.store(count_ptr, 0)
    key, keep, _b, _h, _j = _entry_keys(e, E, r2t_ptr, r2t_s0, rpi_ptr, idx_ptr, idx_s0, idx_s1, idx_s2,
                                        cnt_ptr, cnt_s0, cnt_s1, HKV, W, N, P, NP)  # fmt: skip
    tl.store(owner_ptr + key, e, mask=keep)  # duplicates race; one entry id lands


@triton.jit
def _compact_kernel(
    r2t_ptr, r2t_s0, rpi_ptr, idx_ptr, idx_s0, idx_s1, idx_s2, cnt_ptr, cnt_s0, cnt_s1,
    owner_ptr, pos_ptr, out_ptr, count_ptr, E, HKV, W, N, P, NP, M,
    BLOCK: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key, keep, _b, _h, _j = _entry_keys(e, E, r2t_ptr, r2t_s0, rpi_ptr, idx_ptr, idx_s0, idx_s1, idx_s2,
                                        cnt_ptr, cnt_s0, cnt_s1, HKV, W, N, P, NP)  # fmt: skip
    first = keep & (tl.load(owner_ptr + key, mask=keep, other=-1) == e)
    base = tl.atomic_add(count_ptr, tl.sum(first.to(tl.int32), axis=0))
    pos = base + tl.cumsum(first.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + pos, key.to(tl.int32), mask=first & (pos < M))
    tl.store(pos_ptr + key, pos, mask=first)


@triton.jit
def _scatter_table_kernel(
    r2t_ptr, r2t_s0, rpi_ptr, idx_ptr, idx_s0, idx_s1, idx_s2, cnt_ptr, cnt_s0, cnt_s1,
    pos_ptr, loc_ptr, table_ptr, tab_s0, tab_s1, E, HKV, W, N, P, NP, M,
    BLOCK: tl.constexpr,
):  # fmt: skip
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    key, keep, b, h, j = _entry_keys(e, E, r2t_ptr, r2t_s0, rpi_ptr, idx_ptr, idx_s0, idx_s1, idx_s2,
                                     cnt_ptr, cnt_s0, cnt_s1, HKV, W, N, P, NP)  # fmt: skip
    pos = tl.minimum(tl.maximum(tl.load(pos_ptr + key, mask=keep, other=0), 0), M - 1)
    lc = tl.load(loc_ptr + pos, mask=keep, other=0)
    tl.store(table_ptr + b * tab_s0 + h * tab_s1 + j, tl.maximum(lc, 0), mask=keep)


def _selection_args(req_to_token, req_pool_indices, page_idx, counts, page_size: int) -> tuple:
    n = -(-req_to_token.shape[1] // page_size)
    return (req_to_token, req_to_token.stride(0), req_pool_indices, page_idx, *page_idx.stride(), counts,
            *counts.stride()), n  # fmt: skip


def head_page_keys_ref(req_to_token, req_pool_indices, page_idx, counts, page_size: int, num_pages: int):
    """Reference: head page key h * NP + physical page of every selection entry [bs, Hkv, W] int64,
    and the kept mask [bs, Hkv, W] bool (w < count)."""
    _, sel = selected_physical_pages(req_to_token, req_pool_indices, page_idx, page_size)
    hkv, w = page_idx.shape[1:]
    keys = sel.clamp(0, num_pages - 1) + torch.arange(hkv, device=sel.device)[None, :, None] * num_pages
    kept = torch.arange(w, device=sel.device) < counts[..., None]
    return keys, kept


def union_head_pages_ref(req_to_token, req_pool_indices, page_idx, counts, page_size: int, num_pages: int,
                         width: int) -> torch.Tensor:  # fmt: skip
    """Reference: the union of the selection's head pages, [width] int32 ascending unique, -1 padded.
    (union_head_pages returns the same set in another order.)"""
    from .device_pool import union_pages

    keys, _ = head_page_keys_ref(req_to_token, req_pool_indices, page_idx, counts, page_size, num_pages)
    return union_pages(keys, counts, page_idx.shape[1] * num_pages, width)


def union_head_pages(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    num_pages: int,
    owner: torch.Tensor,
    pos_of: torch.Tensor,
    out: torch.Tensor,
    count: torch.Tensor,
) -> torch.Tensor:
    """Two launches: the selection's unique head pages (h * num_pages + physical page) in out [M]
    int32, valid ones first (any order), -1 after; count [1] int32 their number; pos_of [Hkv * NP]
    int32 each one's position in out. owner [Hkv * NP] int32 is a workspace (any contents).

    page_idx [bs, Hkv, W] int (valid in [:count]); M = out's length must be >= the number of unique
    head pages (bs x Hkv x W always is).
    """
    bs, hkv, w = page_idx.shape
    e, m = bs * hkv * w, out.shape[0]
    if owner.shape != (hkv * num_pages,) or pos_of.shape != owner.shape:
        raise ValueError(f"owner and pos_of must be [{hkv * num_pages}], got {list(owner.shape)}")
    if e == 0:
        out.fill_(-1)
        count.zero_()
        return out
    sel, n = _selection_args(req_to_token, req_pool_indices, page_idx, counts, page_size)
    grid = (triton.cdiv(max(e, m), BLOCK),)
    dims = (e, hkv, w, n, page_size, num_pages, m)
    _claim_kernel[grid](*sel, owner, out, count, *dims, BLOCK=BLOCK, num_warps=4)
    _compact_kernel[grid](*sel, owner, pos_of, out, count, *dims, BLOCK=BLOCK, num_warps=4)
    return out


def head_page_table_ref(req_to_token, req_pool_indices, page_idx, counts, page_size: int, num_pages: int,
                        union: torch.Tensor, loc: torch.Tensor, n: int) -> torch.Tensor:  # fmt: skip
    """Reference: table [bs, Hkv, n] int32 with table[b, h, j] = loc of head page (h, phys of j) in
    the union for every selected (b, h, j); 0 elsewhere (head_page_table leaves those undefined)."""
    keys, kept = head_page_keys_ref(req_to_token, req_pool_indices, page_idx, counts, page_size, num_pages)
    where = {int(k): max(int(c), 0) for k, c in zip(union.tolist(), loc.tolist()) if k >= 0}
    bs, hkv, w = page_idx.shape
    table = torch.zeros(bs, hkv, n, dtype=torch.int32)
    j = page_idx.long().clamp(0, n - 1)  # as the kernel reads them
    for b, h, i in kept.nonzero().tolist():
        table[b, h, int(j[b, h, i])] = where[int(keys[b, h, i])]
    return table.to(page_idx.device)


def head_page_table(
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    page_size: int,
    num_pages: int,
    pos_of: torch.Tensor,
    loc: torch.Tensor,
) -> torch.Tensor:
    """One launch: table [bs, Hkv, N] int32, table[b, h, j] = loc[pos_of[key]] for every selected
    (b, h, j) (union_head_pages' pos_of, the placement's loc [M]); entries of pages not selected are
    left undefined: sparse_decode reads the table only at selected pages."""
    bs, hkv, w = page_idx.shape
    sel, n = _selection_args(req_to_token, req_pool_indices, page_idx, counts, page_size)
    table = torch.empty(bs, hkv, n, dtype=torch.int32, device=page_idx.device)
    e = bs * hkv * w
    if e:
        _scatter_table_kernel[(triton.cdiv(e, BLOCK),)](
            *sel, pos_of, loc, table, table.stride(0), table.stride(1), e, hkv, w, n, page_size, num_pages,
            loc.shape[0], BLOCK=BLOCK, num_warps=4,
        )  # fmt: skip
    return table


# ============================================================================ split miss path
def split_selection_ref(page_idx: torch.Tensor, counts: torch.Tensor, table: torch.Tensor,
                        fill_stamp: torch.Tensor, stamp: torch.Tensor) -> tuple:  # fmt: skip
    """Reference: the selection split by its rows' fill stamps, each part in selection order ->
    (rest_idx, rest_cnt, fresh_idx, fresh_cnt): fresh = pages whose table row has fill_stamp == stamp
    (filled by that placement's copy), rest = the others (resident before it). idx [bs, Hkv, W] int32,
    -1 padded; cnt [bs, Hkv] int32. table [bs, N] or [bs, Hkv, N]."""
    bs, hkv, w = page_idx.shape
    tab = table[:, None].expand(bs, hkv, table.shape[-1]) if table.dim() == 2 else table
    j = page_idx.long().clamp(0, tab.shape[-1] - 1)
    kept = torch.arange(w, device=page_idx.device) < counts[..., None]
    row = torch.where(kept, tab.gather(2, j).long(), 0)
    fresh = kept & (fill_stamp[row] == stamp.reshape(()))
    return (*compact_selection(page_idx, kept & ~fresh), *compact_selection(page_idx, fresh))


@triton.jit
def _split_selection_kernel(
    page_idx, counts, table, fill_stamp, stamp_ptr, rest_idx, rest_cnt, fresh_idx, fresh_cnt,
    stride_pb, stride_ph, stride_tb, stride_th,
    HKV: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(0)
    b, h = bh // HKV, bh % HKV
    w = tl.arange(0, BLOCK_W)
    kept = w < tl.load(counts + bh)
    pg = tl.load(page_idx + b * stride_pb + h * stride_ph + w, mask=kept, other=0)
    row = tl.load(table + b * stride_tb + h * stride_th + pg, mask=kept, other=0)
    fresh = kept & (tl.load(fill_stamp + row, mask=kept, other=-1) == tl.load(stamp_ptr))
    _store_part(kept & ~fresh, pg, rest_idx + bh * W, rest_cnt + bh, w, W, BLOCK_W)
    _store_part(fresh, pg, fresh_idx + bh * W, fresh_cnt + bh, w, W, BLOCK_W)


@triton.jit
def _store_part(part, pg, idx_row, cnt_at, w, W: tl.constexpr, BLOCK_W: tl.constexpr):
    """The entries of pg [BLOCK_W] where part is set, packed in order into idx_row[0 .. W), -1 after."""
    pos = tl.cumsum(part.to(tl.int32), axis=0) - 1
    total = tl.sum(part.to(tl.int32), axis=0)
    tl.store(idx_row + pos, pg.to(tl.int32), mask=part)  # positions < total
    tl.store(idx_row + w, tl.full([BLOCK_W], -1, tl.int32), mask=(w >= total) & (w < W))
    tl.store(cnt_at, total)


def split_selection(
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    table: torch.Tensor,
    fill_stamp: torch.Tensor,
    stamp: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch, a program per (request, kv head): the selection split into the pages resident
    before a placement and the pages it sent copies for -> (rest_idx, rest_cnt, fresh_idx, fresh_cnt)
    (split_selection_ref). The split miss path attends the first list while the copy runs and the
    second once it is done.

    page_idx [bs, Hkv, W] int32 (valid in [:count], contiguous in W), counts [bs, Hkv] int32
    contiguous, table [bs, N] or [bs, Hkv, N] int32 (page_table of sparse_decode), fill_stamp [rows]
    int64 (DevicePagePool.fill_stamp), stamp [1] int64 (the placement's, Placement.stamp).
    """
    bs, hkv, w = page_idx.shape
    dev = page_idx.device
    rest_idx, fresh_idx = (torch.empty(bs, hkv, w, dtype=torch.int32, device=dev) for _ in range(2))
    rest_cnt, fresh_cnt = (torch.empty(bs, hkv, dtype=torch.int32, device=dev) for _ in range(2))
    if bs * hkv == 0 or w == 0:
        return rest_idx, rest_cnt.zero_(), fresh_idx, fresh_cnt.zero_()
    _split_selection_kernel[(bs * hkv,)](
        page_idx, counts.contiguous(), table, fill_stamp, stamp, rest_idx, rest_cnt, fresh_idx, fresh_cnt,
        page_idx.stride(0), page_idx.stride(1), table.stride(0), table.stride(1) if table.dim() == 3 else 0,
        HKV=hkv, W=w, BLOCK_W=triton.next_power_of_2(w), num_warps=4,
    )  # fmt: skip
    return rest_idx, rest_cnt, fresh_idx, fresh_cnt
