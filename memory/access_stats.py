"""Statistics of PSA's page selections over decode steps (input: sglang_psa.access_log.AccessTrace).

A *group* is one (request, layer, kv head): the sequence of its selections over the decode steps,
in step order ("consecutive steps" means consecutive records of the group; a tracked request is in
every step until it ends). Per group, `selection_matrix` builds a [T, N] bool matrix, T steps by N
logical pages; working sets and persistence are column/window reductions of it.

dynamic_only: drop the pages PSA always keeps (the first `sink_pages` pages and the last
`local_pages` pages of the request at that step), leaving what the bounds chose. The sink and window
sizes come from the trace metadata (`sink_pages`, `local_pages`) unless given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class Group:
    request: int
    layer: int
    head: int
    records: np.ndarray  # [T] record indices into the trace, in step order


def groups(trace) -> Iterator[Group]:
    """Every (request, layer, head) group of the trace, its records in step order."""
    order = np.lexsort((trace.step, trace.head, trace.layer, trace.request))
    r, lyr, h = trace.request[order], trace.layer[order], trace.head[order]
    brk = np.nonzero((r[1:] != r[:-1]) | (lyr[1:] != lyr[:-1]) | (h[1:] != h[:-1]))[0] + 1
    for seg in np.split(order, brk):
        if seg.size:
            i = seg[0]
            yield Group(int(trace.request[i]), int(trace.layer[i]), int(trace.head[i]), seg)


def _forced(trace, sink_pages: int | None, local_pages: int | None) -> tuple[int, int]:
    s = trace.meta.get("sink_pages", 0) if sink_pages is None else sink_pages
    w = trace.meta.get("local_pages", 0) if local_pages is None else local_pages
    return int(s), int(w)


def selection_matrix(
    trace,
    records: np.ndarray,
    dynamic_only: bool = False,
    sink_pages: int | None = None,
    local_pages: int | None = None,
) -> np.ndarray:
    """[T, N] bool: row t marks the pages selected by records[t] (N = max page + 1)."""
    counts = trace.count[records].astype(np.int64)
    starts = trace.offsets[records]
    rows = np.repeat(np.arange(records.size), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    pages = trace.pages[np.repeat(starts, counts) + within].astype(np.int64)
    npg = -(-trace.seq_len[records].astype(np.int64) // trace.page_size)
    N = int(max(pages.max() + 1 if pages.size else 0, npg.max() if npg.size else 0, 1))
    mat = np.zeros((records.size, N), dtype=bool)
    mat[rows, pages] = True
    if dynamic_only:
        s, w = _forced(trace, sink_pages, local_pages)
        j = np.arange(N)[None, :]
        mat &= ~((j < s) | (j >= npg[:, None] - w))
    return mat


# ------------------------------------------------------------------------ selection sizes
def selection_sizes(trace) -> dict:
    """Selection size distribution (pages per record), per layer and per (layer, head).

    Returns {"overall": summary, "per_layer": [summary per layer], "per_head": [[summary]]} with
    summary = {mean, std, cv, min, p10, p50, p90, max, mean_fraction} where mean_fraction is the mean
    of count / pages in context.
    """
    npg = np.maximum(-(-trace.seq_len.astype(np.int64) // trace.page_size), 1)
    frac = trace.count / npg

    def summ(m: np.ndarray) -> dict:
        c = trace.count[m].astype(np.float64)
        if c.size == 0:
            return {}
        mean = float(c.mean())
        p10, p50, p90 = np.percentile(c, [10, 50, 90])
        return {
            "n": int(c.size),
            "mean": mean,
            "std": float(c.std()),
            "cv": float(c.std() / mean) if mean else 0.0,
            "min": float(c.min()),
            "p10": float(p10),
            "p50": float(p50),
            "p90": float(p90),
            "max": float(c.max()),
            "mean_fraction": float(frac[m].mean()),
        }

    L, H = trace.num_layers, trace.num_kv_heads
    return {
        "overall": summ(np.ones(len(trace), dtype=bool)),
        "per_layer": [summ(trace.layer == lyr) for lyr in range(L)],
        "per_head": [[summ((trace.layer == lyr) & (trace.head == h)) for h in range(H)] for lyr in range(L)],
    }


# ------------------------------------------------------------------------ working set
def working_set_ratios(mat: np.ndarray, window: int = 50, stride: int = 1) -> np.ndarray:
    """For windows [t, t + window) of a [T, N] selection matrix, t = 0, stride, ... (full windows):
    |union of the window's selections| / mean selection size in the window. [num_windows] float."""
    T = mat.shape[0]
    if T < window:
        return np.zeros(0)
    cs = np.zeros((T + 1, mat.shape[1]), dtype=np.int32)
    np.cumsum(mat, axis=0, out=cs[1:])
    starts = np.arange(0, T - window + 1, stride)
    union = ((cs[starts + window] - cs[starts]) > 0).sum(axis=1)
    sizes = np.concatenate([[0], np.cumsum(mat.sum(axis=1))])
    mean = (sizes[starts + window] - sizes[starts]) / window
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(mean > 0, union / np.where(mean > 0, mean, 1), np.nan)


def working_set(
    trace, window: int = 50, stride: int = 10, dynamic_only: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Working set of `window` consecutive steps as a multiple of the per-step selection, per group.

    Returns (ratios [m] float, layer [m] int) over all full windows of all groups.
    """
    vals, lays = [], []
    for g in groups(trace):
        r = working_set_ratios(selection_matrix(trace, g.records, dynamic_only), window, stride)
        r = r[~np.isnan(r)]
        vals.append(r)
        lays.append(np.full(r.size, g.layer))
    if not vals:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    return np.concatenate(vals), np.concatenate(lays).astype(np.int64)


# ------------------------------------------------------------------------ persistence
def run_lengths(mat: np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of True down each column of a [T, N] bool matrix (any order)."""
    T, N = mat.shape
    pad = np.zeros((T + 2, N), dtype=np.int8)
    pad[1:-1] = mat
    d = np.diff(pad, axis=0)  # +1 at run starts, -1 one past run ends
    # column-major scan so starts and ends pair up within each column
    st = np.nonzero(d.T == 1)
    en = np.nonzero(d.T == -1)
    return (en[1] - st[1]).astype(np.int64)


def persistence(trace, dynamic_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run lengths (in steps) of consecutive selection of a page, per group.

    Returns (lengths [m] int, layer [m] int). Runs cut by the start or end of the trace count with
    the length seen (censored).
    """
    vals, lays = [], []
    for g in groups(trace):
        r = run_lengths(selection_matrix(trace, g.records, dynamic_only))
        vals.append(r)
        lays.append(np.full(r.size, g.layer))
    if not vals:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(vals), np.concatenate(lays).astype(np.int64)


# ------------------------------------------------------------------------ lookback
def lookback(trace, dynamic_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """How far behind the current position each selected page lies, as a fraction of the length.

    For a page p of a request of length n: (n - min((p + 1) * P, n)) / n, in [0, 1): 0 for the page
    holding the newest token, near 1 for the first page. Returns (fractions [m], layer [m]).
    """
    P = trace.page_size
    counts = trace.count.astype(np.int64)
    n = np.repeat(trace.seq_len.astype(np.int64), counts)
    p = trace.pages.astype(np.int64)
    lay = np.repeat(trace.layer.astype(np.int64), counts)
    frac = (n - np.minimum((p + 1) * P, n)) / np.maximum(n, 1)
    if dynamic_only:
        s, w = _forced(trace, None, None)
        npg = -(-n // P)
        keep = (p >= s) & (p < npg - w)
        frac, lay = frac[keep], lay[keep]
    return frac, lay
