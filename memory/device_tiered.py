"""Tiered decode for one layer on the device: no host sync, fixed shapes (CUDA-graph capturable).

The device twin of tiered_decode.TieredAttention, built on DevicePagePool (map and LRU victim choice
as tensor ops) and PageFetcher (SGLang's UVA transfer kernel). One layer's call:
  1. physical page of every selected logical page (req_to_token[rpi, j * P] // P), and their union
     over requests and kv heads: [M] ascending, -1 padded (M static: min(width, bs x Hkv x W));
  2. `pool.place`: hits are touched, misses get free or LRU slots, all on the device;
  3. pages that found no slot (everything evictable is in use this step) overflow into the pool's
     scratch rows C+1 .. C+M: overflow page number r (in page order) goes to scratch slot C+1+r;
  4. one PageFetcher call copies the misses (into their slots) and the overflow pages (into
     scratch) from the pinned host tier, M * P token items with dummies for the rest;
  5. one sparse_decode over the pool buffer through a page table [bs, N] that maps each logical
     page to its slot or scratch slot.
Overflow choice: scratch sized to the union width means every overflowing page fits in one pass, so
the result is exact for any pool size (capacity 0 included) with one attention launch and no merge;
the price is M extra slots of device memory (M pages x all kv heads, e.g. 1280 x 128 KiB = 160 MiB
at Llama-3.1-8B's shape, bs 1, 160 pages per head), shared by all layers. Reading overflow pages
straight from host memory inside the attention kernel would save that memory, but needs the Triton
kernel to take a pinned pointer (unverified) and would read each page once per query group.

Head pages (`build(..., head_pages=True)`, --psa-hot-granularity head): a slot holds one kv head's
page [P, 1, D] and the pool is keyed by head page h * NP + p. A layer's kv heads select different
pages, so a slot of all heads made a miss move Hkv heads of which one or a few are read (~6x the
bytes attention needs with dummy weights on the H100, docs/TIERED.md). Steps 1-5 stay one launch
each for all heads: fused_place.union_head_pages (an unsorted union by scatter and atomic claim, no
scan over keys), the same CLOCK placement, copies of head h's rows of host page p, and sparse_decode
over the slots' single head (expanded to Hkv, stride 0) through a per-head table [bs, Hkv, N]. One
shared pool serves every (layer, head): no fixed per-head quota.

Overlap (`prefetch`): layer l+1's pages are unknown until its query exists, so after layer l's
placement `prefetch(l + 1)` places and copies a *prediction* of layer l+1's union on a side CUDA
stream while layer l attends and runs its MLP; `forward(l + 1)` makes the current stream wait on that
stream's event, then places the exact union: predicted pages are hits, the rest are fetched
synchronously. Two predictions (forward's `prefetch_next`):
  - "previous-step": the union layer l+1 needed at the previous decode step;
  - "next-layer": the union `speculate(l + 1, ...)` stored this step, from pages selected with a
    query estimated before layer l+1 exists (sglang_psa/lookahead.py: layer l+1's query projection
    of the residual stream entering layer l, as InfiniGen does);
  - "next-step": the union `speculate(l + 1, ...)` stored at the previous step, from the pages just
    below that step's cut (kernels/select_pages.select_margin): a page enters a selection by climbing
    past the cut, and the pages the previous step did select are still resident. Layer 0's comes
    from begin_step.
Prefetch never uses the scratch (a predicted page that finds no slot is skipped), and a wrong
prediction costs only bandwidth. Every `prefetch(l)` must be followed by `forward(l)` in the same
step (in a graph capture, the side stream joins there). On the CPU prefetch runs inline.

Miss path (`miss_path`): "pool" copies a layer's misses into their slots (step 4) before attention,
a main-stream kernel whose time is mostly PCIe latency (~45-70 us a layer on the H200 for 0.5-1.4 MiB,
profile-decode-*.json), so hiding part of its bytes by prefetch hides almost none of its time. "host"
builds the page table with the missed pages pointing into the host tier itself (sparse_decode's
host_k / host_v, read over UVA inside the attention kernel, where their latency overlaps the reads of
the resident pages) and copies the missed pages that got a slot into the pool on the side stream, for
the steps after. The two paths attend the same keys, so outputs are equal. Reading host pages inside
the attention kernel turned out latency-bound (bench_tiered on the H200: 10-45% slower than "pool").
"split" takes the misses' copy off the critical path: the placement (fused_place.clock_place) packs
the pages to copy and their slot or scratch row into a list as it installs them and stamps those rows
(DevicePagePool.fill_stamp), the side stream copies the list while the main stream builds the table,
splits each (request, kv head)'s selection into the pages resident before the placement and the pages
just sent for (fused_place.split_selection: one launch, by the rows' stamps) and attends the first
list; then it joins the side stream, attends the second list and merges the two states by log-sum-exp
(sparse_decode merge_with). One copy per miss, straight into its slot, no compaction kernels. Same keys
as "pool"; the output differs only by the merge's rounding. (Session 12's version copied into scratch
before the placement and moved the slotted misses scratch -> slot after it: two copies, a lookup and
two compactions a layer, and a second pass over the whole selection; it hid none of the fetch.)

KV writes: `invalidate_layer` drops the written pages of a layer (any write: prefill, a page reused
by the radix cache); `write_through` instead writes the new rows into the slots of resident pages, so
the page a decode step appends to stays a hit (without it that page misses in every layer and kv
head at every step, and no prediction can fetch it ahead: its row is written in the same layer);
`fill` (prefill writes) also places the pages the write covers whole, from the rows on the device, at
low priority, so a request's first decode steps do not fetch from host what prefill just computed.

Shapes and dtypes:
    q [bs, Hq, D]; req_to_token [max_reqs, max_context] int32; req_pool_indices, seq_lens [bs] int
    page_idx [bs, Hkv, W] int32 selected logical pages ([:count], -1 after), counts [bs, Hkv] int32
    -> out [bs, Hq, D] q.dtype, lse [bs, Hq] float32
Counters (`counters` [6] int64 on the device, `stats()` reads them): pages needed (union sizes),
hits at the exact placement (prefetched pages included), pages fetched synchronously into slots,
overflow pages (fetched into scratch), pages prefetched, pages filled by prefill writes (`fill`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

from sglang_psa.config import MISS_PATHS
from sglang_psa.kernels import sparse_decode

from .device_pool import DevicePagePool, Placement, union_pages
from .fused_place import (
    head_page_table,
    page_table,
    selected_physical_pages,
    split_selection,
    union_head_pages,
    union_selected,
)
from .uva_fetch import PageFetcher

COUNTER_NAMES = ("needed", "hits", "fetched", "overflow", "prefetched", "filled")


class DeviceTieredAttention:
    """One layer's tiered decode attention on the device (see the module docstring)."""

    def __init__(
        self,
        pool: DevicePagePool,
        width: int,
        attend: Callable = sparse_decode,
        prefetch_programs: int | None = None,
        miss_path: str = "pool",
        pin_window: tuple[int, int] | None = None,
        **fetch_kw,
    ):
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if miss_path not in MISS_PATHS:
            raise ValueError(f"miss_path must be one of {', '.join(MISS_PATHS)}, got {miss_path!r}")
        self.miss_path = miss_path
        if pin_window is not None and (not pool.pin_lease or min(pin_window) < 0):
            raise ValueError(f"pin_window {pin_window}: needs a pool with pin_lease and counts >= 0")
        self.pin_window = pin_window
        # table entries from here on name host pages (sparse_decode's host_base): past every pool row
        self._host_base = pool.k.shape[0]
        if pool.scratch_slots < width:
            raise ValueError(f"pool needs scratch_slots >= width ({width}), has {pool.scratch_slots}")
        self.pool, self.width, self.attend = pool, width, attend
        # side-stream copy grid (prefetch, the host / split miss paths' copies; None: the fetcher's default)
        self.prefetch_programs = prefetch_programs
        self.head_pages = pool.head_pages
        self.fetcher = PageFetcher(pool.host, pool.k, pool.v, sink_slot=pool.capacity,
                                   head_pages=self.head_pages,
                                   **fetch_kw)  # fmt: skip
        dev = pool.device
        self.host_pages, self.hkv = pool.host.k.shape[1], pool.host.k.shape[3]
        # The Triton unions' workspaces, one set for the exact union and one for the speculated union
        # (it runs on the side stream, beside exact unions): union_head_pages' owner / pos_of / count,
        # union_selected's all-zero bitmap (the pool's own for the exact union).
        if self.head_pages:
            self._owner, self._pos_of, self._spec_owner, self._spec_pos_of = (
                torch.zeros(pool.num_pages, dtype=torch.int32, device=dev) for _ in range(4)
            )
            self._count, self._spec_count = (torch.zeros(1, dtype=torch.int32, device=dev) for _ in range(2))
        else:
            self._spec_bitmap = torch.zeros(pool.num_pages, dtype=torch.int8, device=dev)
        self.counters = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=dev)
        # per layer: the previous step's union, and this step's speculated union (the predictions)
        self.last_union = torch.full((pool.num_layers, width), -1, dtype=torch.int32, device=dev)
        self.spec_union = torch.full((pool.num_layers, width), -1, dtype=torch.int32, device=dev)
        self._cuda = dev.type == "cuda"
        self.side = torch.cuda.Stream(device=dev) if self._cuda else None
        self._events = [torch.cuda.Event() for _ in range(pool.num_layers)] if self._cuda else []
        self._pending: set[int] = set()
        self._scratch0 = pool.capacity + 1
        self._pins_fresh = False
        if pin_window is not None:  # _pins' workspace: a byte per host page (+ padding), set for the step
            self._pin_mark = torch.zeros(self.host_pages + 1, dtype=torch.int8, device=dev)
            sink, local = pin_window
            self._pin_j = torch.cat([torch.arange(sink), -1 - torch.arange(local)]).to(dev)

    @classmethod
    def build(
        cls,
        capacity: int,
        host,
        width: int,
        device: str | torch.device = "cpu",
        head_pages: bool = False,
        **kw,
    ) -> DeviceTieredAttention:
        """A pool of `capacity` slots (plus `width` scratch slots) over `host`, and the attention.
        head_pages: a slot holds one kv head's page (capacity and width count head pages).
        pin_window (sink pages, local pages): pin each request's first and last pages (leases)."""
        nl, npg, p, hkv, d = host.k.shape
        dt = host.k.dtype
        placement = ("policy", "clock_window", "clock_impl", "quota", "quota_interval", "quota_smoothing")
        pool_kw = {k: kw.pop(k) for k in placement if k in kw}
        pool_kw["pin_lease"] = kw.get("pin_window") is not None
        keys, heads = (npg * hkv, 1) if head_pages else (npg, hkv)
        pool = DevicePagePool(
            capacity, nl, keys, p, heads, d, dt, device, host=host, scratch_slots=width,
            head_pages=head_pages,
            **pool_kw,
        )  # fmt: skip
        return cls(pool, width, **kw)

    @staticmethod
    def union_width(bs: int, hkv: int, max_selected: int, num_pages: int, head_pages: bool = False) -> int:
        """The most unique pages (head pages) one layer can select: the static M to size width with."""
        return max(1, min(bs * hkv * max_selected, num_pages * (hkv if head_pages else 1)))

    # ------------------------------------------------------------------ steps / stats
    def begin_step(self, prefetch_first: bool | str = False) -> None:
        """A new decode step; with prefetch_first, start layer 0's prefetch now: "previous-step" (or
        True) its previous-step union, "next-step" the margin union speculate(0) stored last step."""
        self.pool.new_step()
        self._pins_fresh = False  # the window pages are marked again by the step's first placement
        if prefetch_first in (True, "previous-step"):
            self.prefetch(0)
        elif prefetch_first == "next-step":
            self.prefetch(0, self.spec_union[0])

    def stats(self) -> dict[str, int]:
        """Counters since construction or reset (one host read)."""
        return dict(zip(COUNTER_NAMES, self.counters.tolist()))

    def reset(self) -> None:
        """Empty pool, zero clocks and counters, no prediction (benchmarks start each run here)."""
        pool = self.pool
        pool.invalidate(torch.arange(pool.num_pages, device=pool.device))
        clocks = (pool.tick, pool.step_start, pool.prev_step_start, pool.last_use, pool.counters)
        for t in (*clocks, self.counters):
            t.zero_()
        pool.fill_stamp.fill_(-1)  # the tick restarts: no row keeps a stamp a new call will reuse
        if pool.quota != "off":
            pool.reset_quotas()
        self.last_union.fill_(-1)
        self.spec_union.fill_(-1)

    def _pool_keys(self, pages: torch.Tensor) -> torch.Tensor:
        """Pool keys of host pages [any shape] (-1 or out of range -> -1): [n] pages, or with head
        slots [n, Hkv], every kv head's page h * NP + p."""
        pages = pages.reshape(-1).to(self.pool.device, torch.int64)
        ok = (pages >= 0) & (pages < self.host_pages)
        if not self.head_pages:
            return torch.where(ok, pages, -1)
        heads = torch.arange(self.hkv, device=pages.device) * self.host_pages
        return torch.where(ok[:, None], pages[:, None] + heads, -1)

    def invalidate_layer(self, layer: int, pages: torch.Tensor) -> None:
        """Drop pages [any shape] of `layer` from the pool (KV writes; graph-capturable). A pending
        prefetch of this layer is joined first: its placement writes the same slot state."""
        self._join(layer)
        self.pool.invalidate_layer(layer, self._pool_keys(pages))

    def write_through(
        self, layer: int, loc: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor
    ) -> None:
        """A KV write of `layer` applied to the pool too: token slots loc [n] (-1 allowed) now hold
        k_rows / v_rows [n, Hkv, D] (the values as stored in the host tier). Resident pages (every kv
        head's page with head slots) get the new rows in their slots and stay resident, so the page a
        decode step appends to is a hit at the next step instead of a refetch (--psa-write-through);
        rows of absent pages go to the sink slot, which nothing reads. Device ops, graph-capturable.
        A pending prefetch of this layer is joined first: it may have placed the written page."""
        self._join(layer)
        pool, p = self.pool, self.pool.k.shape[1]
        loc = loc.reshape(-1).to(pool.device, torch.int64)
        keys = self._pool_keys(loc // p)  # loc -1 -> page -1 -> key -1
        slots = pool.lookup(layer, keys.reshape(-1)).view(keys.shape).long()
        slots = torch.where(slots >= 0, slots, pool.capacity)
        off = loc % p
        if self.head_pages:  # slots [n, Hkv], rows [n, Hkv, 1, D] -> [n, Hkv, D]
            off = off[:, None].expand_as(slots)
            pool.k[slots, off, 0] = k_rows.to(pool.k.dtype)
            pool.v[slots, off, 0] = v_rows.to(pool.v.dtype)
        else:
            pool.k[slots, off] = k_rows.to(pool.k.dtype)
            pool.v[slots, off] = v_rows.to(pool.v.dtype)

    def fill(self, layer: int, loc: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor) -> None:
        """A prefill write of `layer` (token slots loc [n], -1 allowed; rows [n, Hkv, D] as stored in
        the host tier) placed in the pool too: every page whose P rows are all in loc gets a slot
        (write-allocate), then `write_through` puts the rows in the slots of all resident pages. New
        pages go in at low priority (clock: reference bit clear; lru: oldest use), so a prompt's pages
        that decode never selects are the first victims rather than other requests' working sets; a
        page that finds no slot is simply not placed. Partly written pages (a prompt's last page, a
        chunk boundary) are not placed: their other rows are only in the host tier. No host sync."""
        self._join(layer)
        pool, p = self.pool, self.pool.k.shape[1]
        loc = loc.reshape(-1).to(pool.device, torch.int64)
        page = torch.where(loc >= 0, loc // p, -1)
        ok = (page >= 0) & (page < self.host_pages)
        rows = torch.zeros(self.host_pages + 1, dtype=torch.int32, device=pool.device)  # entry NP: padding
        rows.index_add_(0, torch.where(ok, page, self.host_pages), torch.ones_like(page, dtype=torch.int32))
        whole = ok & (loc % p == 0) & (rows[page.clamp(0, self.host_pages)] == p)  # one entry per page
        keys = self._pool_keys(torch.where(whole, page, -1)).reshape(-1)
        keys = keys.sort(descending=True).values.to(torch.int32)  # valid keys first, -1 padding last
        pl = pool.place(layer, keys, demand=False)  # a quota follows what decode selects, not prompts
        pool.demote(torch.where(pl.fetch, pl.slots.long(), pool.capacity))  # the sink slot takes the rest
        self.counters[5] += pl.fetch.sum()
        self.write_through(layer, loc, k_rows, v_rows)

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, layer: int, pages: torch.Tensor | None = None) -> None:
        """Place and copy `pages` [width] (default: the previous step's union of `layer`) on the side
        stream; forward(layer) waits for it. Pages that find no slot are skipped."""
        if not 0 <= layer < self.pool.num_layers:
            return
        pages = self.last_union[layer] if pages is None else pages
        with self.on_side_stream(layer):  # after the pool state main has written so far
            self._prefetch_body(layer, pages)

    def speculate(self, layer: int, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                  page_idx: torch.Tensor, counts: torch.Tensor) -> None:  # fmt: skip
        """Store the union of a *predicted* selection of `layer` (page_idx [bs, Hkv, W], counts
        [bs, Hkv]) as its next-layer prediction; forward(layer - 1, prefetch_next="next-layer")
        prefetches it. Device ops only; own workspaces, so the exact union's state is untouched."""
        sel = (req_to_token, req_pool_indices, page_idx, counts, self.pool.k.shape[1])
        self._union_into(self._row(self.spec_union, layer, page_idx), sel, speculated=True)

    @contextlib.contextmanager
    def on_side_stream(self, layer: int, *inputs: torch.Tensor) -> Iterator[None]:
        """Run the block's device ops for `layer` (a prefetch, a speculative selection, a pool fill) on
        the side stream, after the current stream's work so far, so that they overlap the layer before
        it; forward(layer) joins them. `inputs` made on the current stream are kept alive until the side
        stream is done with them. Inline on the CPU."""
        if not self._cuda:
            yield
            return
        self.side.wait_stream(torch.cuda.current_stream(self.pool.device))
        for t in inputs:
            t.record_stream(self.side)
        with torch.cuda.stream(self.side):
            yield
            self._events[layer].record(self.side)
        self._pending.add(layer)

    def _prefetch_body(self, layer: int, pages: torch.Tensor) -> None:
        if self.pool.policy == "clock":  # one launch: place + the prefetched counter
            pl = self.pool.place(layer, pages, acc=self.counters, acc_mode=2, demand=False)
        else:
            pl = self.pool.place(layer, pages, demand=False)
            self.counters[4] += pl.fetch.sum()
        self._copy_misses(layer, pages, pl, self.prefetch_programs)

    def _copy_misses(self, layer: int, pages: torch.Tensor, pl: Placement, max_programs: int | None = None):
        """Copy what placement `pl` of pages [M] sends to the pool: clock's packed copy list as it is,
        else the copy (or fetch) mask over pages, compacted by the fetcher."""
        if pl.copy_keys is not None and self.fetcher.takes_lists:
            self.fetcher.copy_list(layer, pl.copy_keys, pl.copy_loc, pl.ncopy, max_programs=max_programs)
        elif pl.loc is not None:
            self.fetcher.copy(layer, pages, pl.loc, pl.copy, max_programs=max_programs)
        else:
            self.fetcher.copy(layer, pages, pl.slots, pl.fetch, max_programs=max_programs)

    def _join(self, layer: int) -> None:
        if layer in self._pending:
            torch.cuda.current_stream(self.pool.device).wait_event(self._events[layer])
            self._pending.discard(layer)

    # ------------------------------------------------------------------ forward
    def _place_fused(self, layer, req_to_token, req_pool_indices, seq_lens, page_idx, counts, prefetch_next,
                     copy):  # fmt: skip
        """Policy "clock": union, place and page table in three Triton launches (fused_place.py);
        the same union, scratch use, copies, counters and table as _place_torch. -> (table, placement)"""
        pool, p = self.pool, self.pool.k.shape[1]
        union = self._union_row(layer, page_idx)
        sel = (req_to_token, req_pool_indices, page_idx, counts, p)
        self._union_into(union, sel, speculated=False)
        pin = self._pins(union, req_to_token, req_pool_indices, seq_lens)
        pl = pool.place(layer, union, pin, scratch_base=self._scratch0, acc=self.counters, acc_mode=1)
        loc = self._fetch(layer, union, pl) if copy else pl.loc
        self._prefetch_after(layer, prefetch_next)
        if self.head_pages:
            return head_page_table(*sel, self.host_pages, self._pos_of, loc), pl
        return page_table(req_to_token, req_pool_indices, p, pool.num_pages, union, loc), pl

    def _pins(self, union, req_to_token, req_pool_indices, seq_lens) -> torch.Tensor | None:
        """pin [m] bool for union [m]: the entries that are one of some request's first `sink` or last
        `local` pages (pin_window; with head slots every kv head's copy of such a page), or None
        without pin_window. A page of the window is selected by every layer and head at every step, so
        its lease is renewed until it leaves the window. The window pages are the same at every layer of
        a step, so the step's first call marks them (a byte per host page, cleared whole: right whichever
        batch's graph ran before) and every call gathers. Fixed shapes, no host sync."""
        if self.pin_window is None:
            return None
        p, npg = self.pool.k.shape[1], self.host_pages
        if not self._pins_fresh:
            n = (seq_lens.to(union.device, torch.int64) + p - 1) // p  # pages of each request [bs]
            j = torch.where(self._pin_j >= 0, self._pin_j, n[:, None] + self._pin_j)  # [bs, sink + local]
            ok = (j >= 0) & (j < n[:, None])
            rows = req_pool_indices.to(union.device, torch.int64)[:, None].expand_as(j)
            tok = req_to_token[rows, torch.where(ok, j, 0) * p].long()
            self._pin_mark.zero_()
            self._pin_mark.index_fill_(0, torch.where(ok & (tok >= 0), tok // p, npg).reshape(-1), 1)
            self._pins_fresh = True
        valid = union >= 0
        key = union.long().remainder(npg) if self.head_pages else union.long()
        return valid & (self._pin_mark[torch.where(valid, key, npg)] != 0)

    def _fetch(self, layer: int, union: torch.Tensor, pl: Placement) -> torch.Tensor:
        """The pages placement `pl` of union [M] sends to the pool (pl.copy: misses, into their slot or
        scratch row pl.loc) reach it; returns the loc the page table is built from. miss_path "pool":
        one copy before attention. "split": the same copy on the side stream, joined by forward before
        its second pass (the first attends the resident pages beside it). "host": attention reads the
        missed pages straight from the host tier (their loc becomes host_base + host page), while the
        ones that got a slot are copied into the pool on the side stream for later steps (joined by the
        next layer's forward, the last layer's own)."""
        if self.miss_path == "pool":
            self._copy_misses(layer, union, pl)
            return pl.loc
        if self.miss_path == "split":
            lists = () if pl.copy_keys is None else (pl.copy_keys, pl.copy_loc, pl.ncopy)
            with self.on_side_stream(layer, union, pl.loc, pl.copy, *lists):
                self._copy_misses(layer, union, pl, self.prefetch_programs)
            return pl.loc
        slotted = pl.fetch  # the misses that got a pool slot (the rest overflowed to scratch)
        host_page = union.remainder(self.host_pages) if self.head_pages else union
        table_loc = torch.where(pl.copy, self._host_base + host_page, pl.loc).to(pl.loc.dtype)
        with self.on_side_stream(min(layer + 1, self.pool.num_layers - 1), union, pl.loc, slotted):
            # the prefetch's small grid, which leaves SMs to the layer it overlaps
            self.fetcher.copy(layer, union, pl.loc, slotted, max_programs=self.prefetch_programs)
        return table_loc

    def _union_into(self, out: torch.Tensor, sel: tuple, speculated: bool) -> None:
        """The selection's union (Triton) into out [m]: head pages in any order, or pages ascending;
        -1 padded. Exact and speculated unions use their own workspaces."""
        if self.head_pages:
            ws = (self._spec_owner, self._spec_pos_of) if speculated else (self._owner, self._pos_of)
            count = self._spec_count if speculated else self._count
            union_head_pages(*sel, self.host_pages, *ws, out, count)
        else:
            bitmap = self._spec_bitmap if speculated else self.pool.union_bitmap
            union_selected(*sel, self.pool.num_pages, out.shape[0], bitmap, out=out)

    def _row(self, rows: torch.Tensor, layer: int, page_idx: torch.Tensor) -> torch.Tensor:
        """The first m = min(width, bs x Hkv x W) entries of rows[layer] (static per batch shape, so a
        small batch does not pay for the widest one); the rest is cleared so no stale entry is read
        as a prediction."""
        bs, hkv, w = page_idx.shape
        m = min(self.width, bs * hkv * w)
        if m < self.width:
            rows[layer, m:].fill_(-1)
        return rows[layer, :m]

    def _union_row(self, layer: int, page_idx: torch.Tensor) -> torch.Tensor:
        """This call's union buffer, the layer's row of last_union (see _row). The layer's pending
        prefetch is joined first: the row it read as its prediction is overwritten here."""
        self._join(layer)
        return self._row(self.last_union, layer, page_idx)

    def _prefetch_after(self, layer: int, prefetch_next: bool | str) -> None:
        """After layer's placement: prefetch layer + 1's predicted union (see the module docstring)."""
        if prefetch_next in (False, None, "off"):
            return
        if prefetch_next in (True, "previous-step"):
            self.prefetch(layer + 1)
        elif prefetch_next in ("next-layer", "next-step"):
            if layer + 1 < self.pool.num_layers:
                self.prefetch(layer + 1, self.spec_union[layer + 1])
        else:
            raise ValueError(
                f"prefetch_next must be off, previous-step, next-layer or next-step, got {prefetch_next!r}"
            )

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        page_idx: torch.Tensor,
        counts: torch.Tensor,
        sm_scale: float,
        prefetch_next: bool | str = False,
        copy: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of `layer` over the selected pages, served from the pool (module docstring).

        prefetch_next: after placing this layer, prefetch layer + 1 on the side stream: "previous-step"
        (or True) its previous-step union, "next-layer" / "next-step" the union speculate(layer + 1)
        stored (this step / the previous step).
        copy=False skips the host copies (wrong output; benchmarks use it to time the rest).
        """
        pool, p = self.pool, self.pool.k.shape[1]
        args = (req_to_token, req_pool_indices, seq_lens, page_idx, counts, prefetch_next, copy)
        place = self._place_fused if pool.policy == "clock" else self._place_torch
        table, pl = place(layer, *args)
        k_rows, v_rows = pool.k.view(-1, *pool.k.shape[2:]), pool.v.view(-1, *pool.v.shape[2:])
        if self.head_pages:  # one head per slot, read by every kv head through its own table
            k_rows, v_rows = (t.expand(-1, self.hkv, -1) for t in (k_rows, v_rows))
        host = {}
        if self.miss_path == "host" and copy:  # misses are read where they are: the host tier's rows
            hk, hv = pool.host.k[layer], pool.host.v[layer]
            host = {"host_k": hk.view(-1, *hk.shape[2:]), "host_v": hv.view(-1, *hv.shape[2:]),
                    "host_base": self._host_base}  # fmt: skip
        kv = (q, k_rows, v_rows, req_to_token, req_pool_indices, seq_lens)
        if self.miss_path == "split" and copy:  # resident pages now, the copied ones after the join
            rest_idx, rest_cnt, fresh_idx, fresh_cnt = split_selection(
                page_idx, counts, table, pool.fill_stamp, pl.stamp
            )
            first = self.attend(*kv, rest_idx, rest_cnt, p, sm_scale, page_table=table,
                                out=torch.empty(q.shape, dtype=torch.float32, device=q.device))  # fmt: skip
            self._join(layer)
            return self.attend(*kv, fresh_idx, fresh_cnt, p, sm_scale, page_table=table, merge_with=first)
        out = self.attend(*kv, page_idx, counts, p, sm_scale, page_table=table, **host)
        if layer + 1 == pool.num_layers:
            self._join(layer)  # the last layer's side-stream copy (miss_path "host") ends with the step
        return out

    def _place_torch(self, layer, req_to_token, req_pool_indices, seq_lens, page_idx, counts, prefetch_next,
                     copy):  # fmt: skip
        """Policy "lru": union, place, copies and page table [bs, N] int32 as torch ops. -> (table, pl)"""
        pool, p = self.pool, self.pool.k.shape[1]
        dev = page_idx.device
        # physical page of each logical page [bs, N] (N static: the table's width) and of each entry
        phys, sel = selected_physical_pages(req_to_token, req_pool_indices, page_idx, p)
        if self.head_pages:  # keys h * NP + page; the table is per kv head
            heads = torch.arange(self.hkv, device=dev)[None, :, None] * self.host_pages
            sel = sel.clamp(0, self.host_pages - 1) + heads
            phys = phys[:, None, :].clamp(0, self.host_pages - 1) + heads  # [bs, Hkv, N]
        union = self._union_row(layer, page_idx)
        union.copy_(union_pages(sel, counts, pool.num_pages, union.shape[0]))  # [m] int32
        stamp = pool.tick.reshape(1).clone()  # before place: every call with a miss advances the tick
        pl = pool.place(layer, union, self._pins(union, req_to_token, req_pool_indices, seq_lens))
        valid = union >= 0
        over = valid & ~pl.hit & ~pl.fetch
        scratch = self._scratch0 + torch.cumsum(over.long(), 0) - 1
        pl.loc = torch.where(over, scratch, pl.slots.long()).to(torch.int32)  # slot or scratch, -1 padding
        pl.copy = pl.fetch | over
        if copy and self.miss_path == "split":  # the stamps split_selection reads, as clock_place's
            pl.stamp = stamp
            rows = torch.where(pl.copy, pl.loc.long(), pool.capacity)  # the sink slot takes the rest
            pool.fill_stamp.index_put_((rows,), stamp.expand(rows.shape[0]))
        loc = self._fetch(layer, union, pl) if copy else pl.loc
        self.counters[:4] += torch.stack([valid.sum(), pl.hit.sum(), pl.fetch.sum(), over.sum()])
        self._prefetch_after(layer, prefetch_next)
        # page table: logical page -> slot, through a map over physical pages (entry NP: padding)
        where = torch.zeros(pool.num_pages + 1, dtype=torch.int32, device=dev)
        where[torch.where(valid, union.long(), pool.num_pages)] = loc.clamp(min=0).to(torch.int32)
        return where[phys.clamp(0, pool.num_pages - 1)].contiguous(), pl
