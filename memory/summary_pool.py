"""Per-layer page summaries (min/max of K per kv head) kept parallel to SGLang's KV pool.

Indexed by physical summary block (token slot // block_size), not by request: two requests that
share a prefix through the radix tree read the same slots, hence the same summaries, with no copy
and no bookkeeping. A block that is freed and handed out again needs no invalidation either: the
update kernel rebuilds a block from its first slot up to the last slot written, so the first write
after reuse replaces whatever the previous owner left (SGLang writes a block's slots in order).

Memory: 2 * (num_slots / block_size) * Hkv * D elements per layer, i.e. 1/block_size of the K+V
pool (3.1% at block_size 32).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

UpdateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], None]


class SummaryPool:
    """kmin/kmax tensors [num_slots // block_size, Hkv, D] per layer, K's dtype."""

    def __init__(
        self,
        num_slots: int,
        head_num: int,
        head_dim: int,
        layer_num: int,
        block_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
        start_layer: int = 0,
    ):
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if num_slots % block_size:
            raise ValueError(f"num_slots ({num_slots}) must be a multiple of block_size")
        self.num_slots = num_slots
        self.head_num = head_num
        self.head_dim = head_dim
        self.layer_num = layer_num
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.start_layer = start_layer
        shape = (num_slots // block_size, head_num, head_dim)
        # Zeros, not +/-inf: a block is only scored for pages a request owns, and every such page
        # has been written (hence summarised) before any decode step reads it.
        self.kmin = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        self.kmax = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layer_num)]

    @classmethod
    def from_kv_pool(cls, kv_pool, block_size: int) -> SummaryPool:
        """Shape a pool after an MHATokenToKVPool (its K buffers include SGLang's padding page)."""
        k0 = kv_pool.get_key_buffer(kv_pool.start_layer)
        return cls(
            num_slots=k0.shape[0],
            head_num=k0.shape[1],
            head_dim=k0.shape[2],
            layer_num=kv_pool.layer_num,
            block_size=block_size,
            dtype=k0.dtype,
            device=k0.device,
            start_layer=kv_pool.start_layer,
        )

    def get(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = layer_id - self.start_layer
        return self.kmin[i], self.kmax[i]

    def update(
        self,
        layer_id: int,
        k_cache: torch.Tensor,
        out_cache_loc: torch.Tensor,
        update_fn: UpdateFn | None = None,
    ) -> None:
        """Refresh the blocks written at out_cache_loc (graph-safe with the Triton kernel)."""
        if update_fn is None:
            from sglang_psa.kernels import update_page_summaries as update_fn
        kmin, kmax = self.get(layer_id)
        update_fn(k_cache, kmin, kmax, out_cache_loc, self.block_size)

    def recompute(self, layer_id: int, k_cache: torch.Tensor, lengths: dict[int, int]):
        """Reference summaries for blocks {block: valid_slots} (tests and debug checks)."""
        out = {}
        for blk, n in lengths.items():
            keys = k_cache[blk * self.block_size : blk * self.block_size + n].float()
            out[blk] = (keys.amin(dim=0).to(self.dtype), keys.amax(dim=0).to(self.dtype))
        return out

    def poison(self, slots: torch.Tensor) -> None:
        """Debug aid: mark the blocks of freed slots (kmin=+big, kmax=-big) so a stale read shows.

        Correctness never depends on it: the next write of a block rebuilds it from its start.
        """
        if slots.numel() == 0:
            return
        blocks = torch.unique(slots.to(torch.int64) // self.block_size).to(self.device)
        big = torch.finfo(self.dtype).max
        for kmin, kmax in zip(self.kmin, self.kmax):
            kmin[blocks] = big
            kmax[blocks] = -big

    def mem_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kmin + self.kmax)


# The backend (model runner) and the radix cache live in the same scheduler process per TP rank;
# this is how the cache side finds the summaries of its rank without a reference through SGLang.
_ACTIVE: list[SummaryPool] = []


def set_active_pool(pool: SummaryPool | None) -> None:
    _ACTIVE.clear()
    if pool is not None:
        _ACTIVE.append(pool)


def active_pool() -> SummaryPool | None:
    return _ACTIVE[0] if _ACTIVE else None
