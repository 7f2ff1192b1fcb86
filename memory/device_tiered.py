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

Overlap (`prefetch`): layer l+1's pages are unknown until its query exists, so after layer l's
placement `prefetch(l + 1)` places and copies the previous step's union of layer l+1 on a side CUDA
stream while layer l attends; `forward(l + 1)` makes the current stream wait on that stream's event,
then places the exact union: predicted pages are hits, the rest are fetched synchronously. Prefetch
never uses the scratch (a predicted page that finds no slot is skipped). Every `prefetch(l)` must be
followed by `forward(l)` in the same step (in a graph capture, the side stream joins there). On the
CPU prefetch runs inline.

Shapes and dtypes:
    q [bs, Hq, D]; req_to_token [max_reqs, max_context] int32; req_pool_indices, seq_lens [bs] int
    page_idx [bs, Hkv, W] int32 selected logical pages ([:count], -1 after), counts [bs, Hkv] int32
    -> out [bs, Hq, D] q.dtype, lse [bs, Hq] float32
Counters (`counters` [5] int64 on the device, `stats()` reads them): pages needed (union sizes),
hits at the exact placement (prefetched pages included), pages fetched synchronously into slots,
overflow pages (fetched into scratch), pages prefetched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sglang_psa.kernels import sparse_decode

from .device_pool import DevicePagePool, union_pages
from .fused_place import page_table, union_selected
from .hot_pool import HostTier
from .uva_fetch import PageFetcher

COUNTER_NAMES = ("needed", "hits", "fetched", "overflow", "prefetched")


class DeviceTieredAttention:
    """One layer's tiered decode attention on the device (see the module docstring)."""

    def __init__(
        self,
        pool: DevicePagePool,
        width: int,
        attend: Callable = sparse_decode,
        **fetch_kw,
    ):
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        if pool.scratch_slots < width:
            raise ValueError(f"pool needs scratch_slots >= width ({width}), has {pool.scratch_slots}")
        self.pool, self.width, self.attend = pool, width, attend
        self.fetcher = PageFetcher(pool.host, pool.k, pool.v, sink_slot=pool.capacity, **fetch_kw)
        dev = pool.device
        self.counters = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64, device=dev)
        # previous step's union per layer: the prediction prefetch() uses
        self.last_union = torch.full((pool.num_layers, width), -1, dtype=torch.int32, device=dev)
        self._cuda = dev.type == "cuda"
        self.side = torch.cuda.Stream(device=dev) if self._cuda else None
        self._events = [torch.cuda.Event() for _ in range(pool.num_layers)] if self._cuda else []
        self._pending: set[int] = set()
        self._scratch0 = pool.capacity + 1

    @classmethod
    def build(
        cls, capacity: int, host, width: int, device: str | torch.device = "cpu", **kw
    ) -> DeviceTieredAttention:
        """A pool of `capacity` slots (plus `width` scratch slots) over `host`, and the attention."""
        nl, npg, p, hkv, d = host.k.shape
        dt = host.k.dtype
        pool_kw = {k: kw.pop(k) for k in ("policy", "clock_window", "clock_impl") if k in kw}  # placement
        pool = DevicePagePool(
            capacity, nl, npg, p, hkv, d, dt, device, host=host, scratch_slots=width, **pool_kw
        )
        return cls(pool, width, **kw)

    @staticmethod
    def union_width(bs: int, hkv: int, max_selected: int, num_pages: int) -> int:
        """The most unique pages one layer can select: the static M to size width with."""
        return max(1, min(bs * hkv * max_selected, num_pages))

    # ------------------------------------------------------------------ steps / stats
    def begin_step(self, prefetch_first: bool = False) -> None:
        """A new decode step; with prefetch_first, start layer 0's prefetch now."""
        self.pool.new_step()
        if prefetch_first:
            self.prefetch(0)

    def stats(self) -> dict[str, int]:
        """Counters since construction or reset (one host read)."""
        return dict(zip(COUNTER_NAMES, self.counters.tolist()))

    def reset(self) -> None:
        """Empty pool, zero clocks and counters, no prediction (benchmarks start each run here)."""
        pool = self.pool
        pool.invalidate(torch.arange(pool.num_pages, device=pool.device))
        for t in (pool.tick, pool.step_start, pool.last_use, pool.counters, self.counters):
            t.zero_()
        self.last_union.fill_(-1)

    def invalidate_layer(self, layer: int, pages: torch.Tensor) -> None:
        """Drop pages [any shape] of `layer` from the pool (KV writes; graph-capturable). A pending
        prefetch of this layer is joined first: its placement writes the same slot state."""
        self._join(layer)
        self.pool.invalidate_layer(layer, pages)

    # ------------------------------------------------------------------ prefetch
    def prefetch(self, layer: int, pages: torch.Tensor | None = None) -> None:
        """Place and copy `pages` [width] (default: the previous step's union of `layer`) on the side
        stream; forward(layer) waits for it. Pages that find no slot are skipped."""
        if not 0 <= layer < self.pool.num_layers:
            return
        pages = self.last_union[layer] if pages is None else pages
        if not self._cuda:
            self._prefetch_body(layer, pages)
            return
        main = torch.cuda.current_stream(self.pool.device)
        self.side.wait_stream(main)  # the pool state written by main so far comes first
        with torch.cuda.stream(self.side):
            self._prefetch_body(layer, pages)
            self._events[layer].record(self.side)
        self._pending.add(layer)

    def _prefetch_body(self, layer: int, pages: torch.Tensor) -> None:
        if self.pool.policy == "clock":  # one launch: place + the prefetched counter
            pl = self.pool.place(layer, pages, acc=self.counters, acc_mode=2)
            self.fetcher.copy(layer, pages, pl.slots, pl.fetch)
            return
        pl = self.pool.place(layer, pages)
        self.fetcher.copy(layer, pages, pl.slots, pl.fetch)
        self.counters[4] += pl.fetch.sum()

    def _join(self, layer: int) -> None:
        if layer in self._pending:
            torch.cuda.current_stream(self.pool.device).wait_event(self._events[layer])
            self._pending.discard(layer)

    # ------------------------------------------------------------------ forward
    def _place_fused(self, layer, req_to_token, req_pool_indices, page_idx, counts, prefetch_next, copy):
        """Policy "clock": union, place and page table in three Triton launches (fused_place.py);
        the same union, scratch use, copies, counters and table as _place_torch."""
        pool, p = self.pool, self.pool.k.shape[1]
        union = self._union_row(layer, page_idx)
        union_selected(req_to_token, req_pool_indices, page_idx, counts, p, pool.num_pages, union.shape[0],
                       pool.union_bitmap, out=union)  # fmt: skip
        pl = pool.place(layer, union, scratch_base=self._scratch0, acc=self.counters, acc_mode=1)
        if copy:
            self.fetcher.copy(layer, union, pl.loc, pl.copy)
        if prefetch_next:
            self.prefetch(layer + 1)
        return page_table(req_to_token, req_pool_indices, p, pool.num_pages, union, pl.loc)

    def _union_row(self, layer: int, page_idx: torch.Tensor) -> torch.Tensor:
        """This call's union buffer: the first m = min(width, rows x Hkv x W) entries of the layer's
        row (static per batch shape, so a small batch does not pay for the widest one); the rest of
        the row is cleared so the next step's prefetch reads no stale prediction. The layer's pending
        prefetch is joined first: the row it read as its prediction is overwritten here."""
        self._join(layer)
        bs, hkv, w = page_idx.shape
        m = min(self.width, bs * hkv * w)
        if m < self.width:
            self.last_union[layer, m:].fill_(-1)
        return self.last_union[layer, :m]

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
        prefetch_next: bool = False,
        copy: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of `layer` over the selected pages, served from the pool (module docstring).

        prefetch_next: after placing this layer, prefetch layer + 1 on the side stream.
        copy=False skips the host copies (wrong output; benchmarks use it to time the rest).
        """
        pool, p = self.pool, self.pool.k.shape[1]
        args = (req_to_token, req_pool_indices, page_idx, counts, prefetch_next, copy)
        table = self._place_fused(layer, *args) if pool.policy == "clock" else self._place_torch(layer, *args)
        k_rows, v_rows = pool.k.view(-1, *pool.k.shape[2:]), pool.v.view(-1, *pool.v.shape[2:])
        return self.attend(q, k_rows, v_rows, req_to_token, req_pool_indices, seq_lens, page_idx, counts, p,
                           sm_scale, page_table=table)  # fmt: skip

    def _place_torch(self, layer, req_to_token, req_pool_indices, page_idx, counts, prefetch_next, copy):
        """Policy "lru": union, place, copies and page table [bs, N] int32 as torch ops."""
        pool, p = self.pool, self.pool.k.shape[1]
        dev = page_idx.device
        bs, hkv, w = page_idx.shape
        # physical page of each logical page: [bs, N], N static (the table's width)
        phys = (req_to_token[req_pool_indices.long()][:, ::p].long() // p).to(dev)
        n = phys.shape[1]
        sel = torch.gather(phys[:, None, :].expand(bs, hkv, n), 2, page_idx.long().clamp(0, n - 1))
        union = self._union_row(layer, page_idx)
        union.copy_(union_pages(sel, counts, pool.num_pages, union.shape[0]))  # [m] int32
        pl = pool.place(layer, union)
        valid = union >= 0
        over = valid & ~pl.hit & ~pl.fetch
        scratch = self._scratch0 + torch.cumsum(over.long(), 0) - 1
        loc = torch.where(over, scratch, pl.slots.long())  # [M] slot or scratch slot, -1 padding
        if copy:
            self.fetcher.copy(layer, union, loc, pl.fetch | over)
        self.counters[:4] += torch.stack([valid.sum(), pl.hit.sum(), pl.fetch.sum(), over.sum()])
        if prefetch_next:
            self.prefetch(layer + 1)
        # page table: logical page -> slot, through a map over physical pages (entry NP: padding)
        where = torch.zeros(pool.num_pages + 1, dtype=torch.int32, device=dev)
        where[torch.where(valid, union.long(), pool.num_pages)] = loc.clamp(min=0).to(torch.int32)
        return where[phys.clamp(0, pool.num_pages - 1)].contiguous()


class PerHeadTieredAttention:
    """Tiered decode with one pool per kv head: a slot holds one head's page (P x D), not all heads'.

    A layer's kv heads select different pages; a slot of all heads (DeviceTieredAttention over the
    whole tier) makes every miss move Hkv heads of which one or a few are read (~6x the bytes
    attention needs with dummy weights on the H100, docs/TIERED.md). Here kv head h has its own
    DeviceTieredAttention over the head-h slice of the host tier (the Triton copy reads the strided
    slice in place) with capacity // Hkv slots, its own union, placement, copies and page table, and
    attention runs per head group. Hkv times the launches per layer (they stay small and graph
    captured), 1 / Hkv of the bytes per miss; each head's quota is a fixed 1 / Hkv of the pool.

    Same interface as DeviceTieredAttention (begin_step, forward, stats, reset, invalidate_layer).
    """

    def __init__(self, heads: list[DeviceTieredAttention]):
        self.heads = heads

    @classmethod
    def build(cls, capacity: int, host, width: int, device: str | torch.device = "cpu", **kw):
        """capacity: slots over all heads (each head gets capacity // Hkv); width: one head's union width."""
        hkv = host.k.shape[3]
        out = []
        for h in range(hkv):
            view = HostTier.wrap(host.k[:, :, :, h : h + 1], host.v[:, :, :, h : h + 1])
            out.append(DeviceTieredAttention.build(capacity // hkv, view, width, device, **kw))
        return cls(out)

    @property
    def counters(self) -> torch.Tensor:
        return torch.stack([t.counters for t in self.heads]).sum(0)

    def stats(self) -> dict[str, int]:
        return dict(zip(COUNTER_NAMES, self.counters.tolist()))

    def begin_step(self, prefetch_first: bool = False) -> None:
        for t in self.heads:
            t.begin_step(prefetch_first)

    def reset(self) -> None:
        for t in self.heads:
            t.reset()

    def invalidate_layer(self, layer: int, pages: torch.Tensor) -> None:
        for t in self.heads:
            t.invalidate_layer(layer, pages)

    def forward(self, layer, q, req_to_token, req_pool_indices, seq_lens, page_idx, counts, sm_scale,
                prefetch_next: bool = False, copy: bool = True):  # fmt: skip
        """DeviceTieredAttention.forward, head by head (q [bs, Hq, D] -> out [bs, Hq, D], lse [bs, Hq])."""
        hkv = len(self.heads)
        g = q.shape[1] // hkv
        outs, lses = [], []
        for h, t in enumerate(self.heads):
            o, lse = t.forward(
                layer, q[:, h * g : (h + 1) * g].contiguous(), req_to_token, req_pool_indices, seq_lens,
                page_idx[:, h : h + 1], counts[:, h : h + 1].contiguous(), sm_scale, prefetch_next, copy,
            )  # fmt: skip
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, 1), torch.cat(lses, 1)
