"""Compacted page copy, host tier -> pool slots: work proportional to the real copies, fixed shapes.

PageFetcher's sgl-kernel path moves M * P token items per call whether or not a page needs a copy
(dummies go to the sink slot), so its time barely depends on the hit rate (docs/TIERED.md, cause 2).
Here the pages to copy are packed to the front on the device and a Triton kernel reads the count from
device memory; a fixed grid of programs strides over the entries below it, so an all-hit call costs
one small launch and a half-hit call moves half the bytes. Nothing reads the count on the host (no
sync), every shape is static: the call is CUDA-graph capturable and the count changes between replays.

    compact(mask [M] bool, pages [M] int, slots [M] int)
        -> pages_c [M] int64, slots_c [M] int64 (the masked entries in order, -1 after), count [1] int32
    copy_pages(src_k, src_v [NP, P, Hkv, D], dst_k, dst_v [S, P, Hkv, D], pages_c, slots_c, count)
        dst[slots_c[i]] = src[pages_c[i]] for i < count (K and V); Triton, grid
        (min(M, max_programs), ceil(page / block)), each program striding over the entries
    copy_pages_ref(...)  the same in torch (reads count on the host: a reference, not capturable)

Source pointer on the GPU: src is the pinned host tier, read over UVA. host_ptr picks how the kernel
gets its address:
  "tensor": the pinned CPU tensor is passed as the pointer argument. Triton 3.6 does no device check
            in Python (runtime/jit.py: a tensor argument is typed by its dtype and specialised on
            data_ptr() % 16); the launcher (backends/nvidia/driver.py, getPointer) calls
            cuPointerGetAttribute(CU_POINTER_ATTRIBUTE_DEVICE_POINTER, data_ptr()) and raises
            "Pointer argument (at i) cannot be accessed from Triton (cpu tensor?)" only when that
            returns CUDA_ERROR_INVALID_VALUE, i.e. for pageable memory. Page-locked memory from
            cudaHostAlloc (torch's pin_memory) or cudaHostRegister is mapped on UVA systems, so the
            query succeeds and returns the device address (equal to the host address under UVA).
  "int":    the address is passed as an int64 and cast to a pointer inside the kernel (int_to_ptr), so
            the launcher checks nothing. The address is cudaHostGetDevicePointer's when libcudart
            answers (torch.cuda.cudart() does not expose that call; ctypes does), else data_ptr().
  "auto":   "tensor", unless a probe launch (count 0, writes nothing) is refused; then "int".
Under TRITON_INTERPRET=1 (CPU tests) both are plain CPU memory; "int" there exercises the cast.
"""

from __future__ import annotations

import ctypes

import torch
import triton
import triton.language as tl

from sglang_psa.kernels._common import sm_count


@triton.jit
def _copy_pages_kernel(
    src_k,
    src_v,
    dst_k,
    dst_v,
    pages,
    slots,
    count,
    head_np,
    PAGE: tl.constexpr,
    BLOCK: tl.constexpr,
    EVEN: tl.constexpr,
    SRC_INT: tl.constexpr,
    SRC_PAGE: tl.constexpr = 0,
    SRC_TOK: tl.constexpr = 0,
    ROW: tl.constexpr = 0,
    HEAD_PAGES: tl.constexpr = False,
):
    c = tl.program_id(1)  # chunk of the page
    n = tl.load(count)
    if SRC_INT:  # raw addresses: cast to pointers of the destination's element type
        # 16-byte aligned (copy_pages checks it): restated after the cast, or loads are not vectorised
        sk = tl.multiple_of(src_k.to(tl.pointer_type(dst_k.dtype.element_ty)), 16)
        sv = tl.multiple_of(src_v.to(tl.pointer_type(dst_v.dtype.element_ty)), 16)
    else:
        sk = src_k
        sv = src_v
    offs = c * BLOCK + tl.arange(0, BLOCK)
    # grid-stride over the compacted entries: a fixed number of programs, however wide the union
    # (an all-hit call launched M x chunks idle programs before: 0.2-0.4 ms per layer on the H100)
    for i in range(tl.program_id(0), n, tl.num_programs(0)):
        page = tl.load(pages + i).to(tl.int64)
        slot = tl.load(slots + i).to(tl.int64)
        if HEAD_PAGES:  # head page h * head_np + p: head h of page p, ROW = D elements per token
            s_off = (
                (page % head_np) * SRC_PAGE + (page // head_np) * ROW + (offs // ROW) * SRC_TOK + offs % ROW
            )
        else:
            s_off = page * PAGE + offs
        d_off = slot * PAGE + offs
        # both loads before either store: a store may alias a later load as far as the compiler knows,
        # so load-store-load-store waits out two PCIe round trips a page where this waits out one
        if EVEN:
            k = tl.load(sk + s_off)
            v = tl.load(sv + s_off)
            tl.store(dst_k + d_off, k)
            tl.store(dst_v + d_off, v)
        else:
            m = offs < PAGE
            k = tl.load(sk + s_off, mask=m)
            v = tl.load(sv + s_off, mask=m)
            tl.store(dst_k + d_off, k, mask=m)
            tl.store(dst_v + d_off, v, mask=m)


def compact(
    mask: torch.Tensor, pages: torch.Tensor, slots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the (page, slot) pairs where mask [M] is set to the front, in order.

    -> pages_c, slots_c [M] int64 (-1 past the count), count [1] int32; all on mask's device, fixed
    shapes, no host sync (cumsum + scatter; unmasked entries are scattered into a trash element M).
    """
    m, dev = mask.shape[0], mask.device
    mask = mask.bool()
    pos = torch.cumsum(mask, 0)  # inclusive: entry i's rank among the masked is pos[i] - 1
    tgt = torch.where(mask, pos - 1, m)
    out_p = torch.full((m + 1,), -1, dtype=torch.int64, device=dev)
    out_s = torch.full((m + 1,), -1, dtype=torch.int64, device=dev)
    out_p.scatter_(0, tgt, pages.to(dev, torch.int64))
    out_s.scatter_(0, tgt, slots.to(dev, torch.int64))
    count = pos[-1:].to(torch.int32) if m else torch.zeros(1, dtype=torch.int32, device=dev)
    return out_p[:m], out_s[:m], count


def _check(src_k, src_v, dst_k, dst_v, head_pages: bool = False) -> int:
    """Elements per page; raises if the page layouts differ or a buffer is not contiguous.
    head_pages: dst pages are one kv head's ([S, P, 1, D]) of a contiguous source [NP, P, Hkv, D]."""
    if head_pages:
        np_, p, _, d = src_k.shape
        if dst_k.shape[1:] != (p, 1, d) or dst_v.shape != dst_k.shape or src_v.shape != src_k.shape:
            raise ValueError(f"head pages: src {tuple(src_k.shape)} dst {tuple(dst_k.shape)}")
    elif src_k.shape != src_v.shape or not dst_k.shape[1:] == dst_v.shape[1:] == src_k.shape[1:]:
        raise ValueError(f"pages differ: src {tuple(src_k.shape)} dst {tuple(dst_k.shape)}")
    if src_k.dtype != dst_k.dtype or src_v.dtype != dst_v.dtype:
        raise ValueError(f"dtypes differ: {src_k.dtype} -> {dst_k.dtype}")
    for t in (src_k, src_v, dst_k, dst_v):
        if not t.is_contiguous():
            raise ValueError("source and destination page buffers must be contiguous")
    return dst_k[0].numel()


def _src_strides(src: torch.Tensor, head_pages: bool = False) -> dict:
    """Kernel constants of head pages (one head's rows of a contiguous source [NP, P, Hkv, D], head_np
    pages per head); none for whole pages."""
    if not head_pages:
        return {}
    np_, p, hkv, d = src.shape
    return {"SRC_PAGE": p * hkv * d, "SRC_TOK": hkv * d, "ROW": d, "HEAD_PAGES": True}


def copy_pages(
    src_k: torch.Tensor,
    src_v: torch.Tensor,
    dst_k: torch.Tensor,
    dst_v: torch.Tensor,
    pages_c: torch.Tensor,
    slots_c: torch.Tensor,
    count: torch.Tensor,
    block: int = 4096,
    num_warps: int = 4,
    host_ptr: str = "tensor",
    max_programs: int | None = None,
    head_pages: bool = False,
) -> None:
    """dst_k/v[slots_c[i]] = src_k/v[pages_c[i]] for i < count[0] (Triton; see the module docstring).

    src_k, src_v [NP, P, Hkv, D] contiguous (the host tier's layer; pinned CPU on a GPU run); dst_k,
    dst_v [S, P, Hkv, D] on the device; pages_c, slots_c [M] int32/int64 and count [1] int32 on the device
    (compact()'s output). Entries past the count are never read as pages nor written. block: elements
    per program (power of 2; a page is ceil(P * Hkv * D / block) programs). host_ptr: "tensor" or
    "int" (how src reaches the kernel). max_programs: programs along the entries, each striding over
    them (default: M on the CPU, 8 per SM on a GPU). head_pages: pages_c holds head pages
    h * NP + p and dst [S, P, 1, D] gets head h of source page p (--psa-hot-granularity head).
    """
    page = _check(src_k, src_v, dst_k, dst_v, head_pages)
    m = pages_c.shape[0]
    if m == 0:
        return
    block = min(triton.next_power_of_2(page), block)
    if host_ptr == "int":
        sk, sv = device_address(src_k), device_address(src_v)
        if sk % 16 or sv % 16:
            raise ValueError("host_ptr='int' needs 16-byte aligned sources")
    elif host_ptr == "tensor":
        sk, sv = src_k, src_v
    else:
        raise ValueError(f"host_ptr must be 'tensor' or 'int', got {host_ptr!r}")
    programs = m if max_programs is None else max(1, min(m, max_programs))
    if max_programs is None and dst_k.device.type == "cuda":
        programs = min(m, 8 * sm_count(dst_k.device))
    grid = (programs, triton.cdiv(page, block))
    _copy_pages_kernel[grid](
        sk, sv, dst_k, dst_v, pages_c, slots_c, count, src_k.shape[0],
        PAGE=page, BLOCK=block, EVEN=page % block == 0, SRC_INT=host_ptr == "int", num_warps=num_warps,
        **_src_strides(src_k, head_pages),
    )  # fmt: skip


def copy_pages_ref(src_k, src_v, dst_k, dst_v, pages_c, slots_c, count, head_pages: bool = False) -> None:
    """copy_pages in torch (reads count on the host)."""
    _check(src_k, src_v, dst_k, dst_v, head_pages)
    n = int(count.reshape(-1)[0])
    p, s = pages_c[:n].long(), slots_c[:n].long()
    if head_pages:
        np_ = src_k.shape[0]
        h, p = (p // np_).to(src_k.device), (p % np_).to(src_k.device)
        dst_k[s.to(dst_k.device)] = src_k[p, :, h].unsqueeze(2).to(dst_k.device)
        dst_v[s.to(dst_v.device)] = src_v[p, :, h].unsqueeze(2).to(dst_v.device)
        return
    dst_k[s.to(dst_k.device)] = src_k[p.to(src_k.device)].to(dst_k.device)
    dst_v[s.to(dst_v.device)] = src_v[p.to(src_v.device)].to(dst_v.device)


_cudart = None


def _cudart_lib():
    global _cudart
    if _cudart is None:
        _cudart = False
        for name in ("libcudart.so.13", "libcudart.so.12", "libcudart.so"):
            try:
                _cudart = ctypes.CDLL(name)  # already loaded by torch: dlopen returns that handle
                break
            except OSError:
                continue
    return _cudart or None


def device_address(t: torch.Tensor) -> int:
    """The device-side address of t's first element: t.data_ptr() for device memory and on the CPU
    (interpreter); for pinned host memory cudaHostGetDevicePointer of the allocation (UVA: the same
    value), falling back to data_ptr() when libcudart cannot be reached."""
    if t.device.type != "cpu" or not torch.cuda.is_available() or not t.is_pinned():
        return t.data_ptr()
    lib = _cudart_lib()
    if lib is None:
        return t.data_ptr()
    base = t.untyped_storage().data_ptr()
    out = ctypes.c_void_p()
    err = lib.cudaHostGetDevicePointer(ctypes.byref(out), ctypes.c_void_p(base), ctypes.c_uint(0))
    if err != 0 or out.value is None:
        raise RuntimeError(f"cudaHostGetDevicePointer failed ({err}): is the host tier pinned and mapped?")
    return out.value + (t.data_ptr() - base)


def pick_host_ptr(src_k, src_v, dst_k, dst_v, head_pages: bool = False) -> str:
    """'tensor' if Triton's launcher takes the pinned tensors directly, else 'int' (probe: count 0)."""
    dev = dst_k.device
    idx = torch.zeros(1, dtype=torch.int64, device=dev)
    zero = torch.zeros(1, dtype=torch.int32, device=dev)
    try:
        copy_pages(src_k, src_v, dst_k, dst_v, idx, idx, zero, host_ptr="tensor", head_pages=head_pages)
    except ValueError as e:  # "Pointer argument (at i) cannot be accessed from Triton (cpu tensor?)"
        if "cannot be accessed" not in str(e):
            raise
        return "int"
    return "tensor"
