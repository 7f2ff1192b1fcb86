"""Page summaries stay exact under SGLang's real pools, paged allocator and radix cache (CPU).

A small state machine mimics the scheduler: requests match a prefix in the RadixCache, allocate
pages for the rest, write K (prefill), append tokens one at a time (decode, batched), finish and
insert into the tree (freeing duplicates and the partial tail page as cache_finished_req does),
and the tree evicts under memory pressure. After every operation, the summaries of every block a
live request or tree node owns must equal min/max of K recomputed from the pool over the block's
valid slots. Evicted pages are poisoned, so a reused page scored with stale summaries fails.
"""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sglang = pytest.importorskip("sglang")

from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.base_prefix_cache import (  # noqa: E402
    EvictParams,
    InsertParams,
    MatchPrefixParams,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey  # noqa: E402

from sglang_psa.kernels import update_page_summaries_ref  # noqa: E402
from sglang_psa.memory.summary_pool import SummaryPool, set_active_pool  # noqa: E402
from sglang_psa.radix_cache import wrap_cache  # noqa: E402

P = 16
HKV, D, LAYERS = 2, 8, 2
NUM_SLOTS = P * 20
MAX_CTX = P * 8
PROMPTS = [[7] * 40, list(range(100, 150)), [3, 1, 4, 1, 5, 9, 2, 6] * 5]


class Sim:
    def __init__(self, block_size: int, seed: int, poison: bool = True):
        self.gen = torch.Generator().manual_seed(seed)
        self.r2t = ReqToTokenPool(size=6, max_context_len=MAX_CTX, device="cpu",
                                  enable_memory_saver=False)  # fmt: skip
        self.kv = MHATokenToKVPool(
            size=NUM_SLOTS, page_size=P, dtype=torch.float32, head_num=HKV, head_dim=D,
            layer_num=LAYERS, device="cpu", enable_memory_saver=False, enable_alt_stream=False,
        )  # fmt: skip
        self.alloc = PagedTokenToKVPoolAllocator(
            NUM_SLOTS, P, torch.float32, "cpu", kvcache=self.kv, need_sort=False
        )
        self.cache = wrap_cache(
            RadixCache(CacheInitParams(disable=False, req_to_token_pool=self.r2t,
                                       token_to_kv_pool_allocator=self.alloc, page_size=P)),
            poison=poison,
        )  # fmt: skip
        self.summ = SummaryPool.from_kv_pool(self.kv, block_size)
        set_active_pool(self.summ)
        self.reqs: list[dict] = []
        self.full_size = self.alloc.available_size()

    # -- helpers
    def _alloc_slots(self, n_pages: int):
        if n_pages == 0:
            return torch.empty(0, dtype=torch.int64)
        out = self.alloc.alloc(n_pages * P)
        if out is None:
            self.cache.evict(EvictParams(num_tokens=n_pages * P))
            out = self.alloc.alloc(n_pages * P)
        return out

    def _write(self, slots: torch.Tensor) -> None:
        """Write fresh K/V at slots through the pool, then refresh summaries (as the backend)."""
        for layer in range(LAYERS):
            k = torch.randn(len(slots), HKV, D, generator=self.gen)
            v = torch.randn(len(slots), HKV, D, generator=self.gen)
            self.kv.set_kv_buffer(types.SimpleNamespace(layer_id=layer), slots, k, v)
            self.summ.update(layer, self.kv.get_key_buffer(layer), slots, update_page_summaries_ref)

    # -- operations
    def new_request(self, prompt_id: int, extra: int) -> None:
        if len(self.reqs) >= 4:
            return
        tokens = PROMPTS[prompt_id] + [900 + len(self.reqs) + i for i in range(extra)]
        m = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(tokens)))
        prefix = m.device_indices.to(torch.int64)
        node = m.last_device_node
        self.cache.inc_lock_ref(node)
        n_new = len(tokens) - len(prefix)
        new = self._alloc_slots(-(-n_new // P))
        if new is None:
            self.cache.dec_lock_ref(node)
            return
        req = types.SimpleNamespace(req_pool_idx=None, inflight_middle_chunks=0, kv_committed_len=0)
        self.r2t.alloc([req])
        kv_idx = torch.cat([prefix, new[:n_new]])
        self.r2t.write((req.req_pool_idx, slice(0, len(kv_idx))), kv_idx.to(torch.int32))
        self._write(new[:n_new])  # prefill writes the new tokens in order
        self.reqs.append(dict(req=req, tokens=tokens, kv=kv_idx, node=node,
                              matched=len(prefix), spare=new[n_new:]))  # fmt: skip

    def decode(self, which: list[int]) -> None:
        locs = []
        for i in sorted(set(which)):
            if i >= len(self.reqs):
                continue
            r = self.reqs[i]
            if len(r["kv"]) >= MAX_CTX:
                continue
            if len(r["kv"]) % P == 0:
                page = self._alloc_slots(1)
                if page is None:
                    continue
                r["spare"] = page
            slot, r["spare"] = r["spare"][:1], r["spare"][1:]
            r["kv"] = torch.cat([r["kv"], slot])
            r["tokens"].append(500 + len(r["kv"]))
            self.r2t.write((r["req"].req_pool_idx, len(r["kv"]) - 1), slot.to(torch.int32))
            locs.append(slot)
        if locs:
            self._write(torch.cat(locs))  # one decode batch: one out_cache_loc

    def finish(self, i: int) -> None:
        if i >= len(self.reqs):
            return
        r = self.reqs.pop(i)
        kv, n = r["kv"], len(r["kv"])
        aligned = n // P * P
        res = self.cache.insert(InsertParams(key=RadixKey(r["tokens"][:aligned]),
                                             value=kv[:aligned].clone()))  # fmt: skip
        # Like cache_finished_req: our copies of what the tree already held, and the partial tail.
        self.alloc.free(kv[r["matched"] : res.prefix_len])
        self.alloc.free(torch.cat([kv[aligned:], r["spare"]]))
        self.cache.dec_lock_ref(r["node"])
        self.r2t.free(r["req"])

    def evict(self, n: int) -> None:
        self.cache.evict(EvictParams(num_tokens=n))

    # -- invariant
    def check(self) -> None:
        valid: dict[int, int] = {}  # summary block -> number of valid slots
        bs = self.summ.block_size

        def own(slots: torch.Tensor) -> None:
            for pos, s in enumerate(slots.tolist()):
                blk = s // bs
                valid[blk] = max(valid.get(blk, 0), s % bs + 1)
                assert s // P == slots[pos - pos % P].item() // P  # page-contiguous

        for r in self.reqs:
            own(r["kv"])
        stack = [self.cache.root_node]
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if node.value is not None and node is not self.cache.root_node:
                own(node.value.to(torch.int64))
        for layer in range(LAYERS):
            k = self.kv.get_key_buffer(layer)
            kmin, kmax = self.summ.get(layer)
            for blk, n in valid.items():
                keys = k[blk * bs : blk * bs + n]
                torch.testing.assert_close(kmin[blk], keys.amin(0), rtol=0, atol=0)
                torch.testing.assert_close(kmax[blk], keys.amax(0), rtol=0, atol=0)

    def drain(self) -> None:
        while self.reqs:
            self.finish(0)
        self.cache.evict(EvictParams(num_tokens=NUM_SLOTS))
        assert self.alloc.available_size() == self.full_size


OPS = st.one_of(
    st.tuples(st.just("new"), st.integers(0, len(PROMPTS) - 1), st.integers(0, 40)),
    st.tuples(st.just("decode"), st.lists(st.integers(0, 3), min_size=1, max_size=4)),
    st.tuples(st.just("finish"), st.integers(0, 3)),
    st.tuples(st.just("evict"), st.integers(1, 4 * P)),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=25), block_size=st.sampled_from([8, 16]),
       seed=st.integers(0, 2**16))  # fmt: skip
def test_summaries_match_pool_under_radix_ops(ops, block_size, seed):
    sim = Sim(block_size, seed)
    for op in ops:
        if op[0] == "new":
            sim.new_request(op[1], op[2])
        elif op[0] == "decode":
            for _ in range(3):
                sim.decode(op[1])
        elif op[0] == "finish":
            sim.finish(op[1])
        else:
            sim.evict(op[1])
        sim.check()
    sim.drain()


def test_reused_page_forgets_previous_owner():
    """A page freed with 16 keys and reused for 3 must summarise only the 3 new keys.

    No poisoning here: the old summaries stay in place, as in production.
    """
    sim = Sim(16, 0, poison=False)
    sim.new_request(1, 14)  # 64 tokens: 4 full pages
    sim.finish(0)
    sim.evict(NUM_SLOTS)  # every page back to the allocator, old summaries left behind
    for _ in range(6):
        sim.new_request(2, 3)  # 43 tokens: partial last pages land on reused pages
        sim.check()
    assert sim.cache.psa_tracker.evicted_tokens >= 64
    sim.drain()


def test_summary_pool_shapes_follow_kv_pool():
    kv = MHATokenToKVPool(size=NUM_SLOTS, page_size=P, dtype=torch.float32, head_num=HKV,
                          head_dim=D, layer_num=LAYERS, device="cpu", enable_memory_saver=False,
                          enable_alt_stream=False)  # fmt: skip
    pool = SummaryPool.from_kv_pool(kv, 8)
    k0 = kv.get_key_buffer(0)
    assert pool.get(0)[0].shape == (k0.shape[0] // 8, HKV, D)
    assert pool.mem_bytes() == 2 * LAYERS * (k0.shape[0] // 8) * HKV * D * 4
    with pytest.raises(ValueError, match="power of two"):
        SummaryPool(64, 1, 4, 1, 12, torch.float32, "cpu")
