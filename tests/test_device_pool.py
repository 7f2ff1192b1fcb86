"""DevicePagePool (device-side map and LRU victim choice) against HotPagePool's global-LRU policy."""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sglang_psa.memory.device_pool import DevicePagePool, union_pages
from sglang_psa.memory.hot_pool import HostTier, HotPagePool

L, NP, P, HKV, D = 3, 12, 2, 2, 3
M = 8  # static width of a call's page list


def make_pair(capacity: int, gen: torch.Generator) -> tuple[DevicePagePool, HotPagePool]:
    host = HostTier(L, NP, P, HKV, D, torch.float32, pin_memory=False)
    host.k.copy_(torch.randn(host.k.shape, generator=gen))
    host.v.copy_(torch.randn(host.v.shape, generator=gen))
    dev = DevicePagePool(capacity, L, NP, P, HKV, D, torch.float32, host=host)
    ref = HotPagePool(capacity, L, NP, P, HKV, D, torch.float32, host=host)  # no quotas, protect per step
    return dev, ref


def padded(pages: list[int]) -> torch.Tensor:
    return torch.tensor(sorted(pages) + [-1] * (M - len(pages)), dtype=torch.int32)


page_set = st.lists(st.integers(0, NP - 1), max_size=M, unique=True)
op_st = st.one_of(
    st.tuples(
        st.just("fetch"), st.integers(0, L - 1), page_set, st.lists(st.booleans(), min_size=M, max_size=M)
    ),
    st.tuples(st.just("step")),
    st.tuples(
        st.just("invalidate"),
        st.none() | st.lists(st.integers(0, L - 1), min_size=1, max_size=L, unique=True),
        page_set,
    ),  # fmt: skip
    st.tuples(st.just("unpin"), st.integers(0, L - 1), page_set),
)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(0, 10), ops=st.lists(op_st, max_size=40), seed=st.integers(0, 2**16))
def test_same_choices_as_the_host_pool(capacity, ops, seed):
    dev, ref = make_pair(capacity, torch.Generator().manual_seed(seed))
    hits = misses = 0
    for op in ops:
        if op[0] == "fetch":
            _, layer, pages, pins = op
            pin = torch.tensor(pins[: len(pages)], dtype=torch.bool)
            res = ref.fetch_missing(layer, torch.tensor(sorted(pages), dtype=torch.int64), pin)
            ids = padded(pages)
            pl = dev.place(layer, ids, torch.cat([pin, torch.zeros(M - len(pages), dtype=torch.bool)]))
            dev.fetch_ref(layer, ids, pl)
            n = len(pages)
            assert pl.slots[:n].tolist() == res.slots.tolist() and pl.slots[n:].eq(-1).all()
            assert int(pl.hit.sum()) == res.hits and int(pl.fetch.sum()) == len(res.admitted)
            hits, misses = hits + res.hits, misses + res.misses
            if res.evicted.numel():
                event("evicted")
            if res.overflow.numel():
                event("overflow")
            # what sits in the slots is the host tier's data
            ok = pl.slots[:n] >= 0
            s = pl.slots[:n][ok].long()
            assert torch.equal(
                dev.k[s], dev.host.k[layer, torch.tensor(sorted(pages), dtype=torch.int64)[ok]]
            )
            assert torch.equal(
                dev.v[s], dev.host.v[layer, torch.tensor(sorted(pages), dtype=torch.int64)[ok]]
            )
        elif op[0] == "step":
            dev.new_step()
            ref.new_step()
        elif op[0] == "invalidate":
            _, layers, pages = op
            dev.invalidate(padded(pages), layers)
            ref.invalidate(torch.tensor(pages, dtype=torch.int64), layers)
        else:
            _, layer, pages = op
            dev.unpin(layer, padded(pages))
            ref.unpin(layer, torch.tensor(pages, dtype=torch.int64))
        assert torch.equal(dev.table(), ref.slot_of)
        assert dev.pinned[:capacity].tolist() == ref._pinned.tolist()
    st_ = dev.stats()
    assert (st_["hits"], st_["misses"]) == (hits, misses) == (ref.stats.hits, ref.stats.misses)
    assert st_["evictions"] == ref.stats.evictions and st_["overflow"] == ref.stats.overflow_pages


def test_hand_trace_lru_protection_and_overflow():
    dev, _ = make_pair(2, torch.Generator().manual_seed(0))
    dev.new_step()
    a = dev.place(0, padded([1, 2]))
    assert a.slots[:2].tolist() == [0, 1] and a.fetch[:2].all()
    b = dev.place(0, padded([3]))  # both slots used this step: page 3 overflows
    assert b.slots[0] == -1 and not b.fetch[0]
    dev.new_step()
    dev.place(0, padded([2]))  # hit: page 2 is now the most recent
    c = dev.place(1, padded([5]))  # evicts page 1 (least recently used)
    assert c.slots[0] == 0 and dev.lookup(0, padded([1]))[0] == -1
    assert dev.stats() == {"hits": 1, "misses": 4, "evictions": 1, "overflow": 1}


def test_pinned_pages_are_never_evicted():
    dev, _ = make_pair(1, torch.Generator().manual_seed(0))
    dev.place(0, padded([4]), torch.tensor([True] + [False] * (M - 1)))
    dev.new_step()
    assert dev.place(2, padded([7])).slots[0] == -1  # the only slot is pinned
    dev.unpin(0, padded([4]))
    dev.new_step()
    assert dev.place(2, padded([7])).slots[0] == 0


@pytest.mark.parametrize("policy", ["lru", "clock"])
def test_lease_pins_last_one_step_past_their_last_pinned_use(policy):
    """pin_lease: a pin protects its slot in the step after the use that set it, not later; a use
    without the flag drops it. One slot, so any protection shows as an overflow (clock's reference
    bits are cleared before each probe, so only protection can keep the slot)."""
    host = HostTier(L, NP, P, HKV, D, torch.float32, pin_memory=False)
    dev = DevicePagePool(1, L, NP, P, HKV, D, torch.float32, host=host, policy=policy, pin_lease=True)
    pin = torch.tensor([True] + [False] * (M - 1))

    def probe(layer: int, page: int) -> int:
        if policy == "clock":
            dev.ref.zero_()
        return int(dev.place(layer, padded([page])).slots[0])

    dev.new_step()
    dev.place(0, padded([4]), pin)
    dev.new_step()  # the lease still holds: the pinned use was in the step before
    assert probe(1, 7) == -1
    dev.new_step()  # not renewed in the step before: released
    assert probe(1, 7) == 0
    dev.new_step()
    dev.place(1, padded([7]), pin)  # renewed every step, it holds on
    for _ in range(3):
        dev.new_step()
        assert probe(2, 9) == -1
        dev.place(1, padded([7]), pin)
    dev.new_step()
    dev.place(1, padded([7]))  # a use without the flag ends the lease
    dev.new_step()
    assert probe(2, 9) == 0


@pytest.mark.parametrize("width", [5, 40])
def test_union_pages_is_sorted_unique_and_padded(width):
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 30, (2, 3, 6), generator=g, dtype=torch.int32)
    cnt = torch.randint(0, 7, (2, 3), generator=g, dtype=torch.int32)
    got = union_pages(idx, cnt, num_pages=30, width=width)
    keep = torch.arange(6) < cnt[..., None]
    want = torch.unique(idx[keep].long()).tolist()[:width]
    assert got.dtype == torch.int32 and got.shape == (width,)
    assert got[: len(want)].tolist() == want and got[len(want) :].eq(-1).all()


@pytest.mark.gpu
def test_place_replays_in_a_cuda_graph():
    """place() has no host sync: captured once, replayed with new pages, it matches eager calls."""
    calls = [[1, 2, 3], [2, 5], [0, 1, 6, 7], [3, 9, 10, 11]]
    graphed = DevicePagePool(3, L, NP, P, HKV, D, torch.float32, "cuda")
    eager_dev = DevicePagePool(3, L, NP, P, HKV, D, torch.float32, "cuda")
    pages = padded([]).cuda()
    graphed.place(0, pages)  # warm-up (allocations) outside the graph
    graphed.invalidate(torch.arange(NP, device="cuda"))
    graphed.counters.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = graphed.place(1, pages)
    graphed.invalidate(torch.arange(NP, device="cuda"))  # capture does not run the ops; start clean
    graphed.counters.zero_()
    graphed.tick.zero_()
    for i, c in enumerate(calls):
        if i == 2:
            graphed.new_step()
            eager_dev.new_step()
        pages.copy_(padded(c))
        g.replay()
        want = eager_dev.place(1, padded(c).cuda())
        assert torch.equal(out.slots, want.slots) and torch.equal(out.fetch, want.fetch)
        assert torch.equal(graphed.table(), eager_dev.table())
    assert graphed.stats() == eager_dev.stats()


def test_host_tier_shape_checked():
    with pytest.raises(ValueError, match="host tier shape"):
        DevicePagePool(2, L, NP, P, HKV, D, torch.float32, host=HostTier(L, NP + 1, P, HKV, D, torch.float32))
