import pytest
import torch
from kernel_cases import CASE_IDS, CASES, TOL, build, rel_err

from sglang_psa.kernels import (
    SelectParams,
    certified_decode,
    dense_decode_ref,
    page_bounds,
    psa_decode,
    select_pages,
    sparse_decode,
    sparse_decode_ref,
)
from sglang_psa.kernels._common import compact_selection

MAXP = 12


def _cache(sb):
    return (sb.q, sb.k_cache, sb.v_cache, sb.req_to_token, sb.req_pool_indices, sb.seq_lens)


def _bounds(sb, kmin, kmax):
    return page_bounds(
        sb.q,
        kmin,
        kmax,
        sb.req_to_token,
        sb.req_pool_indices,
        sb.seq_lens,
        sb.page_size,
        sb.page_size,
        sb.sm_scale,
        MAXP,
    )


@pytest.mark.parametrize("page_size,group,d,dtype", CASES, ids=CASE_IDS)
def test_kernel_equals_reference(page_size, group, d, dtype, device):
    sb, kmin, kmax = build(page_size, group, d, dtype, device)
    idx, counts = select_pages(
        _bounds(sb, kmin, kmax),
        sb.seq_lens,
        page_size,
        SelectParams(tau=0.8, sink_pages=1, local_pages=1, max_pages=8),
    )
    out, lse = sparse_decode(*_cache(sb), idx, counts, page_size, sb.sm_scale)
    ref, ref_lse = sparse_decode_ref(*_cache(sb), idx, counts, page_size, sb.sm_scale)
    assert out.dtype == dtype and out.shape == sb.q.shape
    assert rel_err(out, ref) < TOL[dtype]
    assert torch.allclose(lse.cpu(), ref_lse.cpu(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("page_size,group,d,dtype", CASES[::2], ids=CASE_IDS[::2])
def test_tau_one_equals_dense(page_size, group, d, dtype, device):
    sb, kmin, kmax = build(page_size, group, d, dtype, device, seed=2)
    res = psa_decode(
        sb.q,
        sb.k_cache,
        sb.v_cache,
        kmin,
        kmax,
        sb.req_to_token,
        sb.req_pool_indices,
        sb.seq_lens,
        page_size,
        page_size,
        sb.sm_scale,
        SelectParams(tau=1.0, sink_pages=1, local_pages=1, max_pages=MAXP),
        MAXP,
    )
    dense, dense_lse = dense_decode_ref(*_cache(sb), page_size, sb.sm_scale)
    assert rel_err(res.out, dense) < TOL[dtype]
    assert torch.allclose(res.lse.cpu(), dense_lse.cpu(), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("splits", [1, 3, 7])
def test_split_count_does_not_change_the_result(splits, device):
    sb, kmin, kmax = build(16, 4, 64, torch.float32, device)
    idx, counts = select_pages(
        _bounds(sb, kmin, kmax), sb.seq_lens, 16, SelectParams(tau=1.0, max_pages=MAXP)
    )
    out, lse = sparse_decode(*_cache(sb), idx, counts, 16, sb.sm_scale, num_splits=splits)
    ref, ref_lse = dense_decode_ref(*_cache(sb), 16, sb.sm_scale)
    assert rel_err(out, ref) < 1e-5 and torch.allclose(lse.cpu(), ref_lse.cpu(), atol=1e-4)


def _captured_mass(sb, order, visited):
    """Exact fraction of each query head's softmax mass on the visited pages."""
    bs, hq, d = sb.q.shape
    hkv = sb.k_cache.shape[1]
    g = hq // hkv
    p = sb.page_size
    frac = torch.zeros(bs, hq, dtype=torch.float64)
    for b in range(bs):
        n = int(sb.seq_lens[b])
        slots = sb.req_to_token[b, :n].long()
        for h in range(hkv):
            s = (sb.q[b, h * g : (h + 1) * g].double() @ sb.k_cache[slots, h].double().T) * sb.sm_scale
            w = torch.softmax(s, dim=-1)  # [G, n]
            pages = order[b, h, : visited[b, h]].long().cpu()
            tok = (pages[:, None] * p + torch.arange(p)).flatten()
            tok = tok[tok < n]
            frac[b, h * g : (h + 1) * g] = w[:, tok].sum(-1)
    return frac


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("page_size,group,d,dtype", CASES[1::3], ids=CASE_IDS[1::3])
def test_certified_captures_tau_of_exact_mass(tau, page_size, group, d, dtype, device):
    lens = [page_size * 11 + 7, page_size * 4, 2]
    sb, kmin, kmax = build(page_size, group, d, dtype, device, lens=lens, seed=4, skew=0.5)
    out, lse, visited, order = certified_decode(
        *_cache(sb), _bounds(sb, kmin, kmax), page_size, sb.sm_scale, tau, 1, 1, 2
    )
    frac = _captured_mass(sb, order, visited)
    assert bool((frac >= tau - 1e-6).all()), frac
    # the attention it returns is exactly attention over the visited pages
    idx = order.to(torch.int32).contiguous()
    ref, _ = sparse_decode_ref(*_cache(sb), idx, visited.contiguous(), page_size, sb.sm_scale)
    assert rel_err(out, ref) < TOL[dtype]


def test_certified_tau_one_equals_dense(device):
    sb, kmin, kmax = build(32, 4, 64, torch.float32, device, seed=6)
    out, lse, visited, _ = certified_decode(
        *_cache(sb), _bounds(sb, kmin, kmax), 32, sb.sm_scale, 1.0, 1, 1, 2
    )
    dense, dense_lse = dense_decode_ref(*_cache(sb), 32, sb.sm_scale)
    assert rel_err(out, dense) < 1e-5
    npages = (sb.seq_lens + 31) // 32
    assert torch.equal(visited.cpu(), npages[:, None].expand_as(visited).int().cpu())


def test_certified_stops_early_on_a_skewed_cache(device):
    sb, kmin, kmax = build(16, 4, 64, torch.float32, device, lens=[16 * 40], skew=1.0, seed=8)
    _, _, visited, _ = certified_decode(*_cache(sb), _bounds(sb, kmin, kmax), 16, sb.sm_scale, 0.9, 1, 1, 4)
    assert int(visited.max()) < 12  # far fewer than the 40 pages


def test_bad_inputs_raise(device):
    sb, kmin, kmax = build(16, 2, 64, torch.float32, device)
    idx, counts = select_pages(_bounds(sb, kmin, kmax), sb.seq_lens, 16, SelectParams(max_pages=8))
    with pytest.raises(TypeError, match="dtype"):
        sparse_decode(sb.q.half(), *_cache(sb)[1:], idx, counts, 16, sb.sm_scale)
    with pytest.raises(ValueError, match="counts"):
        sparse_decode(*_cache(sb), idx, counts.long(), 16, sb.sm_scale)
    with pytest.raises(ValueError, match="page_idx"):
        sparse_decode(*_cache(sb), idx[:1], counts, 16, sb.sm_scale)
    with pytest.raises(ValueError, match="page_size"):
        sparse_decode(*_cache(sb), idx, counts, 8, sb.sm_scale)
    with pytest.raises(ValueError, match="v_cache"):
        sparse_decode(sb.q, sb.k_cache, sb.v_cache[:5], *_cache(sb)[3:], idx, counts, 16, sb.sm_scale)
    with pytest.raises(ValueError, match="tau"):
        certified_decode(*_cache(sb), _bounds(sb, kmin, kmax), 16, sb.sm_scale, 0.0)
    with pytest.raises(ValueError, match="head_dim"):
        q = torch.zeros(3, 4, 48)
        k = torch.zeros(64, 2, 48)
        sparse_decode(q, k, k, *_cache(sb)[3:], idx, counts, 16, 1.0)


def test_progressive_attends_exactly_its_visited_pages_and_stops_early(device):
    """Progressive mode (tail estimated from centers) is exact over what it visits, and visits less."""
    sb, kmin, kmax = build(16, 4, 64, torch.float32, device, lens=[16 * 40, 16 * 23 + 5], skew=1.0, seed=8)
    bounds, centers = page_bounds(
        sb.q, kmin, kmax, sb.req_to_token, sb.req_pool_indices, sb.seq_lens, 16, 16, sb.sm_scale, 40,
        with_centers=True,
    )  # fmt: skip
    out, _, visited, order = certified_decode(
        *_cache(sb), bounds, 16, sb.sm_scale, 0.9, 1, 1, 2, rest_logits=centers
    )
    _, _, cert_visited, _ = certified_decode(*_cache(sb), bounds, 16, sb.sm_scale, 0.9, 1, 1, 2)
    ref, _ = sparse_decode_ref(*_cache(sb), order.to(torch.int32).contiguous(), visited, 16, sb.sm_scale)
    assert rel_err(out, ref) < 1e-5
    assert bool((visited <= cert_visited).all())
    assert float(_captured_mass(sb, order, visited).mean()) >= 0.85


@pytest.mark.parametrize("mode", ["certified", "progressive"])
def test_dense_below_visits_every_page_of_short_requests(mode, device):
    page = 16
    lens = [page * 11 + 7, page * 4, 2]
    sb, kmin, kmax = build(page, 4, 64, torch.float32, device, lens=lens, seed=4, skew=0.9)
    bounds = page_bounds(*_cache(sb)[:1], kmin, kmax, *_cache(sb)[3:], page, page, sb.sm_scale, MAXP,
                         with_centers=True, skip_below=page * 5)  # fmt: skip
    b_, c_ = bounds
    rest = c_ if mode == "progressive" else None
    out, _, visited, _ = certified_decode(*_cache(sb), b_, page, sb.sm_scale, 0.5, 1, 1, 2, rest_logits=rest,
                                          dense_below=page * 5)  # fmt: skip
    assert visited[1].tolist() == [4] * visited.shape[1] and visited[2].tolist() == [1] * visited.shape[1]
    dense, _ = dense_decode_ref(*_cache(sb), page, sb.sm_scale)
    assert rel_err(out[1:], dense[1:]) < 1e-5


@pytest.mark.parametrize("tune", [{"pages_per_iter": 4}, {"pages_per_iter": 1, "num_stages": 3}])
def test_launch_overrides_do_not_change_the_result(tune, device):
    # the launch parameters tune_attend.py sweeps (and the 128-token iteration long splits use)
    sb, kmin, kmax = build(16, 4, 64, torch.float32, device)
    idx, counts = select_pages(
        _bounds(sb, kmin, kmax), sb.seq_lens, 16, SelectParams(tau=1.0, max_pages=MAXP)
    )
    out, lse = sparse_decode(*_cache(sb), idx, counts, 16, sb.sm_scale, num_splits=2, tuning=tune)
    ref, ref_lse = dense_decode_ref(*_cache(sb), 16, sb.sm_scale)
    assert rel_err(out, ref) < 1e-5 and torch.allclose(lse.cpu(), ref_lse.cpu(), atol=1e-4)


def test_long_splits_load_128_tokens_per_iteration():
    from sglang_psa.kernels.sparse_decode import _pages_per_iter

    assert _pages_per_iter(32, 26) == 4 and _pages_per_iter(32, 10) == 2  # 16 x 4k dense vs a capped split
    assert _pages_per_iter(16, 32) == 8 and _pages_per_iter(128, 64) == 1


@pytest.mark.parametrize("table_dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_pages_are_read_in_place(table_dim, dtype, device):
    """page_table entries >= host_base read pages of host_k / host_v (tiered mode's misses, straight
    from the pinned host tier): the same result as with those pages copied behind the pool, i.e. the
    same table over cat(pool, host) with host_base = the pool's page count."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 dot products need a GPU")
    g = torch.Generator().manual_seed(11)
    p, hkv, grp, d, bs, n, slots, host_pages = 16, 2, 2, 64, 2, 6, 10, 12
    pool_k, pool_v = (torch.randn(slots * p, hkv, d, generator=g).to(device, dtype) for _ in range(2))
    pin = device == "cuda"
    host_k, host_v = (torch.randn(host_pages * p, hkv, d, generator=g).to(dtype) for _ in range(2))
    if pin:
        host_k, host_v = host_k.pin_memory(), host_v.pin_memory()
    shape = (bs, n) if table_dim == 2 else (bs, hkv, n)
    on_host = torch.rand(shape, generator=g) < 0.5
    table = torch.where(on_host, slots + torch.randint(0, host_pages, shape, generator=g),
                        torch.randint(0, slots, shape, generator=g)).to(torch.int32)  # fmt: skip
    q = torch.randn(bs, hkv * grp, d, generator=g).to(device, dtype)
    seq_lens = torch.tensor([n * p - 5, 4 * p + 1], dtype=torch.int32)
    page_idx = torch.tensor([[0, 2, 3, 5], [0, 1, 4, -1]], dtype=torch.int32)[:, None].expand(bs, hkv, 4)
    counts = torch.tensor([[4, 4], [3, 3]], dtype=torch.int32)
    args = [
        torch.zeros(bs, n * p, dtype=torch.int32),
        torch.arange(bs),
        seq_lens,
        page_idx.contiguous(),
        counts,
    ]
    args = [t.to(device) for t in args]
    table = table.to(device)
    out, lse = sparse_decode(q, pool_k, pool_v, *args, p, d**-0.5, page_table=table, host_k=host_k,
                             host_v=host_v, host_base=slots)  # fmt: skip
    full_k, full_v = torch.cat([pool_k, host_k.to(device)]), torch.cat([pool_v, host_v.to(device)])
    want, want_lse = sparse_decode_ref(q, full_k, full_v, *args, p, d**-0.5, page_table=table)
    ref, ref_lse = sparse_decode_ref(q, pool_k, pool_v, *args, p, d**-0.5, page_table=table, host_k=host_k,
                                     host_v=host_v, host_base=slots)  # fmt: skip
    assert torch.equal(ref, want) and torch.equal(ref_lse, want_lse)
    assert rel_err(out, want) < TOL[dtype]
    assert torch.allclose(lse.cpu(), want_lse.cpu(), atol=1e-3, rtol=1e-4)


def tiny_args() -> tuple:
    """sparse_decode's positional arguments for one request of 20 tokens, 2 kv heads, one page."""
    q, k = torch.zeros(1, 2, 64), torch.zeros(32, 2, 64)
    return (q, k, k, torch.zeros(1, 32, dtype=torch.int32), torch.zeros(1, dtype=torch.int64),
            torch.tensor([20], dtype=torch.int32), torch.zeros(1, 2, 1, dtype=torch.int32),
            torch.ones(1, 2, dtype=torch.int32), 16, 0.1)  # fmt: skip


def test_host_arguments_are_checked():
    args = tiny_args()
    k = args[1]
    table = torch.zeros(1, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="host_k and host_v come together"):
        sparse_decode(*args, host_k=k, host_v=k)
    with pytest.raises(ValueError, match=r"host_v must be \[rows, 2, 64\]"):
        sparse_decode(*args, page_table=table, host_k=k, host_v=torch.zeros(32, 1, 64))


@pytest.mark.parametrize("table_dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_page_lists_merged_equal_one_pass(table_dim, dtype, device):
    """Tiered mode's split miss path: attending one part of each row's pages (here: table entry below a
    cut), then the rest with merge_with the first state, gives the one-pass result over all pages
    (also where a row has no page on one side: an empty state merges as nothing)."""
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("bf16 dot products need a GPU")
    g = torch.Generator().manual_seed(5)
    p, hkv, grp, d, bs, n, rows, cut = 16, 2, 2, 64, 3, 6, 14, 8
    k, v = (torch.randn(rows * p, hkv, d, generator=g).to(device, dtype) for _ in range(2))
    shape = (bs, n) if table_dim == 2 else (bs, hkv, n)
    table = torch.randint(0, rows, shape, generator=g, dtype=torch.int32)
    table[0] = torch.randint(0, cut, table[0].shape, generator=g)  # request 0: nothing at or above the cut
    q = torch.randn(bs, hkv * grp, d, generator=g).to(device, dtype)
    page_idx = torch.tensor([[0, 2, 3, 5], [0, 1, 4, -1], [5, 4, 3, 2]], dtype=torch.int32)
    counts = torch.tensor([[4, 4], [3, 2], [4, 1]], dtype=torch.int32)
    args = [torch.zeros(bs, n * p, dtype=torch.int32), torch.arange(bs),
            torch.tensor([n * p - 5, 5 * p + 1, n * p], dtype=torch.int32),
            page_idx[:, None].expand(bs, hkv, 4).contiguous(), counts]  # fmt: skip
    args = [t.to(device) for t in args] + [p, d**-0.5]
    table = table.to(device)
    want, want_lse = sparse_decode_ref(q, k, v, *args, page_table=table)
    sel, cnt = args[3], args[4]
    tab = table[:, None].expand(bs, hkv, n) if table_dim == 2 else table
    kept = torch.arange(4, device=device) < cnt[..., None]
    low = kept & (tab.gather(2, sel.long().clamp(min=0)) < cut)
    parts = [compact_selection(sel, low), compact_selection(sel, kept & ~low)]
    for attend in (sparse_decode, sparse_decode_ref):
        first = attend(q, k, v, *args[:3], *parts[0], *args[5:], page_table=table,
                       out=torch.empty(q.shape, dtype=torch.float32, device=device))  # fmt: skip
        assert first[0].dtype == torch.float32
        out, lse = attend(q, k, v, *args[:3], *parts[1], *args[5:], page_table=table, merge_with=first)
        assert out.dtype == dtype and rel_err(out, want) < TOL[dtype]
        assert torch.allclose(lse.cpu(), want_lse.cpu(), atol=1e-3, rtol=1e-4)


def test_merge_arguments_are_checked():
    args = tiny_args()
    with pytest.raises(ValueError, match=r"merge_with must be \(o \[1, 2, 64\]"):
        sparse_decode(*args, merge_with=(torch.zeros(1, 2, 64), torch.zeros(1, 2, dtype=torch.float64)))
