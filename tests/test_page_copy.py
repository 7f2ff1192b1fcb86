"""Compacted page copy (memory/page_copy.py, PageFetcher backend "triton") equals the torch reference and
the existing fallback, never writes past the device count, and replays in a CUDA graph (GPU)."""

from __future__ import annotations

import pytest
import torch
from test_tiered_device import HKV, Batch, D, L, P

from sglang_psa.memory import page_copy
from sglang_psa.memory.hot_pool import HostTier
from sglang_psa.memory.uva_fetch import PageFetcher

NP, S, M = 12, 9, 7  # host pages, pool slots (last: the sink), union width
POISON = 777.0


def host_tier(seed: int, dtype=torch.float32, pin: bool = False) -> HostTier:
    g = torch.Generator().manual_seed(seed)
    h = HostTier(L, NP, P, HKV, D, dtype, pin_memory=pin)
    h.k.copy_(torch.randn(h.k.shape, generator=g))
    h.v.copy_(torch.randn(h.v.shape, generator=g))
    return h


def case(kind: str, seed: int, device: str = "cpu"):
    """pages [M] (distinct host pages, -1 where unmasked), slots [M] (distinct, < S - 1), mask [M]."""
    g = torch.Generator().manual_seed(seed)
    mask = {"none": torch.zeros(M, dtype=torch.bool), "all": torch.ones(M, dtype=torch.bool)}.get(kind)
    if mask is None:
        mask = torch.rand(M, generator=g) < 0.5
    pages = torch.randperm(NP, generator=g)[:M].to(torch.int32)
    slots = torch.randperm(S - 1, generator=g)[:M]
    pages = torch.where(mask, pages, -1)
    slots = torch.where(mask, slots, torch.randint(-1, S - 1, (M,), generator=g))  # junk where unmasked
    return pages.to(device), slots.to(device), mask.to(device)


def pool(device="cpu", dtype=torch.float32):
    k = torch.full((S, P, HKV, D), POISON, dtype=dtype, device=device)
    return k, k.clone()


def test_compact_packs_masked_pairs_in_order_with_a_device_count():
    pages = torch.tensor([3, -1, 7, 2, -1, 5])
    slots = torch.tensor([4, 9, 0, 6, -1, 1])
    mask = torch.tensor([True, False, True, True, False, True])
    pc, sc, cnt = page_copy.compact(mask, pages, slots)
    assert pc.tolist() == [3, 7, 2, 5, -1, -1] and sc.tolist() == [4, 0, 6, 1, -1, -1]
    assert cnt.dtype == torch.int32 and cnt.shape == (1,) and int(cnt) == 4
    _, _, cnt = page_copy.compact(torch.zeros(3, dtype=torch.bool), pages[:3], slots[:3])
    assert int(cnt) == 0


@pytest.mark.parametrize("kind,seed", [("none", 0), ("all", 1), ("mixed", 2), ("mixed", 3)])
@pytest.mark.parametrize("host_ptr", ["tensor", "int"])
def test_triton_copy_equals_reference_and_torch_fallback(kind, seed, host_ptr):
    h = host_tier(seed)
    pages, slots, mask = case(kind, seed)
    layer = seed % L
    pc, sc, cnt = page_copy.compact(mask, pages, slots)
    tk, tv = pool()
    page_copy.copy_pages(h.k[layer], h.v[layer], tk, tv, pc, sc, cnt, block=1024, host_ptr=host_ptr)
    rk, rv = pool()
    page_copy.copy_pages_ref(h.k[layer], h.v[layer], rk, rv, pc, sc, cnt)
    assert torch.equal(tk, rk) and torch.equal(tv, rv)
    fk, fv = pool()  # the existing fallback: dummies go to the sink (slot S - 1)
    PageFetcher(h, fk, fv, sink_slot=S - 1, backend="torch").copy(layer, pages, slots, mask)
    assert torch.equal(tk[: S - 1], fk[: S - 1]) and torch.equal(tv[: S - 1], fv[: S - 1])
    # only the masked slots changed; the sink is never written by the compacted copy
    hit = torch.zeros(S, dtype=torch.bool)
    hit[slots[mask].long()] = True
    assert tk[~hit].eq(POISON).all() and tv[~hit].eq(POISON).all()
    for p_, s_ in zip(pages[mask].tolist(), slots[mask].tolist()):
        assert torch.equal(tk[s_], h.k[layer, p_]) and torch.equal(tv[s_], h.v[layer, p_])


def test_entries_past_the_count_are_never_written():
    h = host_tier(5)
    pc = torch.tensor([4, 1, 6, 2, 8])
    sc = torch.tensor([0, 3, 5, 2, 7])  # valid-looking pairs past the count
    for n in (0, 2, 5):
        k, v = pool()
        page_copy.copy_pages(h.k[1], h.v[1], k, v, pc, sc, torch.tensor([n], dtype=torch.int32), block=512)
        for i in range(5):
            src_k, dst = h.k[1, pc[i]], k[sc[i]]
            assert torch.equal(dst, src_k) if i < n else dst.eq(POISON).all()
        assert k[[1, 4, 6, 8]].eq(POISON).all() and v[[1, 4, 6, 8]].eq(POISON).all()


def test_uneven_page_is_masked_inside_the_last_block():
    """A page of P * Hkv * D elements that the block does not divide: the tail is masked."""
    g = torch.Generator().manual_seed(0)
    src_k, src_v = torch.randn(5, 3, 1, 10, generator=g), torch.randn(5, 3, 1, 10, generator=g)
    dk, dv = torch.zeros(4, 3, 1, 10), torch.zeros(4, 3, 1, 10)
    pc, sc, cnt = page_copy.compact(torch.tensor([True, True]), torch.tensor([4, 0]), torch.tensor([1, 3]))
    page_copy.copy_pages(src_k, src_v, dk, dv, pc, sc, cnt, block=16)  # 30 elements: 2 blocks
    assert torch.equal(dk[1], src_k[4]) and torch.equal(dv[3], src_v[0]) and dk[[0, 2]].eq(0).all()


def test_triton_backend_through_the_tiered_attention_equals_resident():
    b = Batch(11)
    t = b.tiered(4, backend="triton", block=1024)
    assert t.fetcher.backend == "triton" and t.fetcher.host_ptr == "tensor"
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        t.begin_step(prefetch_first=True)
        for layer in range(L):
            idx, cnt = b.select(g)
            out, _ = b.run(t, layer, idx, cnt, prefetch_next=True)
            assert torch.equal(out, b.resident(layer, idx, cnt)[0])
    s = t.stats()
    assert s["fetched"] + s["overflow"] > 0


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("host_ptr", ["auto", "tensor", "int"])
def test_triton_uva_copy_from_pinned_host_equals_fallback(host_ptr):
    h = host_tier(0, torch.bfloat16, pin=True)
    assert h.k.is_pinned()
    for kind, seed in (("none", 0), ("all", 1), ("mixed", 2)):
        pages, slots, mask = case(kind, seed, "cuda")
        outs = []
        for backend in ("triton", "torch"):
            dk, dv = pool("cuda", torch.bfloat16)
            f = PageFetcher(h, dk, dv, sink_slot=S - 1, backend=backend, host_ptr=host_ptr)
            f.copy(1, pages, slots, mask)
            torch.cuda.synchronize()
            outs.append((dk[: S - 1].clone(), dv[: S - 1].clone(), f.host_ptr))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
        print(f"host_ptr {host_ptr} -> {outs[0][2]}")


@pytest.mark.gpu
@pytest.mark.parametrize("host_ptr", ["tensor", "int"])
def test_triton_copy_replays_in_a_cuda_graph_with_changing_masks(host_ptr):
    h = host_tier(1, torch.bfloat16, pin=True)
    dk, dv = pool("cuda", torch.bfloat16)
    f = PageFetcher(h, dk, dv, sink_slot=S - 1, backend="triton", host_ptr=host_ptr)
    pages_buf = torch.full((M,), -1, dtype=torch.int32, device="cuda")
    slots_buf = torch.full((M,), -1, dtype=torch.int64, device="cuda")
    mask_buf = torch.zeros(M, dtype=torch.bool, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f.copy(0, pages_buf, slots_buf, mask_buf)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        f.copy(0, pages_buf, slots_buf, mask_buf)
    for kind, seed in (("mixed", 3), ("all", 4), ("none", 5), ("mixed", 6)):
        pages, slots, mask = case(kind, seed, "cuda")
        pages_buf.copy_(pages)
        slots_buf.copy_(slots)
        mask_buf.copy_(mask)
        dk.fill_(POISON)
        dv.fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        rk, rv = pool("cuda", torch.bfloat16)
        PageFetcher(h, rk, rv, sink_slot=S - 1, backend="torch").copy(0, pages, slots, mask)
        assert torch.equal(dk[: S - 1], rk[: S - 1]) and torch.equal(dv[: S - 1], rv[: S - 1])
        assert dk[S - 1].eq(POISON).all()  # the sink is never written


@pytest.mark.parametrize("host_ptr", ["tensor", "int"])
def test_triton_copy_of_head_pages_equals_reference(host_ptr):
    """--psa-hot-granularity head: entry h * NP + p copies kv head h of host page p into a one-head slot."""
    h = host_tier(11)
    np_ = h.k.shape[1]
    g = torch.Generator().manual_seed(3)
    keys = torch.randperm(HKV * np_, generator=g)[:S].to(torch.int32)
    slots = torch.randperm(S, generator=g).to(torch.int32)
    mask = torch.rand(S, generator=g) < 0.7
    out = []
    for copy in (page_copy.copy_pages, page_copy.copy_pages_ref):
        dst_k = torch.full((S, P, 1, D), POISON)
        dst_v = dst_k.clone()
        pc, sc, cnt = page_copy.compact(mask, keys, slots)
        kw = {"block": 256, "host_ptr": host_ptr} if copy is page_copy.copy_pages else {}
        copy(h.k[1], h.v[1], dst_k, dst_v, pc, sc, cnt, head_pages=True, **kw)
        out.append((dst_k, dst_v))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    for key, s_ in zip(keys[mask].tolist(), slots[mask].tolist()):
        assert torch.equal(out[0][0][s_, :, 0], h.k[1, key % np_, :, key // np_])
        assert torch.equal(out[0][1][s_, :, 0], h.v[1, key % np_, :, key // np_])
    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots[mask].long()] = False
    assert bool((out[0][0][untouched] == POISON).all())


def test_copy_refuses_a_source_without_contiguous_token_rows():
    h = host_tier(0)
    src = h.k[0].transpose(2, 3)  # [NP, P, D, Hkv]: rows are not contiguous
    dst = torch.zeros(S, P, D, HKV)
    one = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="contiguous"):
        page_copy.copy_pages(src, src, dst, dst.clone(), one, one, torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("programs", [1, 2, 5])
def test_fewer_programs_than_entries_stride_over_all_of_them(programs):
    h = host_tier(9)
    pages, slots, mask = case("all", 9)
    dst_k, dst_v = pool()
    pc, sc, cnt = page_copy.compact(mask, pages, slots)
    page_copy.copy_pages(h.k[0], h.v[0], dst_k, dst_v, pc, sc, cnt, block=256, max_programs=programs)
    for p_, s_ in zip(pages.tolist(), slots.tolist()):
        assert torch.equal(dst_k[s_], h.k[0, p_]) and torch.equal(dst_v[s_], h.v[0, p_])
