"""Per-layer decode statistics, accumulated on the device and read out every N steps.

Each decode step adds, per layer, the number of (request, kv head, page) units PSA attended, and
once per step the units a dense decode would have read. Both are device tensors updated by
in-place adds that a CUDA graph records; the host reads them (one sync) only every
`interval` steps and turns them into log lines and Prometheus counters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass
class StatsSnapshot:
    steps: int
    selected_pages: list[float]  # per layer, summed over requests and kv heads
    dense_pages: float  # per layer (same for every layer)
    kv_bytes_read: float  # all layers: selected pages' K+V plus the summaries scored
    kv_bytes_dense: float  # all layers: K+V of every page
    recall_sum: float = 0.0  # --psa-measure-recall: sum over (request, q head, layer) of recall
    recall_count: float = 0.0
    recall_min: float = 1.0

    @property
    def recall_mean(self) -> float | None:
        return self.recall_sum / self.recall_count if self.recall_count else None

    @property
    def read_fraction(self) -> float:
        return self.kv_bytes_read / self.kv_bytes_dense if self.kv_bytes_dense else 0.0

    def per_layer_fraction(self) -> list[float]:
        d = self.dense_pages or 1.0
        return [s / d for s in self.selected_pages]


class DecodeStats:
    def __init__(
        self,
        num_layers: int,
        start_layer: int,
        page_size: int,
        block_size: int,
        head_dim: int,
        elem_bytes: int,
        interval: int,
        device: torch.device,
        labels: dict[str, str] | None = None,
        enable_metrics: bool = False,
    ):
        self.num_layers = num_layers
        self.start_layer = start_layer
        self.interval = interval
        # Bytes of one (kv head, page) unit: K and V of P tokens; its summaries: 2 rows per block.
        self.page_bytes = 2 * page_size * head_dim * elem_bytes
        self.summary_bytes = 2 * (page_size // block_size) * head_dim * elem_bytes
        # float64: exact integer sums well beyond int32, and no dtype juggling in graphs.
        self.selected = torch.zeros(num_layers, dtype=torch.float64, device=device)
        self.dense = torch.zeros(1, dtype=torch.float64, device=device)
        self.recall = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64, device=device)  # sum, n, min
        self.steps = 0
        self._since_read = 0
        self.labels = labels or {}
        self.enable_metrics = enable_metrics
        self._prom = None
        self.last: StatsSnapshot | None = None

    # ---- device side (graph-recordable)
    def add_layer(self, layer_id: int, counts: torch.Tensor) -> None:
        self.selected[layer_id - self.start_layer] += counts.sum()

    def add_step(self, dense_units: torch.Tensor) -> None:
        self.dense += dense_units

    def add_recall(self, recall: torch.Tensor) -> None:
        """recall: [bs, Hq] of one layer (eval runs only; see sglang_psa.recall)."""
        if recall.numel():
            r = recall.double()
            self.recall[0] += r.sum()
            self.recall[1] += r.numel()
            self.recall[2] = torch.minimum(self.recall[2], r.min())

    # ---- host side (outside graphs)
    def reset(self) -> None:
        self.selected.zero_()
        self.dense.zero_()
        self.recall.copy_(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        self._since_read = 0

    def on_step(self) -> StatsSnapshot | None:
        """Count a decode step; every `interval` steps read out (one host sync) and reset."""
        self.steps += 1
        self._since_read += 1
        if self._since_read < self.interval:
            return None
        return self.read()

    def read(self) -> StatsSnapshot:
        sel = self.selected.tolist()
        dense = float(self.dense.item())
        rsum, rn, rmin = self.recall.tolist()
        snap = StatsSnapshot(
            steps=self._since_read,
            selected_pages=sel,
            dense_pages=dense,
            kv_bytes_read=sum(sel) * self.page_bytes + dense * self.num_layers * self.summary_bytes,
            kv_bytes_dense=dense * self.num_layers * self.page_bytes,
            recall_sum=rsum,
            recall_count=rn,
            recall_min=rmin,
        )
        self.reset()
        self.last = snap
        self._emit(snap)
        return snap

    def _emit(self, snap: StatsSnapshot) -> None:
        frac = snap.per_layer_fraction()
        logger.info(
            "PSA decode stats over %d steps: KV read %.1f%% of dense (%.2f GB vs %.2f GB); "
            "selected fraction per layer min %.3f mean %.3f max %.3f",
            snap.steps,
            100 * snap.read_fraction,
            snap.kv_bytes_read / 1e9,
            snap.kv_bytes_dense / 1e9,
            min(frac) if frac else 0.0,
            sum(frac) / len(frac) if frac else 0.0,
            max(frac) if frac else 0.0,
        )
        if snap.recall_mean is not None:
            logger.info("PSA attention-mass recall: mean %.4f min %.4f", snap.recall_mean, snap.recall_min)
        if self.enable_metrics:
            self._emit_prometheus(snap, frac)

    def _emit_prometheus(self, snap: StatsSnapshot, frac: list[float]) -> None:
        # Imported late: SGLang sets PROMETHEUS_MULTIPROC_DIR before the scheduler starts, and
        # prometheus_client reads it at import.
        if self._prom is None:
            from prometheus_client import Counter, Gauge

            names = list(self.labels.keys())
            self._prom = {
                "read": Counter(
                    "sglang:psa_kv_bytes_read",
                    "KV bytes PSA decode read (selected pages + page summaries).",
                    labelnames=names,
                ),
                "dense": Counter(
                    "sglang:psa_kv_bytes_dense",
                    "KV bytes a dense decode of the same steps would have read.",
                    labelnames=names,
                ),
                "frac": Gauge(
                    "sglang:psa_kv_read_fraction",
                    "PSA KV bytes read / dense, last read-out window.",
                    labelnames=names,
                    multiprocess_mode="mostrecent",
                ),
                "sel_pages": Counter(
                    "sglang:psa_selected_pages",
                    "(request, kv head, page) units PSA decode attended, summed over layers.",
                    labelnames=names,
                ),
                "dense_pages": Counter(
                    "sglang:psa_dense_pages",
                    "(request, kv head, page) units a dense decode would attend, summed over layers.",
                    labelnames=names,
                ),
                "recall_sum": Counter(
                    "sglang:psa_recall_sum",
                    "Sum of attention-mass recall over (request, q head, layer) (--psa-measure-recall).",
                    labelnames=names,
                ),
                "recall_count": Counter(
                    "sglang:psa_recall_count",
                    "Number of recall samples summed in sglang:psa_recall_sum.",
                    labelnames=names,
                ),
                "layer": Gauge(
                    "sglang:psa_selected_page_fraction",
                    "Selected pages / all pages per layer, last read-out window.",
                    labelnames=names + ["layer"],
                    multiprocess_mode="mostrecent",
                ),
            }
        p = self._prom
        p["read"].labels(**self.labels).inc(snap.kv_bytes_read)
        p["dense"].labels(**self.labels).inc(snap.kv_bytes_dense)
        p["frac"].labels(**self.labels).set(snap.read_fraction)
        p["sel_pages"].labels(**self.labels).inc(sum(snap.selected_pages))
        p["dense_pages"].labels(**self.labels).inc(snap.dense_pages * self.num_layers)
        if snap.recall_count:
            p["recall_sum"].labels(**self.labels).inc(snap.recall_sum)
            p["recall_count"].labels(**self.labels).inc(snap.recall_count)
        for i, f in enumerate(frac):
            p["layer"].labels(**self.labels, layer=str(i + self.start_layer)).set(f)
