"""Tiered-mode decode attention for one layer: attend from the hot-page pool, never wrong for its size.

In tiered mode the full KV lives in the host tier and the GPU keeps a hot-page pool (hot_pool.py).
After bounds and selection (which need only the GPU-resident page summaries), one layer's decode:
  1. maps each selected logical page to its physical page, phys = req_to_token[rpi, j * P] // P
     (pages shared through the radix tree share a physical page, hence a pool slot);
  2. makes the union of those pages resident: pool.fetch_missing copies misses host -> device,
     evicting by LRU under the pool's quotas; sinks and the local window are pinned;
  3. attends over the selected pages that are resident, reading the pool's slots through a
     page table (sparse_decode's page_table);
  4. streams the pages the pool could not place (everything evictable was in use) through a scratch
     buffer, `scratch_pages` at a time, and merges those partial results by log-sum-exp.
So a step whose pages do not fit costs more copies, never a wrong result.

What is not here yet (issue 6): overlapping layer l+1's fetch with layer l's compute on a side
stream, moving the victim choice to the device, and the SGLang radix-cache / backend wiring. Step 2
syncs with the host once per layer (the page ids), so this path is not captured in CUDA graphs.

Shapes and dtypes:
    q [bs, Hq, D]; req_to_token [max_reqs, max_context] int32; req_pool_indices, seq_lens [bs] int
    page_idx [bs, Hkv, W] int32 selected logical pages ([:count], -1 after), counts [bs, Hkv] int32
    -> out [bs, Hq, D] q.dtype, lse [bs, Hq] float32
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sglang_psa.kernels import merge_states, sparse_decode
from sglang_psa.kernels._common import compact_selection, page_layout

from .hot_pool import HotPagePool


@dataclass
class LayerFetch:
    """What one layer's call did: unique pages needed, hits, pages copied into the pool, overflow."""

    needed: int
    hits: int
    fetched: int
    overflow: int
    passes: int


class TieredAttention:
    """One layer's decode attention in tiered mode (see the module docstring)."""

    def __init__(self, pool: HotPagePool, scratch_pages: int = 64, attend: Callable = sparse_decode):
        if scratch_pages < 1:
            raise ValueError(f"scratch_pages must be >= 1, got {scratch_pages}")
        self.pool = pool
        shape = (scratch_pages, *pool.k.shape[1:])
        self.scratch_k = torch.empty(shape, dtype=pool.dtype, device=pool.device)
        self.scratch_v = torch.empty_like(self.scratch_k)
        self.attend = attend

    def begin_step(self) -> None:
        """A new decode step: pages used by earlier steps become evictable again."""
        self.pool.new_step()

    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        page_idx: torch.Tensor,
        counts: torch.Tensor,
        sm_scale: float,
        sink_pages: int = 1,
        local_pages: int = 4,
    ) -> tuple[torch.Tensor, torch.Tensor, LayerFetch]:
        pool, p = self.pool, self.pool.page_size
        dev = q.device
        bs, hkv, width = page_idx.shape
        n_log = int(-(-int(seq_lens.max()) // p)) if bs else 0
        # physical page of every logical page of every request: [bs, N]
        first_tok = req_to_token[req_pool_indices.long()][:, : n_log * p : p].long()
        phys = (first_tok // p).to(dev)
        valid = torch.arange(width, device=dev) < counts[..., None]
        logical = page_idx.long().clamp(min=0)
        sel_phys = torch.gather(
            phys[:, None, :].expand(bs, hkv, n_log), 2, logical.clamp(max=max(n_log - 1, 0))
        )
        needed = torch.unique(sel_phys[valid])
        forced = page_layout(seq_lens.to(dev), n_log, p, sink_pages, local_pages)[2]
        pinned = torch.unique(phys[forced])
        res = pool.fetch_missing(layer, needed, pin=torch.isin(needed, pinned))

        table = pool.slot_of[layer][phys].to(torch.int32)  # [bs, N] pool slot or -1
        resident = valid & (torch.gather(table[:, None, :].expand(bs, hkv, n_log), 2,
                                         logical.clamp(max=max(n_log - 1, 0))) >= 0)  # fmt: skip
        idx0, cnt0 = compact_selection(page_idx, resident)
        k_rows = pool.k.view(-1, *pool.k.shape[2:])
        v_rows = pool.v.view(-1, *pool.v.shape[2:])
        out, lse = self.attend(q, k_rows, v_rows, req_to_token, req_pool_indices, seq_lens, idx0, cnt0, p,
                               sm_scale, page_table=table.clamp(min=0).contiguous())  # fmt: skip
        passes = 1
        overflow = res.overflow
        cap = self.scratch_k.shape[0]
        for start in range(0, overflow.numel(), cap):
            chunk = overflow[start : start + cap]
            n = chunk.numel()
            self.scratch_k[:n] = pool.host.k[layer, chunk].to(dev, non_blocking=True)
            self.scratch_v[:n] = pool.host.v[layer, chunk].to(dev, non_blocking=True)
            chunk_d = chunk.to(dev)
            pos = torch.full((pool.num_pages,), -1, dtype=torch.int32, device=dev)
            pos[chunk_d] = torch.arange(n, dtype=torch.int32, device=dev)
            table_c = pos[phys]
            keep = valid & torch.isin(sel_phys, chunk_d)
            idx_c, cnt_c = compact_selection(page_idx, keep)
            k_s = self.scratch_k.view(-1, *self.scratch_k.shape[2:])
            v_s = self.scratch_v.view(-1, *self.scratch_v.shape[2:])
            out_c, lse_c = self.attend(q, k_s, v_s, req_to_token, req_pool_indices, seq_lens, idx_c, cnt_c, p,
                                       sm_scale, page_table=table_c.clamp(min=0).contiguous())  # fmt: skip
            out, lse = merge_states(out, lse, out_c, lse_c)
            passes += 1
        info = LayerFetch(
            int(needed.numel()), res.hits, int(res.admitted.numel()), int(overflow.numel()), passes
        )
        return out, lse, info
