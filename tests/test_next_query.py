"""kernels/next_query.py: the fused next-layer query estimate against its torch reference (Triton on
the interpreter on CPU; bf16 on a GPU)."""

from __future__ import annotations

import pytest
import torch

from sglang_psa.kernels.next_query import next_query, next_query_ref


def rope_cache(head_dim: int, max_pos: int = 4096) -> torch.Tensor:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    return torch.cat([freqs.cos(), freqs.sin()], -1)


def case(t, k, heads, d, dtype, residual, bias, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=g)).to(dtype).to(device)  # noqa: E731
    q_size = heads * d
    args = dict(
        hidden=rnd(t, k), residual=rnd(t, k) if residual else None, norm_weight=1 + rnd(k, scale=0.1),
        eps=1e-5, w_qkv=rnd(q_size + 2 * d, k, scale=0.05),
        bias=rnd(q_size + 2 * d, scale=0.1) if bias else None,
        q_size=q_size, cos_sin_cache=rope_cache(d).to(device),
        positions=torch.randint(0, 4096, (t,), generator=g).to(device), head_dim=d,
    )  # fmt: skip
    return args


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("t,residual,bias", [(1, True, False), (5, False, True), (19, True, True)])
@pytest.mark.parametrize("d", [32, 64])
def test_fused_estimate_matches_reference(dtype, tol, t, residual, bias, d):
    args = case(t, 192, 3, d, dtype, residual, bias)
    out = next_query(**args)
    ref = next_query_ref(**args)
    assert out.shape == (t, 3 * d) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_bad_shapes_are_named():
    args = case(2, 64, 2, 32, torch.float32, True, False)
    with pytest.raises(ValueError, match="head_dim"):
        next_query(**{**args, "head_dim": 48})
    with pytest.raises(ValueError, match="cos_sin_cache"):
        next_query(**{**args, "cos_sin_cache": rope_cache(64)})
    with pytest.raises(ValueError, match="residual"):
        next_query(**{**args, "residual": args["residual"][:1]})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("t", [1, 8, 64])
def test_fused_estimate_bf16_on_gpu(t):
    # Llama-3.1-8B's shape: hidden 4096, 32 heads of 128
    args = case(t, 4096, 32, 128, torch.bfloat16, True, False, device="cuda")
    torch.testing.assert_close(
        next_query(**args).float(), next_query_ref(**args).float(), rtol=2e-2, atol=2e-2
    )
