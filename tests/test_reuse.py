"""--psa-reuse-steps: kernels skip kept rows; the backend keeps, ages and invalidates selections.

Kernels (Triton under the interpreter and the torch refs): a row flagged in keep_rows is left
exactly as the output buffers held it (poisoned here), every other row equals the plain launch.
Backend (CPU harness of test_backend.py): with R = 4 a row reuses its selection for up to 3 steps,
reselects when its page count grows, when the batch is reordered and after an extend; fresh
selections equal the R = 1 backend's, and the attention output of a kept row is sparse decode over
the stored selection.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from kernel_cases import build

from sglang_psa.kernels import (
    SelectParams,
    page_bounds,
    page_bounds_ref,
    select_pages,
    select_pages_ref,
    sparse_decode_ref,
)

P = 16


# ---------------------------------------------------------------------------------- kernels
def _bounds_args(sb, kmin, kmax, max_pages):
    return (sb.q, kmin, kmax, sb.req_to_token, sb.req_pool_indices, sb.seq_lens, 16, 16, sb.sm_scale,
            max_pages)  # fmt: skip


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("fill", [True, False])
@pytest.mark.parametrize("keep_dtype", [torch.bool, torch.int32])
def test_page_bounds_leaves_kept_rows_untouched(impl, fill, keep_dtype, device):
    fn = page_bounds if impl == "triton" else page_bounds_ref
    lens = [16 * 40 + 3, 16 * 3, 16 * 70, 16 * 9 + 1]
    sb, kmin, kmax = build(16, 4, 64, torch.float32, device, lens=lens)
    width, cut = 100, 16 * 4
    args = _bounds_args(sb, kmin, kmax, width)
    want_u, want_c = fn(*args, with_centers=True, skip_below=cut, fill=True)
    keep = torch.tensor([0, 1, 1, 0], dtype=keep_dtype, device=sb.q.device)
    nan = torch.full((4, 2, width), float("nan"), device=sb.q.device)
    got_u, got_c = fn(*args, with_centers=True, skip_below=cut, fill=fill, out=nan.clone(),
                      centers=nan.clone(), keep_rows=keep)  # fmt: skip
    for want, got in ((want_u, got_u), (want_c, got_c)):
        assert bool(torch.isnan(got[1:3]).all())  # kept: not a single entry written
        for b in (0, 3):
            n = -(-lens[b] // 16)
            if fill or impl == "ref":
                assert torch.equal(got[b], want[b])
            else:  # fill=False writes the live blocks of 64 pages only
                live = 64 * -(-n // 64)
                assert torch.equal(got[b, :, :live], want[b, :, :live])
    # no keep_rows, or nothing flagged: the plain result
    none = fn(*args, with_centers=True, skip_below=cut, keep_rows=torch.zeros_like(keep))
    assert torch.equal(none[0], want_u) and torch.equal(none[1], want_c)


SELECT_PARAMS = [
    SelectParams(tau=0.8, sink_pages=1, local_pages=2, max_pages=24),
    SelectParams(topk=6, sink_pages=1, local_pages=2),
]


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("params", SELECT_PARAMS, ids=["tau0.8", "topk6"])
@pytest.mark.parametrize("keep_dtype", [torch.bool, torch.int32])
def test_select_pages_leaves_kept_rows_untouched(impl, params, keep_dtype, device):
    fn = select_pages if impl == "triton" else select_pages_ref
    gen = torch.Generator().manual_seed(4)
    bounds = torch.randn(5, 2, 40, generator=gen) * 3
    centers = bounds - torch.rand(bounds.shape, generator=gen) * 2
    # rows 1 and 3 are short (below dense_below): one kept, one not
    seq_lens = torch.tensor([40 * P, 5 * P + 3, 33 * P, 4 * P, 30 * P + 1], dtype=torch.int32)
    for b, n in enumerate((40, 6, 33, 4, 31)):
        bounds[b, :, n:] = float("-inf")
        centers[b, :, n:] = float("-inf")
    bounds, centers, seq_lens = bounds.to(device), centers.to(device), seq_lens.to(device)
    kw = dict(mass_logits=centers, dense_below=6 * P)
    want_idx, want_cnt = fn(bounds, seq_lens, P, params, **kw)
    keep = torch.tensor([1, 1, 0, 0, 1], dtype=keep_dtype, device=device)
    # the kept rows' bounds are garbage: a kept row must not read them either
    poisoned = bounds.clone()
    poisoned[keep.bool()] = float("nan")
    idx = torch.full((5, 2, params.width), 77, dtype=torch.int32, device=device)
    cnt = torch.full((5, 2), 77, dtype=torch.int32, device=device)
    got_idx, got_cnt = fn(poisoned, seq_lens, P, params, page_idx=idx, counts=cnt, keep_rows=keep, **kw)
    assert got_idx is idx and got_cnt is cnt
    kept = keep.bool().cpu()
    assert bool((got_idx.cpu()[kept] == 77).all()) and bool((got_cnt.cpu()[kept] == 77).all())
    assert torch.equal(got_idx.cpu()[~kept], want_idx.cpu()[~kept])
    assert torch.equal(got_cnt.cpu()[~kept], want_cnt.cpu()[~kept])
    if impl == "triton":  # and the kernel agrees with the reference on the rows it writes
        ref_idx, ref_cnt = select_pages_ref(bounds.cpu(), seq_lens.cpu(), P, params,
                                            mass_logits=centers.cpu(), dense_below=6 * P)  # fmt: skip
        assert torch.equal(want_idx.cpu(), ref_idx) and torch.equal(want_cnt.cpu(), ref_cnt)


def test_keep_rows_must_match_the_batch(device):
    bounds = torch.zeros(2, 1, 8, device=device)
    seq = torch.full((2,), 8 * P, dtype=torch.int32, device=device)
    params = SelectParams(tau=0.9, sink_pages=1, local_pages=1, max_pages=8)
    for fn in (select_pages, select_pages_ref):
        with pytest.raises(ValueError, match="keep_rows must be \\[2\\]"):
            fn(bounds, seq, P, params, keep_rows=torch.zeros(3, dtype=torch.bool, device=device))
        with pytest.raises(ValueError, match="keep_rows"):
            fn(bounds, seq, P, params, keep_rows=torch.zeros(2, dtype=torch.float32, device=device))


# ---------------------------------------------------------------------------------- backend
pytest.importorskip("sglang")

from sglang.srt.model_executor.forward_batch_info import ForwardMode  # noqa: E402
from test_backend import HQ, LAYERS, Batch, D, layer, make_backend  # noqa: E402


class Recorder:
    """Wraps the backend's select_pages: what each (step, layer) selected, and with which kwargs."""

    def __init__(self, backend):
        self.calls = []
        inner = backend.ops.select_pages

        def select(*args, **kwargs):
            idx, cnt = inner(*args, **kwargs)
            self.calls.append((sorted(kwargs), idx.clone(), cnt.clone()))
            return idx, cnt

        backend.ops = dataclasses.replace(backend.ops, select_pages=select)


def decode(batch):
    """Batch.decode, but returning the queries and the forward batch (to recompute attention)."""
    b = batch.b
    fb = batch.begin_decode()
    outs, qs = [], []
    for i in range(LAYERS):
        q = torch.randn(len(batch.lens), HQ * D, generator=batch.gen)
        k, v = batch._kv(len(batch.lens))
        outs.append(b.forward_decode(q, k, v, layer(i), fb).view(-1, HQ, D))
        qs.append(q.view(-1, HQ, D))
    return fb, qs, outs


def extend(batch):
    """An extend forward that writes nothing new (as a prefill of another request would start)."""
    loc = torch.zeros(0, dtype=torch.int64)
    fb = types.SimpleNamespace(forward_mode=ForwardMode.EXTEND, out_cache_loc=loc, batch_size=0)
    batch.b.init_forward_metadata(fb)


def reorder(batch):
    for name in ("rows", "slots", "lens"):
        setattr(batch, name, getattr(batch, name)[::-1])


@pytest.mark.parametrize(
    "opts",
    [
        dict(mode="topk", topk=5, sink_pages=1, local_pages=1),
        dict(mode="estimated", tau=0.5, max_pages=6, sink_pages=1, local_pages=1),
    ],
    ids=["topk", "estimated"],
)
def test_rows_reuse_for_r_minus_1_steps_and_reselect_when_due(opts):
    R = 4
    twin = make_backend(dense_below=0, **opts)  # R = 1, same data: the selection of every step
    b = make_backend(dense_below=0, reuse_steps=R, **opts)
    assert twin.reuse is None and b.reuse is not None
    rec_twin, rec = Recorder(twin), Recorder(b)
    # [160, 42] + 1 per step: request 0 stays at 11 pages; request 1 grows from 3 to 4 pages at step 7
    batches = [Batch(x, [160, 42], torch.Generator().manual_seed(7)) for x in (twin, b)]
    for x in batches:
        x.prefill()

    expect = {  # step: keep (row 0, row 1)
        1: (0, 0),  # first decode after the prefill: select
        2: (1, 1), 3: (1, 1), 4: (1, 1),
        5: (0, 0),  # R steps served: select again
        6: (1, 1),
        7: (1, 0),  # request 1's page count grew: its local window moved
        8: (1, 1),
        9: (0, 1), 10: (1, 1),
        11: (1, 0),
        12: (0, 0),  # batch reordered: each row holds the other request's selection
        13: (1, 1),
        14: (0, 0),  # after an extend
        15: (1, 1),
    }  # fmt: skip
    made = {}  # (row, layer) -> the (page_idx, counts) of the twin at the step the row selected
    for step in range(1, 16):
        if step == 12:
            for x in batches:
                reorder(x)
        if step == 14:
            for x in batches:
                extend(x)
        _, _, twin_outs = decode(batches[0])
        fb, qs, outs = decode(batches[1])
        bufs = b.reuse.current
        keep = bufs.keep[:2].tolist()
        assert tuple(int(k) for k in keep) == expect[step], (step, keep)
        for i in range(LAYERS):
            names, idx, cnt = rec.calls[-LAYERS + i]
            assert "keep_rows" in names and "page_idx" in names
            _, t_idx, t_cnt = rec_twin.calls[-LAYERS + i]
            stored_idx, stored_cnt = bufs.page_idx[i, :2], bufs.counts[i, :2]
            assert torch.equal(idx, stored_idx) and torch.equal(cnt, stored_cnt)
            for row in range(2):
                if not keep[row]:
                    made[row, i] = (t_idx[row], t_cnt[row])
                want_idx, want_cnt = made[row, i]
                # fresh: what R = 1 selects now; kept: what R = 1 selected when the row last selected
                assert torch.equal(idx[row], want_idx) and torch.equal(cnt[row], want_cnt), (step, row, i)
            # the output is sparse attention over the stored selection (new token included)
            ref, _ = sparse_decode_ref(
                qs[i], b.kv_pool.get_key_buffer(i), b.kv_pool.get_value_buffer(i), b.req_to_token,
                fb.req_pool_indices, fb.seq_lens, stored_idx, stored_cnt, P, D**-0.5,
            )  # fmt: skip
            torch.testing.assert_close(outs[i], ref.to(outs[i].dtype), rtol=1e-5, atol=1e-5)
            if not any(keep):
                torch.testing.assert_close(outs[i], twin_outs[i], rtol=1e-5, atol=1e-5)


def test_r1_passes_no_reuse_arguments():
    b = make_backend(mode="topk", topk=5, sink_pages=1, local_pages=1, dense_below=0)
    rec = Recorder(b)
    batch = Batch(b, [100, 50], torch.Generator().manual_seed(1))
    batch.prefill()
    for _ in range(2):
        decode(batch)
    assert b.reuse is None
    assert all(names == ["dense_below", "mass_logits"] for names, _, _ in rec.calls)


def test_short_requests_stay_dense_with_reuse():
    b = make_backend(mode="topk", topk=6, sink_pages=1, local_pages=1, dense_below=96, reuse_steps=3)
    batch = Batch(b, [48, 200], torch.Generator().manual_seed(1))
    batch.prefill()
    for step in range(4):
        fb, qs, outs = decode(batch)
        for i in range(LAYERS):
            ref, _ = dense_ref(b, qs[i], fb, i)
            torch.testing.assert_close(outs[i][0], ref[0].to(outs[i].dtype), rtol=1e-5, atol=1e-5)
        assert b.reuse.current.keep[:2].tolist() == ([False, False] if step in (0, 3) else [True, True])


def dense_ref(b, q, fb, i):
    from sglang_psa.kernels import dense_decode_ref

    return dense_decode_ref(q, b.kv_pool.get_key_buffer(i), b.kv_pool.get_value_buffer(i), b.req_to_token,
                            fb.req_pool_indices, fb.seq_lens, page_size=P, sm_scale=D**-0.5)  # fmt: skip


def test_graph_rows_eager_growth_and_capture_invalidation():
    """The graph path (in_graph hook) and eager batches beyond the graph size use separate buffers."""
    opts = dict(mode="topk", topk=5, sink_pages=1, local_pages=1, dense_below=0, reuse_steps=4)
    b = make_backend(**opts)
    b.dense.init_cuda_graph_state = lambda *a, **k: None
    b.init_cuda_graph_state(max_bs=2, max_num_tokens=2)
    graph_set = b.reuse.graph
    assert graph_set.rows == 2 and b.reuse.eager is None
    hkv, w = b.kv_pool.head_num, b.width
    assert graph_set.page_idx.numel() * 4 == 2 * LAYERS * hkv * w * 4  # rows x layers x Hkv x W x 4 B

    batch = Batch(b, [100, 60, 30], torch.Generator().manual_seed(5))
    batch.prefill()
    two = Batch.__new__(Batch)  # the first two requests as their own batch (same pools)
    two.b, two.gen = b, batch.gen
    two.lens, two.rows, two.slots = batch.lens[:2], batch.rows[:2], batch.slots[:2]

    def graph_step(x, in_capture=False):
        """What a capture (in_capture) or a replay runs: out_graph on the host, then the recorded part."""
        loc = torch.stack([s[n] for s, n in zip(x.slots, x.lens)])
        if not in_capture:
            x.lens = [n + 1 for n in x.lens]
        fb = types.SimpleNamespace(
            forward_mode=ForwardMode.DECODE, out_cache_loc=loc, batch_size=len(x.lens),
            seq_lens=torch.tensor(x.lens), req_pool_indices=torch.tensor(x.rows), rids=None,
        )  # fmt: skip
        b.init_forward_metadata_out_graph(fb, in_capture=in_capture)
        b.init_forward_metadata_in_graph(fb)
        for i in range(LAYERS):
            q = torch.randn(len(x.lens), HQ * D, generator=x.gen)
            b.forward_decode(q, None, None, layer(i), fb, save_kv_cache=False)
        return b.reuse.current

    # "capture": warm-up runs execute the tag updates; the first real step must not trust them
    for _ in range(2):
        assert graph_step(two, in_capture=True) is graph_set
    assert graph_step(two) is graph_set and not graph_set.keep[:2].any()
    assert graph_step(two) is graph_set and graph_set.keep[:2].all()
    # an eager batch larger than the graph size: its own buffers, grown on demand
    batch.lens = two.lens + batch.lens[2:]
    decode(batch)
    eager = b.reuse.current
    assert eager is b.reuse.eager and eager.rows >= 3 and not eager.keep[:3].any()
    decode(batch)
    assert eager.keep[:3].all()
    # back on the graph set: its tags aged with the shared step counter (made 2 steps + 2 eager ago)
    two.lens = batch.lens[:2]
    assert graph_step(two) is graph_set and not graph_set.keep[:2].any()
    assert graph_step(two) is graph_set and graph_set.keep[:2].all()
    # an extend invalidates every set
    extend(batch)
    batch.lens = two.lens + batch.lens[2:]
    decode(batch)
    assert b.reuse.current is eager and not eager.keep[:3].any()
    assert b.reuse.graph is graph_set  # never reallocated


@pytest.mark.gpu
@pytest.mark.parametrize("params", SELECT_PARAMS, ids=["tau0.8", "topk6"])
def test_tag_updates_and_kernels_replay_in_a_cuda_graph(params):
    """begin_decode + bounds + select with keep_rows, captured once and replayed with new inputs, keep
    the same rows and hold the same selections as the same ops run eagerly."""
    from sglang_psa.reuse import SelectionReuse

    lens = [16 * 30, 16 * 20, 16 * 8]
    sb, kmin, kmax = build(16, 4, 128, torch.bfloat16, "cuda", lens=lens, seed=3)
    bs, hkv, width, n = 3, 2, params.width, 40
    gen = torch.Generator(device="cuda").manual_seed(0)
    start = torch.tensor([16 * 27 + 1, 16 * 17 + 2, 16 * 5 + 2], device="cuda")  # no page fills up
    static = types.SimpleNamespace(batch_size=bs, req_pool_indices=sb.req_pool_indices.clone(),
                                   seq_lens=start.clone().to(sb.seq_lens.dtype), q=sb.q.clone())  # fmt: skip

    def make():
        r = SelectionReuse(4, layers=1, hkv=hkv, width=width, max_rows=8, device=torch.device("cuda"))
        r.init_graph_rows(4)
        return r

    def step(r, fb, in_graph):
        r.begin_decode(fb, 16, in_graph=in_graph)
        bufs = r.current
        keep = bufs.keep[:bs]
        u, c = page_bounds(fb.q, kmin, kmax, sb.req_to_token, fb.req_pool_indices, fb.seq_lens, 16, 16,
                           sb.sm_scale, n, with_centers=True, fill=False, keep_rows=keep)  # fmt: skip
        select_pages(u, fb.seq_lens, 16, params, page_idx=bufs.page_idx[0, :bs], counts=bufs.counts[0, :bs],
                     mass_logits=c, keep_rows=keep)  # fmt: skip

    graph_r, eager_r = make(), make()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(graph_r, static, in_graph=True)  # warm-up: compile, allocate
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graph_r, static, in_graph=True)
    graph_r.invalidate()  # what the first step after capture does
    keeps = []
    for t in range(12):
        if t == 6:  # reorder the batch
            perm = torch.tensor([2, 0, 1], device="cuda")
            static.req_pool_indices.copy_(static.req_pool_indices[perm])
            static.seq_lens.copy_(static.seq_lens[perm])
        if t == 9:  # an extend in between
            graph_r.invalidate()
            eager_r.invalidate()
        static.seq_lens.add_(1)
        static.q.copy_(torch.randn(static.q.shape, generator=gen, device="cuda").to(static.q.dtype))
        graph.replay()
        eager_fb = types.SimpleNamespace(
            **{k: v.clone() if torch.is_tensor(v) else v for k, v in vars(static).items()}
        )
        step(eager_r, eager_fb, in_graph=False)
        g, e = graph_r.graph, eager_r.graph
        assert torch.equal(g.keep[:bs], e.keep[:bs]), t
        assert torch.equal(g.page_idx[0, :bs], e.page_idx[0, :bs]) and torch.equal(
            g.counts[0, :bs], e.counts[0, :bs]
        )
        keeps.append(g.keep[:bs].tolist())
    assert keeps[0] == [False] * 3 and keeps[1] == [True] * 3 and keeps[4] == [False] * 3
    assert keeps[6] == [False] * 3 and keeps[9] == [False] * 3 and keeps[10] == [True] * 3
