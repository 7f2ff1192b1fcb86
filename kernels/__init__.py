"""PSA decode stages: each a Triton kernel beside its pure-torch reference (import sglang_psa.kernels)."""

from .page_bounds import page_bounds, page_bounds_ref
from .page_summaries import alloc_summaries, update_page_summaries, update_page_summaries_ref
from .psa_decode import PSADecodeResult, psa_decode
from .select_pages import SelectParams, select_margin, select_pages, select_pages_ref, select_streaming
from .sparse_decode import (
    certified_decode,
    dense_decode_ref,
    merge_states,
    sparse_decode,
    sparse_decode_ref,
)
from .synthetic import SkewedBatch, layer_skews, make_skewed_batch

__all__ = [
    "PSADecodeResult",
    "SelectParams",
    "SkewedBatch",
    "alloc_summaries",
    "certified_decode",
    "dense_decode_ref",
    "layer_skews",
    "make_skewed_batch",
    "merge_states",
    "page_bounds",
    "page_bounds_ref",
    "psa_decode",
    "select_margin",
    "select_pages",
    "select_pages_ref",
    "select_streaming",
    "sparse_decode",
    "sparse_decode_ref",
    "update_page_summaries",
    "update_page_summaries_ref",
]
