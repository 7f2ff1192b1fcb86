"""Access logger: round trip, request tracking, bounded size and rotation (CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_psa.access_log import (
    AccessLogger,
    _decode_pages,
    _encode_pages,
    load_access_log,
    log_files,
)

P, H, W, L = 16, 2, 8, 3


def random_selection(rng, bs, seq_lens, shuffle=False):
    """page_idx [bs, H, W] int32 (-1 padded) and counts [bs, H], like select_pages."""
    idx = torch.full((bs, H, W), -1, dtype=torch.int32)
    cnt = torch.zeros(bs, H, dtype=torch.int32)
    for b in range(bs):
        npg = -(-int(seq_lens[b]) // P)
        for h in range(H):
            k = int(rng.integers(0, min(W, npg) + 1))
            pages = np.sort(rng.choice(npg, size=k, replace=False))
            if shuffle:
                rng.shuffle(pages)
            idx[b, h, :k] = torch.from_numpy(pages.astype(np.int32))
            cnt[b, h] = k
    return idx, cnt


def run_log(tmp_path, steps, rids_of, **kw):
    """Log `steps` steps; returns the expected records {(step, rid, layer, head): (seq_len, pages)}."""
    rng = np.random.default_rng(0)
    expected = {}
    log = AccessLogger(tmp_path, "synthetic-kernels", L, H, W, P, head_dim=4, **kw)
    for step in range(steps):
        rids = rids_of(step)
        seq = torch.tensor([100 + 7 * i + step for i in range(len(rids))], dtype=torch.int32)
        log.begin_step(step, rids)
        for layer in range(L):
            idx, cnt = random_selection(rng, len(rids), seq, shuffle=kw.get("background", False))
            log.record_layer(layer, idx, cnt, seq)
            for b, rid in enumerate(rids):
                for h in range(H):
                    pages = sorted(idx[b, h, : cnt[b, h]].tolist())
                    expected[(step, rid, layer, h)] = (int(seq[b]), pages)
        log.end_step()
    log.close()
    return expected


def as_dict(tr):
    return {
        (int(tr.step[i]), tr.request_ids[tr.request[i]], int(tr.layer[i]), int(tr.head[i])): (
            int(tr.seq_len[i]),
            tr.pages_of(i).tolist(),
        )
        for i in range(len(tr))
    }


@pytest.mark.parametrize("background", [False, True])
def test_round_trip(tmp_path, background):
    exp = run_log(
        tmp_path, 6, lambda s: ["a", "b"] if s < 3 else ["c", "b"], max_requests=4, background=background
    )
    tr = load_access_log(tmp_path)
    assert as_dict(tr) == exp
    assert tr.source == "synthetic-kernels" and tr.page_size == P and tr.meta["head_dim"] == 4
    assert tr.num_layers == L and tr.num_kv_heads == H
    # access order: step, layer, request, head
    key = list(zip(tr.step, tr.layer, tr.request, tr.head))
    assert key == sorted(key)
    # n_tokens: valid tokens of the selected pages
    for i in range(len(tr)):
        n = int(tr.seq_len[i])
        assert tr.n_tokens[i] == sum(min(P, n - p * P) for p in tr.pages_of(i).tolist())


def test_request_tracking(tmp_path):
    # two slots: 'a', 'b' tracked; 'c' waits until 'a' leaves; max_total_requests=3 refuses 'd'
    batches = [["a", "b", "c"], ["a", "b", "c"], ["b", "c", "d"], ["c", "d"]]
    exp = run_log(tmp_path, 4, lambda s: batches[s], max_requests=2, max_total_requests=3)
    tr = load_access_log(tmp_path)
    got = {(k[0], k[1]) for k in as_dict(tr)}
    assert got == {(0, "a"), (0, "b"), (1, "a"), (1, "b"), (2, "b"), (2, "c"), (3, "c")}
    for k, v in as_dict(tr).items():
        assert exp[k] == v


def test_filter_and_idle(tmp_path):
    log = AccessLogger(tmp_path, "x", L, H, W, P, rid_filter=lambda r: r.startswith("keep"))
    seq = torch.tensor([40, 50], dtype=torch.int32)
    idx, cnt = random_selection(np.random.default_rng(1), 2, seq)
    for step in range(2):
        log.record(step, 0, idx, cnt, seq, ["drop-1", "keep-1"])
        log.record(step, 1, idx, cnt, seq, ["drop-1", "keep-1"])
    log.begin_step(2, [])  # an idle step
    log.record_layer(0, idx[:0], cnt[:0], seq[:0])
    log.close()
    tr = load_access_log(tmp_path)
    assert set(tr.request_ids) == {"keep-1"} and len(tr) == 2 * 2 * H
    assert sorted(set(tr.layer.tolist())) == [0, 1]


def test_bounded_size_and_rotation(tmp_path):
    max_bytes = 12_000
    exp = run_log(
        tmp_path,
        200,
        lambda s: ["a", "b"],
        max_requests=2,
        max_bytes_per_file=max_bytes,
        max_files=3,
        compress=False,
    )
    files = log_files(tmp_path)
    assert len(files) == 3
    assert all(os.path.getsize(f) <= max_bytes for f in files)
    assert [os.path.basename(f) for f in files] == sorted(os.path.basename(f) for f in files)
    assert int(os.path.basename(files[0])[7:13]) > 0  # the oldest were deleted
    tr = load_access_log(tmp_path)
    got = as_dict(tr)
    assert all(exp[k] == v for k, v in got.items())
    steps = sorted({k[0] for k in got})
    assert steps[-1] == 199 and steps == list(range(steps[0], 200))  # the newest, contiguous
    # a new logger in the same directory continues the numbering
    log = AccessLogger(tmp_path, "synthetic-kernels", L, H, W, P, head_dim=4, max_files=3)
    seq = torch.tensor([300], dtype=torch.int32)
    idx, cnt = random_selection(np.random.default_rng(2), 1, seq)
    log.record(500, 0, idx, cnt, seq, ["z"])
    log.close()
    assert log_files(tmp_path)[-1].endswith(f"access-{int(os.path.basename(files[-1])[7:13]) + 1:06d}.npz")


def test_too_small_file_limit(tmp_path):
    with pytest.raises(ValueError):
        AccessLogger(tmp_path, "x", L, H, W, P, max_bytes_per_file=100)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 70000), max_size=6, unique=True), max_size=8))
def test_page_encoding_round_trip(recs):
    pages = np.array([p for r in recs for p in sorted(r)], dtype=np.int64)
    offsets = np.zeros(len(recs) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in recs], out=offsets[1:])
    assert _decode_pages(_encode_pages(pages, offsets), offsets).tolist() == pages.tolist()


def test_max_steps_per_file(tmp_path):
    exp = run_log(tmp_path, 10, lambda s: ["a"], max_requests=1, max_steps_per_file=4)
    files = log_files(tmp_path)
    assert len(files) == 3  # steps 0-3, 4-7, 8-9
    assert as_dict(load_access_log(tmp_path)) == exp


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_stage_selection_kernel_equals_torch(dtype, device):
    from sglang_psa.access_log import stage_selection, stage_selection_ref

    gen = torch.Generator().manual_seed(0)
    page_idx = torch.randint(-1, 50, (5, 3, 40), generator=gen).to(dtype)
    counts = torch.randint(0, 40, (5, 3), generator=gen, dtype=torch.int32)
    seq_lens = torch.randint(1, 900, (5,), generator=gen, dtype=torch.int64)
    rows = torch.tensor([4, 0, 2], dtype=torch.int64)
    page_idx, counts, seq_lens, rows = (t.to(device) for t in (page_idx, counts, seq_lens, rows))
    outs = []
    for fn in (stage_selection, stage_selection_ref):
        o = (torch.full((3, 3, 48), -7, dtype=torch.int32), torch.zeros(3, 3, dtype=torch.int32),
             torch.zeros(3, dtype=torch.int32), torch.zeros(1, dtype=torch.bool))  # fmt: skip
        o = tuple(t.to(device) for t in o)
        fn(page_idx[..., :40], counts, seq_lens, rows, *o, 33)
        outs.append([t.cpu() for t in o])
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    assert outs[0][3].item() and outs[0][0][0, 0, 33].item() == -7
