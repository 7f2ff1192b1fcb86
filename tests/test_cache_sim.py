"""Hot-pool simulator against hand-computed traces and brute-force optima."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_psa.access_log import trace_from_records
from sglang_psa.memory.cache_sim import (
    build_stream,
    next_use,
    simulate,
    simulate_adaptive_quota,
    simulate_pinned,
    simulate_quota,
    stream_from_steps,
    sweep,
)

# The textbook reference string: 3 frames give 10 LRU faults and 7 optimal (Belady) faults.
REF = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]


def one_step_each(keys):
    return stream_from_steps([[k] for k in keys])


def test_lru_textbook():
    r = simulate(one_step_each(REF), 3, "lru")
    assert r.accesses - r.num_hits == 10
    # hand trace: cap 2, 1 2 1 3 2 1 -> only the second 1 hits
    r = simulate(one_step_each([1, 2, 1, 3, 2, 1]), 2, "lru")
    assert r.hits.tolist() == [False, False, True, False, False, False]


def test_belady_textbook():
    r = simulate(one_step_each(REF), 3, "belady", bypass=False)
    assert r.accesses - r.num_hits == 7
    r = simulate(one_step_each(REF), 3, "belady", bypass=True)
    assert r.accesses - r.num_hits == 7
    # bypass matters: cap 1, 1 2 1 -> keeping 1 (not admitting 2) gives a hit
    assert simulate(one_step_each([1, 2, 1]), 1, "belady", bypass=True).num_hits == 1
    assert simulate(one_step_each([1, 2, 1]), 1, "belady", bypass=False).num_hits == 0


def test_lfu_hand_trace():
    # cap 2: 1 m, 1 h (f=2), 2 m, 3 m evicts 2 (f=1), 2 m evicts 3, 3 m evicts 2
    r = simulate(one_step_each([1, 1, 2, 3, 2, 3]), 2, "lfu")
    assert r.hits.tolist() == [False, True, False, False, False, False]
    # ties broken by recency: cap 2, 1 2 3 -> evicts 1 (older), so 2 hits
    r = simulate(one_step_each([1, 2, 3, 2]), 2, "lfu")
    assert r.hits.tolist() == [False, False, False, True]


def test_lru_token_hand_trace():
    # capacity 6 tokens; A=4 tokens, B=2, C=2
    A, B, Cc = 1, 2, 3
    s = stream_from_steps(
        [[A], [B], [A], [Cc], [B], [A]], unit_tokens=4, tokens=[[4], [2], [4], [2], [2], [4]]
    )
    r = simulate(s, 6, "lru_token")
    assert r.hits.tolist() == [False, False, True, False, False, False]
    assert r.tokens_fetched == 4 + 2 + 2 + 2 + 4
    # the same stream with page accounting (cap 2 units) keeps A and C after step 4
    r = simulate(s, 2, "lru")
    assert r.hits.tolist() == [False, False, True, False, False, False]


def test_bytes_and_warmup():
    s = stream_from_steps([[1, 2], [1, 2], [1, 3]], unit_tokens=4, token_bytes=10)
    r = simulate(s, 2, "lru")
    assert r.num_hits == 3 and r.bytes_fetched == 3 * 4 * 10
    assert r.bytes_per_step == 40.0
    r = simulate(s, 2, "lru", warmup_steps=1)
    assert r.accesses == 4 and r.num_hits == 3 and r.bytes_fetched == 40 and r.num_steps == 2


def test_next_use():
    assert next_use(np.array([5, 6, 5, 5, 7])).tolist()[:3] == [2, np.iinfo(np.int64).max, 3]


def brute_lru(keys, cap):
    cache, hits = [], 0
    for k in keys:
        if k in cache:
            hits += 1
            cache.remove(k)
        elif len(cache) >= cap:
            cache.pop(0)
        cache.append(k)
    return hits


def brute_opt(keys, cap):
    """Maximum hits over every admission/eviction choice (bypass allowed)."""

    @functools.cache
    def best(i, cache):
        if i == len(keys):
            return 0
        k = keys[i]
        if k in cache:
            return 1 + best(i + 1, cache)
        opts = [best(i + 1, cache)]  # do not admit
        if len(cache) < cap:
            opts.append(best(i + 1, cache | {k}))
        else:
            opts += [best(i + 1, (cache - {v}) | {k}) for v in cache]
        return max(opts)

    return best(0, frozenset())


keys_st = st.lists(st.integers(0, 4), min_size=1, max_size=12)


@settings(max_examples=80, deadline=None)
@given(keys_st, st.integers(1, 3))
def test_belady_is_optimal_and_bounds_others(keys, cap):
    s = one_step_each(keys)
    bel = simulate(s, cap, "belady").num_hits
    assert bel == brute_opt(tuple(keys), cap)
    for pol in ("lru", "lfu"):
        assert simulate(s, cap, pol).num_hits <= bel
    assert simulate(s, cap, "lru").num_hits == brute_lru(keys, cap)


def test_build_stream_keys_tokens_and_merge():
    # page 2 of a 70-token request (P=32) holds 6 tokens; heads 0 and 1 share page 0
    tr = trace_from_records(
        [(0, 0, 0, 0, 70, [0, 2]), (0, 0, 0, 1, 70, [0, 1]), (1, 0, 0, 0, 71, [0, 2])],
        page_size=32,
        meta={"num_layers": 1, "num_kv_heads": 2, "head_dim": 8, "elem_bytes": 2},
    )
    s = build_stream(tr)
    assert len(s) == 6 and s.num_steps == 2
    assert s.tokens.tolist() == [32, 6, 32, 32, 32, 7]
    assert len(set(s.keys[[0, 2]].tolist())) == 2  # same page, different heads: different units
    assert s.keys[0] == s.keys[4] and s.unit_bytes == 32 * 2 * 8 * 2
    m = build_stream(tr, merge_heads=True)
    assert len(m) == 5 and m.token_bytes == 2 * s.token_bytes  # pages {0,1,2} at step 0, {0,2} at 1
    assert simulate(s, 10, "lru").num_hits == 2 and simulate(m, 10, "lru").num_hits == 2


def test_quota_equals_separate_pools():
    rng = np.random.default_rng(0)
    recs = []
    for step in range(30):
        for layer in range(2):
            pages = rng.choice(20 if layer else 6, size=3 if layer else 2, replace=False)
            recs.append((step, 0, layer, 0, 640, pages.tolist()))
    tr = trace_from_records(recs, page_size=32, meta={"num_layers": 2, "num_kv_heads": 1})
    s = build_stream(tr)
    q = simulate_quota(s, 10, quotas=np.array([0.4, 0.6]), policy="lru")
    h0 = simulate(s.subset(s.layer == 0), 4, "lru").num_hits
    h1 = simulate(s.subset(s.layer == 1), 6, "lru").num_hits
    assert q.num_hits == h0 + h1
    rows = sweep(s, multiples=(1, 2), warmup_steps=0)
    assert {(d["pool"], d["policy"]) for d in rows} >= {("shared", "belady"), ("per_layer_quota", "lru")}
    for m in (1.0, 2.0):
        sel = {d["policy"]: d["hit_rate"] for d in rows if d["multiple"] == m and d["pool"] == "shared"}
        assert sel["belady"] >= max(sel["lru"], sel["lfu"]) - 1e-12


def test_build_stream_marks_sink_and_local_pages():
    # 100 tokens at P=16: pages 0..6; sink 1, local 2 -> pages 0, 5, 6 are forced
    meta = {"num_layers": 1, "num_kv_heads": 1, "sink_pages": 1, "local_pages": 2}
    tr = trace_from_records([(0, 0, 0, 0, 100, [0, 2, 5, 6])], page_size=16, meta=meta)
    assert build_stream(tr).forced.tolist() == [True, False, True, True]


def with_forced(steps, forced_keys):
    s = stream_from_steps(steps)
    s.forced = np.isin(s.keys, list(forced_keys))
    return s


def test_pinned_keeps_window_pages_that_lru_evicts():
    # cap 2; each step: the forced page 0, then two new pages. LRU evicts 0 every step; pinned keeps it.
    steps = [[0, 10 + 2 * i, 11 + 2 * i] for i in range(6)]
    assert simulate(with_forced(steps, ()), 2, "lru").num_hits == 0
    r = simulate_pinned(with_forced(steps, {0}), 2)
    assert r.hits.tolist()[::3] == [False] + [True] * 5
    # page 0 stops being forced (it left the window): unpinned at the next step, then evicted by LRU
    steps2 = steps + [[1], [1, 2], [1, 2], [0]]
    r = simulate_pinned(with_forced(steps2, {0}), 2)
    assert r.hits.tolist()[-6:] == [False, True, False, True, True, False]


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=5), min_size=1, max_size=12), st.integers(0, 5)
)
def test_pinned_without_forced_pages_is_lru(steps, cap):
    s = with_forced(steps, ())
    assert simulate_pinned(s, cap).hits.tolist() == simulate(s, cap, "lru").hits.tolist()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 12), min_size=1, max_size=5), min_size=1, max_size=12), st.integers(0, 5)
)
def test_adaptive_quota_on_one_layer_is_lru_and_never_beats_belady(steps, cap):
    s = stream_from_steps(steps)
    r = simulate_adaptive_quota(s, cap, interval=1)
    assert r.hits.tolist() == simulate(s, cap, "lru").hits.tolist()
    assert r.num_hits <= simulate(s, cap, "belady").num_hits


def test_adaptive_quota_shields_a_small_hot_layer_from_a_scanning_one():
    # layer 0 re-reads pages 0, 1 every step; layer 1 reads 5 new pages; cap 6 < 7 units per step
    recs = []
    for step in range(20):
        recs.append((step, 0, 0, 0, 640, [0, 1]))
        recs.append((step, 0, 1, 0, 640, list(range(100 + 5 * step, 105 + 5 * step))))
    s = build_stream(trace_from_records(recs, page_size=32, meta={"num_layers": 2, "num_kv_heads": 1}))
    shared = simulate(s, 6, "lru")
    adaptive = simulate_adaptive_quota(s, 6, interval=2)
    layer0 = s.layer == 0
    assert shared.hits[layer0].sum() == 0  # the scan evicts layer 0's pages every step
    assert adaptive.hits[layer0].sum() == layer0.sum() - 2  # only the first reads miss
    with pytest.raises(ValueError, match="interval"):
        simulate_adaptive_quota(s, 6, interval=0)


def test_speed_100k():
    rng = np.random.default_rng(1)
    steps = [(rng.zipf(1.3, 100) % 5000).tolist() for _ in range(1000)]
    s = stream_from_steps(steps)
    t = time.time()
    for pol in ("lru", "lfu", "belady"):
        simulate(s, 300, pol)
    assert time.time() - t < 10


def test_device_pool_replay_counts_hits_after_warmup():
    """compare_pool_policies --device-pool: each (step, layer) group is one DevicePagePool call; the
    first step only fills. A pool holding everything misses only new pages; an empty one never hits."""
    from script_loader import load_script

    from sglang_psa.memory.cache_sim import AccessStream

    mod = load_script("compare_pool_policies")
    rows = [(0, 0, 1), (0, 0, 2), (0, 1, 10), (1, 0, 1), (1, 0, 2), (1, 0, 3), (1, 1, 10)]
    rows += [(2, 0, 1), (2, 0, 2), (2, 0, 3), (2, 1, 10)]
    step, layer, keys = (np.array(c) for c in zip(*rows))
    stream = AccessStream(keys=keys.astype(np.int64), tokens=np.ones(len(rows), dtype=np.int32),
                          step=step.astype(np.int64), layer=layer.astype(np.int16), num_steps=3,
                          num_layers=2, unit_tokens=1, token_bytes=1)  # fmt: skip
    for quota in ("off", "adaptive"):
        assert mod.device_pool_hit_rate(stream, 8, quota, interval=1) == 7 / 8  # step 1: 3 of 4, step 2: all
        assert mod.device_pool_hit_rate(stream, 0, quota) == 0.0
