"""Host tier -> device page slots: whole pages copied by token-index lists of a static length.

The GPU path is SGLang's own HiCache primitive, `sgl_kernel.kvcacheio.transfer_kv_per_layer` (what
`MHATokenToKVPoolHost.load_to_device_per_layer` calls for io_backend "kernel", layout
"layer_first"): one warp per item copies `item_size` bytes from src + src_idx * item_size to
dst + dst_idx * item_size, reading the pinned host buffer over UVA (no copy engine, no host sync).
Items are tokens: one token's [Hkv, D] row, item_size = Hkv * D * elem bytes, as SGLang passes them.

Layout check: `HostTier.k[layer]` is [num_pages, P, Hkv, D] contiguous, i.e. [num_pages * P, Hkv, D]
token rows, which is exactly `MHATokenToKVPoolHost.k_buffer[layer]` in layout "layer_first" ([2, L,
tokens, H, D]); the pool's `k` [slots, P, Hkv, D] is a device token-row buffer of the same item. So
token t of host page p is src item p * P + t and token t of slot s is dst item s * P + t; no change
to the host tier's layout is needed.

Fixed shapes for CUDA graphs: a call always copies M pages = M * P items (M = the union width). The
entries that need no copy (hits, padding) are dummies whose destination is the pool's sink slot
(never read). Their source, by `pad`:
  "host":   token 0 of the layer's host tier. One `transfer_kv_per_layer` call for K and V, but every
            dummy is a 2 KiB PCIe read unless the GPU caches it (bench_tiered.py measures a call
            with no real copies to tell).
  "device": a small device pad buffer, addressed relative to the host base (UVA puts host and
            device memory in one address space, so src + idx * item_size can land on device memory
            when idx is chosen for it). K and V then need different dummy indices, so the copy is
            two `transfer_kv_per_layer_mla` calls (the same kernel, one buffer each). Dummies then
            read device memory, not PCIe.
Entries stay in page order (not compacted), so real copies spread over all warps: older kernel
versions give each warp one contiguous chunk of items.

`backend="torch"` is the same index logic as plain tensor indexing (CPU tests; on a GPU it reads the
source indices on the host, so it is eager-only there and serves as the reference).

`backend="triton"` (memory/page_copy.py) is the compacted copy: the pages to copy are packed to the
front on the device with a device count, and a fixed grid of Triton programs strides over the first
`count` of them, so the work scales with the real copies (no dummies, the sink slot is never
written). It also copies head pages (one kv head of a host page, `head_pages`) in place. Still
fixed shapes and no host sync. `host_ptr` says how the pinned host tier reaches the kernel ("auto",
"tensor", "int": see page_copy), `block` / `triton_warps` its tile. Selectable only; the default
stays the sgl-kernel path.

Negative-index skipping (what compacting with -1 padding would need on the sgl-kernel path): the
installed sglang-kernel 0.4.5 `transfer_kernel_impl` (sm_90 / sm_90a SASS in sgl_kernel/sm90/common_ops,
KV and MLA variants, read with cuobjdump) loads both indices and copies with no sign test, and gives
warp w the items w * items_per_warp + i (one contiguous chunk per warp). The upstream transfer.cu
stored at sgl-project/sglang 1243cf3 skips `src < 0 || dst < 0` and strides items over warps, but
0.4.5's binary does not do either, so -1 padding is not offered here (a -1 would be read as an
address before the buffer).
"""

from __future__ import annotations

import torch

from . import page_copy
from .hot_pool import HostTier


def _kernel_ops():
    from sgl_kernel.kvcacheio import transfer_kv_per_layer, transfer_kv_per_layer_mla

    return transfer_kv_per_layer, transfer_kv_per_layer_mla


class PageFetcher:
    """Copies pages of one layer from `host` (k, v [L, NP, P, Hkv, D]) into dst_k / dst_v slots.

    dst_k, dst_v [S, P, Hkv, D] on the device (a DevicePagePool's k / v); sink_slot: a slot that
    absorbs the dummy entries. backend: "auto" (kernel when dst is on CUDA and the host tier is
    pinned), "kernel", "triton" (compacted copy, page_copy.py) or "torch". block_quota / num_warps:
    the sgl kernel's launch cap (SGLang uses 2 blocks of 32 warps for loads; more blocks pull more
    bytes in flight over PCIe). host_ptr / block / triton_warps: the Triton backend's options.
    """

    def __init__(
        self,
        host: HostTier,
        dst_k: torch.Tensor,
        dst_v: torch.Tensor,
        sink_slot: int,
        backend: str = "auto",
        pad: str = "device",
        block_quota: int = 8,
        num_warps: int = 32,
        host_ptr: str = "auto",
        block: int = 4096,
        triton_warps: int = 4,
        head_pages: bool = False,
    ):
        num_layers, _, p, hkv, d = host.k.shape
        self.head_pages = head_pages
        if head_pages:  # dst slots hold one kv head's page; copy() gets head pages h * NP + p
            if backend not in ("auto", "triton", "torch"):
                raise ValueError("head pages are copied by the 'triton' or 'torch' backend")
            backend = "triton" if backend == "auto" else backend
            hkv = 1
        if dst_k.shape[1:] != (p, hkv, d) or dst_v.shape != dst_k.shape or dst_k.dtype != host.k.dtype:
            raise ValueError(f"dst {tuple(dst_k.shape)} {dst_k.dtype} does not hold pages of the host tier")
        if not 0 <= sink_slot < dst_k.shape[0]:
            raise ValueError(f"sink slot {sink_slot} out of range")
        if pad not in ("host", "device"):
            raise ValueError(f"pad must be 'host' or 'device', got {pad!r}")
        if backend in ("kernel", "auto") and not (host.k[0].is_contiguous() and host.v[0].is_contiguous()):
            if backend == "kernel":  # its item indices assume contiguous (Hkv x D) token items
                raise ValueError("a kv-head slice of the host tier needs backend 'triton' or 'torch'")
            backend = "torch" if dst_k.device.type != "cuda" else "triton"
        self.host, self.dst_k, self.dst_v = host, dst_k, dst_v
        self.page_size, self.sink_slot = p, sink_slot
        self.item_size = hkv * d * host.k.element_size()
        dev = dst_k.device
        if backend == "auto":
            pinned = host.k.is_pinned() and host.v.is_pinned()
            backend = "kernel" if dev.type == "cuda" and pinned else "torch"
        if backend not in ("kernel", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'kernel', 'triton' or 'torch', got {backend!r}")
        self.block, self.triton_warps = block, triton_warps
        if backend == "triton":
            if dev.type == "cuda" and not (host.k.is_pinned() and host.v.is_pinned()):
                raise ValueError("the triton backend on CUDA needs a pinned host tier")
            if host_ptr == "auto" and dev.type == "cuda":
                host_ptr = page_copy.pick_host_ptr(host.k[0], host.v[0], dst_k, dst_v, head_pages)
            elif host_ptr == "auto":
                host_ptr = "tensor"
            if host_ptr not in ("tensor", "int"):
                raise ValueError(f"host_ptr must be 'auto', 'tensor' or 'int', got {host_ptr!r}")
        self.host_ptr = host_ptr if backend == "triton" else None
        if backend == "kernel":
            if dev.type != "cuda" or not (host.k.is_pinned() and host.v.is_pinned()):
                raise ValueError("the kernel backend needs a CUDA destination and a pinned host tier")
            if self.item_size % 8:
                raise ValueError(f"item size {self.item_size} B must be a multiple of 8 (kernel copies u64)")
            self._ops = _kernel_ops()
        self.backend, self.pad = backend, pad if backend == "kernel" else "host"  # triton: no dummies
        self.block_quota, self.num_warps = block_quota, num_warps
        self._t = torch.arange(p, device=dev)
        # dummy source item per (layer, K/V); row 0 = K, row 1 = V
        dummy = torch.zeros(2, num_layers, dtype=torch.int64)
        if self.pad == "device":
            # pad buffer: one item, placed at an address that is base + idx * item_size for every base
            self._pad_buf = torch.zeros(2 * self.item_size, dtype=torch.uint8, device=dev)
            buf = self._pad_buf.data_ptr()
            for kv, t in enumerate((host.k, host.v)):
                for layer in range(num_layers):
                    base = t[layer].data_ptr()
                    addr = buf + (base - buf) % self.item_size
                    if (addr - buf) % 8:
                        raise ValueError("host tier and pad buffer are not 8-byte aligned to each other")
                    dummy[kv, layer] = (addr - base) // self.item_size
        self.dummy_src = dummy.to(dev)

    def indices(
        self, layer: int, pages: torch.Tensor, slots: torch.Tensor, copy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(src_k, src_v, dst) token-item indices [M * P] int64 for pages/slots/copy [M].

        Entries with copy False are dummies (see the module docstring).
        """
        p = self.page_size
        copy = copy.to(self._t.device)[:, None]
        page_tok = pages.to(self._t.device, torch.int64).clamp(min=0)[:, None] * p + self._t
        src_k = torch.where(copy, page_tok, self.dummy_src[0, layer]).reshape(-1)
        src_v = torch.where(copy, page_tok, self.dummy_src[1, layer]).reshape(-1)
        slot = torch.where(copy, slots.to(self._t.device, torch.int64)[:, None], self.sink_slot)
        dst = (slot * p + self._t).reshape(-1)
        return src_k, src_v, dst

    @property
    def takes_lists(self) -> bool:
        """copy_list works: the compacted Triton copy and its torch reference (sgl-kernel takes masks)."""
        return self.backend in ("triton", "torch")

    def copy_list(self, layer: int, pages_c: torch.Tensor, slots_c: torch.Tensor, count: torch.Tensor,
                  max_programs: int | None = None) -> None:  # fmt: skip
        """Copy host page pages_c[i] of `layer` into slot slots_c[i] for i < count[0] (lists already
        packed, e.g. Placement.copy_keys / copy_loc / ncopy): `copy` without its compaction."""
        if not self.takes_lists:
            raise ValueError(f"copy_list needs the triton or torch backend, not {self.backend!r}")
        hk, hv = self.host.k[layer], self.host.v[layer]
        if self.backend == "torch":
            page_copy.copy_pages_ref(hk, hv, self.dst_k, self.dst_v, pages_c, slots_c, count, self.head_pages)
            return
        page_copy.copy_pages(hk, hv, self.dst_k, self.dst_v, pages_c, slots_c, count, self.block,
                             self.triton_warps, self.host_ptr, max_programs, self.head_pages)  # fmt: skip

    def copy(self, layer: int, pages: torch.Tensor, slots: torch.Tensor, copy: torch.Tensor,
             max_programs: int | None = None) -> None:  # fmt: skip
        """Copy host page pages[i] of `layer` into slot slots[i] where copy[i] (all [M]).

        pages may hold -1 and slots anything where copy is False. No host sync on the kernel path.
        max_programs: the Triton backend's grid along the pages (None: page_copy's default).
        """
        if self.backend == "triton" or self.head_pages:  # the compacted copy (head pages: its reference)
            pages_c, slots_c, count = page_copy.compact(copy.to(self._t.device), pages, slots)
            self.copy_list(layer, pages_c, slots_c, count, max_programs=max_programs)
            return
        hk, hv = self.host.k[layer], self.host.v[layer]
        src_k, src_v, dst = self.indices(layer, pages, slots, copy)
        if self.backend == "torch":
            rows = hk.shape[1:]
            dk, dv = self.dst_k.view(-1, *rows[1:]), self.dst_v.view(-1, *rows[1:])
            dk[dst] = hk.reshape(-1, *rows[1:])[src_k.to(hk.device)].to(dk.device)
            dv[dst] = hv.reshape(-1, *rows[1:])[src_v.to(hv.device)].to(dv.device)
            return
        per_layer, mla = self._ops
        if self.pad == "host":
            bq, nw = self.block_quota, self.num_warps
            per_layer(hk, self.dst_k, hv, self.dst_v, src_k, dst, self.item_size, bq, nw)
        else:
            mla(hk, self.dst_k, src_k, dst, self.item_size, self.block_quota, self.num_warps)
            mla(hv, self.dst_v, src_v, dst, self.item_size, self.block_quota, self.num_warps)
