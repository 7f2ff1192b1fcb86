import math

import pytest
import torch
from kernel_cases import CASE_IDS, CASES, build

from sglang_psa.kernels import alloc_summaries, page_bounds, page_bounds_ref, update_page_summaries_ref


def _args(sb, kmin, kmax, block, max_pages):
    return (
        sb.q,
        kmin,
        kmax,
        sb.req_to_token,
        sb.req_pool_indices,
        sb.seq_lens,
        sb.page_size,
        block,
        sb.sm_scale,
        max_pages,
    )


@pytest.mark.parametrize("page_size,group,d,dtype", CASES, ids=CASE_IDS)
def test_kernel_equals_reference(page_size, group, d, dtype, device):
    sb, kmin, kmax = build(page_size, group, d, dtype, device)
    got = page_bounds(*_args(sb, kmin, kmax, page_size, 12))
    ref = page_bounds_ref(*_args(sb, kmin, kmax, page_size, 12))
    fin = torch.isfinite(ref)
    assert torch.equal(fin, torch.isfinite(got))
    assert torch.allclose(got[fin], ref[fin], rtol=1e-5, atol=1e-4)
    assert got.shape == (3, 2, 12) and got.dtype == torch.float32


def _true_logit_max(sb, page_size, max_pages):
    """Brute force: the max scaled logit over each page's valid tokens and the GQA group."""
    bs, hq, d = sb.q.shape
    hkv = sb.k_cache.shape[1]
    g = hq // hkv
    out = torch.full((bs, hkv, max_pages), float("-inf"), dtype=torch.float64)
    for b in range(bs):
        n = int(sb.seq_lens[b])
        slots = sb.req_to_token[b, :n].long()
        k = sb.k_cache[slots].double().cpu()  # [n, Hkv, D]
        qb = sb.q[b].double().cpu().view(hkv, g, d)
        s = torch.einsum("hgd,nhd->hgn", qb, k).amax(1) * sb.sm_scale  # [Hkv, n]
        for j in range(min(-(-n // page_size), max_pages)):
            out[b, :, j] = s[:, j * page_size : (j + 1) * page_size].amax(-1)
    return out


@pytest.mark.parametrize("page_size,group,d,dtype", CASES[::2], ids=CASE_IDS[::2])
def test_no_key_logit_above_its_page_bound(page_size, group, d, dtype, device):
    sb, kmin, kmax = build(page_size, group, d, dtype, device, seed=5)
    got = page_bounds(*_args(sb, kmin, kmax, page_size, 12)).double().cpu()
    true = _true_logit_max(sb, page_size, 12)
    fin = torch.isfinite(true)
    # fp32 accumulation order may differ by rounding only
    assert bool((got[fin] >= true[fin] - 1e-4 * true[fin].abs().clamp(min=1)).all())


def test_sub_pages_are_tighter_and_still_bounds(device):
    sb, kmin8, kmax8 = build(32, 4, 64, torch.float32, device, block=8)
    _, kmin32, kmax32 = build(32, 4, 64, torch.float32, device, block=32)
    fine = page_bounds(*_args(sb, kmin8, kmax8, 8, 12))
    coarse = page_bounds(*_args(sb, kmin32, kmax32, 32, 12))
    assert torch.allclose(fine, page_bounds_ref(*_args(sb, kmin8, kmax8, 8, 12)), rtol=1e-5, atol=1e-4)
    fin = torch.isfinite(coarse)
    assert bool((fine[fin] <= coarse[fin] + 1e-4).all())
    assert bool((fine[fin] < coarse[fin] - 1e-3).any())  # strictly tighter somewhere
    true = _true_logit_max(sb, 32, 12)
    assert bool((fine.double().cpu()[fin.cpu()] >= true[fin.cpu()] - 1e-4).all())


def test_pages_past_the_end_are_minus_inf(device):
    sb, kmin, kmax = build(16, 1, 64, torch.float32, device, lens=[17, 16])
    got = page_bounds(*_args(sb, kmin, kmax, 16, 4))
    assert torch.isfinite(got[0, :, :2]).all() and torch.isinf(got[0, :, 2:]).all()
    assert torch.isfinite(got[1, :, :1]).all() and torch.isinf(got[1, :, 1:]).all()


def test_bad_inputs_raise(device):
    sb, kmin, kmax = build(16, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="page_size"):
        page_bounds(*_args(sb, kmin, kmax, 16, 4)[:6], 24, 8, sb.sm_scale, 4)
    with pytest.raises(ValueError, match="block_size"):
        page_bounds(*_args(sb, kmin, kmax, 16, 4)[:6], 16, 3, sb.sm_scale, 4)
    with pytest.raises(TypeError, match="dtype"):
        page_bounds(sb.q.half(), *_args(sb, kmin, kmax, 16, 4)[1:])
    with pytest.raises(ValueError, match="shape"):
        page_bounds(sb.q[0], *_args(sb, kmin, kmax, 16, 4)[1:])
    with pytest.raises(ValueError, match="seq_lens"):
        page_bounds(*_args(sb, kmin, kmax, 16, 4)[:5], sb.seq_lens[:1], 16, 16, sb.sm_scale, 4)


@pytest.mark.parametrize("page_size,group,d,dtype", CASES[::3], ids=CASE_IDS[::3])
def test_centers_equal_reference_and_lie_inside_the_interval(page_size, group, d, dtype, device):
    sb, kmin, kmax = build(page_size, group, d, dtype, device, seed=9)
    got_u, got_c = page_bounds(*_args(sb, kmin, kmax, page_size, 12), with_centers=True)
    ref_u, ref_c = page_bounds_ref(*_args(sb, kmin, kmax, page_size, 12), with_centers=True)
    fin = torch.isfinite(ref_c)
    assert torch.equal(fin, torch.isfinite(got_c))
    # bf16/fp16 round (kmin + kmax) / 2 before the product
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(got_c[fin], ref_c[fin], rtol=tol, atol=tol)
    assert bool((got_c[fin] <= got_u[fin] + tol).all())


def test_skip_below_leaves_short_requests_minus_inf(device):
    sb, kmin, kmax = build(16, 4, 64, torch.float32, device)
    cut = int(sb.seq_lens.max())  # the longest request keeps its bounds, shorter ones are skipped
    got = page_bounds(*_args(sb, kmin, kmax, 16, 12), skip_below=cut)
    ref = page_bounds_ref(*_args(sb, kmin, kmax, 16, 12), skip_below=cut)
    full = page_bounds(*_args(sb, kmin, kmax, 16, 12))
    for b in range(3):
        if int(sb.seq_lens[b]) < cut:
            assert bool(torch.isneginf(got[b]).all()) and bool(torch.isneginf(ref[b]).all())
        else:
            assert torch.equal(got[b], full[b])


@pytest.mark.parametrize("with_centers", [False, True])
def test_fill_false_writes_only_live_pages(with_centers, device):
    # The server's width N spans its longest context; fill=False must write each long request's pages
    # (-inf past seq_len inside the last block) and leave everything else as it was.
    sb, kmin, kmax = build(16, 4, 64, torch.float32, device, lens=[16 * 40 + 3, 16 * 3, 16 * 70])
    cut, width = 16 * 4, 100
    full = page_bounds(*_args(sb, kmin, kmax, 16, width), skip_below=cut, with_centers=with_centers)
    poison = torch.full((3, 2, width), float("nan"), device=sb.q.device)
    kw = {"centers": poison.clone()} if with_centers else {}
    got = page_bounds(*_args(sb, kmin, kmax, 16, width), out=poison.clone(), skip_below=cut,
                      with_centers=with_centers, fill=False, **kw)  # fmt: skip
    for f, g in zip(full if with_centers else (full,), got if with_centers else (got,)):
        for b, blocks in ((0, 1), (2, 2)):  # live blocks of 64 pages: written in full
            assert torch.equal(g[b, :, : 64 * blocks], f[b, :, : 64 * blocks])
            assert bool(torch.isnan(g[b, :, 64 * blocks :]).all())
        assert bool(torch.isnan(g[1]).all())  # below skip_below: untouched


def test_select_and_certified_ignore_unwritten_bounds(device):
    from sglang_psa.kernels import SelectParams, certified_decode, select_pages

    lens = [16 * 40 + 3, 16 * 3, 16 * 70]
    sb, kmin, kmax = build(16, 4, 64, torch.float32, device, lens=lens, skew=0.9)
    cut, width = 16 * 4, 100
    args = _args(sb, kmin, kmax, 16, width)
    full_b, full_c = page_bounds(*args, skip_below=cut, with_centers=True)
    nan = torch.full((3, 2, width), float("nan"), device=sb.q.device)
    b_, c_ = page_bounds(*args, skip_below=cut, with_centers=True, fill=False, out=nan.clone(),
                         centers=nan.clone())  # fmt: skip
    params = SelectParams(tau=0.8, sink_pages=1, local_pages=2, max_pages=48)
    want = select_pages(full_b, sb.seq_lens, 16, params, mass_logits=full_c, dense_below=cut)
    got = select_pages(b_, sb.seq_lens, 16, params, mass_logits=c_, dense_below=cut)
    assert all(torch.equal(w, g) for w, g in zip(want, got))
    cache = (sb.q, sb.k_cache, sb.v_cache, sb.req_to_token, sb.req_pool_indices, sb.seq_lens)
    want = certified_decode(
        *cache, full_b, 16, sb.sm_scale, 0.8, 1, 2, 4, rest_logits=full_c, dense_below=cut
    )
    got = certified_decode(*cache, b_, 16, sb.sm_scale, 0.8, 1, 2, 4, rest_logits=c_, dense_below=cut)
    assert all(torch.equal(w, g) for w, g in zip(want, got))


@pytest.mark.parametrize("page_size,group,d,dtype", CASES[1::3], ids=CASE_IDS[1::3])
@pytest.mark.parametrize("block", [None, "half"])
def test_variance_weighted_centers_equal_reference(page_size, group, d, dtype, block, device):
    blk = page_size if block is None else page_size // 2
    sb, kmin, kmax = build(page_size, group, d, dtype, device, seed=4, block=blk)
    args = _args(sb, kmin, kmax, blk, 12)
    got_u, got_c = page_bounds(*args, with_centers=True, variance_weight=1 / 24)
    ref_u, ref_c = page_bounds_ref(*args, with_centers=True, variance_weight=1 / 24)
    _, plain = page_bounds_ref(*args, with_centers=True)
    fin = torch.isfinite(ref_c)
    assert torch.equal(fin, torch.isfinite(got_c))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(got_c[fin], ref_c[fin], rtol=tol, atol=tol)
    assert torch.equal(got_u, page_bounds(*args))  # the bounds do not change
    # the spread term is >= 0 and strictly raises pages whose keys differ
    assert bool((ref_c[fin] >= plain[fin] - 1e-6).all()) and bool((ref_c[fin] > plain[fin] + 1e-3).any())


def test_lognormal_centers_estimate_page_mass_better_than_the_midpoint():
    """On pages of Gaussian keys with different spreads, the log-normal centers track each page's true
    log-mean-exp logit closer than the midpoints, which miss the spread (Jensen) entirely."""
    torch.manual_seed(0)
    page, n_pages, d = 16, 64, 64
    scale = torch.rand(n_pages, 1, 1, 1) * 1.5 + 0.1  # pages of very different spread
    k = (torch.randn(n_pages, page, 1, d) * scale + 0.2 * torch.randn(n_pages, 1, 1, d)).view(-1, 1, d)
    q = torch.randn(1, 1, d)
    slots = torch.arange(n_pages * page)
    kmin, kmax = alloc_summaries(k.shape[0], 1, d, page, torch.float32, "cpu")
    update_page_summaries_ref(k, kmin, kmax, slots, page)
    r2t = slots[None].to(torch.int32)
    meta = (
        r2t,
        torch.zeros(1, dtype=torch.int32),
        torch.tensor([n_pages * page]),
        page,
        page,
        d**-0.5,
        n_pages,
    )
    _, mid = page_bounds_ref(q, kmin, kmax, *meta, with_centers=True)
    _, logn = page_bounds_ref(q, kmin, kmax, *meta, with_centers=True, variance_weight=1 / 24)
    logits = (k[:, 0] @ q[0, 0]).view(n_pages, page) * d**-0.5
    truth = torch.logsumexp(logits.double(), -1) - math.log(page)

    def err(est):  # a shared offset does not change a mass ranking or share: compare centered errors
        e = est[0, 0].double() - truth
        return float((e - e.mean()).abs().mean())

    assert err(logn) < 0.75 * err(mid)
