"""The PSA selection run through FlashInfer's paged decode (GPU only), and FlashInfer dense decode.

FlashInfer's decode takes one page list per request for all of its kv heads, while PSA selects per
(request, kv head). So each (request, kv head) becomes one FlashInfer request with a single kv head:
the KV pool [num_slots, Hkv, D] is viewed as num_slots * Hkv rows of one token and one head
(page_size 1, row = slot * Hkv + head), and the selected pages are expanded to their token rows.
Building that list needs its length on the host, and FlashInfer's plan() schedules on the host, so
this path syncs once per step and is not CUDA-graph capturable; the Triton path is. The benchmark
records both and keeps whichever is faster per regime.

Shapes: q [bs, Hq, D]; k_cache, v_cache [num_slots, Hkv, D]; page_idx [bs, Hkv, W] int32;
counts [bs, Hkv] int32 -> out [bs, Hq, D].
"""

from __future__ import annotations

import torch

_WORKSPACE_BYTES = 256 * 1024 * 1024


def _wrapper(device: torch.device):
    import flashinfer

    ws = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
    # Tensor-core decode: what SGLang uses for GQA groups >= 4, and the kernels the bundle caches.
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=True)


class FlashInferSparseDecode:
    """Plan with a PSA selection, then run FlashInfer decode over the selected tokens only."""

    def __init__(self, device: torch.device) -> None:
        self.wrapper = _wrapper(device)
        self.hkv = self.group = 0

    def plan(
        self,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        page_idx: torch.Tensor,
        counts: torch.Tensor,
        page_size: int,
        num_q_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        sm_scale: float,
    ) -> int:
        """Expand the selection to token rows and plan; returns the number of rows attended."""
        bs, hkv, width = page_idx.shape
        dev = page_idx.device
        self.hkv, self.group = hkv, num_q_heads // hkv
        slot_in_page = torch.arange(page_size, device=dev)
        pages = page_idx.clamp(min=0).to(torch.int64)  # [bs, Hkv, W]
        rows_of_req = req_to_token[req_pool_indices.to(torch.int64)].to(torch.int64)  # [bs, ctx]
        first = torch.gather(rows_of_req, 1, (pages * page_size).view(bs, -1)).view(bs, hkv, width)
        tok_pos = pages[..., None] * page_size + slot_in_page  # logical positions [bs, Hkv, W, P]
        valid = (torch.arange(width, device=dev)[None, None, :, None] < counts[..., None, None]) & (
            tok_pos < seq_lens.to(torch.int64)[:, None, None, None]
        )
        heads = torch.arange(hkv, device=dev)[None, :, None, None]
        rows = (first[..., None] + slot_in_page) * hkv + heads
        indices = rows[valid].to(torch.int32)
        per_req = valid.view(bs * hkv, -1).sum(-1)
        indptr = torch.zeros(bs * hkv + 1, dtype=torch.int32, device=dev)
        indptr[1:] = torch.cumsum(per_req, 0)
        last = torch.ones(bs * hkv, dtype=torch.int32, device=dev)
        self.wrapper.plan(
            indptr, indices, last, self.group, 1, head_dim, 1,
            q_data_type=dtype, kv_data_type=dtype, sm_scale=sm_scale,
        )  # fmt: skip
        return int(indices.numel())

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        bs, hq, d = q.shape
        k_rows = k_cache.view(-1, 1, 1, d)
        v_rows = v_cache.view(-1, 1, 1, d)
        out = self.wrapper.run(q.view(bs * self.hkv, self.group, d), (k_rows, v_rows))
        return out.view(bs, hq, d)


class FlashInferDenseDecode:
    """FlashInfer paged decode over every page of each request (the dense baseline)."""

    def __init__(self, device: torch.device) -> None:
        self.wrapper = _wrapper(device)
        self.page_size = 0

    def plan(
        self,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        page_size: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        sm_scale: float,
    ) -> None:
        self.page_size = page_size
        npages = (seq_lens.to(torch.int64) + page_size - 1) // page_size
        indptr = torch.zeros(seq_lens.numel() + 1, dtype=torch.int32, device=seq_lens.device)
        indptr[1:] = torch.cumsum(npages, 0)
        rows = req_to_token[req_pool_indices.to(torch.int64)]
        firsts = [rows[b, : int(n) * page_size : page_size] for b, n in enumerate(npages.tolist())]
        indices = (torch.cat(firsts).to(torch.int64) // page_size).to(torch.int32)
        last = (seq_lens.to(torch.int64) - (npages - 1) * page_size).to(torch.int32)
        self.wrapper.plan(
            indptr, indices, last, num_q_heads, num_kv_heads, head_dim, page_size,
            q_data_type=dtype, kv_data_type=dtype, sm_scale=sm_scale,
        )  # fmt: skip

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        hkv, d = k_cache.shape[1], k_cache.shape[2]
        k_pages = k_cache.view(-1, self.page_size, hkv, d)
        v_pages = v_cache.view(-1, self.page_size, hkv, d)
        return self.wrapper.run(q, (k_pages, v_pages))
