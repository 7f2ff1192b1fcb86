"""fused_place.py: the Triton union / CLOCK place / page table (CPU interpreter) equal their torch
references, and the CLOCK pool keeps its invariants over random traces."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sglang_psa.memory import fused_place
from sglang_psa.memory.device_pool import DevicePagePool

L, NP, M = 3, 12, 8


def padded(pages: list[int], m: int = M) -> torch.Tensor:
    return torch.tensor(sorted(pages) + [-1] * (m - len(pages)), dtype=torch.int32)


def clock_pool(capacity: int, window: int, impl: str, lease: bool = False, quota: int = 0) -> DevicePagePool:
    """quota: 0 = none, else per-layer quotas with quota_span = quota."""
    return DevicePagePool(capacity, L, NP, 2, 1, 2, torch.float32, policy="clock", clock_window=window,
                          clock_impl=impl, pin_lease=lease, quota="adaptive" if quota else "off",
                          quota_interval=2, quota_span=max(quota, 1))  # fmt: skip


# ----------------------------------------------------------------------------- union / table
def random_selection(g: torch.Generator, bs: int, hkv: int, w: int, npages: int, p: int = 4):
    """req_to_token over shuffled physical pages (shared prefixes allowed) and a random selection."""
    n = 6
    r2t = torch.zeros(bs + 1, n * p + 3, dtype=torch.int32)  # one spare row, a partial last page
    for b in range(bs):
        phys = torch.randint(0, npages, (n + 1,), generator=g)
        r2t[b + 1] = (phys[:, None] * p + torch.arange(p)).flatten()[: r2t.shape[1]].to(torch.int32)
    rpi = torch.randperm(bs, generator=g) + 1
    idx = torch.randint(-1, n + 1, (bs, hkv, w), generator=g, dtype=torch.int32)  # clamped like the ref
    cnt = torch.randint(0, w + 1, (bs, hkv), generator=g, dtype=torch.int32)
    return r2t, rpi, idx, cnt, p


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), bs=st.integers(1, 3), hkv=st.integers(1, 3), w=st.integers(1, 5),
       npages=st.integers(1, 30), width_cut=st.integers(0, 3))  # fmt: skip
def test_union_and_table_equal_their_references(seed, bs, hkv, w, npages, width_cut):
    for blk in (4, 1024):  # BLOCK 4: every loop of the single-program kernels runs several blocks
        fused_place.BLOCK = blk
        try:
            g = torch.Generator().manual_seed(seed)
            r2t, rpi, idx, cnt, p = random_selection(g, bs, hkv, w, npages)
            width = max(1, min(bs * hkv * w, npages) - width_cut)  # also narrower than the union
            bitmap = torch.zeros(npages, dtype=torch.int8)
            want = fused_place.union_selected_ref(r2t, rpi, idx, cnt, p, npages, width)
            got = fused_place.union_selected(r2t, rpi, idx, cnt, p, npages, width, bitmap)
            assert torch.equal(got, want) and bitmap.eq(0).all()
            loc = torch.randint(-1, 50, (width,), generator=g, dtype=torch.int32)
            tab = fused_place.page_table(r2t, rpi, p, npages, want, loc)
            assert torch.equal(tab, fused_place.page_table_ref(r2t, rpi, p, npages, want, loc))
        finally:
            fused_place.BLOCK = 1024


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), bs=st.integers(1, 3), hkv=st.integers(1, 3), w=st.integers(1, 5),
       npages=st.integers(1, 30))  # fmt: skip
def test_head_page_union_and_table_equal_their_references(seed, bs, hkv, w, npages):
    """--psa-hot-granularity head: the unsorted union holds the reference's set, once each, with
    pos_of pointing at each key; the table maps every selected (b, h, j) to its key's loc."""
    for blk in (4, 1024):  # BLOCK 4: several programs claim union positions through the atomic count
        fused_place.BLOCK = blk
        try:
            g = torch.Generator().manual_seed(seed)
            r2t, rpi, idx, cnt, p = random_selection(g, bs, hkv, w, npages)
            width = bs * hkv * w
            want = fused_place.union_head_pages_ref(r2t, rpi, idx, cnt, p, npages, width)
            owner = torch.randint(-5, 50, (hkv * npages,), generator=g, dtype=torch.int32)  # any contents
            pos_of = torch.randint(-5, 50, (hkv * npages,), generator=g, dtype=torch.int32)
            out = torch.randint(-5, 50, (width,), generator=g, dtype=torch.int32)
            count = torch.full((1,), 7, dtype=torch.int32)
            fused_place.union_head_pages(r2t, rpi, idx, cnt, p, npages, owner, pos_of, out, count)
            n = int((want >= 0).sum())
            assert int(count) == n and out[n:].eq(-1).all()
            assert torch.equal(out[:n].sort().values, want[:n])
            assert torch.equal(pos_of[out[:n].long()], torch.arange(n, dtype=torch.int32))
            loc = torch.randint(-1, 50, (width,), generator=g, dtype=torch.int32)
            tab = fused_place.head_page_table(r2t, rpi, idx, cnt, p, npages, pos_of, loc)
            ref = fused_place.head_page_table_ref(r2t, rpi, idx, cnt, p, npages, out, loc, tab.shape[2])
            kept = torch.arange(w) < cnt[..., None]
            j = idx.long().clamp(0, tab.shape[2] - 1)
            assert torch.equal(tab.gather(2, j)[kept], ref.gather(2, j)[kept])
        finally:
            fused_place.BLOCK = 1024


# ----------------------------------------------------------------------------- clock traces
def random_trace(rng: random.Random, n: int) -> list[tuple]:
    """place / step / invalidate / unpin ops over a small key space (so pages recur and evict)."""
    ops = []
    for _ in range(n):
        r = rng.random()
        pages = sorted(rng.sample(range(NP), rng.randint(0, M)))
        if r < 0.6:
            pins = [rng.random() < 0.08 for _ in range(M)]
            ops.append(("place", rng.randrange(L), pages, pins, rng.random() < 0.5))
        elif r < 0.85:
            ops.append(("step",))
        elif r < 0.95:
            layers = None if rng.random() < 0.5 else rng.sample(range(L), rng.randint(1, L))
            ops.append(("invalidate", layers, pages[:3]))
        else:
            ops.append(("unpin", rng.randrange(L), pages))
    return ops


STATE = ("slot_of", "slot_layer", "slot_page", "last_use", "pinned", "ref", "tick", "step_start",
         "prev_step_start", "hand", "counters", "fill_stamp")  # fmt: skip
QUOTA_STATE = ("layer_used", "layer_quota", "layer_demand", "demand_ema", "quota_steps")


def state_names(pool: DevicePagePool) -> tuple[str, ...]:
    return STATE + (QUOTA_STATE if pool.quota != "off" else ())


def check_map(pool: DevicePagePool) -> None:
    """No slot holds two keys; slot_of and slot_layer / slot_page are inverse."""
    tab = pool.table()
    lyr, pg = torch.nonzero(tab >= 0, as_tuple=True)
    slots = tab[lyr, pg].long()
    assert slots.unique().numel() == slots.numel(), "a slot holds two keys"
    assert torch.equal(pool.slot_layer[slots], lyr) and torch.equal(pool.slot_page[slots], pg)
    assert int((pool.slot_layer[: pool.capacity] >= 0).sum()) == slots.numel()
    assert pool.slot_of[-1] == -1
    if pool.quota != "off":  # slots held per layer match the map; the spare entry stays 0
        held = torch.bincount(lyr, minlength=pool.num_layers + 1)
        assert torch.equal(pool.layer_used, held), (pool.layer_used, held)


def expected_overflow(pool: DevicePagePool, layer: int, pages: list[int]) -> int:
    """Misses minus the eligible slots of the window, from the state before the call."""
    c = pool.capacity
    cur = [int(pool.slot_of[layer * NP + p]) for p in pages]
    nmiss = sum(s < 0 for s in cur)
    hits = {s for s in cur if s >= 0}
    h, ss, floor = int(pool.hand), int(pool.step_start), int(pool.pin_floor)
    window = [(h + j) % c for j in range(min(pool.clock_window * M, c))]
    free = [int(pool.slot_layer[s]) < 0 for s in window]
    last = [int(pool.last_use[s]) for s in window]
    prot = [(bool(pool.pinned[s]) and t >= floor) or t >= ss or s in hits for s, t in zip(window, last)]
    # a referenced slot only becomes eligible on a later call (its bit is cleared, it is skipped)
    eligible = sum(f or (not p and not int(pool.ref[s])) for s, f, p in zip(window, free, prot))
    return max(0, nmiss - eligible)


@settings(max_examples=50, deadline=None)
@given(capacity=st.integers(0, 12), window=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**32 - 1),
       length=st.integers(1, 40), block4=st.booleans(), lease=st.booleans(),
       quota=st.sampled_from([0, 1, 2, 16]))  # fmt: skip
def test_clock_kernel_equals_reference_and_keeps_invariants(capacity, window, seed, length, block4, lease,
                                                             quota):  # fmt: skip
    """Sticky pins hold until unpinned; lease pins (pin_lease) hold while the page's latest use pinned it
    and came in this step or the one before, and every use sets the pin anew. With quotas the victims
    differ, never the protection, the overflow count or the map's consistency (quota: the span of the
    search for allowed victims, in misses; 0 = no quotas)."""
    fused_place.BLOCK = 4 if block4 else 1024
    fused_place.QUOTA_BLOCK = 4 if block4 else 128
    ops = random_trace(random.Random(seed), length)
    try:
        tri, ref = (clock_pool(capacity, window, impl, lease, quota) for impl in ("triton", "torch"))
        used: set[tuple[int, int]] = set()  # used this step (or pinned): never evicted
        pinned: dict[tuple[int, int], int] = {}  # pinned page -> the step of the use that pinned it
        step = 0
        for op in ops:
            if op[0] == "place":
                _, layer, pages, pins, scratch = op
                ids, pin = padded(pages), torch.tensor(pins)
                pin[len(pages) :] = False
                want_over = expected_overflow(ref, layer, sorted(pages))
                before = ref.counters.clone()
                base = 100 if scratch else -1
                a = tri.place(layer, ids, pin, scratch_base=base)
                b = ref.place(layer, ids, pin, scratch_base=base)
                for f in ("slots", "fetch", "hit", "loc", "copy", "ncopy", "stamp"):
                    assert torch.equal(getattr(a, f), getattr(b, f)), f
                n_copy = int(b.ncopy)  # the copy list: the copy mask's pages and loc, packed in order
                assert n_copy == int(b.copy.sum())
                for f, full in (("copy_keys", ids), ("copy_loc", b.loc)):
                    assert torch.equal(getattr(a, f)[:n_copy], getattr(b, f)[:n_copy]), f
                    assert torch.equal(getattr(b, f)[:n_copy], full[b.copy]), f
                d = (ref.counters - before).tolist()
                assert d[3] == want_over
                if d[3]:
                    event("overflow")
                if d[2]:
                    event("eviction")
                n = len(pages)
                assert (b.slots[:n] >= 0).sum() + d[3] == n and b.slots[n:].eq(-1).all()
                if scratch:  # overflow pages get consecutive scratch slots in page order
                    over = ~b.hit & ~b.fetch & (ids >= 0)
                    assert b.loc[over].tolist() == list(range(100, 100 + int(over.sum())))
                for p, s, pn in zip(sorted(pages), b.slots.tolist(), pin.tolist()):
                    if s >= 0:
                        used.add((layer, p))
                        if pn:
                            pinned[(layer, p)] = step
                        elif lease:  # a use without the flag ends the lease
                            pinned.pop((layer, p), None)
            elif op[0] == "step":
                tri.new_step()
                ref.new_step()
                used = set()
                step += 1
                if lease:  # leases not renewed in the step before this one have run out
                    pinned = {k: t for k, t in pinned.items() if t >= step - 1}
            elif op[0] == "invalidate":
                _, layers, pages = op
                tri.invalidate(padded(pages), layers)
                ref.invalidate(padded(pages), layers)
                gone = {(lyr, p) for lyr in (layers or range(L)) for p in pages}
                used -= gone
                pinned = {k: t for k, t in pinned.items() if k not in gone}
            else:
                _, layer, pages = op
                tri.unpin(layer, padded(pages))
                ref.unpin(layer, padded(pages))
                pinned = {k: t for k, t in pinned.items() if k[0] != layer or k[1] not in pages}
            for name in state_names(ref):
                assert torch.equal(getattr(tri, name), getattr(ref, name)), name
            check_map(ref)
            for lyr, p in used | set(pinned):
                assert ref.slot_of[lyr * NP + p] >= 0, f"protected page {(lyr, p)} was evicted"
    finally:
        fused_place.BLOCK = 1024
        fused_place.QUOTA_BLOCK = 128


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_clock_hand_trace(impl):
    """Second chance, hand movement, protection of this step's pages, overflow and pins by hand."""
    pool = clock_pool(3, 1, impl)
    pool.new_step()
    a = pool.place(0, padded([1, 2, 3]))  # free slots 0, 1, 2 in scan order; hand wraps to 0
    assert a.slots[:3].tolist() == [0, 1, 2] and int(pool.hand) == 0
    b = pool.place(0, padded([4]))  # all three used this step: no victim in the window -> overflow
    assert b.slots[0] == -1 and int(pool.hand) == 0  # window 1 x M = 8 >= C: examined all 3, hand back to 0
    pool.new_step()
    pool.place(0, padded([2]))  # hit: slot 1 referenced and used this step
    # scan from 0 over the window (3 slots): slot 0 referenced -> bit cleared, slot 1 used this step
    # -> skipped, slot 2 referenced -> bit cleared: no victim, the page overflows
    c = pool.place(1, padded([5]))
    assert c.slots[0] == -1 and pool.ref.tolist()[:3] == [0, 1, 0]
    pool.new_step()
    d = pool.place(1, padded([5, 6]))  # slots 0 and 2 (bits cleared last step); slot 1: second chance
    assert d.slots[:2].tolist() == [0, 2] and int(pool.hand) == 0 and pool.ref[1] == 0
    assert pool.lookup(0, padded([1, 3]))[:2].tolist() == [-1, -1]
    assert pool.stats() == {"hits": 1, "misses": 7, "evictions": 2, "overflow": 2}
    # pins: a pinned slot is skipped, never evicted
    pool.new_step()
    pool.place(0, padded([2]), torch.tensor([True] + [False] * (M - 1)))
    pool.new_step()
    pool.ref.zero_()
    e = pool.place(2, padded([7, 8, 9]))
    assert 1 not in e.slots.tolist() and pool.lookup(0, padded([2]))[0] == 1


@pytest.mark.parametrize("capacity", [0, 5, 40])
def test_tiered_clock_triton_equals_torch_reference(capacity):
    """DeviceTieredAttention with the clock kernel and with its torch reference: same outputs, counters
    and pool state over steps with prefetch (the reference also fills the tiered counters)."""
    from test_tiered_device import Batch

    from sglang_psa.kernels import sparse_decode_ref

    b = Batch(11)
    ts = [b.tiered(capacity, policy="clock", clock_impl=impl) for impl in ("triton", "torch")]
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        for t in ts:
            t.begin_step(prefetch_first=True)
        for layer in range(2):
            idx, cnt = b.select(g)
            outs = [b.run(t, layer, idx, cnt, prefetch_next=True)[0] for t in ts]
            assert torch.equal(outs[0], outs[1])
            assert torch.equal(outs[0], b.resident(layer, idx, cnt, attend=sparse_decode_ref)[0])
    assert ts[0].stats() == ts[1].stats()
    for name in STATE:
        assert torch.equal(getattr(ts[0].pool, name), getattr(ts[1].pool, name)), name


@pytest.mark.gpu
def test_compiled_kernels_equal_references_on_the_gpu():
    """The compiled (not interpreted) kernels: union / table and clock traces against the references."""
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        sel = random_selection(g, 3, 2, 5, 2000)
        r2t, rpi, idx, cnt, p = (t.cuda() if torch.is_tensor(t) else t for t in sel)
        bitmap = torch.zeros(2000, dtype=torch.int8, device="cuda")
        want = fused_place.union_selected_ref(r2t, rpi, idx, cnt, p, 2000, 30)
        assert torch.equal(fused_place.union_selected(r2t, rpi, idx, cnt, p, 2000, 30, bitmap), want)
        loc = torch.randint(0, 50, (30,), dtype=torch.int32, device="cuda")
        tab = fused_place.page_table(r2t, rpi, p, 2000, want, loc)
        assert torch.equal(tab, fused_place.page_table_ref(r2t, rpi, p, 2000, want, loc))
        fill_stamp = torch.randint(-1, 3, (50,), device="cuda")
        stamp = torch.ones(1, dtype=torch.int64, device="cuda")
        idx_ok = torch.where(idx >= 0, idx, 0)
        parts = fused_place.split_selection(idx_ok, cnt, tab, fill_stamp, stamp)
        for x, y in zip(parts, fused_place.split_selection_ref(idx_ok, cnt, tab, fill_stamp, stamp)):
            assert torch.equal(x, y)
    for seed in range(20):
        rng = random.Random(seed)
        cap = rng.randint(0, 12)
        pools = [DevicePagePool(cap, L, NP, 2, 1, 2, torch.float32, "cuda", policy="clock", clock_window=2,
                                clock_impl=impl) for impl in ("triton", "torch")]  # fmt: skip
        for op in random_trace(rng, 40):
            for pool in pools:
                if op[0] == "place":
                    pool.place(op[1], padded(op[2]).cuda(), torch.tensor(op[3]).cuda(), scratch_base=7)
                elif op[0] == "step":
                    pool.new_step()
                elif op[0] == "invalidate":
                    pool.invalidate(padded(op[2]).cuda(), op[1])
                else:
                    pool.unpin(op[1], padded(op[2]).cuda())
            for name in STATE:
                assert torch.equal(getattr(pools[0], name), getattr(pools[1], name)), name


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), bs=st.integers(1, 3), hkv=st.integers(1, 3), w=st.integers(1, 7),
       per_head=st.booleans(), stamp=st.integers(0, 3))  # fmt: skip
def test_split_selection_equals_reference(seed, bs, hkv, w, per_head, stamp):
    """The split miss path's lists: each row's selected pages split by whether their table row carries
    the placement's fill stamp, both parts in selection order."""
    g = torch.Generator().manual_seed(seed)
    n, rows = 9, 12
    idx = torch.stack([torch.randperm(n, generator=g)[:w] for _ in range(bs * hkv)]).view(bs, hkv, w)
    cnt = torch.randint(0, w + 1, (bs, hkv), generator=g, dtype=torch.int32)
    idx = torch.where(torch.arange(w) < cnt[..., None], idx, -1).to(torch.int32)
    table = torch.randint(0, rows, (bs, hkv, n) if per_head else (bs, n), generator=g, dtype=torch.int32)
    fill_stamp = torch.randint(-1, 4, (rows,), generator=g)
    st_t = torch.tensor([stamp])
    got = fused_place.split_selection(idx, cnt, table, fill_stamp, st_t)
    want = fused_place.split_selection_ref(idx, cnt, table, fill_stamp, st_t)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
    assert torch.equal(got[1] + got[3], cnt)
    if w > 1:  # a view at an offset (a layer's row of a [L, bs, Hkv, W] buffer) reads the same
        big = torch.full((2, bs, hkv, w), -1, dtype=torch.int32)
        big[1] = idx
        assert torch.equal(fused_place.split_selection(big[1], cnt, table, fill_stamp, st_t)[2], want[2])


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_quota_victims_follow_the_layers_excess(impl):
    """C = 6, 3 layers, equal quotas of 2 (no update yet). A layer under its quota evicts a layer over
    its own even where the hand meets another layer's slots first; a layer at its quota evicts its own;
    allowances that run short fall back to any evictable slot (a page never overflows for a quota)."""
    pool = DevicePagePool(6, 3, NP, 2, 1, 2, torch.float32, policy="clock", clock_window=4, clock_impl=impl,
                          quota="adaptive", quota_interval=100)  # fmt: skip
    assert pool.layer_quota.tolist() == [2, 2, 2]
    pool.new_step()
    assert pool.place(0, padded([0, 1, 2, 3])).slots[:4].tolist() == [0, 1, 2, 3]  # borrows free slots
    assert pool.place(1, padded([0, 1])).slots[:2].tolist() == [4, 5]
    assert pool.layer_used.tolist() == [4, 2, 0, 0]
    pool.new_step()
    pool.ref.zero_()
    pool.hand.fill_(4)
    # layer 2 (0 of 2): layer 0 is 2 over, layer 1 at quota -> slots 0, 1, not the hand's 4, 5
    assert pool.place(2, padded([7, 8])).slots[:2].tolist() == [0, 1]
    assert pool.layer_used.tolist() == [2, 2, 2, 0] and int(pool.hand) == 2
    # layer 1 (2 of 2) needs one: its own slot 4, past layer 0's unreferenced 2 and 3
    assert pool.place(1, padded([9])).slots[0] == 4
    assert pool.layer_used.tolist() == [2, 2, 2, 0]
    # layer 2 needs 3 more: its own allowance is 3 (2 + 3 - 2) but its slots were used this step, so
    # the misses fall back to layer 0's 2, 3 and layer 1's 5 in scan order
    pool.ref.zero_()
    got = pool.place(2, padded([1, 2, 3])).slots[:3].tolist()
    assert sorted(got) == [2, 3, 5] and pool.layer_used.tolist() == [0, 1, 5, 0]
    check_map(pool)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_quota_search_ends_past_its_span(impl):
    """quota_span 1: once fallback victims suffice, the scan stops looking for allowed ones after
    span x misses slots; with a long span it walks on to the allowed slot."""
    got = {}
    for span in (1, 16):
        kw = dict(policy="clock", clock_impl=impl, quota="adaptive", quota_interval=99, quota_span=span)
        pool = DevicePagePool(6, 3, NP, 2, 1, 2, torch.float32, **kw)
        pool.new_step()
        pool.place(1, padded([0, 1, 2]))  # slots 0-2: layer 1
        pool.place(0, padded([0, 1, 2]))  # slots 3-5: layer 0
        pool.new_step()
        pool.ref.zero_()
        pool.layer_quota.copy_(torch.tensor([2, 3, 1]))  # layer 0 over by 1, layer 1 at its quota
        got[span] = pool.place(2, padded([9])).slots[0].item()  # from hand 0: slot 0 is a fallback victim
        assert pool.hand.item() == (1 if span == 1 else 4)
    assert got == {1: 0, 16: 3}


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_quotas_follow_each_layers_demand(impl):
    """Quotas = floor(C x average demand share), re-derived every quota_interval steps with demand;
    prefetch / fill placements (demand=False) and steps without demand leave them be."""
    pool = DevicePagePool(8, 3, NP, 2, 1, 2, torch.float32, policy="clock", clock_impl=impl, quota="adaptive",
                          quota_interval=2, quota_smoothing=0.5)  # fmt: skip
    pool.new_step()  # no demand yet: nothing changes
    assert pool.layer_quota.tolist() == [2, 2, 2] and int(pool.quota_steps) == 0
    pool.place(0, padded([0, 1, 2]))
    pool.place(1, padded([0]))
    pool.place(2, padded([5, 6, 7, 8]), demand=False)  # a prefetch: not demand
    assert pool.layer_demand.tolist() == [3, 1, 0]
    pool.new_step()  # step 1 of 2: the average starts at the demand, the quotas wait
    assert pool.demand_ema.tolist() == [3.0, 1.0, 0.0] and pool.layer_quota.tolist() == [2, 2, 2]
    pool.place(0, padded([0]))
    pool.place(2, padded([1, 2, 3]))
    pool.new_step()  # ema = 0.5 x (1, 0, 3) + 0.5 x (3, 1, 0) = (2, 0.5, 1.5): quotas floor(8 x share)
    assert pool.demand_ema.tolist() == [2.0, 0.5, 1.5] and pool.layer_quota.tolist() == [4, 1, 3]
    assert pool.layer_demand.tolist() == [0, 0, 0]


def test_invalidate_counts_each_freed_slot_once():
    """A KV write names its page once per token: repeated keys free one slot and count it once."""
    pool = clock_pool(6, 2, "torch", quota=16)
    pool.new_step()
    pool.place(1, padded([3, 4, 5]))
    pool.invalidate_layer(1, torch.tensor([4, 4, 4, -1, 5, 4, 9]))
    assert pool.layer_used.tolist() == [0, 1, 0, 0]
    check_map(pool)
