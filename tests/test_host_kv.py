"""memory/host_kv.py: pinned host buffers that kernels use as CUDA tensors (zero-copy over UVA)."""

import pytest
import torch

from sglang_psa.kernels import sparse_decode
from sglang_psa.memory.host_kv import cuda_view, pinned_empty


def test_pinned_empty_is_zeroed_cpu_memory():
    t = pinned_empty((3, 5, 2), torch.bfloat16)
    assert t.device.type == "cpu" and t.shape == (3, 5, 2) and t.dtype == torch.bfloat16
    assert int(t.count_nonzero()) == 0
    assert t.is_pinned() == torch.cuda.is_available()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error path")
def test_cuda_view_without_cuda_raises():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        cuda_view(pinned_empty((4,), torch.float32))


@pytest.mark.gpu
def test_cuda_view_aliases_host_memory():
    host = pinned_empty((64, 8, 128), torch.bfloat16)
    host.copy_(torch.randn(host.shape))
    view = cuda_view(host)
    assert view.is_cuda and view.dtype == torch.bfloat16 and view.data_ptr() == host.data_ptr()
    assert torch.equal(view.cpu(), host)
    view[3].fill_(2.0)  # a kernel writes host memory
    torch.cuda.synchronize()
    assert bool((host[3] == 2.0).all())
    loc = torch.tensor([5, 7], device="cuda")
    view[loc] = torch.ones(2, 8, 128, dtype=torch.bfloat16, device="cuda")  # SGLang's set_kv_buffer
    torch.cuda.synchronize()
    assert bool((host[5] == 1).all()) and bool((host[7] == 1).all())
    with pytest.raises(ValueError, match="page-locked"):
        cuda_view(torch.zeros(4))


@pytest.mark.gpu
def test_sparse_decode_over_host_view_equals_device():
    p, hkv, hq, d, bs, n = 32, 8, 32, 128, 2, 64
    g = torch.Generator().manual_seed(0)
    tokens = bs * n * p + p
    k_host, v_host = (pinned_empty((tokens, hkv, d), torch.bfloat16) for _ in range(2))
    k_host.copy_(torch.randn(k_host.shape, generator=g))
    v_host.copy_(torch.randn(v_host.shape, generator=g))
    r2t = (p + torch.arange(bs * n * p)).view(bs, n * p).to(torch.int32).cuda()
    rpi = torch.arange(bs, device="cuda")
    seq = torch.full((bs,), n * p - 5, dtype=torch.int32, device="cuda")
    q = torch.randn(bs, hq, d, generator=g).to(torch.bfloat16).cuda()
    page_idx = torch.stack([torch.randperm(n - 1, generator=g)[:16] for _ in range(bs * hkv)])
    page_idx = page_idx.view(bs, hkv, 16)
    page_idx[..., 0] = n - 1  # the partial last page
    page_idx = page_idx.to(torch.int32).cuda()
    counts = torch.full((bs, hkv), 16, dtype=torch.int32, device="cuda")
    args = (r2t, rpi, seq, page_idx, counts, p, d**-0.5)
    o_dev, lse_dev = sparse_decode(q, k_host.cuda(), v_host.cuda(), *args)
    o_uva, lse_uva = sparse_decode(q, cuda_view(k_host), cuda_view(v_host), *args)
    assert torch.equal(o_dev, o_uva) and torch.equal(lse_dev, lse_uva)


@pytest.mark.gpu
def test_flashinfer_paged_prefill_over_host_view_equals_device():
    """SGLang's prefill reads the cached prefix through FlashInfer's paged kernel (page size 1)."""
    flashinfer = pytest.importorskip("flashinfer")
    hkv, hq, d, prefix, new = 8, 32, 128, 3000, 200
    g = torch.Generator().manual_seed(1)
    k_host, v_host = (pinned_empty((prefix + new + 1, hkv, d), torch.bfloat16) for _ in range(2))
    k_host.copy_(torch.randn(k_host.shape, generator=g))
    v_host.copy_(torch.randn(v_host.shape, generator=g))
    q = torch.randn(new, hq, d, generator=g).to(torch.bfloat16).cuda()
    idx = (1 + torch.randperm(prefix + new, generator=g)).to(torch.int32).cuda()  # scattered slots
    qo_indptr = torch.tensor([0, new], dtype=torch.int32, device="cuda")
    kv_indptr = torch.tensor([0, prefix + new], dtype=torch.int32, device="cuda")
    last = torch.ones(1, dtype=torch.int32, device="cuda")
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    outs = []
    for k, v in ((k_host.cuda(), v_host.cuda()), (cuda_view(k_host), cuda_view(v_host))):
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
        w.plan(qo_indptr, kv_indptr, idx, last, hq, hkv, d, 1, causal=True, q_data_type=torch.bfloat16)
        outs.append(w.run(q, (k.unsqueeze(1), v.unsqueeze(1))))
    assert torch.equal(outs[0], outs[1])
