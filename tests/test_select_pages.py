import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_psa.kernels import SelectParams, select_pages, select_pages_ref

P = 16


def _random_bounds(bs, hkv, n, seed, ties=False):
    gen = torch.Generator().manual_seed(seed)
    b = torch.randn(bs, hkv, n, generator=gen) * 3
    if ties:  # few distinct values: many ties at the threshold
        b = torch.round(b)
    return b


def _check_invariants(bounds, seq_lens, params, idx, counts):
    bs, hkv, n = bounds.shape
    for b in range(bs):
        npages = min(-(-int(seq_lens[b]) // P), n)
        forced = {j for j in range(npages) if j < params.sink_pages or j >= npages - params.local_pages}
        for h in range(hkv):
            c = int(counts[b, h])
            sel = idx[b, h, :c].tolist()
            assert sel == sorted(set(sel)), "ascending, no duplicates"
            assert all(0 <= j < npages for j in sel)
            assert forced <= set(sel), "sinks and local window always kept"
            assert bool((idx[b, h, c:] == -1).all())
            assert c <= params.width
            if params.topk is not None:
                assert c == min(max(params.topk, len(forced)), npages)
            else:
                assert c >= min(params.min_pages, npages)


@pytest.mark.parametrize(
    "params",
    [
        SelectParams(tau=0.9, sink_pages=1, local_pages=2, max_pages=24),
        SelectParams(tau=0.5, sink_pages=0, local_pages=0, min_pages=3, max_pages=24),
        SelectParams(tau=0.99, sink_pages=2, local_pages=1, max_pages=5),  # the cap binds
        SelectParams(tau=1.0, sink_pages=1, local_pages=1, max_pages=40),
        SelectParams(topk=6, sink_pages=1, local_pages=2),
        SelectParams(topk=3, sink_pages=0, local_pages=0),
    ],
    ids=["tau0.9", "tau0.5-min3", "cap", "tau1", "topk6", "topk3-nosink"],
)
@pytest.mark.parametrize("ties", [False, True])
def test_kernel_equals_reference(params, ties, device):
    bounds = _random_bounds(3, 4, 40, seed=1, ties=ties)
    seq_lens = torch.tensor([40 * P, 13 * P + 2, 5], dtype=torch.int32)
    bounds[1, :, 14:] = float("-inf")
    bounds[2, :, 1:] = float("-inf")
    ref = select_pages_ref(bounds, seq_lens, P, params)
    got = select_pages(bounds.to(device), seq_lens.to(device), P, params)
    assert torch.equal(got[1].cpu(), ref[1]), (got[1], ref[1])
    assert torch.equal(got[0].cpu(), ref[0])
    _check_invariants(bounds, seq_lens, params, got[0].cpu(), got[1].cpu())


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 70),
    tau=st.sampled_from([0.3, 0.8, 0.95, 1.0]),
    sink=st.integers(0, 2),
    local=st.integers(0, 3),
    min_pages=st.integers(0, 6),
    extra=st.integers(0, 30),
    ties=st.booleans(),
)
def test_kernel_equals_reference_fuzz(seed, n, tau, sink, local, min_pages, extra, ties):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    max_pages = max(sink + local, min_pages, 1) + extra
    params = SelectParams(
        tau=tau, sink_pages=sink, local_pages=local, min_pages=min_pages, max_pages=max_pages
    )
    gen = torch.Generator().manual_seed(seed)
    bounds = _random_bounds(2, 2, n, seed, ties)
    seq_lens = torch.randint(1, n * P + 1, (2,), generator=gen, dtype=torch.int32)
    for b in range(2):
        bounds[b, :, -(-int(seq_lens[b]) // P) :] = float("-inf")
    ref = select_pages_ref(bounds, seq_lens, P, params)
    got = [t.cpu() for t in select_pages(bounds.to(dev), seq_lens.to(dev), P, params)]
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])
    _check_invariants(bounds, seq_lens, params, got[0], got[1])


def test_tau_one_selects_every_page_even_when_masses_underflow(device):
    bounds = torch.full((1, 2, 20), -500.0)
    bounds[0, :, 3] = 100.0  # every other page has exp(bound - max) == 0 in fp32
    seq_lens = torch.tensor([20 * P], dtype=torch.int32)
    idx, counts = select_pages(bounds.to(device), seq_lens.to(device), P, SelectParams(tau=1.0, max_pages=20))
    idx, counts = idx.cpu(), counts.cpu()
    assert counts.tolist() == [[20, 20]]
    assert idx[0, 0].tolist() == list(range(20))


def test_estimated_mass_reaches_tau_when_uncapped(device):
    bounds = _random_bounds(2, 3, 64, seed=7)
    seq_lens = torch.tensor([64 * P, 64 * P], dtype=torch.int32)
    params = SelectParams(tau=0.9, sink_pages=1, local_pages=1, max_pages=64)
    idx, counts = (t.cpu() for t in select_pages(bounds.to(device), seq_lens.to(device), P, params))
    w = torch.exp(bounds.double() - bounds.amax(-1, keepdim=True))
    for b in range(2):
        for h in range(3):
            sel = idx[b, h, : counts[b, h]].long()
            assert w[b, h, sel].sum() / w[b, h].sum() >= 0.9 - 1e-6


def test_params_validation_names_the_option():
    with pytest.raises(ValueError, match="tau"):
        SelectParams(tau=1.5)
    with pytest.raises(ValueError, match="tau"):
        SelectParams(tau=0.0)
    with pytest.raises(ValueError, match="sink_pages"):
        SelectParams(sink_pages=-1)
    with pytest.raises(ValueError, match="local_pages"):
        SelectParams(sink_pages=4, local_pages=8, max_pages=10)
    with pytest.raises(ValueError, match="min_pages"):
        SelectParams(min_pages=20, max_pages=10)
    with pytest.raises(ValueError, match="topk"):
        SelectParams(topk=0)
    with pytest.raises(ValueError, match="bounds"):
        select_pages(torch.zeros(2, 3), torch.ones(2, dtype=torch.int32), P, SelectParams())
    with pytest.raises(ValueError, match="seq_lens"):
        select_pages(torch.zeros(2, 1, 3), torch.ones(3, dtype=torch.int32), P, SelectParams())


@pytest.mark.parametrize("tau", [0.5, 0.9, 1.0])
def test_mass_logits_kernel_equals_reference(tau, device):
    bounds = _random_bounds(2, 3, 30, seed=11)
    centers = bounds - torch.rand(bounds.shape, generator=torch.Generator().manual_seed(3)) * 4
    seq_lens = torch.tensor([30 * P, 17 * P + 3], dtype=torch.int32)
    bounds[1, :, 18:] = float("-inf")
    centers[1, :, 18:] = float("-inf")
    params = SelectParams(tau=tau, sink_pages=1, local_pages=2, max_pages=30)
    ref = select_pages_ref(bounds, seq_lens, P, params, mass_logits=centers)
    got = select_pages(bounds.to(device), seq_lens.to(device), P, params, mass_logits=centers.to(device))
    assert torch.equal(got[1].cpu(), ref[1]) and torch.equal(got[0].cpu(), ref[0])
    plain = select_pages_ref(bounds, seq_lens, P, params)
    if tau < 1.0:  # a different estimate changes how many pages are needed
        assert not torch.equal(plain[1], ref[1])


@pytest.mark.parametrize(
    "params",
    [
        SelectParams(tau=0.9, sink_pages=1, local_pages=2, max_pages=24),
        SelectParams(topk=10, sink_pages=1, local_pages=2),
        SelectParams(tau=1.0, sink_pages=1, local_pages=1, max_pages=8),
    ],
    ids=["tau0.9", "topk10", "tau1-cap8"],
)
def test_dense_below_takes_every_page_of_short_requests(params, device):
    # request 0 is long (sparse), 1 is short and fits the width (dense), 2 is short but spans more
    # pages than the width holds (so it is selected as usual rather than overflowing)
    bounds = _random_bounds(3, 2, 40, seed=5)
    seq_lens = torch.tensor([40 * P, 7 * P + 3, 30 * P], dtype=torch.int32)
    for b, n in enumerate((40, 8, 30)):
        bounds[b, :, n:] = float("-inf")
    dense_below = 31 * P
    ref = select_pages_ref(bounds, seq_lens, P, params, dense_below=dense_below)
    got = [t.cpu() for t in select_pages(bounds.to(device), seq_lens.to(device), P, params,
                                         dense_below=dense_below)]  # fmt: skip
    assert torch.equal(got[1], ref[1]) and torch.equal(got[0], ref[0])
    assert got[1][1].tolist() == [8, 8]
    assert got[0][1, 0, :8].tolist() == list(range(8))
    plain = select_pages_ref(bounds, seq_lens, P, params)
    assert torch.equal(plain[0][0], ref[0][0]) and torch.equal(plain[0][2], ref[0][2])


def test_output_rows_are_fully_written(device):
    """The kernel writes the -1 tail itself: garbage in a reused output buffer never survives."""
    bounds = _random_bounds(2, 2, 30, seed=9)
    seq_lens = torch.tensor([30 * P, 9 * P], dtype=torch.int32)
    bounds[1, :, 9:] = float("-inf")
    params = SelectParams(tau=0.8, sink_pages=1, local_pages=1, max_pages=12)
    page_idx = torch.full((2, 2, 12), 77, dtype=torch.int32, device=device)
    counts = torch.full((2, 2), 77, dtype=torch.int32, device=device)
    got = select_pages(bounds.to(device), seq_lens.to(device), P, params, page_idx=page_idx, counts=counts)
    ref = select_pages_ref(bounds, seq_lens, P, params)
    assert torch.equal(got[0].cpu(), ref[0]) and torch.equal(got[1].cpu(), ref[1])


@pytest.mark.parametrize("dense_below", [0, 100])
def test_streaming_selection_is_topk_of_sinks_and_window(dense_below):
    from sglang_psa.kernels import select_streaming

    seq = torch.tensor([1, 16, 17, 40, 95, 96, 97, 300, 1000])
    for sink, local, width in ((1, 2, 3), (1, 4, 8), (2, 0, 4), (0, 3, 5)):
        idx, cnt = select_streaming(seq, 2, width, 16, sink, local, dense_below)
        k = sink + local
        params = SelectParams(topk=k, sink_pages=sink, local_pages=local)
        bounds = torch.randn(len(seq), 2, 64)
        ref_idx, ref_cnt = select_pages_ref(bounds, seq, 16, params, dense_below=dense_below)
        short = (seq < dense_below) & ((seq + 15) // 16 <= width)
        for b in range(len(seq)):
            if bool(short[b]) and (seq[b] + 15) // 16 > k:  # dense rows: wider than the top-k width
                n = int((seq[b] + 15) // 16)
                assert cnt[b].tolist() == [n, n] and idx[b, 0, :n].tolist() == list(range(n))
                continue
            assert torch.equal(cnt[b], ref_cnt[b]), (b, sink, local)
            n = int(cnt[b, 0])
            assert torch.equal(idx[b, :, :n], ref_idx[b, :, :n])
            assert bool((idx[b, :, n:] == -1).all())


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 40),
    margin=st.integers(1, 12),
    dense_below=st.sampled_from([0, 200]),
    keep=st.booleans(),
)
def test_margin_is_the_best_unselected_pages_of_each_row(seed, n, margin, dense_below, keep):
    """select_margin (--psa-prefetch next-step): per row, the `margin` best valid pages the selection
    left out, best first; nothing for rows below dense_below or reusing an old selection, and entries
    past a request's last page are never read (NaN there)."""
    from sglang_psa.kernels import select_margin

    g = torch.Generator().manual_seed(seed)
    bs, hkv = 3, 2
    seq_lens = torch.randint(1, n * P + 1, (bs,), generator=g, dtype=torch.int32)
    order = torch.randn(bs, hkv, n, generator=g)
    params = SelectParams(tau=0.6, sink_pages=1, local_pages=1, max_pages=max(2, n // 3))
    idx, cnt = select_pages_ref(order, seq_lens, P, params)
    npages = ((seq_lens + P - 1) // P).clamp(max=n)
    for b in range(bs):
        order[b, :, int(npages[b]) :] = float("nan")  # unwritten
    keep_rows = torch.tensor([0, 1, 0], dtype=torch.int8) if keep else None
    m_idx, m_cnt = select_margin(order, seq_lens, idx, cnt, P, margin, dense_below, keep_rows)
    assert m_idx.shape == (bs, hkv, min(margin, n)) and m_idx.dtype == m_cnt.dtype == torch.int32
    for b in range(bs):
        for h in range(hkv):
            chosen = set(idx[b, h, : cnt[b, h]].tolist())
            rest = [j for j in range(int(npages[b])) if j not in chosen]
            rest.sort(key=lambda j: -float(order[b, h, j]))
            live = int(seq_lens[b]) >= dense_below and not (keep and b == 1)
            want = rest[:margin] if live else []
            c = int(m_cnt[b, h])
            assert c == len(want) and bool((m_idx[b, h, c:] == -1).all())
            got = m_idx[b, h, :c].tolist()
            assert sorted(got) == sorted(want)  # ties may order differently
            best_first = sorted((float(order[b, h, j]) for j in want), reverse=True)
            assert [float(order[b, h, j]) for j in got] == best_first


def test_margin_names_bad_arguments():
    from sglang_psa.kernels import select_margin

    order = torch.zeros(1, 1, 4)
    idx, cnt = torch.zeros(1, 1, 2, dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32)
    seq = torch.tensor([64], dtype=torch.int32)
    with pytest.raises(ValueError, match="margin must be >= 1"):
        select_margin(order, seq, idx, cnt, P, 0)
    with pytest.raises(ValueError, match="order must be"):
        select_margin(order.double(), seq, idx, cnt, P, 2)
