"""Which implementation of each PSA stage the backend calls: Triton on CUDA, torch refs on CPU.

The refs have the Triton kernels' signatures (docs/KERNEL_API.md), so the backend's glue can be
tested on a machine without a GPU, against SGLang's real pools.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sglang_psa import kernels as K

from .config import PSAConfig


def select_params(cfg: PSAConfig) -> K.SelectParams:
    return K.SelectParams(
        tau=float(cfg.tau),
        sink_pages=cfg.sink_pages,
        local_pages=cfg.local_pages,
        min_pages=cfg.min_pages,
        max_pages=cfg.max_pages,
        topk=cfg.topk if cfg.mode == "topk" else None,
    )


@dataclass(frozen=True)
class KernelOps:
    update_page_summaries: Callable
    page_bounds: Callable
    select_pages: Callable
    sparse_decode: Callable
    certified_decode: Callable
    triton: bool

    @classmethod
    def for_device(cls, device: torch.device | str) -> KernelOps:
        if torch.device(device).type == "cuda":
            return cls(
                K.update_page_summaries,
                K.page_bounds,
                K.select_pages,
                K.sparse_decode,
                K.certified_decode,
                True,
            )
        return cls(
            K.update_page_summaries_ref,
            K.page_bounds_ref,
            K.select_pages_ref,
            K.sparse_decode_ref,
            K.certified_decode,  # no separate ref; runs under TRITON_INTERPRET=1 on CPU
            False,
        )
