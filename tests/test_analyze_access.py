"""Access statistics against brute force, and the analysis / sample-log scripts end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from script_loader import load_script

from sglang_psa.access_log import load_access_log, trace_from_records
from sglang_psa.memory import access_stats as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = 4


@st.composite
def traces(draw):
    """Random small traces: 1-2 requests, layers, heads; sequences growing one token per step."""
    T = draw(st.integers(1, 14))
    R, Lr, Hh = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    n0 = draw(st.integers(1, 30))
    recs = []
    for t in range(T):
        for r in range(R):
            n = n0 + 5 * r + t
            npg = -(-n // P)
            for layer in range(Lr):
                for h in range(Hh):
                    pages = draw(st.sets(st.integers(0, npg - 1), max_size=npg))
                    recs.append((t, r, layer, h, n, sorted(pages)))
    meta = {"num_layers": Lr, "num_kv_heads": Hh, "sink_pages": draw(st.integers(0, 1)), "local_pages": 1}
    return trace_from_records(recs, page_size=P, meta=meta)


def brute_groups(tr):
    """{(request, layer, head): [(seq_len, set(pages)) in step order]}."""
    g = {}
    for i in np.argsort(tr.step, kind="stable"):
        g.setdefault((tr.request[i], tr.layer[i], tr.head[i]), []).append(
            (int(tr.seq_len[i]), set(tr.pages_of(i).tolist()))
        )
    return g


def dyn(sel, n, tr):
    npg = -(-n // P)
    return {p for p in sel if p >= tr.meta["sink_pages"] and p < npg - tr.meta["local_pages"]}


@settings(max_examples=50, deadline=None)
@given(traces(), st.integers(1, 5), st.integers(1, 3), st.booleans())
def test_working_set_brute(tr, window, stride, dynamic):
    got, _ = S.working_set(tr, window=window, stride=stride, dynamic_only=dynamic)
    want = []
    for _key, seq in sorted(brute_groups(tr).items()):
        sels = [dyn(s, n, tr) if dynamic else s for n, s in seq]
        for t in range(0, len(sels) - window + 1, stride):
            w = sels[t : t + window]
            mean = sum(len(s) for s in w) / window
            if mean > 0:
                want.append(len(set().union(*w)) / mean)
    np.testing.assert_allclose(sorted(got), sorted(want))


@settings(max_examples=50, deadline=None)
@given(traces(), st.booleans())
def test_persistence_brute(tr, dynamic):
    got, _ = S.persistence(tr, dynamic_only=dynamic)
    want = []
    for seq in brute_groups(tr).values():
        sels = [dyn(s, n, tr) if dynamic else s for n, s in seq]
        for p in set().union(*sels):
            run = 0
            for s in sels + [set()]:
                if p in s:
                    run += 1
                elif run:
                    want.append(run)
                    run = 0
    assert sorted(got.tolist()) == sorted(want)


@settings(max_examples=50, deadline=None)
@given(traces(), st.booleans())
def test_lookback_and_sizes_brute(tr, dynamic):
    got, lays = S.lookback(tr, dynamic_only=dynamic)
    want, want_l = [], []
    for i in range(len(tr)):
        n = int(tr.seq_len[i])
        sel = set(tr.pages_of(i).tolist())
        for p in sorted(dyn(sel, n, tr) if dynamic else sel):
            want.append((n - min((p + 1) * P, n)) / n)
            want_l.append(int(tr.layer[i]))
    np.testing.assert_allclose(sorted(got), sorted(want))
    assert sorted(lays.tolist()) == sorted(want_l)
    assert all(0 <= x < 1 for x in got)
    sz = S.selection_sizes(tr)
    for layer in range(tr.num_layers):
        c = [len(tr.pages_of(i)) for i in range(len(tr)) if tr.layer[i] == layer]
        assert abs(sz["per_layer"][layer]["mean"] - np.mean(c)) < 1e-9
        assert sz["per_layer"][layer]["max"] == max(c)


def test_run_lengths_hand():
    m = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]], dtype=bool)
    assert sorted(S.run_lengths(m).tolist()) == sorted([2, 1, 3, 1, 2])


def test_scripts_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    log_dir, out = tmp_path / "log", tmp_path / "out"
    gen = load_script("make_sample_access_log")
    args = ["-o", str(log_dir), "--layers", "2", "--hq", "4", "--hkv", "2", "--head-dim", "64"]
    args += ["--page-size", "16", "--lens", "300", "500", "--steps", "12", "--max-pages", "16"]
    assert gen.main(args) == 0
    tr = load_access_log(log_dir)
    assert tr.source == "synthetic-kernels" and len(tr) == 12 * 2 * 2 * 2
    assert sorted(set(tr.step.tolist())) == list(range(12))
    assert (tr.count <= 16).all() and (tr.count >= 5).all()  # sink + local window at least
    ana = load_script("analyze_access")
    rc = ana.main([str(log_dir), "-o", str(out), "--window", "5", "--multiples", "1", "2", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    h = summary["headline"][0]
    assert h["source"] == "synthetic-kernels"
    assert 0 <= h["lru_hit_rate_2x"] <= h["belady_hit_rate_2x"] <= 1
    for name in ("selection_sizes", "working_set", "persistence", "lookback", "cache"):
        assert (out / f"synthetic-kernels-{name}.png").stat().st_size > 1000
    assert (out / "lru_vs_belady_2x.png").exists()
    log_ = summary["logs"][0]
    assert len(log_["selection_sizes"]["per_layer"]) == 2
    assert {d["pool"] for d in log_["cache"]["sweep"]} == {"shared", "per_layer_quota"}
