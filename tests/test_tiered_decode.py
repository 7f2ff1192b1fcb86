"""Tiered decode (hot pool + host tier) returns what resident decode returns, whatever the pool size."""

import pytest
import torch
from kernel_cases import rel_err

from sglang_psa.kernels import (
    SelectParams,
    make_skewed_batch,
    select_pages_ref,
    sparse_decode,
    sparse_decode_ref,
)
from sglang_psa.memory.hot_pool import HostTier, HotPagePool
from sglang_psa.memory.tiered_decode import TieredAttention, merge_states

P = 16
D = 64


def _setup(device, layers=2, seed=0):
    sb = make_skewed_batch(3, 4, 2, D, [20 * P + 5, 9 * P, 14 * P + 1], P, dtype=torch.float32,
                           device=device, seed=seed, spare_pages=6)  # fmt: skip
    num_pages = sb.k_cache.shape[0] // P
    host = HostTier(layers, num_pages, P, 2, D, torch.float32, pin_memory=False)
    caches = []
    for layer in range(layers):  # layer l's cache: the batch's keys, scaled so layers differ
        k, v = sb.k_cache * (1 + 0.5 * layer), sb.v_cache.clone()
        host.write_pages(
            layer, torch.arange(num_pages), k.view(num_pages, P, 2, D), v.view(num_pages, P, 2, D)
        )
        caches.append((k, v))
    return sb, host, caches, num_pages


def _select(sb, k, width, seed):
    gen = torch.Generator().manual_seed(seed)
    bounds = torch.randn(3, 2, 21, generator=gen)
    params = SelectParams(tau=0.7, sink_pages=1, local_pages=2, max_pages=width)
    return select_pages_ref(bounds, sb.seq_lens.cpu(), P, params)


def test_page_table_kernel_equals_reference(device):
    sb, host, caches, num_pages = _setup(device)
    idx, cnt = _select(sb, caches[0][0], 12, seed=1)
    idx, cnt = idx.to(device), cnt.to(device)
    # a page table that moves every page: location = num_pages - 1 - physical page, in a permuted copy
    perm_k = torch.flip(caches[0][0].view(num_pages, P, 2, D), [0]).reshape(-1, 2, D).contiguous()
    perm_v = torch.flip(caches[0][1].view(num_pages, P, 2, D), [0]).reshape(-1, 2, D).contiguous()
    phys = sb.req_to_token[:, ::P].long() // P
    table = (num_pages - 1 - phys).to(torch.int32).contiguous()
    args = (sb.req_to_token, sb.req_pool_indices, sb.seq_lens, idx, cnt, P, sb.sm_scale)
    got, got_lse = sparse_decode(sb.q, perm_k, perm_v, *args, page_table=table)
    ref, ref_lse = sparse_decode_ref(sb.q, caches[0][0], caches[0][1], *args)
    assert rel_err(got, ref) < 1e-5 and torch.allclose(got_lse.cpu(), ref_lse.cpu(), atol=1e-4)


def test_per_head_page_table_over_one_head_slots_equals_reference(device):
    """page_table [bs, Hkv, N] over slots of one kv head (k_cache expanded to Hkv, head stride 0):
    kv head h of physical page p lives in slot h * NP + (NP - 1 - p)."""
    sb, host, caches, num_pages = _setup(device)
    idx, cnt = _select(sb, caches[0][0], 12, seed=2)
    idx, cnt = idx.to(device), cnt.to(device)
    k4, v4 = (c.view(num_pages, P, 2, D) for c in caches[0])
    # slots [2 * NP, P, 1, D]: head-major, pages reversed within a head
    slots_k = torch.flip(k4, [0]).permute(2, 0, 1, 3).reshape(2 * num_pages, P, 1, D).contiguous()
    slots_v = torch.flip(v4, [0]).permute(2, 0, 1, 3).reshape(2 * num_pages, P, 1, D).contiguous()
    rows_k, rows_v = (t.view(-1, 1, D).expand(-1, 2, D) for t in (slots_k, slots_v))
    phys = sb.req_to_token[:, ::P].long() // P
    heads = torch.arange(2, device=phys.device)[None, :, None] * num_pages
    table = (heads + num_pages - 1 - phys[:, None, :]).to(torch.int32).contiguous()  # [bs, 2, N]
    args = (sb.req_to_token, sb.req_pool_indices, sb.seq_lens, idx, cnt, P, sb.sm_scale)
    got, got_lse = sparse_decode(sb.q, rows_k, rows_v, *args, page_table=table)
    ref, ref_lse = sparse_decode_ref(sb.q, caches[0][0], caches[0][1], *args)
    assert rel_err(got, ref) < 1e-5 and torch.allclose(got_lse.cpu(), ref_lse.cpu(), atol=1e-4)
    via_ref, _ = sparse_decode_ref(sb.q, rows_k, rows_v, *args, page_table=table)
    assert rel_err(via_ref, ref) < 1e-6


@pytest.mark.parametrize("capacity,scratch", [(64, 8), (6, 4), (0, 3)], ids=["fits", "evicts", "no-pool"])
def test_tiered_equals_resident_over_steps(capacity, scratch, device):
    sb, host, caches, num_pages = _setup(device)
    pool = HotPagePool(capacity, 2, num_pages, P, 2, D, torch.float32, device=device, host=host)
    pool.set_quotas([1.0, 2.0])
    tiered = TieredAttention(pool, scratch_pages=scratch)
    for step in range(4):
        tiered.begin_step()
        for layer in range(2):
            idx, cnt = (t.to(device) for t in _select(sb, caches[layer][0], 12, seed=10 * step + layer))
            out, lse, info = tiered.forward(layer, sb.q, sb.req_to_token, sb.req_pool_indices, sb.seq_lens,
                                            idx, cnt, sb.sm_scale, sink_pages=1, local_pages=2)  # fmt: skip
            ref, ref_lse = sparse_decode_ref(sb.q, *caches[layer], sb.req_to_token, sb.req_pool_indices,
                                             sb.seq_lens, idx, cnt, P, sb.sm_scale)  # fmt: skip
            assert rel_err(out, ref) < 1e-5
            assert torch.allclose(lse.cpu(), ref_lse.cpu(), atol=1e-4)
            assert info.hits + info.fetched + info.overflow >= info.needed
            if capacity == 0:
                assert info.overflow == info.needed and info.passes >= 2
        pool.check_invariants()
    if capacity >= 64:
        assert pool.stats.hits > 0 and pool.stats.overflow_pages == 0


def test_merge_states_is_attention_over_the_union():
    gen = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 10, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 3, 10, 4, generator=gen, dtype=torch.float64)

    def part(sl):
        lse = torch.logsumexp(s[..., sl], -1)
        return torch.einsum("bhn,bhnd->bhd", torch.softmax(s[..., sl], -1), v[..., sl, :]), lse

    out, lse = merge_states(*part(slice(0, 4)), *part(slice(4, 10)))
    full = part(slice(0, 10))
    assert torch.allclose(out, full[0]) and torch.allclose(lse, full[1])
    empty = (
        torch.zeros(2, 3, 4, dtype=torch.float64),
        torch.full((2, 3), float("-inf"), dtype=torch.float64),
    )
    out2, lse2 = merge_states(*empty, *full)
    assert torch.allclose(out2, full[0]) and torch.allclose(lse2, full[1])
