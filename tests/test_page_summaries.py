import pytest
import torch
from kernel_cases import CASE_IDS, CASES, build

from sglang_psa.kernels import (
    alloc_summaries,
    make_skewed_batch,
    update_page_summaries,
    update_page_summaries_ref,
)


@pytest.mark.parametrize("page_size,group,d,dtype", CASES, ids=CASE_IDS)
def test_prefill_kernel_equals_reference(page_size, group, d, dtype, device):
    sb, kmin_ref, kmax_ref = build(page_size, group, d, dtype, device)
    kmin, kmax = alloc_summaries(sb.k_cache.shape[0], 2, d, page_size, dtype, device)
    update_page_summaries(sb.k_cache, kmin, kmax, sb.written_slots, page_size)
    assert torch.equal(kmin, kmin_ref) and torch.equal(kmax, kmax_ref)


@pytest.mark.parametrize("page_size,block", [(16, 16), (32, 8), (64, 16)])
def test_decode_appends_and_sub_pages(page_size, block, device):
    """Token-by-token decode writes give the same summaries as one prefill of the whole sequence."""
    lens = [page_size * 2 + 3, page_size + 1]
    sb = make_skewed_batch(2, 4, 2, 64, lens, page_size, dtype=torch.float16, device=device, seed=3)
    prefix = [n - 5 for n in lens]
    kmin, kmax = alloc_summaries(sb.k_cache.shape[0], 2, 64, block, torch.float16, device)
    first = torch.cat([sb.req_to_token[b, :n] for b, n in enumerate(prefix)]).to(torch.int64)
    update_page_summaries(sb.k_cache, kmin, kmax, first, block)
    for step in range(5):  # one decode token per request per step
        loc = torch.stack([sb.req_to_token[b, n + step] for b, n in enumerate(prefix)])
        update_page_summaries(sb.k_cache, kmin, kmax, loc, block)
    kmin_ref, kmax_ref = alloc_summaries(sb.k_cache.shape[0], 2, 64, block, torch.float16, device)
    update_page_summaries_ref(sb.k_cache, kmin_ref, kmax_ref, sb.written_slots, block)
    touched = torch.unique(sb.written_slots // block)
    assert torch.equal(kmin[touched], kmin_ref[touched])
    assert torch.equal(kmax[touched], kmax_ref[touched])


def test_reused_page_gets_fresh_summaries(device):
    """A page freed and refilled with fewer tokens must not keep the old tokens' min/max."""
    page = 16
    k = torch.randn(4 * page, 2, 64, device=device) * 10
    kmin, kmax = alloc_summaries(k.shape[0], 2, 64, page, torch.float32, device)
    full = torch.arange(page, 2 * page, device=device)
    update_page_summaries(k, kmin, kmax, full, page)
    k[page : page + 3] = torch.randn(3, 2, 64, device=device) * 0.01  # new owner writes 3 tokens
    update_page_summaries(k, kmin, kmax, torch.arange(page, page + 3, device=device), page)
    assert torch.equal(kmin[1], k[page : page + 3].amin(0))
    assert torch.equal(kmax[1], k[page : page + 3].amax(0))


@pytest.mark.parametrize("page_size,group,d,dtype", CASES[:3], ids=CASE_IDS[:3])
def test_summaries_bound_every_key(page_size, group, d, dtype, device):
    sb, kmin, kmax = build(page_size, group, d, dtype, device)
    slots = sb.written_slots
    blk = slots // page_size
    assert bool((kmin[blk] <= sb.k_cache[slots]).all()) and bool((sb.k_cache[slots] <= kmax[blk]).all())


def test_bad_inputs_raise(device):
    k = torch.zeros(64, 2, 64, device=device)
    kmin, kmax = alloc_summaries(64, 2, 64, 16, torch.float32, device)
    loc = torch.arange(4, device=device)
    with pytest.raises(ValueError, match="power of two"):
        update_page_summaries(k, kmin, kmax, loc, 12)
    with pytest.raises(ValueError, match="kmin must be"):
        update_page_summaries(k, kmin[:2], kmax, loc, 16)
    with pytest.raises(TypeError, match="out_cache_loc"):
        update_page_summaries(k, kmin, kmax, loc.float(), 16)
    with pytest.raises(TypeError, match="k_cache"):
        update_page_summaries(k.to(torch.int32), kmin, kmax, loc, 16)
