"""Offline simulation of the hot-page pool on an access trace (see sglang_psa.access_log).

Unit of caching: the K and V of one logical page of one request, for one layer and one kv head,
key = (request, layer, kv head, page). PSA selects pages per kv head, so two heads of a layer
generally want different pages, and the pool must be able to hold one without the other; a unit
is 2 * page_size * head_dim * elem_bytes bytes. (SGLang's pool stores a token's kv heads together,
[slots, Hkv, D], so a per-head unit means a strided host->device copy; `merge_heads=True` in
`build_stream` simulates the coarser (request, layer, page) unit instead, Hkv times larger.)

The pool is shared by all layers and requests (DESIGN.md, tiered mode), or split into per-layer
quotas: fixed (`simulate_quota`) or re-derived from the recent selection sizes as the workload
changes (`simulate_adaptive_quota`); `simulate_pinned` is the shared LRU pool with the sink and
local-window units pinned (issue 6's two policy options). Accesses are replayed in decode order:
step by step, layer by layer, and within a layer request by request, head by head. Every selected
unit is needed on the GPU: a miss fetches it (bytes = its valid tokens' K+V) and the policy decides
whether and what it keeps.

Policies (all demand-fetch):
  lru        page granularity, capacity in units;
  lru_token  LRU whose capacity is in tokens, a unit occupying its valid tokens (the last page of a
             request is partial and grows by one token per step);
  lfu        least frequently used among the cached units (frequency counted while cached), ties
             broken by least recent use;
  belady     Belady's optimum (farthest next use), offline, with bypass: a unit whose next use is
             farther than every cached unit's is not admitted. With unit sizes this maximizes the
             hit count for any capacity and is the ceiling for the other policies.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

POLICIES = ("lru", "lru_token", "lfu", "belady")
_INF = np.iinfo(np.int64).max


@dataclass
class AccessStream:
    """A trace flattened into the order the pool sees accesses.

    keys [n] int64 unit ids; tokens [n] int32 valid tokens of the unit at the access; step [n] int64
    dense step index 0..num_steps-1; layer [n] int16; unit_tokens: tokens a unit holds when full.
    """

    keys: np.ndarray
    tokens: np.ndarray
    step: np.ndarray
    layer: np.ndarray
    num_steps: int
    num_layers: int
    unit_tokens: int
    token_bytes: int  # bytes of one token of one unit (K+V, all heads of the unit)
    # [n] bool: the access is a sink or local-window page (always selected); None = unknown
    forced: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    @property
    def unit_bytes(self) -> int:
        return self.unit_tokens * self.token_bytes

    def budget_units(self) -> float:
        """Per-step budget: mean units selected per decode step (all layers, heads, requests)."""
        return len(self) / max(self.num_steps, 1)

    def budget_tokens(self) -> float:
        return float(self.tokens.sum()) / max(self.num_steps, 1)

    def layer_budget_units(self) -> np.ndarray:
        """[num_layers] mean units per step of each layer."""
        return np.bincount(self.layer, minlength=self.num_layers) / max(self.num_steps, 1)

    def subset(self, mask: np.ndarray) -> AccessStream:
        return AccessStream(
            keys=self.keys[mask],
            tokens=self.tokens[mask],
            step=self.step[mask],
            layer=self.layer[mask],
            num_steps=self.num_steps,
            num_layers=self.num_layers,
            unit_tokens=self.unit_tokens,
            token_bytes=self.token_bytes,
            forced=None if self.forced is None else self.forced[mask],
        )


def build_stream(trace, merge_heads: bool = False) -> AccessStream:
    """Flatten an AccessTrace into an AccessStream.

    merge_heads: the unit becomes (request, layer, page) with all kv heads (selected if any head
    selects it), Hkv times the bytes of a per-head unit.
    """
    tr = trace.sorted()
    P = tr.page_size
    counts = tr.count.astype(np.int64)
    rec = np.repeat(np.arange(len(tr)), counts)
    page = tr.pages.astype(np.int64)
    req = tr.request.astype(np.int64)[rec]
    layer = tr.layer.astype(np.int64)[rec]
    head = tr.head.astype(np.int64)[rec]
    n_len = tr.seq_len.astype(np.int64)[rec]
    steps_u, step_dense = np.unique(tr.step, return_inverse=True)
    step = step_dense.astype(np.int64)[rec]
    L = max(tr.num_layers, int(layer.max()) + 1 if layer.size else 1)
    H = max(tr.num_kv_heads, int(head.max()) + 1 if head.size else 1)
    maxp = int(page.max()) + 1 if page.size else 1
    token_bytes = tr.token_bytes()
    if merge_heads:
        key = (req * L + layer) * maxp + page
        # keep the first access of each (step, layer, request, page): one per merged unit
        order = np.lexsort((head, page, req, layer, step))
        k_sorted = key[order]
        s_sorted = step[order]
        first = np.ones(order.size, dtype=bool)
        first[1:] = (k_sorted[1:] != k_sorted[:-1]) | (s_sorted[1:] != s_sorted[:-1])
        keep = np.sort(order[first])
        key, step, layer, page, n_len = key[keep], step[keep], layer[keep], page[keep], n_len[keep]
        token_bytes *= H
    else:
        key = ((req * L + layer) * H + head) * maxp + page
    tokens = np.clip(n_len - page * P, 0, P).astype(np.int32)
    sink, local = int(tr.meta.get("sink_pages", 0)), int(tr.meta.get("local_pages", 0))
    forced = (page < sink) | (page >= -(-n_len // P) - local)
    return AccessStream(
        keys=key.astype(np.int64),
        tokens=tokens,
        step=step,
        layer=layer.astype(np.int16),
        num_steps=int(steps_u.size),
        num_layers=L,
        unit_tokens=P,
        token_bytes=token_bytes,
        forced=forced,
    )


def stream_from_steps(
    steps: list[list[int]], unit_tokens: int = 1, token_bytes: int = 1, tokens: list[list[int]] | None = None
) -> AccessStream:
    """A single-layer stream from a list of steps, each a list of keys (hand-made test traces)."""
    keys = [k for s in steps for k in s]
    tok = [t for s in tokens for t in s] if tokens is not None else [unit_tokens] * len(keys)
    step = [i for i, s in enumerate(steps) for _ in s]
    return AccessStream(
        keys=np.array(keys, dtype=np.int64),
        tokens=np.array(tok, dtype=np.int32),
        step=np.array(step, dtype=np.int64),
        layer=np.zeros(len(keys), dtype=np.int16),
        num_steps=len(steps),
        num_layers=1,
        unit_tokens=unit_tokens,
        token_bytes=token_bytes,
    )


@dataclass
class SimResult:
    """Outcome of one simulation. hits [n] bool (per access, stream order)."""

    policy: str
    capacity: float  # units (tokens for lru_token)
    accesses: int
    num_hits: int
    tokens_fetched: int
    bytes_fetched: int
    num_steps: int
    hits: np.ndarray = field(repr=False)

    @property
    def hit_rate(self) -> float:
        return self.num_hits / self.accesses if self.accesses else 1.0

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_fetched / max(self.num_steps, 1)

    def to_dict(self) -> dict[str, float]:
        return {
            "policy": self.policy,
            "capacity": self.capacity,
            "accesses": self.accesses,
            "hits": self.num_hits,
            "hit_rate": self.hit_rate,
            "bytes_fetched": self.bytes_fetched,
            "bytes_per_step": self.bytes_per_step,
        }


def next_use(keys: np.ndarray) -> np.ndarray:
    """[n] int64: index of the next access of the same key, or int64 max if none."""
    n = keys.shape[0]
    nxt = np.full(n, _INF, dtype=np.int64)
    if n < 2:
        return nxt
    order = np.argsort(keys, kind="stable")
    same = keys[order[1:]] == keys[order[:-1]]
    nxt[order[:-1][same]] = order[1:][same]
    return nxt


def _lru(keys: list[int], cap: int, hits: np.ndarray) -> None:
    cache: OrderedDict[int, None] = OrderedDict()
    for i, k in enumerate(keys):
        if k in cache:
            cache.move_to_end(k)
            hits[i] = True
        else:
            cache[k] = None
            if len(cache) > cap:
                cache.popitem(last=False)


def _lru_token(keys: list[int], toks: list[int], cap: int, hits: np.ndarray) -> None:
    cache: OrderedDict[int, int] = OrderedDict()
    used = 0
    for i, k in enumerate(keys):
        t = toks[i]
        old = cache.get(k)
        if old is not None:
            cache.move_to_end(k)
            hits[i] = True
            if t > old:  # the page grew (new tokens written on the GPU): it occupies more
                cache[k] = t
                used += t - old
        else:
            cache[k] = t
            used += t
        while used > cap and cache:
            _, s = cache.popitem(last=False)
            used -= s


def _lfu(keys: list[int], cap: int, hits: np.ndarray) -> None:
    cache: dict[int, tuple[int, int]] = {}  # key -> (freq, last access)
    heap: list[tuple[int, int, int]] = []
    for i, k in enumerate(keys):
        ent = cache.get(k)
        if ent is not None:
            hits[i] = True
            ent = (ent[0] + 1, i)
        else:
            if len(cache) >= cap:
                while True:
                    f, t, kk = heapq.heappop(heap)
                    if cache.get(kk) == (f, t):
                        del cache[kk]
                        break
            ent = (1, i)
        cache[k] = ent
        heapq.heappush(heap, (ent[0], ent[1], k))
        if len(heap) > 4 * cap + 64:  # drop stale entries now and then
            heap = [(f, t, kk) for f, t, kk in heap if cache.get(kk) == (f, t)]
            heapq.heapify(heap)


def _belady(keys: list[int], nxt: list[int], cap: int, hits: np.ndarray, bypass: bool) -> None:
    cache: dict[int, int] = {}  # key -> its next use
    heap: list[tuple[int, int]] = []  # (-next use, key), lazily invalidated
    for i, k in enumerate(keys):
        nu = nxt[i]
        if k in cache:
            hits[i] = True
            cache[k] = nu
            heapq.heappush(heap, (-nu, k))
            continue
        if len(cache) >= cap:
            while cache.get(heap[0][1]) != -heap[0][0]:
                heapq.heappop(heap)
            far = -heap[0][0]
            if bypass and nu >= far:
                continue  # the newcomer is needed last: do not keep it
            _, kk = heapq.heappop(heap)
            del cache[kk]
        cache[k] = nu
        heapq.heappush(heap, (-nu, k))
        if len(heap) > 4 * cap + 64:
            heap = [(a, kk) for a, kk in heap if cache.get(kk) == -a]
            heapq.heapify(heap)


def simulate(
    stream: AccessStream, capacity: float, policy: str = "lru", bypass: bool = True, warmup_steps: int = 0
) -> SimResult:
    """Replay `stream` through a pool of `capacity` (units; tokens for lru_token).

    warmup_steps: accesses of the first steps fill the pool but are not counted (cold start; in
    tiered mode the prefill leaves the request's pages on the GPU anyway).
    bypass: Belady may decline to admit a unit (see the module docstring).
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    n = len(stream)
    hits = np.zeros(n, dtype=bool)
    cap = int(capacity)
    keys = stream.keys.tolist()
    if cap > 0 and n:
        if policy == "lru":
            _lru(keys, cap, hits)
        elif policy == "lru_token":
            _lru_token(keys, stream.tokens.tolist(), cap, hits)
        elif policy == "lfu":
            _lfu(keys, cap, hits)
        else:
            _belady(keys, next_use(stream.keys).tolist(), cap, hits, bypass)
    return _result(stream, policy, capacity, hits, warmup_steps)


def _result(
    stream: AccessStream, policy: str, capacity: float, hits: np.ndarray, warmup_steps: int
) -> SimResult:
    counted = stream.step >= warmup_steps
    miss_tok = int(stream.tokens[counted & ~hits].sum())
    return SimResult(
        policy=policy,
        capacity=float(capacity),
        accesses=int(counted.sum()),
        num_hits=int((hits & counted).sum()),
        tokens_fetched=miss_tok,
        bytes_fetched=miss_tok * stream.token_bytes,
        num_steps=max(stream.num_steps - warmup_steps, 0),
        hits=hits,
    )


def simulate_quota(
    stream: AccessStream,
    capacity: float,
    quotas: np.ndarray | None = None,
    policy: str = "lru",
    warmup_steps: int = 0,
) -> SimResult:
    """Per-layer pools: layer l gets floor(capacity * quotas[l] / sum(quotas)).

    quotas [num_layers] >= 0; default: each layer's mean selection per step (the measured skew,
    which is what DESIGN.md proposes: flat layers get more).
    """
    if quotas is None:
        quotas = stream.layer_budget_units()
    q = np.asarray(quotas, dtype=np.float64)
    q = q / q.sum() if q.sum() > 0 else np.full_like(q, 1.0 / q.size)
    hits = np.zeros(len(stream), dtype=bool)
    for lyr in range(stream.num_layers):
        m = stream.layer == lyr
        if not m.any():
            continue
        r = simulate(stream.subset(m), int(capacity * q[lyr]), policy)  # counted in _result
        hits[m] = r.hits
    return _result(stream, policy, capacity, hits, warmup_steps)


def simulate_pinned(stream: AccessStream, capacity: float, warmup_steps: int = 0) -> SimResult:
    """Shared LRU pool (units) in which sink and local-window units are pinned.

    A unit accessed as forced (stream.forced) is pinned until the end of the next step in which it is
    not forced (it left the window, or its request stopped): then it rejoins the LRU order as most
    recently used. Only unpinned units are evicted, least recently used first; a unit that finds no
    room (everything else pinned) is fetched and not kept.
    """
    if stream.forced is None:
        raise ValueError("simulate_pinned needs stream.forced (build_stream sets it from the trace)")
    hits = np.zeros(len(stream), dtype=bool)
    cap = int(capacity)
    lru: OrderedDict[int, None] = OrderedDict()
    pinned: dict[int, None] = {}
    forced_now: set[int] = set()
    cur = None
    for i, (k, st, f) in enumerate(zip(stream.keys.tolist(), stream.step.tolist(), stream.forced.tolist())):
        if st != cur:  # step boundary: units not forced in the step just ended are unpinned
            for kk in [kk for kk in pinned if kk not in forced_now]:
                del pinned[kk]
                lru[kk] = None
            forced_now, cur = set(), st
        hits[i] = k in lru or k in pinned
        if f:
            forced_now.add(k)
            lru.pop(k, None)
            pinned[k] = None
        elif k in lru:
            lru.move_to_end(k)
        elif k not in pinned:
            lru[k] = None
        while len(lru) + len(pinned) > cap:
            if lru:
                lru.popitem(last=False)
            else:  # only pinned units left: the newcomer is not kept
                pinned.pop(k, None)
                break
    return _result(stream, "lru_pinned", capacity, hits, warmup_steps)


def simulate_adaptive_quota(
    stream: AccessStream,
    capacity: float,
    interval: int = 8,
    smoothing: float = 0.5,
    warmup_steps: int = 0,
) -> SimResult:
    """Per-layer LRU quotas that follow each layer's measured selection size.

    Every `interval` steps, layer l's quota becomes capacity x s_l / sum(s), s_l an exponential moving
    average (weight `smoothing` on the newest step) of layer l's units per step; before the first
    update the quotas are equal. A layer may borrow room while the pool has any; when the pool is full,
    a miss of layer l evicts layer l's LRU unit if l is at or over its quota, else the LRU unit of the
    layer most over its own (HotPagePool's quota policy).
    """
    if interval < 1 or not 0.0 < smoothing <= 1.0:
        raise ValueError(f"need interval >= 1 and smoothing in (0, 1], got {interval}, {smoothing}")
    n_layers = stream.num_layers
    hits = np.zeros(len(stream), dtype=bool)
    cap = int(capacity)
    pools: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(n_layers)]
    quota = np.full(n_layers, cap / n_layers)
    ema = np.zeros(n_layers)
    seen = np.zeros(n_layers)
    cur, n_steps, total = None, 0, 0
    for i, (k, st, lyr) in enumerate(zip(stream.keys.tolist(), stream.step.tolist(), stream.layer.tolist())):
        if st != cur:
            if cur is not None:
                ema = seen if n_steps == 0 else smoothing * seen + (1 - smoothing) * ema
                n_steps += 1
                if n_steps % interval == 0 and ema.sum() > 0:
                    quota = cap * ema / ema.sum()
            seen, cur = np.zeros(n_layers), st
        seen[lyr] += 1
        pool = pools[lyr]
        if k in pool:
            pool.move_to_end(k)
            hits[i] = True
            continue
        if cap <= 0:
            continue
        pool[k] = None
        total += 1
        if total > cap:
            sizes = np.array([len(p) for p in pools], dtype=np.float64)
            victim = lyr if sizes[lyr] - 1 >= quota[lyr] else int(np.argmax(sizes - quota))
            pools[victim].popitem(last=False)
            total -= 1
    return _result(stream, "lru_adaptive_quota", capacity, hits, warmup_steps)


def per_layer_hit_rate(stream: AccessStream, result: SimResult, warmup_steps: int = 0) -> np.ndarray:
    """[num_layers] hit rate of each layer's accesses (nan for a layer without accesses)."""
    c = stream.step >= warmup_steps
    acc = np.bincount(stream.layer[c], minlength=stream.num_layers).astype(np.float64)
    hit = np.bincount(stream.layer[c], weights=result.hits[c], minlength=stream.num_layers)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hit / acc


def sweep(
    stream: AccessStream,
    multiples: tuple[float, ...] = (1, 1.25, 1.5, 2, 3, 4, 6, 8),
    policies: tuple[str, ...] = POLICIES,
    quota_policies: tuple[str, ...] = ("lru", "belady"),
    warmup_steps: int = 1,
    progress=None,
) -> list[dict]:
    """Hit rate and bytes fetched per step over capacities `multiples` x the per-step budget.

    Capacity C = m * budget_units (units); lru_token gets the same bytes, C * unit_tokens tokens.
    Returns one dict per (pool, policy, multiple), pool in {'shared', 'per_layer_quota'}, with
    per-layer hit rates; the first `warmup_steps` steps are not counted.
    progress: optional callable(n) to advance a progress bar.
    """
    out = []
    budget = stream.budget_units()
    jobs = [("shared", p) for p in policies] + [("per_layer_quota", p) for p in quota_policies]
    for m in multiples:
        cap_units = m * budget
        for pool, pol in jobs:
            cap = cap_units * stream.unit_tokens if pol == "lru_token" else cap_units
            if pool == "shared":
                r = simulate(stream, cap, pol, warmup_steps=warmup_steps)
            else:
                r = simulate_quota(stream, cap, policy=pol, warmup_steps=warmup_steps)
            d = r.to_dict()
            d.update(
                pool=pool,
                multiple=float(m),
                capacity_units=cap_units,
                capacity_bytes=cap_units * stream.unit_bytes,
                per_layer_hit_rate=[
                    None if np.isnan(x) else float(x) for x in per_layer_hit_rate(stream, r, warmup_steps)
                ],
            )
            out.append(d)
            if progress is not None:
                progress(1)
    return out
