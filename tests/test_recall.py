import torch

from sglang_psa.kernels import make_skewed_batch
from sglang_psa.recall import selection_recall

P = 16


def _brute(sb, page_idx, counts):
    bs, hq, d = sb.q.shape
    hkv = sb.k_cache.shape[1]
    g = hq // hkv
    out = torch.zeros(bs, hq, dtype=torch.float64)
    for b in range(bs):
        n = int(sb.seq_lens[b])
        k = sb.k_cache[sb.req_to_token[b, :n].long()].double()
        for h in range(hq):
            kh = h // g
            prob = torch.softmax(k[:, kh] @ sb.q[b, h].double() * sb.sm_scale, 0)
            pages = set(page_idx[b, kh, : counts[b, kh]].tolist())
            out[b, h] = sum(float(prob[t]) for t in range(n) if t // P in pages)
    return out


def test_recall_matches_brute_force_and_is_one_for_every_page():
    sb = make_skewed_batch(2, 4, 2, 32, [5 * P + 3, 9 * P], P, dtype=torch.float32, seed=3)
    width = 10
    gen = torch.Generator().manual_seed(0)
    page_idx = torch.randint(0, 5, (2, 2, width), generator=gen, dtype=torch.int32)
    counts = torch.tensor([[3, 1], [4, 0]], dtype=torch.int32)
    args = (sb.q, sb.k_cache, sb.req_to_token, sb.req_pool_indices, sb.seq_lens)
    got = selection_recall(*args, page_idx, counts, P, sb.sm_scale)
    assert torch.allclose(got.double(), _brute(sb, page_idx, counts), atol=1e-5)
    every = torch.arange(width, dtype=torch.int32).expand(2, 2, width).contiguous()
    full = selection_recall(*args, every, torch.tensor([[6, 6], [9, 9]], dtype=torch.int32), P, sb.sm_scale)
    assert torch.allclose(full, torch.ones_like(full), atol=1e-5)
