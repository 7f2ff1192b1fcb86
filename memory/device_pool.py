"""The hot-page pool's map and victim choice on the device: no host sync, fixed shapes.

`HotPagePool` (hot_pool.py) keeps its LRU bookkeeping in numpy, so every fetch reads the requested
page ids on the host: one sync per layer, which keeps tiered decode out of CUDA graphs. This module
holds the same state as device tensors and places a layer's pages with a fixed sequence of tensor
ops (gather, top-k, cumsum, scatter), so a decode step that calls it can be captured.

Policy "lru" (the default): `HotPagePool` without quotas and with `protect_calls=None` (the
access-pattern study found one shared LRU pool better than per-layer quotas on every real source),
i.e. for the misses of one call, in ascending page order: free slots lowest index first, then
evictable slots least recently used first (ties by slot index); a slot is evictable unless pinned or
used since `new_step()`.
Pins (`place(..., pin)`) are sticky by default: a pinned slot stays until `unpin` or invalidation
(HotPagePool's pins). With `pin_lease=True` a pin is a lease that each use renews: a use sets the
slot's pin to that call's flag, and a pin protects the slot only while its last use is no older than
the previous step (last_use >= prev_step_start). Tiered decode pins the sink and local-window pages
this way: a page that leaves the window, or whose request finished, stops being protected one step
later with no unpin call (which no captured decode step could make for a request that is gone).
Misses left without a slot overflow (slot -1): the caller reads them from the host tier. With the
same calls both pools make identical choices (tests/test_device_pool.py checks the slot tables).
It costs dozens of small torch ops per call (a top-k over the whole capacity among them).

Per-layer quotas (`quota="adaptive"`, clock only; PSA's unified memory management): layer l's
quota is floor(C x s_l / sum(s)), s_l an exponential average (weight `quota_smoothing` on the newest
step) of the pages layer l placed per decode step, re-derived every `quota_interval` steps in
`new_step` on the device (equal quotas until then). Quotas bound eviction, not admission
(HotPagePool's quota policy): a layer borrows free slots beyond its quota; a call's misses evict
first the slots of layers over their quota (at most each layer's excess) and, for the misses that take
the layer itself past its quota, its own slots; only when the window holds no such victim does a miss
take any other evictable slot (fused_place.py gives the scan order; the search for allowed victims
ends past `quota_span` x misses slots once other victims suffice). Replays of recorded selections
through this pool gain 0 to 0.036 hit rate with quotas in seven rows of eight and lose 0.03 in one
(docs/TIERED.md); "off" is the default.

Policy "clock": CLOCK / second chance (reference bits and a hand, victims from a window of
`clock_window` x M slots after the hand; memory/fused_place.py describes it), one Triton launch per
call, no global sort. It is not HotPagePool's LRU, so it can overflow where LRU would not (only
when the window holds no eligible slot). "lru" stays the default until a GPU run shows clock is
faster (scripts/bench_tiered.py --placement lru,clock).

State (device, C = capacity, L layers, P pages per layer):
    slot_of     [L * P + 1] int32   slot of (layer, page) at layer * P + page, -1 = absent; the
                                    last entry is a write sink for masked-out lanes (kept at -1)
    k, v        [C + 1 + S, P, Hkv, D]  page slots; row C is the sink, rows C+1.. are S scratch slots
                                    (`scratch_slots`, never in the map: device_tiered.py's overflow)
    slot_layer, slot_page [C + 1] int64   reverse map (-1 = free); entry C is the sink
    last_use    [C + 1] int64       LRU tick of the last call that used the slot
    pinned      [C + 1] bool        sink / local-window pages, never evicted (leases: see above)
    tick, step_start  [] int64      call-order clock and its value at new_step()
    prev_step_start   [] int64      step_start of the step before (lease pins expire past it)
    counters    [4] int64           hits, misses, evictions, overflow pages (read when convenient)
    ref         [C + 1] int8        clock only: reference bits
    hand        [] int64            clock only: the hand (next slot to examine)
    layer_used  [L + 1] int64       quota only: slots held per layer (entry L absorbs masked lanes)
    layer_quota [L] int64           quota only: slots each layer may hold before it evicts its own
    layer_demand [L] int64          quota only: pages each layer placed in the current step
    demand_ema  [L] float32, quota_steps [] int64   quota only: the average and the steps seen

Inputs are `pages [M] int32`: one layer's pages, ascending and unique, padded with -1 at the end
(`union_pages` builds that from a selection). M is static; the count of valid pages is not.
Fetching the misses' K/V (`fetch_ref`) is plain tensor indexing between tensors on one device; on
a GPU with the host tier in pinned memory it needs a kernel that reads host memory over UVA (as
SGLang's HiSparse does), which is not written yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fused_place import clock_place, clock_place_ref
from .hot_pool import HostTier

_BIG = 2**62  # key of slots that cannot be evicted
QUOTA_MODES = ("off", "adaptive")


@dataclass
class Placement:
    """Result of `DevicePagePool.place` for pages [M] (all [M], on the pool's device).

    slots: the slot holding each page after the call, -1 for padding and overflow.
    fetch: the page got a new slot and its K/V must be copied from the host tier.
    hit:   the page was resident before the call.

    loc, copy (clock only): loc = slots with overflow pages at scratch_base + overflow rank when
    place() got a scratch_base, copy = fetch | overflow then (else loc = slots, copy = fetch).
    copy_keys, copy_loc, ncopy, stamp (clock only): the pages with copy set and their loc, packed in
    page order ([M] int32, valid below ncopy [1] int32; what the copy kernel reads with no compaction),
    and the call's stamp [1] int64, which the pool's fill_stamp holds at every copied loc.
    """

    slots: torch.Tensor
    fetch: torch.Tensor
    hit: torch.Tensor
    loc: torch.Tensor | None = None
    copy: torch.Tensor | None = None
    copy_keys: torch.Tensor | None = None
    copy_loc: torch.Tensor | None = None
    ncopy: torch.Tensor | None = None
    stamp: torch.Tensor | None = None


def union_pages(page_idx: torch.Tensor, counts: torch.Tensor, num_pages: int, width: int) -> torch.Tensor:
    """Pages selected by any row, ascending and unique, -1 padded: [width] int32 (fixed shape).

    page_idx [..., W] int (valid in [:count]), counts [...]. Pages past `width` unique ones are
    dropped (size width to the most a layer can select: rows x W, or the page count).
    """
    dev = page_idx.device
    keep = torch.arange(page_idx.shape[-1], device=dev) < counts[..., None]
    ids = torch.where(keep, page_idx.long().clamp(0, num_pages - 1), num_pages).reshape(-1)
    mask = torch.zeros(num_pages + 1, dtype=torch.bool, device=dev)
    mask.index_fill_(0, ids, True)  # index_fill_: a scalar fill needs no host tensor (graph capture)
    mask[num_pages:].fill_(False)
    pages = torch.where(mask[:num_pages], torch.arange(num_pages, device=dev), num_pages)
    pages = torch.sort(pages).values
    if width > num_pages:
        pages = torch.cat([pages, pages.new_full((width - num_pages,), num_pages)])
    pages = pages[:width]
    return torch.where(pages < num_pages, pages, -1).to(torch.int32)


class DevicePagePool:
    """Page slots of K and V shared by all layers, with the map and LRU state on the device."""

    def __init__(
        self,
        capacity: int,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        host: HostTier | None = None,
        scratch_slots: int = 0,
        policy: str = "lru",
        clock_window: int = 4,
        clock_impl: str = "triton",
        head_pages: bool = False,
        pin_lease: bool = False,
        quota: str = "off",
        quota_interval: int = 8,
        quota_smoothing: float = 0.5,
        quota_span: int = 16,
    ):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if policy not in ("lru", "clock") or clock_impl not in ("triton", "torch") or clock_window < 1:
            raise ValueError(f"bad policy {policy!r}, clock_impl {clock_impl!r} or window {clock_window}")
        if quota not in QUOTA_MODES:
            raise ValueError(f"quota must be one of {', '.join(QUOTA_MODES)}, got {quota!r}")
        if quota != "off" and policy != "clock":
            raise ValueError(f"quota {quota!r} needs policy 'clock', got {policy!r}")
        if quota_interval < 1 or not 0.0 < quota_smoothing <= 1.0 or quota_span < 1:
            raise ValueError(
                f"need quota_interval >= 1, smoothing in (0, 1], span >= 1: {quota_interval}, "
                f"{quota_smoothing}, {quota_span}"
            )
        self.quota, self.quota_interval, self.quota_smoothing = quota, quota_interval, quota_smoothing
        # the scan looks for allowed victims over at most quota_span x misses slots once fallback
        # victims suffice (fused_place.py): a bound on the sequential scan's cost
        self.quota_span = quota_span
        # clock_impl "torch": the readable reference (host loops; tests compare the two)
        self.policy, self.clock_window, self.clock_impl = policy, clock_window, clock_impl
        self.capacity, self.num_layers, self.num_pages = capacity, num_layers, num_pages
        self.device = torch.device(device)
        # head_pages: a slot holds one kv head's page; "page" p of the pool is head p // NP of host
        # page p % NP (num_pages = Hkv x the host's NP, num_kv_heads 1)
        self.head_pages = head_pages
        self.pin_lease = pin_lease
        if head_pages:
            if host is None or num_kv_heads != 1 or host.k.shape[3] * host.k.shape[1] != num_pages:
                raise ValueError(
                    "head_pages: pass the host tier, num_kv_heads 1, num_pages = Hkv x host pages"
                )
            hl, _, hp, _, hd = host.k.shape
            if (hl, hp, hd, host.k.dtype) != (num_layers, page_size, head_dim, dtype):
                raise ValueError(f"host tier shape {tuple(host.k.shape)} does not match the pool")
            self.host = host
        else:
            self.host = HostTier.for_pool(
                host, num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype
            )
        # slot C: sink for masked copies; slots C+1 .. C+scratch_slots: scratch outside the map (the
        # tiered path stages overflow pages there, so one page table covers pool and scratch)
        self.scratch_slots = scratch_slots
        shape = (capacity + 1 + scratch_slots, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        dev = self.device
        self._sink_key = num_layers * num_pages
        self.slot_of = torch.full((self._sink_key + 1,), -1, dtype=torch.int32, device=dev)
        self.slot_layer = torch.full((capacity + 1,), -1, dtype=torch.int64, device=dev)
        self.slot_page = torch.full((capacity + 1,), -1, dtype=torch.int64, device=dev)
        self.last_use = torch.zeros(capacity + 1, dtype=torch.int64, device=dev)
        self.pinned = torch.zeros(capacity + 1, dtype=torch.bool, device=dev)
        self.tick = torch.zeros((), dtype=torch.int64, device=dev)
        self.step_start = torch.zeros((), dtype=torch.int64, device=dev)
        self.prev_step_start = torch.zeros((), dtype=torch.int64, device=dev)
        # a pin protects a slot while last_use >= pin_floor: always for sticky pins (floor 0), for
        # leases while the slot was used in this step or the one before
        self.pin_floor = self.prev_step_start if pin_lease else torch.zeros((), dtype=torch.int64, device=dev)
        self.counters = torch.zeros(4, dtype=torch.int64, device=dev)  # hits, misses, evictions, overflow
        self._slot_idx = torch.arange(capacity, device=dev)
        # fill_stamp[row]: stamp of the last placement that sent a copy to that slot or scratch row (the
        # clock kernels; the tiered lru path writes it itself). The split miss path tells a call's fresh
        # rows by it: those always carry the call's stamp; a resident row with a stale equal stamp only
        # moves to the second pass, which still attends it exactly
        self.fill_stamp = torch.full((capacity + 1 + scratch_slots,), -1, dtype=torch.int64, device=dev)
        if policy == "clock":
            self.ref = torch.zeros(capacity + 1, dtype=torch.int8, device=dev)
            self.hand = torch.zeros((), dtype=torch.int64, device=dev)
            # all-zero workspace of fused_place.union_selected (the tiered path's union)
            self.union_bitmap = torch.zeros(num_pages, dtype=torch.int8, device=dev)
        if quota != "off":
            self.layer_used = torch.zeros(num_layers + 1, dtype=torch.int64, device=dev)
            self.layer_quota = torch.zeros(num_layers, dtype=torch.int64, device=dev)
            self.layer_demand = torch.zeros(num_layers, dtype=torch.int64, device=dev)
            self.demand_ema = torch.zeros(num_layers, dtype=torch.float32, device=dev)
            self.quota_steps = torch.zeros((), dtype=torch.int64, device=dev)
            self._lane_of = torch.zeros(capacity + 1, dtype=torch.int64, device=dev)  # _free_keys' workspace
            self.reset_quotas()

    # ------------------------------------------------------------------ reads
    def table(self) -> torch.Tensor:
        """slot_of as [L, P] (a view; -1 = absent)."""
        return self.slot_of[: self._sink_key].view(self.num_layers, self.num_pages)

    def lookup(self, layer: int, pages: torch.Tensor) -> torch.Tensor:
        """pages [M] int (-1 allowed) -> slots [M] int32, -1 where absent."""
        return self.slot_of[self._keys(layer, pages)]

    def stats(self) -> dict[str, int]:
        """Counters since construction (one host read)."""
        return dict(zip(("hits", "misses", "evictions", "overflow"), self.counters.tolist()))

    # ------------------------------------------------------------------ step / place
    def new_step(self) -> None:
        """Pages used from now on are protected from eviction until the next new_step() (pinned ones,
        with pin_lease, until the one after). With quotas: fold the step's demand into the average."""
        self.prev_step_start.copy_(self.step_start)
        self.step_start.copy_(self.tick)
        if self.quota != "off":
            self._update_quotas()

    def quotas(self) -> list[int] | None:
        """Per-layer quotas in slots (one host read; None without quotas)."""
        return None if self.quota == "off" else self.layer_quota.tolist()

    def reset_quotas(self) -> None:
        """Equal quotas, no demand history (construction, and benchmarks restarting a run)."""
        self.layer_quota.fill_(self.capacity // self.num_layers)
        for t in (self.layer_demand, self.demand_ema, self.quota_steps):
            t.zero_()

    def _update_quotas(self) -> None:
        """Device ops, no host read (new_step runs inside the captured decode step): a step with any
        demand updates the average; every quota_interval such steps the quotas follow it."""
        d = self.layer_demand.to(torch.float32)
        s = self.quota_smoothing
        have = d.sum() > 0
        ema = torch.where(self.quota_steps == 0, d, s * d + (1.0 - s) * self.demand_ema)
        self.demand_ema.copy_(torch.where(have, ema, self.demand_ema))
        self.quota_steps.add_(have.long())
        total = self.demand_ema.sum()
        due = have & (self.quota_steps % self.quota_interval == 0) & (total > 0)
        share = torch.floor(self.capacity * self.demand_ema / total.clamp(min=1e-9) + 1e-6).long()
        self.layer_quota.copy_(torch.where(due, share, self.layer_quota))
        self.layer_demand.zero_()

    def place(
        self,
        layer: int,
        pages: torch.Tensor,
        pin: torch.Tensor | None = None,
        scratch_base: int = -1,
        acc: torch.Tensor | None = None,
        acc_mode: int = 0,
        demand: bool = True,
    ) -> Placement:
        """Touch the resident pages, give the missing ones slots (evicting by the policy), update maps.

        pages [M] int32 ascending unique, -1 padded at the end; pin [M] bool (optional): pin those
        pages once resident (with pin_lease, every page's pin becomes its flag of this call). Device
        ops only. The caller copies K/V for `fetch` (`fetch_ref`).
        Clock only: scratch_base, acc, acc_mode (fused_place.clock_place) fill Placement.loc / copy
        and DeviceTieredAttention's counters in the same launch.
        demand (quotas): count the call's pages as the layer's demand (not for prefetch or prefill fills).
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        if self.policy == "clock":
            return self._place_clock(layer, pages, pin, scratch_base, acc, acc_mode, demand)
        m, c = pages.shape[0], self.capacity
        pages = pages.to(self.device, torch.int64)
        valid = pages >= 0
        pin = torch.zeros_like(valid) if pin is None else pin.to(self.device, torch.bool) & valid
        keys = self._keys(layer, pages)
        cur = self.slot_of[keys].long()
        hit = valid & (cur >= 0)
        ticks = self.tick + torch.arange(m, device=self.device)  # valid pages come first
        # touch hits first (sink slot c takes the masked lanes): a hit is then protected
        hs = torch.where(hit, cur, c)
        self.last_use[hs] = ticks
        self.pinned[hs] = pin if self.pin_lease else self.pinned[hs] | pin
        # victims: free slots by index, then evictable (not pinned, not used this step) by LRU tick
        free = self.slot_layer[:c] < 0
        held = self.pinned[:c] & (self.last_use[:c] >= self.pin_floor)
        evictable = ~free & ~held & (self.last_use[:c] < self.step_start)
        rank_key = torch.where(
            free,
            self._slot_idx - (c + 1),
            torch.where(evictable, self.last_use[:c] * (c + 1) + self._slot_idx, _BIG),
        )
        k = min(m, c)
        vkey, victims = torch.topk(rank_key, k, largest=False, sorted=True)
        miss = valid & ~hit
        rank = torch.cumsum(miss.long(), 0) - 1
        if k > 0:
            r = rank.clamp(0, k - 1)
            ok = miss & (rank < k) & (vkey[r] < _BIG)
            new_slot = torch.where(ok, victims[r], c)
        else:
            ok = torch.zeros_like(miss)
            new_slot = torch.full_like(pages, c)
        # evict the victims' old keys, install the new ones
        old_l, old_p = self.slot_layer[new_slot], self.slot_page[new_slot]
        evict = ok & (old_l >= 0)
        self.slot_of.index_fill_(0, torch.where(evict, old_l * self.num_pages + old_p, self._sink_key), -1)
        self.slot_of[torch.where(ok, keys, self._sink_key)] = new_slot.to(torch.int32)
        self.slot_of[self._sink_key :].fill_(-1)
        self.slot_layer.index_fill_(0, new_slot, layer)
        self.slot_page[new_slot] = pages
        self.last_use[new_slot] = ticks
        self.pinned[new_slot] = pin
        self._reset_sink_slot()
        self.tick += valid.sum()
        overflow = miss & ~ok
        self.counters += torch.stack([hit.sum(), miss.sum(), evict.sum(), overflow.sum()])
        slots = torch.where(hit, cur, torch.where(ok, new_slot, -1)).to(torch.int32)
        return Placement(slots=slots, fetch=ok, hit=hit)

    def _place_clock(self, layer, pages, pin, scratch_base, acc, acc_mode, demand) -> Placement:
        if self.clock_impl == "torch":
            out = clock_place_ref(self, layer, pages, pin, self.clock_window, scratch_base, demand)
            if acc is not None:
                slots, fetch, hit = out[:3]
                placed = fetch.sum()
                if acc_mode == 1:
                    over = (pages >= 0).to(self.device) & ~hit & ~fetch
                    acc[:4] += torch.stack([(pages >= 0).sum().to(acc.device), hit.sum(), placed, over.sum()])
                elif acc_mode == 2:
                    acc[4] += placed
        else:
            out = clock_place(self, layer, pages, pin, self.clock_window, scratch_base, acc, acc_mode, demand)
        return Placement(*out)

    def fetch_ref(self, layer: int, pages: torch.Tensor, placement: Placement) -> None:
        """Copy the K/V of placement.fetch pages from the host tier into their slots.

        Tensor indexing on one device (CPU here; on a GPU a UVA-reading kernel replaces it).
        """
        pages = pages.to(self.host.k.device, torch.int64).clamp(min=0)
        dst = torch.where(placement.fetch, placement.slots.long(), self.capacity).to(self.k.device)
        if self.head_pages:
            np_ = self.host.k.shape[1]
            pg, h = pages % np_, pages // np_
            self.k[dst] = self.host.k[layer, pg, :, h].unsqueeze(2).to(self.k.device)
            self.v[dst] = self.host.v[layer, pg, :, h].unsqueeze(2).to(self.v.device)
            return
        self.k[dst] = self.host.k[layer, pages].to(self.k.device)
        self.v[dst] = self.host.v[layer, pages].to(self.v.device)

    # ------------------------------------------------------------------ invalidation / pins
    def invalidate(self, pages: torch.Tensor, layers: list[int] | None = None) -> None:
        """Free the slots of pages [n] (-1 allowed) in `layers` (default all): pages the radix
        cache freed, so a reused physical page is refetched, never served stale. Pins go too."""
        lyr = torch.arange(self.num_layers, device=self.device) if layers is None else (
            torch.as_tensor(layers, dtype=torch.int64, device=self.device))  # fmt: skip
        pages = pages.to(self.device, torch.int64)
        keys = torch.where(
            pages[None, :] >= 0, lyr[:, None] * self.num_pages + pages[None, :], self._sink_key
        )
        self._free_keys(keys.reshape(-1))

    def invalidate_layer(self, layer: int, pages: torch.Tensor) -> None:
        """invalidate(pages, [layer]) with no host tensor, so a captured decode step can call it (the
        tiered backend does, for every page a KV write touches). pages: any shape, -1 allowed."""
        pages = pages.reshape(-1).to(self.device, torch.int64)
        ok = (pages >= 0) & (pages < self.num_pages)
        self._free_keys(torch.where(ok, layer * self.num_pages + pages, self._sink_key))

    def _free_keys(self, keys: torch.Tensor) -> None:
        """Free the slots of map keys [n] (the sink key = nothing); their pins and reference bits go too."""
        slots = self.slot_of[keys].long()
        s = torch.where(slots >= 0, slots, self.capacity)
        if self.quota != "off":
            # keys may repeat (a KV write names a page once per token): one lane per slot counts, the
            # one whose index the scatter kept; the other lanes and the sink land on the spare entry L
            lane = torch.arange(s.shape[0], device=s.device)
            self._lane_of.index_copy_(0, s, lane)
            first = (slots >= 0) & (self._lane_of[s] == lane)
            owner = torch.where(first, self.slot_layer[s], self.num_layers)
            self.layer_used.index_add_(0, owner, torch.full_like(owner, -1))
            self.layer_used[self.num_layers :].zero_()
        self.slot_layer.index_fill_(0, s, -1)
        self.slot_page.index_fill_(0, s, -1)
        self.pinned.index_fill_(0, s, False)
        if self.policy == "clock":
            self.ref.index_fill_(0, s, 0)
        self.slot_of.index_fill_(0, torch.where(slots >= 0, keys, self._sink_key), -1)
        self._reset_sink_slot()

    def demote(self, slots: torch.Tensor) -> None:
        """Make slots [n] (the sink slot C = none) the policy's next victims among unused slots: clock
        clears their reference bits, lru gives them the oldest use (insertion at low priority)."""
        if self.policy == "clock":
            self.ref.index_fill_(0, slots, 0)
        else:
            self.last_use.index_fill_(0, slots, 0)

    def unpin(self, layer: int, pages: torch.Tensor) -> None:
        """Unpin the resident ones of pages [n] (-1 allowed)."""
        slots = self.lookup(layer, pages).long()
        self.pinned.index_fill_(0, torch.where(slots >= 0, slots, self.capacity), False)
        self._reset_sink_slot()

    # ------------------------------------------------------------------ internals
    def _keys(self, layer: int, pages: torch.Tensor) -> torch.Tensor:
        pages = pages.to(self.device, torch.int64)
        return torch.where(pages >= 0, layer * self.num_pages + pages, self._sink_key)

    def _reset_sink_slot(self) -> None:
        c = self.capacity
        # slices + fill_: `t[int] = scalar` copies a host scalar, which graph capture refuses
        self.slot_layer[c : c + 1].fill_(-1)
        self.slot_page[c : c + 1].fill_(-1)
        self.pinned[c : c + 1].fill_(False)
