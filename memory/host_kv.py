"""Pinned host memory that CUDA kernels read and write in place (zero-copy over UVA).

Tiered mode keeps SGLang's whole token KV pool in host memory: one page-locked buffer, registered
with `cudaHostRegister` (SGLang's own MHATokenToKVPoolHost pattern; torch's pin_memory allocator
would round 40 GiB up to 64), and per-layer CUDA tensors that alias it. On a UVA system a
registered host page has a device address equal to its host address, so every kernel SGLang or
FlashInfer launches on a `cuda_view` tensor (KV writes, prefill attention, summaries) reads and
writes host memory over PCIe, and the radix cache, allocator and scheduler see an ordinary, larger
KV pool. Decode reads the selected pages through the hot pool instead (memory/device_tiered.py).

    pinned_empty(shape, dtype) -> CPU tensor, page-locked (registered), zero-filled by the OS
    cuda_view(host) -> CUDA tensor aliasing `host` (same shape, dtype and strides); it keeps `host`
    alive. On a machine without CUDA there is no such view: `cuda_view` raises.

torch builds the view from the `__cuda_array_interface__` protocol (typestr for the bytes, then a
dtype view, since the protocol has no bfloat16); torch asks the driver which device the pointer
belongs to, which for registered host memory is the device it was registered on.
"""

from __future__ import annotations

import torch

_TYPESTR = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}  # raw bytes of an element, by itemsize
_ITEM_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A page-locked CPU tensor (zeroed: fresh anonymous pages). Plain CPU memory without CUDA."""
    t = torch.zeros(shape, dtype=dtype)  # touches every page once, before pinning
    if not torch.cuda.is_available() or t.numel() == 0:
        return t
    rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(rc) != 0:
        raise RuntimeError(
            f"cudaHostRegister of {t.numel() * t.element_size() / 2**30:.1f} GiB failed (error {int(rc)}); "
            "lower the host tier size (--psa-host-kv-gb) or raise the locked-memory limit"
        )
    return t


class _Interface:
    """Holds the host tensor and describes it to torch as CUDA memory."""

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host = host
        item = host.element_size()
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "typestr": _TYPESTR[item],
            "data": (host.data_ptr(), False),
            "strides": tuple(s * item for s in host.stride()),
            "version": 3,
            "stream": None,  # no synchronisation: the host buffer has no producer stream
        }


def cuda_view(host: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """A CUDA tensor over the registered host tensor `host` (no copy; reads and writes go to host)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_view needs CUDA (unified virtual addressing)")
    if host.device.type != "cpu" or not host.is_pinned():
        raise ValueError("cuda_view needs a page-locked CPU tensor (pinned_empty)")
    device = torch.device(device or "cuda")
    item = host.element_size()
    with torch.cuda.device(device):
        raw = torch.as_tensor(_Interface(host, device), device=device)
    view = raw if raw.dtype == host.dtype else raw.view(host.dtype)
    if view.data_ptr() != host.data_ptr() or view.shape != host.shape or item != view.element_size():
        raise RuntimeError("cuda_view: torch built a copy instead of a view")
    return view
