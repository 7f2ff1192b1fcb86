"""--psa-reuse-steps: LServe-style reuse of a decode row's page selection for up to R steps.

The backend calls SelectionReuse.begin_decode before layer 0 of each decode step (recorded in the
CUDA graph) and passes `keep` to page_bounds / select_pages, which skip the kept rows; their page
lists stay in the persistent buffers select writes into.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from sglang_psa.kernels._common import num_pages_of

if TYPE_CHECKING:
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)


class ReuseBuffers:
    """Persistent selection buffers of `rows` batch rows for --psa-reuse-steps (one set).

    page_idx / counts are what select_pages writes for every layer; a row that reuses its selection
    is skipped by the kernels, so they still hold its earlier lists. Per row, the tags say whose
    selection the row holds: rpi_tag (req_pool_index, -1 none), npages_tag (its page count then),
    made_step (value of the step counter when it was selected); keep is this step's decision.
    """

    def __init__(self, rows: int, layers: int, hkv: int, width: int, device: torch.device):
        self.rows = rows
        self.page_idx = torch.full((layers, rows, hkv, width), -1, dtype=torch.int32, device=device)
        self.counts = torch.zeros((layers, rows, hkv), dtype=torch.int32, device=device)
        self.rpi_tag = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.npages_tag = torch.zeros((rows,), dtype=torch.int64, device=device)
        self.made_step = torch.zeros((rows,), dtype=torch.int64, device=device)
        self.keep = torch.zeros((rows,), dtype=torch.bool, device=device)

    def mem_bytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.page_idx, self.counts, self.rpi_tag, self.npages_tag, self.made_step, self.keep)
        )


class SelectionReuse:
    """LServe-style selection reuse (--psa-reuse-steps R): device-side bookkeeping, no host sync.

    Before layer 0 of every decode step (init_forward_metadata_in_graph, so a CUDA graph records it;
    eager steps run the same ops), for the rows of the step's buffer set:
        step += 1
        keep = (rpi_tag == rpi) & (npages_tag == npages) & (step - made_step < R)
        rpi_tag, npages_tag = rpi, npages;  made_step = where(keep, made_step, step)
    A kept row skips bounds and select in every layer and decodes over the stored lists; a row whose
    page count grew reselects (its local window moved), as does a row that now holds another request
    (batch reordered). Any extend / mixed forward adds R to the step counter instead of touching the
    tags: every selection is then too old, so no row is kept at the next decode step, and a new
    request on a recycled req_pool_index can never inherit a stale selection. The counter is shared by
    every buffer set, so a set that sat out some steps still ages correctly.

    Buffer sets: one for the CUDA-graph batch sizes (allocated in init_cuda_graph_state, never freed:
    captured graphs point at it) and one for eager batches larger than that, grown on demand (no graph
    points at it). Cost: rows x layers x Hkv x W x 4 B for page_idx (+ counts, 4 B per row x layer x
    Hkv, and 25 B of tags per row).
    """

    def __init__(self, steps: int, layers: int, hkv: int, width: int, max_rows: int, device: torch.device):
        self.steps = steps
        self.layers, self.hkv, self.width = layers, hkv, width
        self.max_rows = max_rows  # a batch never has more rows than the request pool
        self.device = device
        self.step = torch.zeros(1, dtype=torch.int64, device=device)
        self.graph: ReuseBuffers | None = None
        self.eager: ReuseBuffers | None = None
        self.current: ReuseBuffers | None = None  # the set this step's layers use (None: no reuse)
        self._graph_sets_kept: list[ReuseBuffers] = []
        self._dirty = False  # capture warm-ups wrote junk tags

    def _alloc(self, rows: int) -> ReuseBuffers:
        bufs = ReuseBuffers(rows, self.layers, self.hkv, self.width, self.device)
        logger.info("PSA selection reuse: buffers for %d rows, %.1f MB", rows, bufs.mem_bytes() / 2**20)
        return bufs

    def init_graph_rows(self, max_bs: int) -> None:
        if self.graph is None or self.graph.rows < max_bs:
            if self.graph is not None:
                # graphs captured earlier point at this set: it must stay allocated
                self._graph_sets_kept.append(self.graph)
            self.graph = self._alloc(max_bs)

    def buffers_for(self, bs: int, in_graph: bool) -> ReuseBuffers | None:
        if self.graph is not None and bs <= self.graph.rows:
            return self.graph
        if in_graph:
            return None  # never allocate during capture; the graph runs without reuse
        if self.eager is None or self.eager.rows < bs:
            rows = min(max(bs, 2 * (self.eager.rows if self.eager is not None else 0)), self.max_rows)
            self.eager = self._alloc(max(rows, bs))
        return self.eager

    def begin_decode(self, forward_batch: ForwardBatch, page_size: int, in_graph: bool) -> None:
        """Decide which rows keep their selection this step (device ops only)."""
        bs = forward_batch.batch_size
        bufs = self.buffers_for(bs, in_graph) if bs > 0 else None
        self.current = bufs
        if bufs is None:
            return
        rpi = forward_batch.req_pool_indices[:bs]
        npages = num_pages_of(forward_batch.seq_lens[:bs], page_size)
        self.step.add_(1)
        made = bufs.made_step[:bs]
        keep = (bufs.rpi_tag[:bs] == rpi) & (bufs.npages_tag[:bs] == npages) & (self.step - made < self.steps)
        bufs.keep[:bs].copy_(keep)
        made.copy_(torch.where(keep, made, self.step))
        bufs.rpi_tag[:bs].copy_(rpi)
        bufs.npages_tag[:bs].copy_(npages)

    def on_decode_step(self, in_capture: bool) -> None:
        """Host side of a decode step. Warm-up runs during capture execute the tag updates on padding
        rows, so the first step after capture starts from no stored selection (as after an extend)."""
        if in_capture:
            self._dirty = True
        elif self._dirty:
            self._dirty = False
            self.invalidate()

    def invalidate(self) -> None:
        """Every stored selection becomes too old to reuse (extend / mixed forward; after capture)."""
        self.current = None
        self.step.add_(self.steps)
