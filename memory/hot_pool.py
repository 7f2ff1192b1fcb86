"""GPU hot-page pool for tiered mode: one fixed set of page slots shared by all layers and requests.

The full KV of every page lives in a host tier (`HostTier`, pinned host memory when CUDA is
present); the device keeps `capacity` page slots, K and V each [capacity, page_size, Hkv, D]. A
slot holds one (layer, physical page id) key. Physical page ids are SGLang's token-pool pages
(token slot // page_size): two requests sharing a prefix through the radix tree share the pages,
hence the slots, with no copy.

Device-side map: `slot_of` [num_layers, num_pages] int32 on the device, -1 = absent. A dense table
(4 bytes per (layer, page)) is a single gather per lookup, needs no hashing, and is CUDA-graph
friendly: `lookup` reads it with no host sync.

Host-side bookkeeping (numpy, for now): reverse map slot -> (layer, page), LRU tick per slot, pin
flag, the call that last used a slot (for in-flight protection), free slots. `fetch_missing`
therefore syncs once to read the requested page ids; moving the victim choice to the device is
part of the remaining work of issue 6.

Policy, for each missing page of layer l that needs a slot (in ascending page-id order):
  1. a free slot if any (lowest index first);
  2. else, with quotas set and layer l at or over its quota: the LRU evictable slot of layer l;
  3. else, with quotas set: the LRU evictable slot among layers over their quota (slots they
     borrowed while the pool had free room are reclaimed first);
  4. else the globally LRU evictable slot;
  5. else the page overflows: it is served straight from the host tier this call (`gather` does
     it), never a wrong result or an error.
A slot is evictable unless it is pinned (sink and local-window pages), or protected: used in the
current step (since `new_step`), or, with `protect_calls=k`, in the last k calls (k=2 covers a
fetch for layer l+1 overlapping layer l's compute). Pages requested in the same call are always
protected from each other.

LRU order: one tick per (deduplicated, ascending) page of a call, so pages of one call are ordered
by page id; a hit moves its page to most recently used.

Consistency: `write_pages` / `write_tokens` write through (host tier and any resident slot);
`invalidate` drops every layer's slot of pages the radix cache freed, so a reused physical page is
refetched rather than served stale. Writing the host tier directly (`HostTier.write_*`) without
`invalidate` is the caller's bug.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


class HostTier:
    """Full KV of every (layer, page): k, v [num_layers, num_pages, page_size, Hkv, D] on the CPU.

    Pinned (page-locked) when CUDA is available and `pin_memory` is set, so host-to-device copies
    can be asynchronous.
    """

    def __init__(
        self,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        pin_memory: bool = True,
    ):
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        pin = pin_memory and torch.cuda.is_available()
        self.k = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.v = torch.zeros(shape, dtype=dtype, pin_memory=pin)

    @classmethod
    def wrap(cls, k: torch.Tensor, v: torch.Tensor) -> HostTier:
        """A tier over existing tensors [L, NP, P, Hkv, D] (a kv-head slice of another tier, SGLang's
        host KV buffer): no allocation."""
        tier = cls.__new__(cls)
        tier.k, tier.v = k, v
        return tier

    @classmethod
    def for_pool(
        cls, host: HostTier | None, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
        head_dim: int, dtype: torch.dtype,
    ) -> HostTier:  # fmt: skip
        """The tier a pool of this shape reads from: `host` after a shape check, or a new one."""
        shape = (num_layers, num_pages, page_size, num_kv_heads, head_dim)
        if host is None:
            return cls(*shape, dtype)
        if tuple(host.k.shape) != shape:
            raise ValueError(f"host tier shape {tuple(host.k.shape)} does not match the pool")
        return host

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    def write_pages(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [n, page_size, Hkv, D] for page_ids [n] (whole pages)."""
        idx = page_ids.to("cpu", torch.int64)
        self.k[layer, idx] = k.to("cpu", self.k.dtype)
        self.v[layer, idx] = v.to("cpu", self.v.dtype)

    def write_tokens(
        self, layer: int, page_ids: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """k, v [n, Hkv, D]: one token each, at (page_ids[i], offsets[i])."""
        p = page_ids.to("cpu", torch.int64)
        o = offsets.to("cpu", torch.int64)
        self.k[layer, p, o] = k.to("cpu", self.k.dtype)
        self.v[layer, p, o] = v.to("cpu", self.v.dtype)

    def mem_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


@dataclass
class FetchResult:
    """Outcome of one `fetch_missing` / `admit` call.

    slots [n] int64 on the pool's device, aligned with the requested page_ids (duplicates
    included): the slot holding each page, -1 where the page overflowed (read it from the host).
    overflow [m] int64 (CPU): the unique pages not placed in the pool this call.
    admitted [a] int64 (CPU): the unique pages placed into new slots (fetched, or written by admit).
    evicted [e, 2] int64 (CPU): (layer, page) keys evicted to make room, in eviction order.
    """

    slots: torch.Tensor
    overflow: torch.Tensor
    admitted: torch.Tensor
    evicted: torch.Tensor
    hits: int = 0
    misses: int = 0

    @property
    def has_overflow(self) -> bool:
        return self.overflow.numel() > 0


@dataclass
class PoolStats:
    """Counters since construction (or `reset_stats`). Per-layer arrays are [num_layers]."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    overflow_pages: int = 0
    bytes_fetched: int = 0  # host -> pool slots
    bytes_overflow: int = 0  # host -> caller directly (pages that did not fit)
    layer_hits: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    layer_misses: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0


class HotPagePool:
    """`capacity` device page slots, shared by all layers and requests, keyed by (layer, page id).

    k, v: [capacity, page_size, Hkv, D] on `device`; slot_of: [num_layers, num_pages] int32 on
    `device` (-1 = absent). `host` is the tier pages are fetched from (allocated if not given).
    protect_calls: None protects every page used since `new_step()`; k protects pages used in the
    last k calls (including the current one).
    """

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
        protect_calls: int | None = None,
    ):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if protect_calls is not None and protect_calls < 1:
            raise ValueError(f"protect_calls must be >= 1 or None, got {protect_calls}")
        self.capacity = capacity
        self.num_layers = num_layers
        self.num_pages = num_pages
        self.page_size = page_size
        self.device = torch.device(device)
        self.dtype = dtype
        self.protect_calls = protect_calls
        self.host = HostTier.for_pool(host, num_layers, num_pages, page_size, num_kv_heads, head_dim, dtype)
        shape = (capacity, page_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v = torch.zeros(shape, dtype=dtype, device=self.device)
        self.slot_of = torch.full((num_layers, num_pages), -1, dtype=torch.int32, device=self.device)
        self.page_bytes = 2 * page_size * num_kv_heads * head_dim * self.k.element_size()
        # host-side bookkeeping
        self._slot_of = np.full((num_layers, num_pages), -1, dtype=np.int64)  # mirror of slot_of
        self._slot_layer = np.full(capacity, -1, dtype=np.int64)  # -1 = free
        self._slot_page = np.full(capacity, -1, dtype=np.int64)
        self._last_use = np.zeros(capacity, dtype=np.int64)  # LRU tick
        self._last_call = np.full(capacity, -1, dtype=np.int64)
        self._pinned = np.zeros(capacity, dtype=bool)
        self._used = np.zeros(num_layers, dtype=np.int64)  # resident slots per layer
        self._quota: np.ndarray | None = None
        self._tick = 0
        self._call = 0
        self._step_start = 0
        self.stats = PoolStats()
        self.reset_stats()

    # ------------------------------------------------------------------ configuration
    def set_quotas(self, weights: torch.Tensor | np.ndarray | list[float] | None) -> np.ndarray | None:
        """Per-layer quotas floor(capacity * w_l / sum(w)); None removes them (pure global LRU).

        weights [num_layers] >= 0, e.g. each layer's measured mean selection (pages per step).
        Quotas bound eviction, not admission: a layer may borrow free slots beyond its quota, and
        borrowed slots are the first reclaimed when an under-quota layer needs room.
        Returns the quotas [num_layers] int64.
        """
        if weights is None:
            self._quota = None
            return None
        w = np.asarray(weights.cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64)
        if w.shape != (self.num_layers,) or (w < 0).any() or not np.isfinite(w).all():
            raise ValueError(f"weights must be [num_layers={self.num_layers}] finite and >= 0")
        s = w.sum()
        w = w / s if s > 0 else np.full(self.num_layers, 1.0 / self.num_layers)
        self._quota = np.floor(self.capacity * w + 1e-9).astype(np.int64)
        return self._quota.copy()

    @property
    def quotas(self) -> np.ndarray | None:
        return None if self._quota is None else self._quota.copy()

    def reset_stats(self) -> None:
        self.stats = PoolStats(
            layer_hits=np.zeros(self.num_layers, dtype=np.int64),
            layer_misses=np.zeros(self.num_layers, dtype=np.int64),
        )

    def new_step(self) -> None:
        """Start a decode step: pages used in earlier steps lose their protection."""
        self._step_start = self._call

    # ------------------------------------------------------------------ reads
    def lookup(self, layer: int, page_ids: torch.Tensor) -> torch.Tensor:
        """page_ids [n] int -> slots [n] int64 (-1 on miss). Device only, no host sync."""
        return self.slot_of[layer, page_ids.to(self.device, torch.int64)].to(torch.int64)

    def gather(
        self, layer: int, page_ids: torch.Tensor, slots: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [n, page_size, Hkv, D] of page_ids [n]: from the pool where resident, else host.

        The reference read path (tests, overflow fallback); the attention kernel reads slots.
        """
        if slots is None:
            slots = self.lookup(layer, page_ids)
        slots = slots.to(self.device, torch.int64)
        n = slots.shape[0]
        k = torch.empty((n, *self.k.shape[1:]), dtype=self.dtype, device=self.device)
        v = torch.empty_like(k)
        hit = (slots >= 0).nonzero().squeeze(1)
        miss = (slots < 0).nonzero().squeeze(1)
        if hit.numel():
            k[hit] = self.k[slots[hit]]
            v[hit] = self.v[slots[hit]]
        if miss.numel():
            pm = page_ids.to("cpu", torch.int64)[miss.cpu()]
            k[miss] = self.host.k[layer, pm].to(self.device, self.dtype)
            v[miss] = self.host.v[layer, pm].to(self.device, self.dtype)
        return k, v

    def resident_pages(self, layer: int) -> np.ndarray:
        """Sorted page ids of `layer` that hold a slot."""
        return np.sort(self._slot_page[self._slot_layer == layer])

    def num_free(self) -> int:
        return int((self._slot_layer < 0).sum())

    # ------------------------------------------------------------------ fetch / admit
    def fetch_missing(
        self, layer: int, page_ids: torch.Tensor, pin: torch.Tensor | None = None
    ) -> FetchResult:
        """Make page_ids [n] of `layer` resident, copying misses from the host tier.

        pin [n] bool (optional): pin those pages (sink / local window) once resident; a pin whose
        page overflows is not recorded (the caller sees the page in `overflow`).
        Counts hits/misses (unique pages) and bytes fetched. One host sync (page ids).
        """
        res, new_slots, new_pages = self._place(layer, page_ids, pin, count=True)
        if new_slots.size:
            s = torch.from_numpy(new_slots).to(self.device)
            p = torch.from_numpy(new_pages)
            self.k[s] = self.host.k[layer, p].to(self.device, non_blocking=True)
            self.v[s] = self.host.v[layer, p].to(self.device, non_blocking=True)
            self.stats.bytes_fetched += int(new_slots.size) * self.page_bytes
        n_over = int(res.overflow.numel())
        self.stats.overflow_pages += n_over
        self.stats.bytes_overflow += n_over * self.page_bytes
        return res

    def admit(
        self,
        layer: int,
        page_ids: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        pin: torch.Tensor | None = None,
    ) -> FetchResult:
        """Write whole pages k, v [n, page_size, Hkv, D] (unique page_ids [n]) to the host tier
        and place them in the pool (e.g. KV just produced by prefill). Not counted as hits/misses.
        """
        self._check_unique(page_ids)
        self.host.write_pages(layer, page_ids, k, v)
        res, _, _ = self._place(layer, page_ids, pin, count=False)
        ok = res.slots >= 0
        if bool(ok.any()):
            dk = k.to(self.device, self.dtype)
            dv = v.to(self.device, self.dtype)
            self.k[res.slots[ok]] = dk[ok]
            self.v[res.slots[ok]] = dv[ok]
        return res

    # ------------------------------------------------------------------ writes / invalidation
    def write_pages(self, layer: int, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write through: host tier and any resident slot. k, v [n, page_size, Hkv, D], unique ids."""
        self._check_unique(page_ids)
        self.host.write_pages(layer, page_ids, k, v)
        slots = self.lookup(layer, page_ids)
        ok = slots >= 0
        if bool(ok.any()):
            self.k[slots[ok]] = k.to(self.device, self.dtype)[ok]
            self.v[slots[ok]] = v.to(self.device, self.dtype)[ok]

    def write_tokens(
        self, layer: int, page_ids: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write through one token per entry: k, v [n, Hkv, D] at (page_ids[i], offsets[i])."""
        self.host.write_tokens(layer, page_ids, offsets, k, v)
        slots = self.lookup(layer, page_ids)
        ok = slots >= 0
        if bool(ok.any()):
            o = offsets.to(self.device, torch.int64)
            self.k[slots[ok], o[ok]] = k.to(self.device, self.dtype)[ok]
            self.v[slots[ok], o[ok]] = v.to(self.device, self.dtype)[ok]

    def invalidate(self, page_ids: torch.Tensor, layers: list[int] | None = None) -> int:
        """Drop the slots of page_ids [n] in `layers` (default all): pages freed by the radix cache.

        Pins on those pages go too. Returns the number of slots freed.
        """
        pages = np.unique(page_ids.to("cpu", torch.int64).numpy())
        lyr = np.arange(self.num_layers) if layers is None else np.unique(np.asarray(layers, dtype=np.int64))
        if pages.size == 0 or lyr.size == 0:
            return 0
        sub = self._slot_of[np.ix_(lyr, pages)]
        slots = sub[sub >= 0]
        self._free_slots(slots)
        return int(slots.size)

    def unpin(self, layer: int, page_ids: torch.Tensor) -> None:
        """Unpin the resident ones of page_ids (e.g. pages leaving the local window)."""
        s = self._slot_of[layer, page_ids.to("cpu", torch.int64).numpy()]
        self._pinned[s[s >= 0]] = False

    def pinned_pages(self, layer: int) -> np.ndarray:
        return np.sort(self._slot_page[(self._slot_layer == layer) & self._pinned])

    # ------------------------------------------------------------------ internals
    @staticmethod
    def _check_unique(page_ids: torch.Tensor) -> None:
        if torch.unique(page_ids).numel() != page_ids.numel():
            raise ValueError("page_ids must be unique")

    def _free_slots(self, slots: np.ndarray) -> None:
        if slots.size == 0:
            return
        lyr = self._slot_layer[slots]
        pg = self._slot_page[slots]
        self._slot_of[lyr, pg] = -1
        np.subtract.at(self._used, lyr, 1)
        self._slot_layer[slots] = -1
        self._slot_page[slots] = -1
        self._pinned[slots] = False
        self._last_call[slots] = -1
        self.slot_of[torch.from_numpy(lyr).to(self.device), torch.from_numpy(pg).to(self.device)] = -1

    def _place(
        self, layer: int, page_ids: torch.Tensor, pin: torch.Tensor | None, count: bool
    ) -> tuple[FetchResult, np.ndarray, np.ndarray]:
        """Touch hits, choose slots for misses (the module docstring's policy), update the maps.

        Returns the result and (new slots, their pages) for the caller to fill.
        """
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range [0, {self.num_layers})")
        ids = page_ids.to("cpu", torch.int64).reshape(-1)
        ids_np = ids.numpy()
        if ids_np.size and (ids_np.min() < 0 or ids_np.max() >= self.num_pages):
            raise IndexError(f"page ids out of range [0, {self.num_pages})")
        pages, inverse = np.unique(ids_np, return_inverse=True)
        pin_u = np.zeros(pages.size, dtype=bool)
        if pin is not None:
            np.logical_or.at(pin_u, inverse, pin.to("cpu", torch.bool).reshape(-1).numpy())
        call = self._call
        self._call += 1
        ticks = self._tick + np.arange(pages.size, dtype=np.int64)
        self._tick += int(pages.size)

        slot_u = self._slot_of[layer, pages].copy()
        hit = slot_u >= 0
        hs = slot_u[hit]
        self._last_use[hs] = ticks[hit]
        self._last_call[hs] = call
        self._pinned[hs] |= pin_u[hit]

        miss_idx = np.flatnonzero(~hit)
        a_idx, a_slot, vict = self._choose_slots(layer, miss_idx, call)
        ev = np.stack([self._slot_layer[vict], self._slot_page[vict]], axis=1).reshape(-1, 2)
        if vict.size:
            self._slot_of[ev[:, 0], ev[:, 1]] = -1
            np.subtract.at(self._used, ev[:, 0], 1)
        np_pages = pages[a_idx]
        self._slot_layer[a_slot] = layer
        self._slot_page[a_slot] = np_pages
        self._slot_of[layer, np_pages] = a_slot
        self._used[layer] += a_slot.size
        self._last_use[a_slot] = ticks[a_idx]
        self._last_call[a_slot] = call
        self._pinned[a_slot] = pin_u[a_idx]
        slot_u[a_idx] = a_slot
        ns = a_slot
        # device map: clear victims, then set the new keys (disjoint: victims were resident)
        if ev.shape[0]:
            e = torch.from_numpy(ev).to(self.device)
            self.slot_of[e[:, 0], e[:, 1]] = -1
        if ns.size:
            self.slot_of[layer, torch.from_numpy(np_pages).to(self.device)] = torch.from_numpy(ns).to(
                self.device, torch.int32
            )
        n_hit = int(hit.sum())
        n_miss = int(pages.size - n_hit)
        if count:
            self.stats.hits += n_hit
            self.stats.misses += n_miss
            self.stats.layer_hits[layer] += n_hit
            self.stats.layer_misses[layer] += n_miss
        self.stats.evictions += int(ev.shape[0])
        over = pages[slot_u < 0]
        res = FetchResult(
            slots=torch.from_numpy(slot_u[inverse]).to(self.device),
            overflow=torch.from_numpy(over),
            admitted=torch.from_numpy(np_pages),
            evicted=torch.from_numpy(ev),
            hits=n_hit,
            misses=n_miss,
        )
        return res, ns, np_pages

    def _choose_slots(self, layer: int, miss_idx: np.ndarray, call: int) -> tuple[np.ndarray, ...]:
        """Slots for the misses (indices into this call's unique pages), by the module's policy.

        Returns (assigned miss indices [a], their slots [a], evicted slots [e] in eviction order);
        misses left out overflow. Free slots and the quota-free case are vectorized; with quotas
        the victims are picked one by one over one LRU-sorted candidate list (O(capacity log) per call).
        """
        empty = np.zeros(0, dtype=np.int64)
        if miss_idx.size == 0:
            return empty, empty, empty
        free = np.flatnonzero(self._slot_layer < 0)
        nf = min(free.size, miss_idx.size)
        rest = miss_idx[nf:]
        if rest.size == 0:
            return miss_idx, free[:nf], empty
        threshold = self._step_start if self.protect_calls is None else call - self.protect_calls + 1
        # hits of this call are already protected (last_call == call >= threshold)
        evictable = (self._slot_layer >= 0) & ~self._pinned & (self._last_call < threshold)
        order = np.flatnonzero(evictable)
        order = order[np.argsort(self._last_use[order], kind="stable")]
        quota = self._quota
        if quota is None:  # global LRU
            k = min(rest.size, order.size)
            return miss_idx[: nf + k], np.concatenate([free[:nf], order[:k]]), order[:k]
        # plain Python lists in the loop: numpy scalar indexing costs ~10x more per access
        used = self._used.tolist()
        used[layer] += nf
        q = quota.tolist()
        slot_layer = self._slot_layer.tolist()
        order_l = order.tolist()
        own = [c for c in order_l if slot_layer[c] == layer]
        taken = bytearray(self.capacity)
        n_ord, n_own = len(order_l), len(own)
        p_own = p_over = p_glob = 0
        picked: list[int] = []
        for _ in range(rest.size):
            slot = -1
            if used[layer] >= q[layer]:  # at or over quota: its own LRU page
                while p_own < n_own and taken[own[p_own]]:
                    p_own += 1
                if p_own < n_own:
                    slot = own[p_own]
            if slot < 0:  # reclaim from layers over their quota (monotone: they only shrink)
                while p_over < n_ord:
                    c = order_l[p_over]
                    cl = slot_layer[c]
                    if not taken[c] and cl != layer and used[cl] > q[cl]:
                        break
                    p_over += 1
                if p_over < n_ord:
                    slot = order_l[p_over]
            if slot < 0:  # global LRU
                while p_glob < n_ord and taken[order_l[p_glob]]:
                    p_glob += 1
                if p_glob < n_ord:
                    slot = order_l[p_glob]
            if slot < 0:
                break  # nothing evictable left: the remaining misses overflow
            taken[slot] = 1
            used[slot_layer[slot]] -= 1
            used[layer] += 1
            picked.append(slot)
        vict = np.asarray(picked, dtype=np.int64)
        return miss_idx[: nf + vict.size], np.concatenate([free[:nf], vict]), vict

    # ------------------------------------------------------------------ checks
    def check_invariants(self) -> None:
        """Raise AssertionError unless the maps are consistent (tests and debug runs).

        The device table equals its host mirror; slot_of restricted to resident keys is a bijection
        onto the occupied slots; per-layer counts match; pins only on occupied slots.
        """
        dev = self.slot_of.cpu().numpy().astype(np.int64)
        assert np.array_equal(dev, self._slot_of), "device slot table differs from its mirror"
        occ = np.flatnonzero(self._slot_layer >= 0)
        keys_l, keys_p = np.nonzero(self._slot_of >= 0)
        slots = self._slot_of[keys_l, keys_p]
        assert slots.size == occ.size, "resident keys and occupied slots differ in number"
        assert np.unique(slots).size == slots.size, "a slot is assigned to two keys"
        assert np.array_equal(np.sort(slots), occ), "map points to a free slot"
        assert np.array_equal(self._slot_layer[slots], keys_l), "reverse map (layer) mismatch"
        assert np.array_equal(self._slot_page[slots], keys_p), "reverse map (page) mismatch"
        counts = np.bincount(self._slot_layer[occ], minlength=self.num_layers)
        assert np.array_equal(counts, self._used), "per-layer counts mismatch"
        assert not self._pinned[self._slot_layer < 0].any(), "pin on a free slot"

    def mem_bytes(self) -> int:
        """Device bytes: K+V slots and the map."""
        return 2 * self.k.numel() * self.k.element_size() + self.slot_of.numel() * 4
