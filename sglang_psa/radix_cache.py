"""`--radix-cache-backend psa`: SGLang's default cache chain, plus PSA's page-state bookkeeping.

PSA needs nothing from the cache for correctness. Resident mode: summaries are indexed by physical
page and rebuilt on the first write after a page is reused. Tiered mode (--psa-tiered, which requires
this backend): the token pool itself lives in pinned host memory, so the tree indexes host slots with
SGLang's own sharing, locking and eviction; the GPU hot pool drops a page of a layer whenever that
page is written (sglang_psa/tiered.py), so a slot freed here and reused by another request is
refetched, never served stale. The wrapper counts evicted tokens and, with SGLANG_PSA_POISON_FREED=1,
poisons the summaries of evicted pages so a stale read would show up in tests as a wrong selection.

The returned object is the cache SGLang's default factory built (same class, so every isinstance
check in the scheduler still holds); only its `evict` is wrapped on the instance.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

from sglang_psa.memory.summary_pool import active_pool

logger = logging.getLogger(__name__)


class EvictionTracker:
    def __init__(self, poison: bool):
        self.poison = poison
        self.evicted_tokens = 0
        self.evict_calls = 0

    def on_evicted(self, cache: Any, freed_values: list) -> None:
        self.evict_calls += 1
        n = sum(int(v.numel()) for v in freed_values)
        self.evicted_tokens += n
        if self.poison and freed_values:
            pool = active_pool()
            if pool is not None:
                import torch

                pool.poison(torch.cat([v.reshape(-1) for v in freed_values]))


def wrap_cache(cache: Any, poison: bool | None = None) -> Any:
    """Wrap `cache.evict` (instance attribute) to observe the pages it frees."""
    if poison is None:
        poison = os.environ.get("SGLANG_PSA_POISON_FREED", "0") == "1"
    tracker = EvictionTracker(poison)
    allocator = getattr(cache, "token_to_kv_pool_allocator", None)
    original_evict = cache.evict
    if allocator is None or not hasattr(allocator, "free_segment"):
        cache.psa_tracker = tracker
        return cache

    @functools.wraps(original_evict)
    def evict(params, *args, **kwargs):
        freed: list = []
        own = allocator.__dict__.get("free_segment")  # an instance override, if any
        orig_free = allocator.free_segment

        def free_segment(value, *a, **k):
            freed.append(value)
            return orig_free(value, *a, **k)

        # Observe exactly the segments this eviction frees (and nothing freed elsewhere).
        allocator.free_segment = free_segment
        try:
            result = original_evict(params, *args, **kwargs)
        finally:
            if own is None:
                del allocator.free_segment  # back to the class method
            else:
                allocator.free_segment = own
        tracker.on_evicted(cache, freed)
        return result

    cache.evict = evict
    cache.psa_tracker = tracker
    return cache


def build_psa_radix_cache(ctx: Any) -> Any:
    from sglang.srt.mem_cache.registry import default_radix_cache_factory

    cache = default_radix_cache_factory(ctx)
    logger.info("PSA radix cache backend wraps %s", type(cache).__name__)
    return wrap_cache(cache)
