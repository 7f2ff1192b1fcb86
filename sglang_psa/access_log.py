"""Access log: which KV pages PSA decode selects, per step, layer, kv head and request.

Opt-in. The backend keeps `self.access_log: AccessLogger | None` and checks it for None, so a server
without the option pays nothing. With it on, per decode step:

    logger.begin_step(step, rids)                           # host, once, outside any CUDA graph
    logger.record_layer(layer_id, page_idx, counts, seq_lens)  # device ops only, per layer
    logger.end_step()                                       # host; async device->host copy

`record_layer` only gathers the rows of the tracked requests into a static device staging buffer
(`index_select` + `copy_`, so it can be recorded in a CUDA graph). `end_step` enqueues one
non-blocking copy of the whole step into a pinned host slot and records an event; slots are drained
(decoded into compact records) every `flush_every` steps, only once their event has completed, and a
background thread compresses and writes the `.npz` files. Nothing in the step waits on the GPU.

On a CPU device the same code runs synchronously (no events, no pinned memory), which is how the
tests and `scripts/make_sample_access_log.py` use it; `record(...)` is a one-call convenience.

Which requests: up to `max_requests` at a time, in order of appearance (optionally only rids that
pass `rid_filter`); a tracked request that leaves the batch frees its slot. A request never seen
again after `max_total_requests` have been tracked is ignored.

File format (one `.npz` per chunk, `access-NNNNNN.npz`, rotated: at most `max_files` files of at most
`max_bytes_per_file` bytes each, oldest deleted). One record = one (step, request, layer, kv head):
    step [n] int64, request [n] int32 (index into request_ids), layer [n] int16, head [n] int16,
    seq_len [n] int32 (request length when the step ran), count [n] int32 (pages selected),
    n_tokens [n] int32 (valid tokens in the selected pages),
    page_delta [total] uint16/int32: the selected logical page ids of all records, concatenated,
        ascending within a record, stored as gaps (first value absolute) for compression,
    request_ids [m] str, source str, meta_json str (page_size, num_layers, num_kv_heads, head_dim,
        elem_bytes, width, start_layer, plus free-form user metadata), format_version int.
`load_access_log(path_or_dir)` reads one file or a directory of them into an `AccessTrace`.
"""

from __future__ import annotations

import atexit
import glob
import io
import json
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

FORMAT_VERSION = 1
FILE_GLOB = "access-*.npz"
# Reserve for npz/npy headers and the small metadata arrays when bounding a file's size.
_HEADER_RESERVE = 8192

SOURCES = ("synthetic-kernels", "dummy-weights-server", "trained-small-model")


# ---------------------------------------------------------------------------------------- reading
@dataclass
class AccessTrace:
    """A decoded access log. Arrays have one entry per record (step, request, layer, kv head).

    pages: [total] int32, the selected logical page ids of every record, concatenated;
    offsets: [n + 1] int64, record i's pages are pages[offsets[i]:offsets[i + 1]] (ascending).
    """

    step: np.ndarray  # [n] int64
    request: np.ndarray  # [n] int32, index into request_ids
    layer: np.ndarray  # [n] int16
    head: np.ndarray  # [n] int16
    seq_len: np.ndarray  # [n] int32
    count: np.ndarray  # [n] int32
    n_tokens: np.ndarray  # [n] int32
    pages: np.ndarray  # [total] int32
    offsets: np.ndarray  # [n + 1] int64
    request_ids: list[str] = field(default_factory=list)
    source: str = "unknown"
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.step.shape[0])

    def pages_of(self, i: int) -> np.ndarray:
        """Selected pages of record i, ascending."""
        return self.pages[self.offsets[i] : self.offsets[i + 1]]

    @property
    def page_size(self) -> int:
        return int(self.meta.get("page_size", 1))

    @property
    def num_layers(self) -> int:
        return int(self.meta.get("num_layers", int(self.layer.max()) + 1 if len(self) else 0))

    @property
    def num_kv_heads(self) -> int:
        return int(self.meta.get("num_kv_heads", int(self.head.max()) + 1 if len(self) else 0))

    def unit_bytes(self) -> int:
        """Bytes of one (page, layer, kv head) unit: K and V of page_size tokens."""
        return self.token_bytes() * self.page_size

    def token_bytes(self) -> int:
        """Bytes of one token's K and V for one layer and one kv head."""
        return 2 * int(self.meta.get("head_dim", 128)) * int(self.meta.get("elem_bytes", 2))

    def select(self, mask: np.ndarray) -> AccessTrace:
        """The records where mask [n] bool is True (pages re-packed)."""
        idx = np.nonzero(mask)[0]
        counts = self.count[idx].astype(np.int64)
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        if idx.size:
            starts = np.repeat(self.offsets[idx], counts)
            within = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], counts)
            pages = self.pages[starts + within]
        else:
            pages = np.zeros(0, dtype=np.int32)
        return AccessTrace(
            step=self.step[idx],
            request=self.request[idx],
            layer=self.layer[idx],
            head=self.head[idx],
            seq_len=self.seq_len[idx],
            count=self.count[idx],
            n_tokens=self.n_tokens[idx],
            pages=pages,
            offsets=offsets,
            request_ids=list(self.request_ids),
            source=self.source,
            meta=dict(self.meta),
        )

    def sorted(self) -> AccessTrace:
        """Records in access order: step, then layer, then request, then head."""
        order = np.lexsort((self.head, self.request, self.layer, self.step))
        if np.all(order[:-1] < order[1:]):
            return self
        counts = self.count[order].astype(np.int64)
        offsets = np.zeros(order.size + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        starts = np.repeat(self.offsets[order], counts)
        within = np.arange(int(offsets[-1])) - np.repeat(offsets[:-1], counts)
        return AccessTrace(
            step=self.step[order],
            request=self.request[order],
            layer=self.layer[order],
            head=self.head[order],
            seq_len=self.seq_len[order],
            count=self.count[order],
            n_tokens=self.n_tokens[order],
            pages=self.pages[starts + within],
            offsets=offsets,
            request_ids=list(self.request_ids),
            source=self.source,
            meta=dict(self.meta),
        )


def trace_from_records(
    records: Sequence[tuple[int, int, int, int, int, Sequence[int]]],
    page_size: int,
    source: str = "hand-made",
    meta: dict[str, Any] | None = None,
) -> AccessTrace:
    """Build a trace from (step, request, layer, head, seq_len, pages) tuples (tests, examples)."""
    n = len(records)
    pages_l = [np.sort(np.asarray(r[5], dtype=np.int64)) for r in records]
    count = np.array([p.size for p in pages_l], dtype=np.int32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(count, out=offsets[1:])
    seq_len = np.array([r[4] for r in records], dtype=np.int32)
    pages = np.concatenate(pages_l).astype(np.int32) if n else np.zeros(0, np.int32)
    nreq = max((r[1] for r in records), default=-1) + 1
    m = {"page_size": page_size}
    m.update(meta or {})
    return AccessTrace(
        step=np.array([r[0] for r in records], dtype=np.int64),
        request=np.array([r[1] for r in records], dtype=np.int32),
        layer=np.array([r[2] for r in records], dtype=np.int16),
        head=np.array([r[3] for r in records], dtype=np.int16),
        seq_len=seq_len,
        count=count,
        n_tokens=_tokens_of(pages, offsets, seq_len, page_size),
        pages=pages,
        offsets=offsets,
        request_ids=[f"r{i}" for i in range(nreq)],
        source=source,
        meta=m,
    )


def _tokens_of(pages: np.ndarray, offsets: np.ndarray, seq_len: np.ndarray, page_size: int) -> np.ndarray:
    """Valid tokens in each record's pages: min(page_size, seq_len - page * page_size), summed."""
    counts = np.diff(offsets)
    n = np.repeat(seq_len.astype(np.int64), counts)
    tok = np.clip(n - pages.astype(np.int64) * page_size, 0, page_size)
    out = np.zeros(counts.size, dtype=np.int64)
    np.add.at(out, np.repeat(np.arange(counts.size), counts), tok)
    return out.astype(np.int32)


def _encode_pages(pages: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-record gaps (first value absolute): small numbers that compress well."""
    d = pages.astype(np.int64).copy()
    if d.size:
        d[1:] -= pages[:-1].astype(np.int64)
        starts = offsets[:-1][np.diff(offsets) > 0]
        d[starts] = pages[starts]
    hi = int(d.max()) if d.size else 0
    return d.astype(np.uint16 if hi < 65536 and (d.size == 0 or d.min() >= 0) else np.int32)


def _decode_pages(delta: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    d = delta.astype(np.int64)
    cs = np.cumsum(d)
    counts = np.diff(offsets)
    before = np.concatenate([[0], cs])[offsets[:-1]]  # cumulative sum before each record
    return (cs - np.repeat(before, counts)).astype(np.int32)


def _read_file(path: str) -> tuple[dict[str, np.ndarray], list[str], str, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as z:
        arrs = {k: z[k] for k in z.files}
    meta = json.loads(str(arrs.pop("meta_json")))
    source = str(arrs.pop("source"))
    rids = [str(x) for x in arrs.pop("request_ids")]
    version = int(arrs.pop("format_version"))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: access log format {version}, this reader reads {FORMAT_VERSION}")
    return arrs, rids, source, meta


def log_files(path_or_dir: str | os.PathLike) -> list[str]:
    """The log's files in write order (a single file is returned as is)."""
    p = os.fspath(path_or_dir)
    if os.path.isdir(p):
        return sorted(glob.glob(os.path.join(p, FILE_GLOB)))
    if not os.path.exists(p):
        raise FileNotFoundError(p)
    return [p]


def load_access_log(path_or_dir: str | os.PathLike | Sequence[str]) -> AccessTrace:
    """Read one .npz, a directory of them (in write order), or a list of files into one trace.

    Request ids are merged by name across files. Records come back in access order (see
    AccessTrace.sorted). All files must share one source and page size.
    """
    files = (
        [os.fspath(f) for f in path_or_dir]
        if isinstance(path_or_dir, (list, tuple))
        else log_files(path_or_dir)
    )
    if not files:
        raise FileNotFoundError(f"no {FILE_GLOB} files in {path_or_dir}")
    cols: dict[str, list[np.ndarray]] = {
        k: [] for k in ("step", "request", "layer", "head", "seq_len", "count", "n_tokens", "pages")
    }
    rid_index: dict[str, int] = {}
    source, meta = None, None
    for f in files:
        arrs, rids, src, m = _read_file(f)
        if source is None:
            source, meta = src, m
        elif src != source or m.get("page_size") != meta.get("page_size"):
            raise ValueError(f"{f}: source/page size {src!r}/{m.get('page_size')} differ from the first file")
        remap = np.array([rid_index.setdefault(r, len(rid_index)) for r in rids] + [0], dtype=np.int32)
        offsets = np.zeros(arrs["count"].size + 1, dtype=np.int64)
        np.cumsum(arrs["count"].astype(np.int64), out=offsets[1:])
        cols["pages"].append(_decode_pages(arrs["page_delta"], offsets))
        cols["request"].append(remap[arrs["request"]])
        for k in ("step", "layer", "head", "seq_len", "count", "n_tokens"):
            cols[k].append(arrs[k])
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    offsets = np.zeros(cat["count"].size + 1, dtype=np.int64)
    np.cumsum(cat["count"].astype(np.int64), out=offsets[1:])
    tr = AccessTrace(
        step=cat["step"].astype(np.int64),
        request=cat["request"].astype(np.int32),
        layer=cat["layer"].astype(np.int16),
        head=cat["head"].astype(np.int16),
        seq_len=cat["seq_len"].astype(np.int32),
        count=cat["count"].astype(np.int32),
        n_tokens=cat["n_tokens"].astype(np.int32),
        pages=cat["pages"].astype(np.int32),
        offsets=offsets,
        request_ids=list(rid_index),
        source=source or "unknown",
        meta=meta or {},
    )
    return tr.sorted()


# ---------------------------------------------------------------------------------------- staging
def stage_selection_ref(
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    seq_lens: torch.Tensor,
    rows: torch.Tensor,
    out_idx: torch.Tensor,
    out_cnt: torch.Tensor,
    out_len: torch.Tensor,
    out_seen: torch.Tensor,
    w: int,
) -> None:
    """Copy the tracked batch rows of one layer's selection into the staging buffers (torch ops).

    page_idx [bs, Hkv, W'] int32/int64, counts [bs, Hkv], seq_lens [bs]; rows [R] int64 batch rows;
    out_idx [R, Hkv, W] int32 (first w columns written), out_cnt [R, Hkv], out_len [R], out_seen [1].
    """
    out_idx[:, :, :w].copy_(page_idx[..., :w].index_select(0, rows))
    out_cnt.copy_(counts.index_select(0, rows))
    out_len.copy_(seq_lens.index_select(0, rows))
    # fill_ is a kernel with a scalar argument; `[0] = True` would copy from an unpinned CPU
    # tensor, which CUDA-graph capture rejects (seen on the H100).
    out_seen.fill_(True)


@triton.jit
def _stage_selection_kernel(
    IDX, CNT, LEN, ROWS, OUT_IDX, OUT_CNT, OUT_LEN, OUT_SEEN, w, stride_ib, stride_ih, stride_or,
    stride_oh, hkv, BLOCK_W: tl.constexpr,
):  # fmt: skip
    r = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(ROWS + r)
    c = tl.arange(0, BLOCK_W)
    for start in range(0, w, BLOCK_W):
        m = start + c < w
        v = tl.load(IDX + row * stride_ib + h * stride_ih + start + c, mask=m)
        tl.store(OUT_IDX + r * stride_or + h * stride_oh + start + c, v.to(tl.int32), mask=m)
    tl.store(OUT_CNT + r * hkv + h, tl.load(CNT + row * hkv + h).to(tl.int32))
    if h == 0:
        tl.store(OUT_LEN + r, tl.load(LEN + row).to(tl.int32))
        if r == 0:
            tl.store(OUT_SEEN, 1)


def stage_selection(
    page_idx: torch.Tensor,
    counts: torch.Tensor,
    seq_lens: torch.Tensor,
    rows: torch.Tensor,
    out_idx: torch.Tensor,
    out_cnt: torch.Tensor,
    out_len: torch.Tensor,
    out_seen: torch.Tensor,
    w: int,
) -> None:
    """stage_selection_ref as one Triton launch (graph-recordable). Same arguments."""
    n_rows, hkv = out_cnt.shape
    if page_idx.stride(2) != 1 or not counts.is_contiguous() or not out_idx.is_contiguous():
        raise ValueError("page_idx must be contiguous in its last dim, counts and out_idx contiguous")
    _stage_selection_kernel[(n_rows, hkv)](
        page_idx, counts, seq_lens, rows, out_idx, out_cnt, out_len, out_seen.view(torch.uint8), w,
        page_idx.stride(0), page_idx.stride(1), out_idx.stride(0), out_idx.stride(1), hkv,
        BLOCK_W=min(256, triton.next_power_of_2(max(w, 16))),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- writing
class _Chunk:
    """Records decoded on the host, waiting to be written to one file."""

    def __init__(self) -> None:
        self.cols: dict[str, list[np.ndarray]] = {
            k: [] for k in ("step", "request", "layer", "head", "seq_len", "count", "n_tokens", "pages")
        }
        self.n = 0
        self.pages_n = 0

    # bytes per record (uncompressed): step 8, request 4, layer 2, head 2, seq_len 4, count 4,
    # n_tokens 4; per page at most 4 (int32 gaps)
    REC_BYTES = 28
    PAGE_BYTES = 4

    def nbytes(self) -> int:
        return self.n * self.REC_BYTES + self.pages_n * self.PAGE_BYTES


class AccessLogger:
    """Records PSA's page selections of chosen requests into a bounded, rotated .npz log.

    Args:
        out_dir: directory of the log files (created).
        source: what produced the selections, e.g. 'synthetic-kernels', 'dummy-weights-server',
            'trained-small-model'.
        num_layers, num_kv_heads, width: static shapes: layers of this rank, kv heads, and W of
            page_idx [bs, Hkv, W].
        page_size, head_dim, elem_bytes: to turn pages into tokens and bytes in the analysis.
        start_layer: layer id of the first layer of this rank (pipeline parallelism).
        device: where page_idx lives; 'cuda' uses pinned buffers, events and non-blocking copies.
        max_requests: requests tracked at a time (rows of the staging buffer).
        max_total_requests: stop adopting new requests after this many (None: no limit).
        rid_filter: optional predicate on rids; only matching requests are tracked.
        flush_every: K, steps between two drains of the pinned slots (2K slots are allocated).
        max_bytes_per_file, max_files: the on-disk bound (oldest files deleted).
        max_steps_per_file: also cut a file after this many logged steps, so a killed server loses
            little (files are written atomically; `close` runs at interpreter exit).
        flush_seconds: write what was logged at least this often (a scheduler process ends with
            os._exit or SIGKILL, so `close` at interpreter exit is not enough).
        compress: np.savez_compressed (default) or np.savez.
        background: write files from a background thread (default: on for CUDA, off for CPU).
        meta: extra JSON-able metadata stored in every file (model, tau, mode, ...).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        source: str,
        num_layers: int,
        num_kv_heads: int,
        width: int,
        page_size: int,
        head_dim: int = 128,
        elem_bytes: int = 2,
        start_layer: int = 0,
        device: str | torch.device = "cpu",
        max_requests: int = 4,
        max_total_requests: int | None = None,
        rid_filter: Callable[[str], bool] | None = None,
        flush_every: int = 16,
        max_bytes_per_file: int = 64 << 20,
        max_files: int = 16,
        max_steps_per_file: int = 2048,
        flush_seconds: float = 10.0,
        compress: bool = True,
        background: bool | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        if max_bytes_per_file <= _HEADER_RESERVE + _Chunk.REC_BYTES + _Chunk.PAGE_BYTES * width:
            raise ValueError(
                f"max_bytes_per_file {max_bytes_per_file} cannot hold one record of width {width}"
            )
        if max_files < 1 or flush_every < 1 or max_requests < 1:
            raise ValueError("max_files, flush_every and max_requests must be >= 1")
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.source = source
        self.num_layers, self.hkv, self.width = num_layers, num_kv_heads, width
        self.page_size = page_size
        self.start_layer = start_layer
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.R = max_requests
        self.max_total_requests = max_total_requests
        self.rid_filter = rid_filter
        self.flush_every = flush_every
        self.max_bytes_per_file = max_bytes_per_file
        self.max_files = max_files
        self.max_steps_per_file = max_steps_per_file
        self.flush_seconds = flush_seconds
        self._last_write = time.monotonic()
        self._steps_in_chunk = 0
        self.compress = compress
        self.meta = {
            "page_size": page_size,
            "num_layers": num_layers,
            "num_kv_heads": num_kv_heads,
            "head_dim": head_dim,
            "elem_bytes": elem_bytes,
            "width": width,
            "start_layer": start_layer,
            **(meta or {}),
        }

        L, R, H, W = num_layers, max_requests, num_kv_heads, width
        dev = self.device
        # device staging of the current step (static addresses: recordable in a CUDA graph)
        self._rows = torch.zeros(R, dtype=torch.int64, device=dev)
        self._dev_idx = torch.full((L, R, H, W), -1, dtype=torch.int32, device=dev)
        self._dev_cnt = torch.zeros((L, R, H), dtype=torch.int32, device=dev)
        self._dev_len = torch.zeros((L, R), dtype=torch.int32, device=dev)
        self._dev_seen = torch.zeros(L, dtype=torch.bool, device=dev)
        # host ring of 2K slots
        self.n_slots = 2 * flush_every if self.cuda else 1
        pin = self.cuda
        self._h_idx = [
            torch.empty((L, R, H, W), dtype=torch.int32, pin_memory=pin) for _ in range(self.n_slots)
        ]
        self._h_cnt = [torch.empty((L, R, H), dtype=torch.int32, pin_memory=pin) for _ in range(self.n_slots)]
        self._h_len = [torch.empty((L, R), dtype=torch.int32, pin_memory=pin) for _ in range(self.n_slots)]
        self._h_seen = [torch.empty(L, dtype=torch.bool, pin_memory=pin) for _ in range(self.n_slots)]
        self._h_rows = [torch.zeros(R, dtype=torch.int64, pin_memory=pin) for _ in range(self.n_slots)]
        self._slot_info: list[tuple[int, list[tuple[int, int]]] | None] = [None] * self.n_slots
        self._slot_event: list[Any] = [None] * self.n_slots
        self._slot = 0
        self._steps_since_flush = 0

        # request tracking: slot r of the staging buffer holds request self._tracked[r] (or None)
        self._tracked: list[str | None] = [None] * R
        self._ever: dict[str, int] = {}  # rid -> index in request_ids (of the whole log)
        self._cur_step: int | None = None
        self._cur_pairs: list[tuple[int, int]] = []  # (staging row r, request index) this step

        self._chunk = _Chunk()
        self._file_seq = self._next_file_seq()
        self.files_written = 0
        self.records_written = 0
        self.bytes_written = 0
        self._closed = False
        if background is None:
            background = self.cuda
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        if background:
            self._queue = queue.Queue(maxsize=4)
            self._thread = threading.Thread(target=self._writer_loop, name="psa-access-log", daemon=True)
            self._thread.start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ per step (host)
    @property
    def active(self) -> bool:
        """True while some tracked request is in the current step (record_layer does work)."""
        return bool(self._cur_pairs)

    def begin_step(self, step: int, rids: Sequence[str]) -> None:
        """Start decode step `step` with the batch's request ids (row order of page_idx).

        Host only, outside CUDA graphs: updates which batch rows are tracked and uploads them.
        Ends the previous step if end_step was not called.
        """
        if self._cur_step is not None:
            self.end_step()
        pos = {r: i for i, r in enumerate(rids)}
        # free slots of requests that left the batch, then adopt new ones in batch order
        for r, rid in enumerate(self._tracked):
            if rid is not None and rid not in pos:
                self._tracked[r] = None
        tracked = set(t for t in self._tracked if t is not None)
        for rid in rids:
            if None not in self._tracked:
                break
            if rid in tracked or (self.rid_filter is not None and not self.rid_filter(rid)):
                continue
            if rid not in self._ever:
                if self.max_total_requests is not None and len(self._ever) >= self.max_total_requests:
                    continue
                self._ever[rid] = len(self._ever)
            self._tracked[self._tracked.index(None)] = rid
            tracked.add(rid)
        if self._slot_info[self._slot] is not None:  # ring wrapped: free the slot this step uses
            self._drain_slot(self._slot, block=True)
        self._cur_step = int(step)
        self._cur_pairs = [(r, self._ever[rid]) for r, rid in enumerate(self._tracked) if rid is not None]
        rows_host = self._h_rows[self._slot]  # one pinned buffer per slot: no reuse while in flight
        for r in range(self.R):
            rid = self._tracked[r]
            rows_host[r] = pos[rid] if rid is not None else 0
        self._rows.copy_(rows_host, non_blocking=self.cuda)
        self._dev_seen.zero_()

    def record_layer(
        self, layer_id: int, page_idx: torch.Tensor, counts: torch.Tensor, seq_lens: torch.Tensor
    ) -> None:
        """Stage one layer's selection: device ops only (graph-recordable), no host sync.

        page_idx [bs, Hkv, W'] int (W' <= width; -1 padding), counts [bs, Hkv] int, seq_lens [bs].
        For certified mode pass the visiting order [bs, Hkv, N] and the visited counts: pages are
        sorted on the host; entries beyond `width` are dropped.
        """
        if page_idx.shape[0] == 0:
            return
        # Staged even when no tracked request is in the batch: a CUDA graph captured in such a
        # step must still contain these copies. The host decides at end_step what to keep.
        li = layer_id - self.start_layer
        w = min(page_idx.shape[-1], self.width)
        stage = stage_selection if self.cuda else stage_selection_ref  # one kernel, not seven small ops
        stage(page_idx, counts, seq_lens, self._rows, self._dev_idx[li], self._dev_cnt[li], self._dev_len[li],
              self._dev_seen[li : li + 1], w)  # fmt: skip

    def end_step(self) -> None:
        """Enqueue the step's staging buffer to a host slot (non-blocking on CUDA)."""
        if self._cur_step is None:
            return
        step, pairs = self._cur_step, self._cur_pairs
        self._cur_step, self._cur_pairs = None, []
        if not pairs:
            return
        s = self._slot
        nb = self.cuda
        self._h_idx[s].copy_(self._dev_idx, non_blocking=nb)
        self._h_cnt[s].copy_(self._dev_cnt, non_blocking=nb)
        self._h_len[s].copy_(self._dev_len, non_blocking=nb)
        self._h_seen[s].copy_(self._dev_seen, non_blocking=nb)
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record()
            self._slot_event[s] = ev
        self._slot_info[s] = (step, pairs)
        self._slot = (s + 1) % self.n_slots
        self._steps_since_flush += 1
        if not self.cuda:
            self._drain_slot(s, block=True)
        elif self._steps_since_flush >= self.flush_every:
            self._steps_since_flush = 0
            self._drain_ready()
            if time.monotonic() - self._last_write >= self.flush_seconds:
                self._write_chunk()

    def record(
        self,
        step: int,
        layer_id: int,
        page_idx: torch.Tensor,
        counts: torch.Tensor,
        seq_lens: torch.Tensor,
        rids: Sequence[str],
    ) -> None:
        """One-call form: begins `step` when it changes, then records the layer."""
        if self._cur_step != step:
            self.begin_step(step, rids)
        self.record_layer(layer_id, page_idx, counts, seq_lens)

    # ------------------------------------------------------------------ draining (host)
    def _drain_ready(self) -> None:
        for k in range(self.n_slots):
            s = (self._slot + k) % self.n_slots  # oldest first
            if self._slot_info[s] is None:
                continue
            ev = self._slot_event[s]
            if ev is not None and not ev.query():
                break
            self._drain_slot(s, block=False)

    def _drain_slot(self, s: int, block: bool) -> None:
        info = self._slot_info[s]
        if info is None:
            return
        ev = self._slot_event[s]
        if ev is not None and block:
            ev.synchronize()
        step, pairs = info
        self._slot_info[s], self._slot_event[s] = None, None
        seen = self._h_seen[s].numpy()
        layers = np.nonzero(seen)[0]
        if layers.size == 0:
            return
        rows = np.array([p[0] for p in pairs], dtype=np.int64)
        req = np.array([p[1] for p in pairs], dtype=np.int32)
        idx = self._h_idx[s].numpy()[layers][:, rows]  # [l, r, H, W]
        cnt = self._h_cnt[s].numpy()[layers][:, rows].astype(np.int64)  # [l, r, H]
        slen = self._h_len[s].numpy()[layers][:, rows]  # [l, r]
        l_n, r_n, h_n = cnt.shape
        cnt = np.clip(cnt, 0, self.width)
        # records in (layer, request, head) order
        layer_col = np.repeat(layers + self.start_layer, r_n * h_n).astype(np.int16)
        req_col = np.tile(np.repeat(req, h_n), l_n)
        head_col = np.tile(np.arange(h_n, dtype=np.int16), l_n * r_n)
        len_col = np.repeat(slen.reshape(-1), h_n).astype(np.int32)
        cnt_col = cnt.reshape(-1)
        flat = idx.reshape(-1, idx.shape[-1])
        valid = np.arange(flat.shape[1])[None, :] < cnt_col[:, None]
        # the selection may come unsorted (certified mode's visiting order): sort within records
        keyed = np.where(valid, flat, np.iinfo(np.int32).max)
        keyed.sort(axis=1)
        pages = keyed[np.arange(flat.shape[1])[None, :] < cnt_col[:, None]].astype(np.int32)
        offsets = np.zeros(cnt_col.size + 1, dtype=np.int64)
        np.cumsum(cnt_col, out=offsets[1:])
        tok = _tokens_of(pages, offsets, len_col, self.page_size)
        self._steps_in_chunk += 1
        self._append(
            {
                "step": np.full(cnt_col.size, step, dtype=np.int64),
                "request": req_col,
                "layer": layer_col,
                "head": head_col,
                "seq_len": len_col,
                "count": cnt_col.astype(np.int32),
                "n_tokens": tok,
            },
            pages,
            offsets,
        )

    def _append(self, rec: dict[str, np.ndarray], pages: np.ndarray, offsets: np.ndarray) -> None:
        """Add records to the chunk, cutting files so that none exceeds max_bytes_per_file."""
        n = rec["step"].size
        budget = self.max_bytes_per_file - _HEADER_RESERVE
        i = 0
        while i < n:
            room = budget - self._chunk.nbytes()
            # how many of the next records fit: bytes of records i..j
            cum = (np.arange(1, n - i + 1) * _Chunk.REC_BYTES) + (
                offsets[i + 1 : n + 1] - offsets[i]
            ) * _Chunk.PAGE_BYTES
            k = int(np.searchsorted(cum, room, side="right"))
            if k == 0:
                self._write_chunk()
                continue
            j = i + k
            for key, col in rec.items():
                self._chunk.cols[key].append(col[i:j])
            self._chunk.cols["pages"].append(pages[offsets[i] : offsets[j]])
            self._chunk.n += k
            self._chunk.pages_n += int(offsets[j] - offsets[i])
            i = j
            if j < n:
                self._write_chunk()
        if self._steps_in_chunk >= self.max_steps_per_file:
            self._write_chunk()

    def _write_chunk(self) -> None:
        ch = self._chunk
        self._steps_in_chunk = 0
        self._last_write = time.monotonic()
        if ch.n == 0:
            return
        self._chunk = _Chunk()
        cat = {k: np.concatenate(v) for k, v in ch.cols.items()}
        offsets = np.zeros(ch.n + 1, dtype=np.int64)
        np.cumsum(cat["count"].astype(np.int64), out=offsets[1:])
        # remap request indices to a per-file table (each file is self-contained)
        used = np.unique(cat["request"])
        names = list(self._ever)
        local = np.searchsorted(used, cat["request"]).astype(np.int32)
        arrays = {
            "step": cat["step"],
            "request": local,
            "layer": cat["layer"],
            "head": cat["head"],
            "seq_len": cat["seq_len"],
            "count": cat["count"],
            "n_tokens": cat["n_tokens"],
            "page_delta": _encode_pages(cat["pages"], offsets),
            "request_ids": np.array([names[u] for u in used], dtype=str),
            "source": np.array(self.source),
            "meta_json": np.array(json.dumps(self.meta, sort_keys=True)),
            "format_version": np.array(FORMAT_VERSION),
        }
        path = os.path.join(self.out_dir, f"access-{self._file_seq:06d}.npz")
        self._file_seq += 1
        self.records_written += ch.n
        if self._queue is not None:
            self._raise_writer_error()
            self._queue.put((path, arrays))
        else:
            self._write_file(path, arrays)

    def _write_file(self, path: str, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        (np.savez_compressed if self.compress else np.savez)(buf, **arrays)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
        os.replace(tmp, path)
        self.files_written += 1
        self.bytes_written += buf.getbuffer().nbytes
        files = log_files(self.out_dir)
        for old in files[: max(0, len(files) - self.max_files)]:
            os.remove(old)

    def _writer_loop(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write_file(*item)
            except BaseException as e:  # surfaced on the next write or at close
                self._error = e
            finally:
                self._queue.task_done()

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError("access log writer failed") from e

    def _next_file_seq(self) -> int:
        files = log_files(self.out_dir)
        if not files:
            return 0
        return int(os.path.basename(files[-1])[len("access-") : -len(".npz")]) + 1

    # ------------------------------------------------------------------ lifetime
    def flush(self) -> None:
        """Drain every slot (waits for outstanding copies) and write the current chunk."""
        self.end_step()
        for k in range(self.n_slots):
            self._drain_slot((self._slot + k) % self.n_slots, block=True)
        self._write_chunk()
        if self._queue is not None:
            self._queue.join()
            self._raise_writer_error()

    def close(self) -> None:
        """Flush and stop the writer thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.flush()
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> AccessLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
