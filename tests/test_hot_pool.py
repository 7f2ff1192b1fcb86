"""Hot-page pool against a pure-Python reference (OrderedDict LRU, same quota and pinning rules)."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sglang_psa.memory.hot_pool import HostTier, HotPagePool

L, NP, P, HKV, D = 3, 12, 2, 2, 3
PAGE_BYTES = 2 * P * HKV * D * 4


class RefPool:
    """Reference model: keys (layer, page) -> [pinned, last_call], OrderedDict order = LRU order."""

    def __init__(self, capacity: int, protect_calls: int | None):
        self.cap = capacity
        self.protect = protect_calls
        self.od: OrderedDict[tuple[int, int], list] = OrderedDict()
        self.call = 0
        self.step_start = 0
        self.quota: list[int] | None = None
        self.hits = self.misses = self.evictions = 0

    def set_quotas(self, w: list[float] | None) -> None:
        if w is None:
            self.quota = None
            return
        s = sum(w)
        frac = [x / s for x in w] if s > 0 else [1.0 / L] * L
        self.quota = [math.floor(self.cap * f + 1e-9) for f in frac]

    def used(self, layer: int) -> int:
        return sum(1 for k in self.od if k[0] == layer)

    def place(self, layer: int, pages: list[int], pins: list[bool], count: bool):
        want: dict[int, bool] = {}
        for p, f in zip(pages, pins):
            want[p] = want.get(p, False) or f
        uniq = sorted(want)
        call = self.call
        self.call += 1
        thr = self.step_start if self.protect is None else call - self.protect + 1
        hits = [p for p in uniq if (layer, p) in self.od]
        for p in hits:
            ent = self.od[(layer, p)]
            ent[0] = ent[0] or want[p]
            ent[1] = call
        evicted, overflow = [], []
        for p in uniq:
            if (layer, p) in self.od:
                continue
            if len(self.od) >= self.cap:
                cands = [k for k, (pin, lc) in self.od.items() if not pin and lc < thr]
                v = None
                q = self.quota
                if q is not None and self.used(layer) >= q[layer]:
                    v = next((k for k in cands if k[0] == layer), None)
                if v is None and q is not None:
                    v = next((k for k in cands if k[0] != layer and self.used(k[0]) > q[k[0]]), None)
                if v is None and cands:
                    v = cands[0]
                if v is None:
                    overflow.append(p)
                    continue
                del self.od[v]
                evicted.append(v)
            self.od[(layer, p)] = [want[p], call]
        for p in uniq:  # LRU order of this call's pages: ascending page id
            if (layer, p) in self.od:
                self.od.move_to_end((layer, p))
        if count:
            self.hits += len(hits)
            self.misses += len(uniq) - len(hits)
        self.evictions += len(evicted)
        return len(hits), len(uniq) - len(hits), evicted, overflow

    def invalidate(self, pages: list[int], layers: list[int] | None) -> None:
        for k in list(self.od):
            if k[1] in pages and (layers is None or k[0] in layers):
                del self.od[k]

    def unpin(self, layer: int, pages: list[int]) -> None:
        for p in pages:
            if (layer, p) in self.od:
                self.od[(layer, p)][0] = False


def make_pool(capacity: int, protect_calls: int | None = None) -> HotPagePool:
    return HotPagePool(capacity, L, NP, P, HKV, D, torch.float32, "cpu", protect_calls=protect_calls)


def check_data(pool: HotPagePool) -> None:
    """Every resident slot holds exactly the host tier's page."""
    for layer in range(L):
        pages = pool.resident_pages(layer)
        if pages.size == 0:
            continue
        pt = torch.from_numpy(pages)
        slots = pool.lookup(layer, pt)
        assert (slots >= 0).all()
        assert torch.equal(pool.k[slots], pool.host.k[layer, pt])
        assert torch.equal(pool.v[slots], pool.host.v[layer, pt])


def check_state(pool: HotPagePool, ref: RefPool) -> None:
    pool.check_invariants()
    for layer in range(L):
        assert pool.resident_pages(layer).tolist() == sorted(p for (lyr, p) in ref.od if lyr == layer)
        assert pool.pinned_pages(layer).tolist() == sorted(
            p for (lyr, p), (pin, _) in ref.od.items() if lyr == layer and pin
        )
    assert pool.stats.hits == ref.hits and pool.stats.misses == ref.misses
    assert pool.stats.evictions == ref.evictions
    check_data(pool)


pages_st = st.lists(st.integers(0, NP - 1), min_size=0, max_size=5)
layer_st = st.integers(0, L - 1)
pins_st = st.lists(st.sampled_from([False, False, False, True]), min_size=5, max_size=5)
op_st = st.one_of(
    st.tuples(st.just("fetch"), layer_st, pages_st, pins_st),
    st.tuples(st.just("admit"), layer_st, pages_st, pins_st),
    # a decode step: new_step, then one fetch per layer (no pins)
    st.tuples(st.just("decode"), st.lists(pages_st, min_size=L, max_size=L)),
    st.tuples(st.just("decode"), st.lists(pages_st, min_size=L, max_size=L)),
    st.tuples(st.just("write"), layer_st, pages_st),
    st.tuples(st.just("write_tok"), layer_st, pages_st),
    st.tuples(st.just("invalidate"), st.none() | st.lists(layer_st, max_size=2), pages_st),
    st.tuples(st.just("reuse"), pages_st),  # radix frees pages, new owner writes the host tier
    st.tuples(st.just("unpin"), layer_st, pages_st),
    st.tuples(st.just("step")),
    st.tuples(st.just("quota"), st.none() | st.lists(st.integers(0, 5), min_size=L, max_size=L)),
)
# a quota setting first in half the traces, so the quota rules see long runs
quota_st = st.none() | st.lists(st.integers(0, 5), min_size=L, max_size=L)


@settings(max_examples=400, deadline=None)
@given(
    capacity=st.integers(0, 8),
    protect=st.sampled_from([None, 1, 2]),
    quota=quota_st,
    ops=st.lists(op_st, max_size=40),
    seed=st.integers(0, 2**16),
)
def test_against_reference(capacity, protect, quota, ops, seed):
    gen = torch.Generator().manual_seed(seed)
    pool = make_pool(capacity, protect)
    ref = RefPool(capacity, protect)
    pool.host.k.copy_(torch.randn(pool.host.k.shape, generator=gen))
    pool.host.v.copy_(torch.randn(pool.host.v.shape, generator=gen))
    rnd = lambda *s: torch.randn(*s, generator=gen)
    flat: list[tuple] = [("quota", quota)]
    for op in ops:
        if op[0] == "decode":
            flat.append(("step",))
            flat += [("fetch", layer, pages, [False] * len(pages)) for layer, pages in enumerate(op[1])]
        else:
            flat.append(op)
    ops = flat
    bytes_fetched = bytes_over = 0
    for op in ops:
        kind = op[0]
        if kind in ("fetch", "admit"):
            _, layer, pages, pins = op
            if kind == "admit":
                pages = sorted(set(pages))
            pins = pins[: len(pages)]
            ids = torch.tensor(pages, dtype=torch.int64)
            pin_t = torch.tensor(pins, dtype=torch.bool)
            if kind == "fetch":
                res = pool.fetch_missing(layer, ids, pin_t)
            else:
                k, v = rnd(len(pages), P, HKV, D), rnd(len(pages), P, HKV, D)
                res = pool.admit(layer, ids, k, v, pin_t)
                assert torch.equal(pool.host.k[layer, ids], k)
            h, m, ev, over = ref.place(layer, pages, pins, count=kind == "fetch")
            assert (res.hits, res.misses) == (h, m)
            assert [tuple(x) for x in res.evicted.tolist()] == ev
            assert res.overflow.tolist() == over
            if ev:
                event("evicted" + (" with quotas" if ref.quota is not None else ""))
            if over:
                event("overflow")
            assert res.slots.shape == ids.shape
            assert ((res.slots < 0) == torch.isin(ids, res.overflow)).all()
            if kind == "fetch":
                bytes_fetched += len(res.admitted) * PAGE_BYTES
                bytes_over += len(over) * PAGE_BYTES
            # what is served (pool slots + host for overflow) is the host tier's data
            gk, gv = pool.gather(layer, ids, res.slots)
            assert torch.equal(gk, pool.host.k[layer, ids])
            assert torch.equal(gv, pool.host.v[layer, ids])
            assert torch.equal(pool.lookup(layer, ids), res.slots)
        elif kind == "write":
            _, layer, pages = op
            ids = torch.tensor(sorted(set(pages)), dtype=torch.int64)
            pool.write_pages(layer, ids, rnd(len(ids), P, HKV, D), rnd(len(ids), P, HKV, D))
        elif kind == "write_tok":
            _, layer, pages = op
            ids = torch.tensor(sorted(set(pages)), dtype=torch.int64)
            offs = torch.randint(0, P, (len(ids),), generator=gen)
            pool.write_tokens(layer, ids, offs, rnd(len(ids), HKV, D), rnd(len(ids), HKV, D))
        elif kind == "invalidate":
            _, layers, pages = op
            pool.invalidate(torch.tensor(pages, dtype=torch.int64), layers)
            ref.invalidate(pages, layers)
        elif kind == "reuse":
            ids = torch.tensor(sorted(set(op[1])), dtype=torch.int64)
            pool.invalidate(ids)
            ref.invalidate(ids.tolist(), None)
            for layer in range(L):
                pool.host.write_pages(layer, ids, rnd(len(ids), P, HKV, D), rnd(len(ids), P, HKV, D))
        elif kind == "unpin":
            _, layer, pages = op
            pool.unpin(layer, torch.tensor(pages, dtype=torch.int64))
            ref.unpin(layer, pages)
        elif kind == "step":
            pool.new_step()
            ref.step_start = ref.call
        elif kind == "quota":
            pool.set_quotas(op[1])
            ref.set_quotas(op[1])
            assert (pool.quotas is None) == (ref.quota is None)
            if ref.quota is not None:
                assert pool.quotas.tolist() == ref.quota
                assert pool.quotas.sum() <= capacity
        check_state(pool, ref)
    assert pool.stats.bytes_fetched == bytes_fetched
    assert pool.stats.bytes_overflow == bytes_over


# ---------------------------------------------------------------------------- hand-made traces


def fetch(pool, layer, pages, pin=None):
    ids = torch.tensor(pages, dtype=torch.int64)
    return pool.fetch_missing(layer, ids, None if pin is None else torch.tensor(pin))


def test_lru_hand_trace():
    pool = make_pool(2)
    for pages, hit in [([1], 0), ([2], 0), ([1], 1), ([3], 0), ([2], 0), ([1], 0)]:
        pool.new_step()
        assert fetch(pool, 0, pages).hits == hit
    assert pool.stats.hits == 1 and pool.stats.misses == 5
    assert pool.stats.bytes_fetched == 5 * PAGE_BYTES


def test_lookup_and_duplicates():
    pool = make_pool(4)
    res = fetch(pool, 1, [5, 5, 7, 5])
    assert res.misses == 2 and res.slots[0] == res.slots[1] == res.slots[3] != res.slots[2]
    assert torch.equal(
        pool.lookup(1, torch.tensor([5, 7, 0])), torch.cat([res.slots[[0, 2]], torch.tensor([-1])])
    )
    assert (pool.lookup(0, torch.arange(NP)) == -1).all()  # keys are per layer


def test_pinned_never_evicted_and_overflow():
    pool = make_pool(3)
    fetch(pool, 0, [0, 1], pin=[True, True])
    for s in range(20):
        pool.new_step()
        res = fetch(pool, s % L, [2 + s % 5, 3 + s % 7])
        assert set(pool.pinned_pages(0).tolist()) == {0, 1}
        assert res.overflow.numel() == 1  # one free-able slot for two pages
        gk, _ = pool.gather(s % L, torch.tensor([2 + s % 5, 3 + s % 7]), res.slots)
        assert torch.equal(gk, pool.host.k[s % L, [2 + s % 5, 3 + s % 7]])
    pool.unpin(0, torch.tensor([0]))
    pool.new_step()
    assert fetch(pool, 2, [9, 10]).overflow.numel() == 0
    assert pool.pinned_pages(0).tolist() == [1]


def test_same_step_pages_protected():
    pool = make_pool(2)
    pool.new_step()
    fetch(pool, 0, [0, 1])
    res = fetch(pool, 1, [0])  # layer 0's pages are in use this step: layer 1 overflows
    assert res.overflow.tolist() == [0] and pool.stats.evictions == 0
    pool.new_step()
    res = fetch(pool, 1, [0])
    assert res.overflow.numel() == 0 and res.evicted.tolist() == [[0, 0]]
    # protect_calls=2: only the previous call (layer l computing while l+1 fetches) is protected
    pool = make_pool(1, protect_calls=2)
    fetch(pool, 0, [0])
    res = fetch(pool, 1, [0])  # no new_step needed: the previous call is protected
    assert res.overflow.tolist() == [0]
    res = fetch(pool, 2, [0])  # layer 0 page 0 was used two calls ago: evictable now
    assert res.evicted.tolist() == [[0, 0]] and res.overflow.numel() == 0


def test_quotas():
    pool = make_pool(6)
    assert pool.set_quotas([1, 2, 0]).tolist() == [2, 4, 0]
    fetch(pool, 0, [0, 1, 2, 3])  # layer 0 borrows free slots beyond its quota of 2
    fetch(pool, 1, [0, 1])
    pool.new_step()
    res = fetch(pool, 1, [2, 3])  # under quota: reclaims layer 0's borrowed slots (LRU first)
    assert res.evicted.tolist() == [[0, 0], [0, 1]]
    pool.new_step()
    res = fetch(pool, 0, [7])  # layer 0 at quota: evicts its own LRU page
    assert res.evicted.tolist() == [[0, 2]]
    pool.new_step()
    res = fetch(pool, 2, [0])  # quota 0, nothing of its own, nobody over quota: global LRU
    assert res.evicted.tolist() == [[0, 3]]
    with pytest.raises(ValueError):
        pool.set_quotas([1, -1, 0])


def test_invalidate_then_reuse_is_not_stale():
    pool = make_pool(4)
    pool.host.k.normal_()
    fetch(pool, 0, [3])
    fetch(pool, 2, [3])
    assert pool.invalidate(torch.tensor([3])) == 2
    new = torch.randn(1, P, HKV, D)
    pool.host.write_pages(0, torch.tensor([3]), new, new)
    pool.new_step()
    res = fetch(pool, 0, [3])
    assert res.misses == 1 and torch.equal(pool.k[res.slots[0]], new[0])
    pool.check_invariants()


def test_zero_capacity_serves_from_host():
    pool = make_pool(0)
    pool.host.k.normal_()
    res = fetch(pool, 1, [4, 2])
    assert res.slots.tolist() == [-1, -1] and res.overflow.tolist() == [2, 4]
    gk, _ = pool.gather(1, torch.tensor([4, 2]), res.slots)
    assert torch.equal(gk, pool.host.k[1, [4, 2]])
    assert pool.stats.bytes_overflow == 2 * PAGE_BYTES and pool.stats.bytes_fetched == 0


def test_host_tier_shape_checked():
    with pytest.raises(ValueError):
        HotPagePool(2, L, NP, P, HKV, D, torch.float32, host=HostTier(L, NP + 1, P, HKV, D, torch.float32))
    assert np.isclose(make_pool(1).stats.hit_rate, 1.0)
