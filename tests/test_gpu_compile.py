"""The CPU run's compile check (tests/gpu_compile.py) catches what the interpreter lets through."""

from collections import Counter

import gpu_compile
import pytest
import torch
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

pytestmark = pytest.mark.skipif(
    gpu_compile.installed is None, reason="compile check off (a GPU is present or PSA_TEST_COMPILE=off)"
)


def _sum(x_ptr, out_ptr, n):
    acc = 0  # an int32 that the loop makes a float: numpy in the interpreter does not mind, the
    for i in range(n):  # compiler rejects a loop-carried value whose type changes
        acc = acc + tl.load(x_ptr + i)
    tl.store(out_ptr, acc)


def _iota_constexpr(out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, offs)


def test_a_kernel_the_gpu_compiler_rejects_fails_on_the_cpu():
    x, out = torch.tensor([0.5, 1.0, 2.0]), torch.zeros(1)
    InterpretedFunction(_sum)[(1,)](x, out, 3)  # the interpreter alone: runs, right answer
    assert out.item() == 3.5
    with pytest.raises(CompilationError, match="Loop-carried"):
        JITFunction(_sum)[(1,)](x, out, 3)


def test_a_compiled_launch_still_computes_in_the_interpreter():
    out = torch.zeros(8, dtype=torch.int32)
    before = gpu_compile.launches["_iota_constexpr"]
    JITFunction(_iota_constexpr)[(1,)](out, N=8)
    assert out.tolist() == list(range(8))
    assert gpu_compile.launches["_iota_constexpr"] == before + 1
    (name, _), cubin = next(((k, v) for k, v in gpu_compile.cubins.items() if k[0] == "_iota_constexpr"))
    assert cubin[:4] == b"\x7fELF"  # a real device binary
    assert gpu_compile.resource_usage([name])[name]["max_registers"] > 0


def test_package_kernels_are_compiled_functions():
    from sglang_psa.memory import fused_place

    assert isinstance(fused_place._split_selection_kernel, JITFunction)


@pytest.mark.parametrize("p", [16, 32])  # the accuracy suite's page size, the capacity runs'
def test_bf16_kernels_compile_at_the_servers_shapes(p):
    """What the interpreter cannot run (bf16 dot products) still compiles, in the variants the GPU
    takes: page_bounds (with the log-normal centers) and sparse_decode at Llama-3.1-8B's head shape
    (8 kv heads of 128, group 4), the latter over a page table, head slots (one kv head per
    slot, read through a stride-0 expand), host pages and the split path's merge; the page copy of a
    copy list; the next-layer query estimate."""
    from kernel_cases import build
    from test_page_bounds import _args as bounds_args

    from sglang_psa.kernels import page_bounds, sparse_decode
    from sglang_psa.kernels.next_query import next_query
    from sglang_psa.memory.hot_pool import HostTier
    from sglang_psa.memory.uva_fetch import PageFetcher

    bf16, hkv, grp, d, bs, n, w = torch.bfloat16, 8, 4, 128, 2, 64, 12
    q = torch.randn(bs, hkv * grp, d).to(bf16)
    slots = torch.randn(40 * p, hkv, d).to(bf16)
    one_head = torch.randn(40 * p, 1, d).to(bf16).expand(-1, hkv, -1)  # head slots
    page_idx = torch.randint(0, n, (bs, hkv, w), dtype=torch.int32)
    counts = torch.full((bs, hkv), w, dtype=torch.int32)
    base = (torch.zeros(bs, n * p, dtype=torch.int32), torch.arange(bs), torch.full((bs,), n * p - 3))
    before = Counter(gpu_compile.launches)
    sb, kmin, kmax = build(p, grp, d, bf16, "cpu", hkv=hkv)
    with gpu_compile.compile_only():
        page_bounds(*bounds_args(sb, kmin, kmax, p, 12))
        page_bounds(*bounds_args(sb, kmin, kmax, p, 12), with_centers=True, variance_weight=0.5)
        for kv, table in ((slots, torch.zeros(bs, n, dtype=torch.int32)),
                          (one_head, torch.zeros(bs, hkv, n, dtype=torch.int32))):  # fmt: skip
            args = (q, kv, kv, *base, page_idx, counts, p, d**-0.5)
            first = sparse_decode(*args, page_table=table, out=torch.empty(q.shape))
            sparse_decode(*args, page_table=table, merge_with=first)
            sparse_decode(*args, page_table=table, host_k=slots, host_v=slots, host_base=40)
        host = HostTier(2, 24, p, hkv, d, bf16)
        pool = torch.zeros(10, p, 1, d, dtype=bf16)
        fetcher = PageFetcher(host, pool, pool.clone(), sink_slot=9, head_pages=True, backend="triton")
        keys = torch.arange(6, dtype=torch.int32)
        fetcher.copy_list(1, keys, keys, torch.tensor([6], dtype=torch.int32), max_programs=66)
        rope = torch.randn(4096, d).float()
        next_query(hidden=torch.randn(1, 4096).to(bf16), residual=torch.randn(1, 4096).to(bf16),
                   norm_weight=torch.ones(4096, dtype=bf16), eps=1e-5, w_qkv=torch.randn(6144, 4096).to(bf16),
                   bias=None, q_size=4096, cos_sin_cache=rope, positions=torch.tensor([7]),
                   head_dim=d)  # fmt: skip
    compiled = Counter(gpu_compile.launches) - before
    assert compiled["_page_bounds_kernel"] == 2 and compiled["_attend_pages_kernel"] >= 6
    assert compiled["_copy_pages_kernel"] == 1
    assert compiled["_next_query_kernel"] == 1
