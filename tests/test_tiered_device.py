"""Device tiered decode (DevicePagePool + PageFetcher) returns resident decode's output for any pool size."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sglang_psa.kernels import sparse_decode, sparse_decode_ref
from sglang_psa.memory.device_tiered import DeviceTieredAttention
from sglang_psa.memory.hot_pool import HostTier
from sglang_psa.memory.uva_fetch import PageFetcher

L, P, HKV, G, D = 2, 16, 2, 2, 64
LENS = [9 * P + 1, 6 * P]  # request 1 shares request 0's first 3 pages (a radix-tree prefix)
W = 5  # selected pages per (request, kv head)
POLICIES = ["lru", "clock"]  # clock: the fused Triton placement (memory/fused_place.py)


class Batch:
    """Two requests over shuffled physical pages, full K/V of every layer in a host tier."""

    def __init__(self, seed: int, device: str = "cpu", dtype=torch.float32, spare: int = 3):
        g = torch.Generator().manual_seed(seed)
        n0, n1 = (math.ceil(n / P) for n in LENS)
        total = n0 + (n1 - 3) + 1 + spare  # page 0 unused, as in SGLang
        perm = torch.randperm(total - 1, generator=g) + 1
        pages0, pages1 = perm[:n0], torch.cat([perm[:3], perm[n0 : n0 + n1 - 3]])
        self.num_pages = total
        r2t = torch.zeros(2, n0 * P, dtype=torch.int32)
        for b, pg in enumerate((pages0, pages1)):
            r2t[b, : pg.numel() * P] = (pg[:, None] * P + torch.arange(P)).flatten().to(torch.int32)
        self.req_to_token = r2t.to(device)
        self.rpi = torch.arange(2, device=device)
        self.seq_lens = torch.tensor(LENS, dtype=torch.int32, device=device)
        self.q = torch.randn(2, HKV * G, D, generator=g).to(device, dtype)
        self.host = HostTier(L, total, P, HKV, D, dtype, pin_memory=device == "cuda")
        self.host.k.copy_(torch.randn(self.host.k.shape, generator=g))
        self.host.v.copy_(torch.randn(self.host.v.shape, generator=g))
        self.sm_scale, self.device = D**-0.5, device

    def select(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random distinct logical pages per (request, kv head): page_idx [2, HKV, W], counts [2, HKV]."""
        idx = torch.full((2, HKV, W), -1, dtype=torch.int32)
        cnt = torch.zeros(2, HKV, dtype=torch.int32)
        for b, n in enumerate(LENS):
            npg = math.ceil(n / P)
            for h in range(HKV):
                c = int(torch.randint(0, W + 1, (1,), generator=g))
                idx[b, h, :c] = torch.randperm(npg, generator=g)[:c].to(torch.int32)
                cnt[b, h] = c
        return idx.to(self.device), cnt.to(self.device)

    def select_into(self, g: torch.Generator, idx_buf, cnt_buf, layer: int) -> None:
        """select(g) copied into layer's rows of a graph's input buffers [L, 2, HKV, W] / [L, 2, HKV]."""
        idx, cnt = self.select(g)
        idx_buf[layer].copy_(idx)
        cnt_buf[layer].copy_(cnt)

    def resident(self, layer: int, idx, cnt, attend=sparse_decode_ref):
        k = self.host.k[layer].reshape(-1, HKV, D).to(self.device)
        v = self.host.v[layer].reshape(-1, HKV, D).to(self.device)
        return attend(self.q, k, v, self.req_to_token, self.rpi, self.seq_lens, idx, cnt, P, self.sm_scale)

    def tiered(self, capacity: int, attend=sparse_decode_ref, granularity: str = "page", **kw):
        if granularity == "head":  # slots of one kv head's page (the triton fetch backend)
            width = DeviceTieredAttention.union_width(2, HKV, W, self.num_pages, head_pages=True)
            return DeviceTieredAttention.build(capacity, self.host, width, self.device, head_pages=True,
                                               attend=attend, backend="triton", **kw)  # fmt: skip
        width = DeviceTieredAttention.union_width(2, HKV, W, self.num_pages)
        return DeviceTieredAttention.build(capacity, self.host, width, self.device, attend=attend, **kw)

    def run(self, t: DeviceTieredAttention, layer: int, idx, cnt, **kw):
        args = (self.q, self.req_to_token, self.rpi, self.seq_lens, idx, cnt, self.sm_scale)
        return t.forward(layer, *args, **kw)


def record_copies(t: DeviceTieredAttention) -> list:
    """Wrap the fetcher so each call's (pages, slots, copy) is kept for checks."""
    calls, inner = [], t.fetcher.copy

    def copy(layer, pages, slots, mask, **kw):
        calls.append((layer, pages.clone(), slots.clone(), mask.clone()))
        inner(layer, pages, slots, mask, **kw)

    t.fetcher.copy = copy
    return calls


def check_pool(t) -> None:
    """The map is a bijection between resident (layer, page) keys and occupied slots."""
    pool = t.pool
    tab = pool.table()
    lyr, pg = torch.nonzero(tab >= 0, as_tuple=True)
    slots = tab[lyr, pg].long()
    assert slots.unique().numel() == slots.numel(), "a slot is assigned to two pages"
    assert torch.equal(pool.slot_layer[slots], lyr) and torch.equal(pool.slot_page[slots], pg)
    assert int((pool.slot_layer[: pool.capacity] >= 0).sum()) == slots.numel()
    if pool.quota != "off":
        assert torch.equal(pool.layer_used, torch.bincount(lyr, minlength=pool.num_layers + 1))


def capture_step(step):
    """step() warmed up on a side stream (kernels compile, workspaces are allocated), then captured in
    a CUDA graph: (graph, the captured call's outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    return graph, outs


def graph_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """A captured step's selection buffers: page_idx [L, 2, HKV, W] (-1) and counts [L, 2, HKV] (0)."""
    idx_buf = torch.full((L, 2, HKV, W), -1, dtype=torch.int32, device="cuda")
    return idx_buf, torch.zeros(L, 2, HKV, dtype=torch.int32, device="cuda")


def prefetching_step(b, t, idx_buf, cnt_buf):
    """A decode step over both layers from the buffers, with previous-step prefetch (to capture)."""

    def step():
        t.begin_step(prefetch_first=True)
        return [b.run(t, layer, idx_buf[layer], cnt_buf[layer], prefetch_next=True) for layer in range(L)]

    return step


def replays_equal_resident(b, t, graph, outs, idx_buf, cnt_buf, new_inputs, check=None, times=4) -> None:
    """Replays after new_inputs() give resident decode's out and lse in every layer; the pool's map
    stays a bijection (and check() holds)."""
    for _ in range(times):
        new_inputs()
        graph.replay()
        torch.cuda.synchronize()
        for layer in range(L):
            ref, ref_lse = b.resident(layer, idx_buf[layer], cnt_buf[layer], attend=sparse_decode)
            assert torch.allclose(outs[layer][0].float(), ref.float(), atol=2e-2)
            assert torch.allclose(outs[layer][1], ref_lse, atol=2e-2)
        check_pool(t)
        if check is not None:
            check()


# ----------------------------------------------------------------------------- fetcher
def test_fetcher_copies_pages_and_sends_dummies_to_the_sink():
    b = Batch(0)
    dst_k = torch.zeros(6, P, HKV, D)
    dst_v = torch.zeros_like(dst_k)
    f = PageFetcher(b.host, dst_k, dst_v, sink_slot=5)
    pages = torch.tensor([3, 7, -1, 2], dtype=torch.int32)
    slots = torch.tensor([4, 0, -1, 1])
    copy = torch.tensor([True, True, False, False])
    f.copy(1, pages, slots, copy)
    assert torch.equal(dst_k[4], b.host.k[1, 3]) and torch.equal(dst_v[0], b.host.v[1, 7])
    assert dst_k[1:4].eq(0).all() and dst_v[1:4].eq(0).all()  # not copied: untouched
    src_k, src_v, dst = f.indices(1, pages, slots, copy)
    assert src_k.shape == dst.shape == (4 * P,)
    assert dst[2 * P :].div(P, rounding_mode="floor").eq(5).all()  # dummies land in the sink slot


def test_fetcher_kernel_backend_refuses_a_head_slice():
    b = Batch(0)
    view = HostTier.wrap(b.host.k[:, :, :, :1], b.host.v[:, :, :, :1])
    dst = torch.zeros(4, P, 1, D)
    with pytest.raises(ValueError, match="kv-head slice"):
        PageFetcher(view, dst, dst.clone(), sink_slot=3, backend="kernel")
    assert PageFetcher(view, dst, dst.clone(), sink_slot=3).backend == "torch"  # auto on the CPU


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(0, 30),
    seed=st.integers(0, 2**16),
    steps=st.integers(1, 4),
    prefetch=st.booleans(),
    miss_path=st.sampled_from(["pool", "host", "split"]),
    quota=st.booleans(),
)
def test_device_tiered_equals_resident(
    granularity, policy, capacity, seed, steps, prefetch, miss_path, quota
):
    """Slots of a page of all kv heads, or of one kv head's page (P x D; copies read the head's rows of
    the host tier in place, all heads of a layer in one union, placement, copy and attention). Misses
    attended from their new slots, straight from the host tier, or (split) in a second pass after their
    side-stream copy, merged with the resident pages' (miss_path; split differs only by the merge's
    rounding). Per-layer quotas (clock) change victims, never results."""
    b = Batch(seed)
    qkw = {"quota": "adaptive", "quota_interval": 1} if quota and policy == "clock" else {}
    t = b.tiered(capacity, policy=policy, granularity=granularity, miss_path=miss_path, **qkw)
    per_head = granularity == "head"
    if per_head:
        assert t.pool.k.shape[1:] == (P, 1, D) and t.pool.num_pages == HKV * b.num_pages
    calls = record_copies(t)
    g = torch.Generator().manual_seed(seed + 1)
    phys = b.req_to_token[:, ::P].long() // P
    needed = []
    for _ in range(steps):
        t.begin_step(prefetch_first=prefetch)
        for layer in range(L):
            idx, cnt = b.select(g)
            out, lse = b.run(t, layer, idx, cnt, prefetch_next=prefetch)
            ref, ref_lse = b.resident(layer, idx, cnt)
            if miss_path == "split":  # two passes merged: the same keys, rounded once more
                assert torch.allclose(out, ref, atol=1e-6, rtol=1e-5)
            else:  # same keys, same order, float64 reference: bit-equal
                assert torch.equal(out, ref)
            assert torch.allclose(lse, ref_lse, atol=1e-6) or torch.equal(lse, ref_lse)
            check_pool(t)
            # pages needed = the unique physical pages (per kv head with head slots: a head fetches
            # only its own pages)
            pairs = [(r, h) for r in range(2) for h in range(HKV)]
            keys = {(h * per_head, int(phys[r, int(j)])) for r, h in pairs for j in idx[r, h, : cnt[r, h]]}
            needed.append(len(keys))
    for _, _, slots, mask in calls:  # every call copies into distinct slots
        s = slots[mask]
        assert s.unique().numel() == s.numel()
    st_ = t.stats()
    assert st_["hits"] + st_["fetched"] + st_["overflow"] == st_["needed"] == sum(needed)
    if st_["overflow"]:
        event("overflow")
    if st_["hits"]:
        event("hits")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("capacity", [0, 4, 64])
def test_triton_kernel_through_the_pool_equals_resident_kernel(capacity, policy):
    b = Batch(3)
    t = b.tiered(capacity, attend=sparse_decode, policy=policy)
    g = torch.Generator().manual_seed(5)
    for _ in range(2):
        t.begin_step()
        for layer in range(L):
            idx, cnt = b.select(g)
            out, lse = b.run(t, layer, idx, cnt)
            ref, ref_lse = b.resident(layer, idx, cnt, attend=sparse_decode)
            assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(lse, ref_lse, atol=1e-5)


@pytest.mark.parametrize("policy", POLICIES)
def test_tiny_pool_overflows_into_scratch_and_stays_exact(policy):
    b = Batch(1)
    t = b.tiered(2, policy=policy)
    g = torch.Generator().manual_seed(2)
    t.begin_step()
    idx, cnt = b.select(g)
    cnt.fill_(W)
    idx = torch.arange(W, dtype=torch.int32).expand(2, HKV, W).contiguous()
    out, _ = b.run(t, 0, idx, cnt)
    assert torch.equal(out, b.resident(0, idx, cnt)[0])
    s = t.stats()
    assert s["fetched"] == 2 and s["overflow"] == s["needed"] - 2 > 0


def window_selection(b: Batch, g: torch.Generator, only: bool = False):
    """Each request's first and last page in every row, as PSA's sink and local window force them, then
    (unless only) up to W - 2 random other pages."""
    idx, cnt = (t.cpu() for t in b.select(g))
    for r, n in enumerate(LENS):
        last = math.ceil(n / P) - 1
        for h in range(HKV):
            rest = [] if only else [j for j in idx[r, h, : cnt[r, h]].tolist() if j not in (0, last)]
            row = [0, last] + rest[: W - 2]
            idx[r, h] = -1
            idx[r, h, : len(row)] = torch.tensor(row, dtype=torch.int32)
            cnt[r, h] = len(row)
    return idx.to(b.device), cnt.to(b.device)


def window_keys(b: Batch, head_pages: bool) -> torch.Tensor:
    """Pool keys of the requests' first and last pages (every kv head's, with head slots)."""
    ends = [(r, j) for r, n in enumerate(LENS) for j in (0, math.ceil(n / P) - 1)]
    pages = sorted({int(b.req_to_token[r, j * P]) // P for r, j in ends})
    keys = [h * b.num_pages + p for h in range(HKV) for p in pages] if head_pages else pages
    return torch.tensor(keys, dtype=torch.int32, device=b.device)


@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
def test_pinned_window_pages_stay_while_other_misses_churn(policy, granularity):
    """pin_window (sink 1, local 1), a pool exactly the size of both layers' window pages: once placed
    they stay resident through later steps whose other pages all miss (and overflow into scratch),
    outputs exact throughout. Without the pins, LRU lets layer 0's misses take layer 1's window pages;
    CLOCK keeps them here anyway (layer 1 sets their reference bits every step, and a call's scan
    covers at most one lap of the pool, so with two layers their second chance never runs out)."""
    keys = window_keys(Batch(5), granularity == "head")
    kept = {}
    for pin in (True, False):
        b, g = Batch(5), torch.Generator().manual_seed(6)
        t = b.tiered(L * keys.numel(), policy=policy, granularity=granularity,
                     pin_window=(1, 1) if pin else None)  # fmt: skip
        resident = []
        for step in range(5):
            t.begin_step()
            for layer in range(L):
                idx, cnt = window_selection(b, g, only=step == 0)
                out, _ = b.run(t, layer, idx, cnt)
                assert torch.equal(out, b.resident(layer, idx, cnt)[0])
            check_pool(t)
            resident.append(all(bool((t.pool.lookup(layer, keys) >= 0).all()) for layer in range(L)))
        assert resident[0], "the first step selects only the window pages: they all fit"
        kept[pin] = all(resident)
    assert kept[True] and kept[False] == (policy == "clock")


@pytest.mark.parametrize("granularity", ["page", "head"])
def test_pin_flags_follow_the_window_from_step_to_step(granularity):
    """The window pages are marked once a step (its first placement) and read by every later call of
    the step: flags name exactly the union entries that are a request's first or last page at this
    step's lengths; after begin_step a shorter request's old last page is no longer flagged."""
    b = Batch(7)
    head = granularity == "head"
    t = b.tiered(8, granularity=granularity, pin_window=(1, 1))
    union = torch.arange(b.num_pages * (HKV if head else 1), dtype=torch.int32)
    union[-2:] = -1  # padding is never pinned

    def expected(lens):
        pages = {int(b.req_to_token[r, j * P]) // P for r, n in enumerate(lens) for j in (0, (n - 1) // P)}
        key = union.long().remainder(b.num_pages) if head else union.long()
        return torch.tensor([u >= 0 and int(k) in pages for u, k in zip(union.tolist(), key)])

    for lens in (LENS, [LENS[0], LENS[1] - P], [LENS[0] - 2 * P, LENS[1]]):
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        t.begin_step()
        first = t._pins(union, b.req_to_token, b.rpi, seq_lens)
        assert torch.equal(first, expected(lens))
        # later layers of the step reuse the marks (their seq_lens are the step's)
        assert torch.equal(t._pins(union, b.req_to_token, b.rpi, seq_lens), first)


def test_pin_window_needs_a_lease_pool():
    b = Batch(0)
    t = b.tiered(4)
    with pytest.raises(ValueError, match="pin_lease"):
        DeviceTieredAttention(t.pool, t.width, pin_window=(1, 1))


# ----------------------------------------------------------------------------- per kv head
def test_per_head_invalidation_drops_every_heads_copy():
    b = Batch(2)
    t = b.tiered(64, granularity="head")
    idx = torch.tensor([[[0, 1, 2], [2, 3, 4]], [[0, 1, 5], [0, 2, 3]]], dtype=torch.int32)
    cnt = torch.full((2, HKV), 3, dtype=torch.int32)
    t.begin_step()
    b.run(t, 0, idx, cnt)
    phys = int(b.req_to_token[0, 2 * P]) // P  # logical page 2 of request 0: selected by both heads
    b.host.k[0, phys] = torch.randn(P, HKV, D)
    t.invalidate_layer(0, torch.tensor([phys * P + 3]) // P)
    t.begin_step()
    out, _ = b.run(t, 0, idx, cnt)
    assert torch.equal(out, b.resident(0, idx, cnt)[0])


def check_contents(t, host: HostTier) -> None:
    """Every resident slot holds its host page (all kv heads, or the one head of a head page)."""
    pool = t.pool
    tab = pool.table()
    for layer, key in torch.nonzero(tab >= 0).tolist():
        slot = int(tab[layer, key])
        if t.head_pages:
            h, page = divmod(key, t.host_pages)
            want_k, want_v = host.k[layer, page, :, h : h + 1], host.v[layer, page, :, h : h + 1]
        else:
            want_k, want_v = host.k[layer, key], host.v[layer, key]
        assert torch.equal(pool.k[slot].cpu(), want_k) and torch.equal(pool.v[slot].cpu(), want_v), (
            layer,
            key,
        )


@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=15, deadline=None)
@given(capacity=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_write_through_keeps_written_pages_resident_and_exact(policy, granularity, capacity, seed):
    """Decode appends a token per request and layer (the host tier gets its K/V, write_through gets the
    same rows): resident slots keep equalling the host tier, outputs stay resident's, and a written
    page that was resident keeps its slot (invalidation would have dropped it)."""
    b = Batch(seed)
    t = b.tiered(capacity, policy=policy, granularity=granularity)
    g = torch.Generator().manual_seed(seed + 3)
    last = [(n - 1) // P for n in LENS]  # each request's newest logical page, selected every step
    for _ in range(3):
        t.begin_step()
        for layer in range(L):
            # a decode write: one new row at an offset of each request's newest page (loc = slot id)
            loc = torch.stack([b.req_to_token[r, last[r] * P + int(torch.randint(0, P, (1,), generator=g))]
                               for r in range(2)]).long()  # fmt: skip
            k_new, v_new = torch.randn(2, HKV, D, generator=g), torch.randn(2, HKV, D, generator=g)
            b.host.k[layer].view(-1, HKV, D)[loc] = k_new
            b.host.v[layer].view(-1, HKV, D)[loc] = v_new
            keys = loc // P
            if t.head_pages:
                keys = (keys[:, None] + torch.arange(HKV) * t.host_pages).reshape(-1)
            slots_before = t.pool.lookup(layer, keys)
            t.write_through(layer, torch.cat([loc, torch.tensor([-1])]),  # -1: a padded row
                            torch.cat([k_new, k_new[:1]]), torch.cat([v_new, v_new[:1]]))  # fmt: skip
            assert torch.equal(t.pool.lookup(layer, keys), slots_before)  # resident pages stay resident
            check_contents(t, b.host)
            idx, cnt = b.select(g)
            idx[:, :, 0], cnt = torch.tensor(last, dtype=torch.int32)[:, None], cnt.clamp(min=1)
            idx = torch.where(torch.arange(W)[None, None] < cnt[..., None], idx, -1)
            out, _ = b.run(t, layer, idx, cnt)
            assert torch.equal(out, b.resident(layer, idx, cnt)[0])
            check_pool(t)
            check_contents(t, b.host)


@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=15, deadline=None)
@given(capacity=st.integers(0, 40), seed=st.integers(0, 2**16), start=st.integers(0, 2 * P),
       length=st.integers(1, 5 * P))  # fmt: skip
def test_fill_places_whole_pages_at_low_priority_and_exact(policy, granularity, capacity, seed, start,
                                                           length):  # fmt: skip
    """A prefill write of request 0's token positions [start, start + length): the pages all of whose
    rows it writes become resident (as many as fit) with the host's contents, partly written pages
    that were resident get the new rows, nothing else changes; new pages carry no reference bit / the
    oldest use, and later placements stay exact."""
    b = Batch(seed)
    t = b.tiered(capacity, policy=policy, granularity=granularity)
    g = torch.Generator().manual_seed(seed + 5)
    t.begin_step()
    idx, cnt = b.select(g)
    b.run(t, 0, idx, cnt)  # some pages resident before the write
    end = min(start + length, LENS[0])
    loc = b.req_to_token[0, start:end].long()
    k_new, v_new = torch.randn(len(loc), HKV, D, generator=g), torch.randn(len(loc), HKV, D, generator=g)
    b.host.k[0].view(-1, HKV, D)[loc] = k_new
    b.host.v[0].view(-1, HKV, D)[loc] = v_new
    filled_before = t.stats()["filled"]
    t.begin_step()  # a prefill between decode steps: the last step's pages are evictable again
    pad = torch.tensor([-1])  # a padded row
    t.fill(0, torch.cat([loc, pad]), torch.cat([k_new, k_new[:1]]), torch.cat([v_new, v_new[:1]]))
    check_pool(t)
    check_contents(t, b.host)
    whole = [j for j in range(start // P, (end - 1) // P + 1) if j * P >= start and (j + 1) * P <= end]
    keys = torch.tensor([int(b.req_to_token[0, j * P]) // P for j in whole], dtype=torch.int64)
    if t.head_pages:
        keys = (keys[:, None] + torch.arange(HKV) * t.host_pages).reshape(-1)
    slots = t.pool.lookup(0, keys).long()
    new = t.stats()["filled"] - filled_before
    assert int((slots >= 0).sum()) >= new
    if policy == "lru":  # LRU finds a victim for every page that fits (CLOCK scans a bounded window)
        assert capacity < keys.numel() or bool((slots >= 0).all())
        assert int((t.pool.last_use[slots[slots >= 0]] == 0).sum()) >= new  # new ones: the oldest use
    else:
        assert int(t.pool.ref[slots[slots >= 0]].sum()) <= keys.numel() - new  # new ones: bit clear
    t.begin_step()
    for layer in range(L):
        idx, cnt = b.select(g)
        out, _ = b.run(t, layer, idx, cnt)
        assert torch.equal(out, b.resident(layer, idx, cnt)[0])
        check_pool(t)
        check_contents(t, b.host)


# ----------------------------------------------------------------------------- staleness
@pytest.mark.parametrize("policy", POLICIES)
def test_invalidated_page_is_refetched_never_served_stale(policy):
    b = Batch(2)
    t = b.tiered(64, policy=policy)
    idx = torch.tensor([[[0, 1, 2], [2, 3, 4]], [[0, 1, 5], [0, 2, 3]]], dtype=torch.int32)
    cnt = torch.full((2, HKV), 3, dtype=torch.int32)
    t.begin_step()
    b.run(t, 0, idx, cnt)
    assert t.stats()["fetched"] > 0
    # the radix cache frees physical page of (req 0, logical 1) and reuses it with new contents
    phys = int(b.req_to_token[0, 1 * P]) // P
    b.host.k[:, phys] = torch.randn(L, P, HKV, D)
    b.host.v[:, phys] = torch.randn(L, P, HKV, D)
    t.pool.invalidate(torch.tensor([phys]))
    check_pool(t)
    t.begin_step()
    out, _ = b.run(t, 0, idx, cnt)
    assert torch.equal(out, b.resident(0, idx, cnt)[0])
    s = t.stats()
    assert s["fetched"] == s["needed"] - s["hits"] and s["needed"] - s["hits"] >= 1


@pytest.mark.parametrize("policy", POLICIES)
def test_prefetch_turns_next_layer_misses_into_hits(policy):
    b = Batch(4)
    t = b.tiered(64, policy=policy)
    g = torch.Generator().manual_seed(0)
    sel = [b.select(g) for _ in range(L)]
    t.begin_step()
    for layer in range(L):
        b.run(t, layer, *sel[layer])
    # empty the pool but keep the step's unions as the prediction: the same selections again
    t.pool.invalidate(torch.arange(b.num_pages))
    t.counters.zero_()
    t.begin_step(prefetch_first=True)
    for layer in range(L):
        out, _ = b.run(t, layer, *sel[layer], prefetch_next=True)
        assert torch.equal(out, b.resident(layer, *sel[layer])[0])
    s = t.stats()
    assert s["prefetched"] == s["needed"] == s["hits"] > 0 and s["fetched"] == 0


@pytest.mark.parametrize("programs", [None, 1])
@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
def test_next_layer_speculation_prefetches_what_the_layer_then_selects(policy, granularity, programs):
    """speculate(l + 1) with layer l+1's exact selection: forward(l, prefetch_next="next-layer") moves
    all of layer l+1's misses on the side stream, and layer l+1 finds them resident. programs: the
    prefetch copy's grid (--psa-prefetch-programs; 1 program strides over every page)."""
    b = Batch(6)
    t = b.tiered(64, policy=policy, granularity=granularity, prefetch_programs=programs)
    g = torch.Generator().manual_seed(2)
    sel = [b.select(g) for _ in range(L)]
    t.begin_step()
    t.speculate(1, b.req_to_token, b.rpi, *sel[1])
    b.run(t, 0, *sel[0], prefetch_next="next-layer")
    before = t.stats()
    out, _ = b.run(t, 1, *sel[1])
    assert torch.equal(out, b.resident(1, *sel[1])[0])
    s = t.stats()
    needed = s["needed"] - before["needed"]
    assert needed > 0 and s["hits"] - before["hits"] == needed and s["fetched"] == before["fetched"]
    assert s["prefetched"] == needed  # an empty pool: every page of layer 1 was a miss, all prefetched


@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=25, deadline=None)
@given(capacity=st.integers(0, 24), seed=st.integers(0, 2**16))
def test_wrong_speculation_costs_bandwidth_never_correctness(policy, granularity, capacity, seed):
    """Predictions unrelated to what layers then select (a random selection): outputs stay resident's."""
    b = Batch(seed)
    t = b.tiered(capacity, policy=policy, granularity=granularity)
    g = torch.Generator().manual_seed(seed + 7)
    for _ in range(3):
        t.begin_step()
        for layer in range(L):
            if layer + 1 < L:
                t.speculate(layer + 1, b.req_to_token, b.rpi, *b.select(g))
            idx, cnt = b.select(g)
            out, _ = b.run(t, layer, idx, cnt, prefetch_next="next-layer")
            assert torch.equal(out, b.resident(layer, idx, cnt)[0])
            check_pool(t)
    s = t.stats()
    assert s["hits"] + s["fetched"] + s["overflow"] == s["needed"]


@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
def test_next_step_prefetch_brings_the_stored_prediction_before_its_layer(policy, granularity):
    """prefetch "next-step": the union speculate(l) stored at one step (in the server: the pages below
    layer l's cut) is copied at the next step on the side stream, by begin_step for layer 0 and by
    forward(l - 1) for the others; a step that selects exactly those pages fetches nothing itself."""
    b = Batch(8)
    t = b.tiered(200, policy=policy, granularity=granularity)
    g = torch.Generator().manual_seed(3)
    sel = [b.select(g) for _ in range(L)]
    gained = [b.select(g) for _ in range(L)]
    t.begin_step(prefetch_first="next-step")
    for layer in range(L):
        t.speculate(layer, b.req_to_token, b.rpi, *gained[layer])  # layer's prediction for the next step
        b.run(t, layer, *sel[layer], prefetch_next="next-step")
    before = t.stats()
    assert before["prefetched"] == 0  # nothing was predicted for the first step
    t.begin_step(prefetch_first="next-step")
    for layer in range(L):
        out, _ = b.run(t, layer, *gained[layer], prefetch_next="next-step")
        assert torch.equal(out, b.resident(layer, *gained[layer])[0])
    s = t.stats()
    assert s["fetched"] == before["fetched"] and s["overflow"] == before["overflow"] == 0
    assert s["prefetched"] > 0 and s["needed"] - before["needed"] == s["hits"] - before["hits"]


@pytest.mark.parametrize("miss_path", ["host", "split"])
@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
def test_side_miss_paths_attend_misses_beside_the_pool_and_fill_their_slots(policy, granularity, miss_path):
    """miss_path "host" / "split": the first step reads its misses from the host tier / from their slots
    in a second pass after the side-stream copy (on a GPU the copy runs beside the resident pages'
    attention; here the side copies are inline), and the copies fill their slots, so the same selection
    next step is all hits from the pool, equal to resident decode both times."""
    b = Batch(12)
    t = b.tiered(200, attend=sparse_decode, policy=policy, granularity=granularity, miss_path=miss_path)
    g = torch.Generator().manual_seed(5)
    sel = [b.select(g) for _ in range(L)]
    for step in range(2):
        t.begin_step()
        for layer in range(L):
            out, _ = b.run(t, layer, *sel[layer])  # the Triton kernel (interpreted on the CPU)
            assert torch.allclose(out, b.resident(layer, *sel[layer])[0], atol=1e-5)
        s = t.stats()
        if step == 0:
            assert s["hits"] == 0 and s["fetched"] == s["needed"] > 0
    assert s["hits"] == s["needed"] - s["fetched"] == s["fetched"]  # step 2: every page from the pool
    check_pool(t)
    tab = t.pool.table()
    for layer, pg in torch.nonzero(tab >= 0).tolist():  # every slot holds its host page
        slot = int(tab[layer, pg])
        if granularity == "head":  # key h * NP + p: head h of host page p
            assert torch.equal(t.pool.k[slot, :, 0], b.host.k[layer, pg % b.num_pages, :, pg // b.num_pages])
        else:
            assert torch.equal(t.pool.k[slot], b.host.k[layer, pg])


def test_miss_path_is_checked():
    with pytest.raises(ValueError, match="miss_path must be one of pool, host, split"):
        Batch(0).tiered(8, miss_path="disk")


def test_prefetch_next_rejects_an_unknown_prediction():
    b = Batch(1)
    t = b.tiered(8)
    with pytest.raises(ValueError, match="prefetch_next must be off, previous-step, next-layer or next-step"):
        b.run(t, 0, *b.select(torch.Generator().manual_seed(0)), prefetch_next="sometimes")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("pad", ["host", "device"])
def test_uva_transfer_kernel_equals_torch_fallback(pad):
    b = Batch(0, device="cuda", dtype=torch.bfloat16)
    assert b.host.k.is_pinned()
    outs = []
    for backend in ("kernel", "torch"):
        dst_k = torch.zeros(9, P, HKV, D, dtype=torch.bfloat16, device="cuda")
        dst_v = torch.zeros_like(dst_k)
        f = PageFetcher(b.host, dst_k, dst_v, sink_slot=8, backend=backend, pad=pad)
        pages = torch.tensor([5, 1, -1, 3, 2, 7], dtype=torch.int32, device="cuda")
        slots = torch.tensor([0, 6, -1, 2, 3, 1], device="cuda")
        copy = torch.tensor([True, True, False, True, False, True], device="cuda")
        f.copy(1, pages, slots, copy)
        torch.cuda.synchronize()
        outs.append((dst_k[:8].clone(), dst_v[:8].clone()))  # the sink (slot 8) may differ
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][0][6].cpu(), b.host.k[1, 1]) and outs[0][0][4].eq(0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("miss_path", ["pool", "host", "split"])
@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("capacity", [3, 64])
def test_whole_step_replays_in_a_cuda_graph(capacity, policy, granularity, miss_path):
    """Both layers (place, UVA fetch, prefetch on the side stream, attention) captured once and
    replayed with new selections give resident decode's result, also with a pool that overflows;
    with miss_path "host" the misses are attended from pinned host memory and copied beside."""
    b = Batch(7, device="cuda", dtype=torch.bfloat16)
    t = b.tiered(capacity, attend=sparse_decode, policy=policy, granularity=granularity, miss_path=miss_path)
    g = torch.Generator().manual_seed(1)
    idx_buf, cnt_buf = graph_inputs()

    def new_inputs():
        for layer in range(L):
            b.select_into(g, idx_buf, cnt_buf, layer)

    new_inputs()
    graph, outs = capture_step(prefetching_step(b, t, idx_buf, cnt_buf))
    t.reset()
    replays_equal_resident(b, t, graph, outs, idx_buf, cnt_buf, new_inputs)
    s = t.stats()
    assert s["hits"] + s["fetched"] + s["overflow"] == s["needed"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("policy", POLICIES)
def test_pinned_window_replays_in_a_cuda_graph(policy, granularity):
    """pin_window's pin flags (req_to_token gathers, a mark workspace) inside a captured step: replays
    equal resident decode and keep every window page resident in a pool of exactly those pages."""
    b = Batch(5, device="cuda", dtype=torch.bfloat16)
    keys = window_keys(b, granularity == "head")
    t = b.tiered(L * keys.numel(), attend=sparse_decode, policy=policy, granularity=granularity,
                 pin_window=(1, 1))  # fmt: skip
    g = torch.Generator().manual_seed(6)
    idx_buf, cnt_buf = graph_inputs()

    def step():
        t.begin_step()
        return [b.run(t, layer, idx_buf[layer], cnt_buf[layer]) for layer in range(L)]

    def new_inputs(only: bool = False):
        for layer in range(L):
            idx_buf[layer], cnt_buf[layer] = window_selection(b, g, only)

    new_inputs(only=True)
    graph, outs = capture_step(step)
    t.reset()
    graph.replay()  # the window pages only: they fill the pool
    torch.cuda.synchronize()

    def all_resident():
        assert all(bool((t.pool.lookup(layer, keys) >= 0).all()) for layer in range(L))

    all_resident()
    replays_equal_resident(b, t, graph, outs, idx_buf, cnt_buf, new_inputs, check=all_resident)


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["page", "head"])
def test_quotas_replay_in_a_cuda_graph(granularity):
    """Per-layer quotas inside a captured step (the quota scan, the slot counts, begin_step's update
    from the step's demand): replays equal resident decode, and the quotas follow the layers'
    demand (layer 0 selects each row's first W pages, layer 1 at most one random page per row)."""
    b = Batch(9, device="cuda", dtype=torch.bfloat16)
    t = b.tiered(12, attend=sparse_decode, policy="clock", granularity=granularity, miss_path="split",
                 quota="adaptive", quota_interval=1, quota_smoothing=1.0)  # fmt: skip
    g = torch.Generator().manual_seed(3)
    idx_buf, cnt_buf = graph_inputs()

    def new_inputs():
        b.select_into(g, idx_buf, cnt_buf, 1)
        cnt_buf[1].clamp_(max=1)
        idx_buf[0].copy_(torch.arange(W, dtype=torch.int32, device="cuda").expand(2, HKV, W))
        cnt_buf[0].fill_(W)

    new_inputs()
    graph, outs = capture_step(prefetching_step(b, t, idx_buf, cnt_buf))
    t.reset()
    replays_equal_resident(b, t, graph, outs, idx_buf, cnt_buf, new_inputs)
    t.begin_step()  # folds the last replay's demand in
    q = t.pool.layer_quota.tolist()
    assert q[0] > q[1] and sum(q) <= 12, q


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["page", "head"])
@pytest.mark.parametrize("capacity", [3, 64])
def test_next_step_prefetch_replays_in_a_cuda_graph(capacity, granularity):
    """--psa-prefetch next-step as the server records it: after each layer's forward, select_margin
    over its ranking and speculate(layer) on the side stream (joined by the next layer; the last layer
    inline), prefetch of the previous step's margins by begin_step and forward(l - 1). Replays with
    new selections and rankings equal resident decode, and margins of one replay are prefetched in
    the next."""
    import contextlib

    from sglang_psa.kernels import select_margin

    b = Batch(9, device="cuda", dtype=torch.bfloat16)
    t = b.tiered(capacity, attend=sparse_decode, policy="clock", granularity=granularity)
    g = torch.Generator().manual_seed(4)
    n = math.ceil(max(LENS) / P)
    idx_buf, cnt_buf = graph_inputs()
    order_buf = torch.zeros(L, 2, HKV, n, device="cuda")

    def step():
        t.begin_step(prefetch_first="next-step")
        outs = []
        for layer in range(L):
            outs.append(b.run(t, layer, idx_buf[layer], cnt_buf[layer], prefetch_next="next-step"))
            last = layer + 1 == L  # the margin after forward, behind the layer's side-stream copies
            ctx = contextlib.nullcontext() if last else t.on_side_stream(layer + 1, order_buf[layer])
            with ctx:
                sel = (idx_buf[layer], cnt_buf[layer])
                m_idx, m_cnt = select_margin(order_buf[layer], b.seq_lens, *sel, P, 3)
                t.speculate(layer, b.req_to_token, b.rpi, m_idx, m_cnt)
        return outs

    def refill():
        for layer in range(L):
            b.select_into(g, idx_buf, cnt_buf, layer)
            order_buf[layer].copy_(torch.randn(order_buf.shape[1:], generator=g))

    refill()
    graph, outs = capture_step(step)
    t.reset()
    replays_equal_resident(b, t, graph, outs, idx_buf, cnt_buf, refill)
    s = t.stats()
    assert s["hits"] + s["fetched"] + s["overflow"] == s["needed"] > 0
    assert s["prefetched"] > 0 or capacity < 2 * HKV * W  # a tiny pool has no free slot to prefetch into


@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["page", "head"])
def test_write_through_replays_in_a_cuda_graph(granularity):
    """write_through captured with both layers' placement, fetch and attention: after each replay the
    resident slots equal the host tier (new rows included) and outputs equal resident decode's."""
    b = Batch(8, device="cuda", dtype=torch.bfloat16)
    t = b.tiered(64, attend=sparse_decode, policy="clock", granularity=granularity)
    g = torch.Generator().manual_seed(2)
    last = [(n - 1) // P for n in LENS]
    loc_buf = torch.zeros(2, dtype=torch.int64, device="cuda")
    k_buf = torch.zeros(L, 2, HKV, D, dtype=torch.bfloat16, device="cuda")
    v_buf = torch.zeros_like(k_buf)
    idx_buf, cnt_buf = graph_inputs()

    def new_inputs():  # a decode write per request and layer (host tier first), then the selections
        r2t = b.req_to_token.cpu()
        loc = torch.tensor(
            [int(r2t[r, last[r] * P + int(torch.randint(0, P, (1,), generator=g))]) for r in range(2)]
        )
        loc_buf.copy_(loc)
        for layer in range(L):
            for buf, host in ((k_buf, b.host.k), (v_buf, b.host.v)):
                rows = torch.randn(2, HKV, D, generator=g).to(torch.bfloat16)
                host[layer].view(-1, HKV, D)[loc] = rows
                buf[layer].copy_(rows)
            idx, cnt = b.select(g)
            idx[:, :, 0], cnt = (
                torch.tensor(last, dtype=torch.int32, device="cuda")[:, None],
                cnt.clamp(min=1),
            )
            idx_buf[layer].copy_(
                torch.where(torch.arange(W, device="cuda")[None, None] < cnt[..., None], idx, -1)
            )
            cnt_buf[layer].copy_(cnt)

    def step():
        t.begin_step()
        outs = []
        for layer in range(L):
            t.write_through(layer, loc_buf, k_buf[layer], v_buf[layer])
            outs.append(b.run(t, layer, idx_buf[layer], cnt_buf[layer]))
        return outs

    new_inputs()
    graph, outs = capture_step(step)
    contents = partial(check_contents, t, b.host)
    replays_equal_resident(b, t, graph, outs, idx_buf, cnt_buf, new_inputs, check=contents)
