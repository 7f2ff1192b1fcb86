"""Tiered mode (`--psa-tiered`): the token KV pool in pinned host memory, a GPU hot-page pool for decode.

How it fits SGLang without replacing its allocator, radix tree or scheduler:
  - `profile_available_bytes` (around KVCacheConfigurator._profile_available_bytes) reports the host
    tier's size instead of the free GPU memory, so SGLang sizes its token pool, admission and radix
    cache for host capacity (--psa-host-kv-gb). The GPU bytes SGLang would have given the pool are
    kept as the hot pool's default budget.
  - `create_kv_buffers` (around MHATokenToKVPool._create_buffers_normal) allocates that pool as one
    pinned host buffer [2, L, tokens, Hkv, D] and hands SGLang per-layer CUDA views of it
    (memory/host_kv.py). Every existing kernel keeps working on those views over PCIe: the KV
    writes, FlashInfer's prefill over cached prefixes, PSA's summary updates. Token slot ids stay
    SGLang's own, so prefix sharing, locking and eviction are the radix cache's, unchanged.
  - `TieredDecode` (built by the backend) serves decode attention: the page lists PSA selected
    (from GPU-resident summaries, before any KV moves) go through DeviceTieredAttention: union per
    layer, hot-map lookup and placement (CLOCK or LRU), copies of the misses host -> pool, attention
    over pool slots through a page table. One pool of (layer, page) slots is shared by all layers and
    requests; pages that find no slot go through scratch slots, so results never depend on the pool.
  - `TieredPrefill` serves extend/prefill attention. FlashInfer's paged prefill would read the cached
    prefix over PCIe once per query tile (tens of times per chunk: ~10 s per 8k chunk of a 64k prompt
    on the H100); instead the prefix K/V is gathered once per layer into device memory and attended by
    a ragged FlashInfer call, merged with SGLang's own ragged pass over the new tokens.
  - Every KV write reaches the pool (`on_write`), so a page rewritten after the radix cache freed and
    reused it is never served stale. By default the write goes through: a decode write updates the
    resident slots (the appended page stays a hit; dropping it made it a miss of every layer and kv
    head at every step: 2,048 of the ~4,900 head-page misses a step of the 8 x 64k capacity runs), a
    prefill write also places the pages it fills whole, at low priority. --psa-no-write-through
    invalidates the written pages' slots instead (refetched on their next use).
Everything per step is device ops with static shapes: decode stays in CUDA graphs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

from .config import PSAConfig, uses_psa

logger = logging.getLogger(__name__)

# Benchmarks only: decode skips the host -> pool copies (wrong outputs) so that a run times everything
# but the transfers; with it, the fetch time a setting exposes is its step time minus this one's.
SKIP_COPY_ENV = "SGLANG_PSA_TIERED_SKIP_COPY"

# Bytes SGLang's profiler found for the device KV pool (the hot pool's default budget); set by the hook
# in the process that builds the pools.
_gpu_kv_budget: int | None = None


def host_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo; pass --psa-host-kv-gb")


def host_kv_bytes(cfg: PSAConfig) -> int:
    """The host tier's size: --psa-host-kv-gb, or half of the available host memory."""
    if cfg.host_kv_gb > 0:
        return int(cfg.host_kv_gb * 2**30)
    return host_available_bytes() // 2


def _tiered_config(server_args: Any = None) -> PSAConfig | None:
    cfg = PSAConfig.from_server_args(server_args) if server_args is not None else PSAConfig.from_env()
    if cfg is None or not cfg.tiered:
        return None
    if server_args is not None and not uses_psa(server_args):
        return None
    return cfg


# ---------------------------------------------------------------------------------- SGLang hooks
def profile_available_bytes(original, self, *args, **kwargs) -> int:
    """KVCacheConfigurator._profile_available_bytes: the host tier's bytes in tiered mode."""
    gpu_bytes = original(self, *args, **kwargs)
    cfg = _tiered_config(getattr(self, "server_args", None))
    if cfg is None:
        return gpu_bytes
    if getattr(self, "post_capture_kv_active", False):
        raise ValueError(
            "--psa-tiered sizes the KV pool before CUDA-graph capture; unset SGLang's post-capture KV "
            "sizing (SGLANG_ENABLE_POST_CAPTURE_KV_SIZING) or drop --psa-tiered"
        )
    global _gpu_kv_budget
    _gpu_kv_budget = gpu_bytes
    host = host_kv_bytes(cfg)
    avail = host_available_bytes()
    if host > 0.9 * avail:
        raise ValueError(
            f"--psa-host-kv-gb {host / 2**30:.1f} GiB does not fit the host's available memory "
            f"({avail / 2**30:.1f} GiB, 90% usable); lower --psa-host-kv-gb"
        )
    logger.info(
        "PSA tiered: token KV pool sized for %.1f GiB of pinned host memory (the device KV budget "
        "would have been %.1f GiB; it goes to the hot pool unless --psa-hot-pool-gb is set)",
        host / 2**30,
        gpu_bytes / 2**30,
    )
    return host


def create_kv_buffers(original, self) -> None:
    """MHATokenToKVPool._create_buffers_normal: in tiered mode, `host_kv_buffers(self)` instead."""
    if _tiered_config() is None:
        return original(self)
    host_kv_buffers(self)


def host_kv_buffers(pool: Any) -> None:
    """Give an MHATokenToKVPool its K/V as one pinned host buffer `pool.psa_host_kv` [2, L, T, Hkv, D]
    and per-layer CUDA views of it (on a CPU pool, the host slices themselves)."""
    from sglang_psa.memory.host_kv import cuda_view, pinned_empty

    if getattr(pool, "use_hnd", False) or getattr(pool, "kv_cache_layout", "nhd") not in ("nhd", "NHD", None):
        raise ValueError("--psa-tiered needs SGLang's default NHD KV layout; drop --kv-cache-layout")
    k_shape, v_shape = pool._kv_buffer_shapes()
    if k_shape != v_shape:
        raise ValueError(f"--psa-tiered needs equal K and V head dims, got {k_shape} and {v_shape}")
    host = pinned_empty((2, pool.layer_num, *k_shape), pool.store_dtype)
    on_gpu = torch.device(pool.device).type == "cuda"
    view = (lambda t: cuda_view(t, pool.device)) if on_gpu else (lambda t: t)
    pool.k_buffer = [view(host[0, i]) for i in range(pool.layer_num)]
    pool.v_buffer = [view(host[1, i]) for i in range(pool.layer_num)]
    pool.psa_host_kv = host
    logger.info(
        "PSA tiered: %d layers x %d token slots of KV in pinned host memory (%.1f GiB)",
        pool.layer_num,
        k_shape[0],
        host.numel() * host.element_size() / 2**30,
    )


# ---------------------------------------------------------------------------------- decode
class TieredDecode:
    """The backend's decode attention in tiered mode: DeviceTieredAttention over the host token pool.

    kv_pool: SGLang's MHATokenToKVPool built by `create_kv_buffers` (has `psa_host_kv`
    [2, L, T, Hkv, D]); max_rows: the largest decode batch; width: PSA's page-list width W.
    """

    def __init__(self, cfg: PSAConfig, kv_pool: Any, page_size: int, max_rows: int, width: int,
                 device: torch.device, reserve_bytes: int = 0):  # fmt: skip
        from sglang_psa.memory.device_tiered import DeviceTieredAttention
        from sglang_psa.memory.hot_pool import HostTier

        host = getattr(kv_pool, "psa_host_kv", None)
        if host is None:
            raise RuntimeError(
                "--psa-tiered: SGLang's KV pool is not in host memory (the PSA pool hook did not run; "
                "is the sglang-psa plugin installed in this environment?)"
            )
        self.cfg, self.page_size = cfg, page_size
        self.start_layer = int(getattr(kv_pool, "start_layer", 0))
        nl, tokens, hkv, d = host.shape[1:]
        if tokens % page_size:
            raise ValueError(f"host KV rows {tokens} are not whole pages of {page_size}")
        num_pages = tokens // page_size
        shape = (nl, num_pages, page_size, hkv, d)
        tier = HostTier.wrap(host[0].view(shape), host[1].view(shape))  # SGLang's buffer, no copy
        # default: SGLang's KV budget less what tiered mode adds on the GPU and SGLang did not count
        # (reserve_bytes: the page summaries, sized by the host tier, and prefill workspaces)
        budget = int(cfg.hot_pool_gb * 2**30)
        if budget <= 0:
            budget = max(0, int(0.9 * (_gpu_kv_budget or 0)) - reserve_bytes)
            if not _gpu_kv_budget:
                logger.warning("PSA tiered: no device KV budget recorded; the hot pool gets no slots")
        per_head = cfg.hot_granularity == "head"
        slot_bytes = 2 * page_size * (1 if per_head else hkv) * d * host.element_size()
        union_width = DeviceTieredAttention.union_width(max_rows, hkv, width, num_pages, head_pages=per_head)
        capacity = max(0, budget // slot_bytes - (1 + union_width))  # less the sink and the scratch slots
        self.attn = DeviceTieredAttention.build(capacity, tier, union_width, device, head_pages=per_head,
                                                policy=cfg.hot_policy, backend="triton",
                                                prefetch_programs=cfg.prefetch_programs or None,
                                                miss_path=cfg.miss_path,
                                                pin_window=(cfg.sink_pages, cfg.local_pages)
                                                if cfg.hot_pin_window else None,
                                                quota=cfg.hot_quota, quota_interval=cfg.hot_quota_interval,
                                                quota_smoothing=cfg.hot_quota_smoothing)  # fmt: skip
        self.slot_bytes = slot_bytes
        self.copy = os.environ.get(SKIP_COPY_ENV, "") in ("", "0")
        if not self.copy:
            logger.warning("PSA tiered: %s is set: decode skips its host copies and returns WRONG tokens "
                           "(timing runs only)", SKIP_COPY_ENV)  # fmt: skip
        self._steps = 0
        self._last = None
        self.last_report: dict[str, float] | None = None
        self.metric_labels: dict[str, str] | None = None  # set by the backend with --enable-metrics
        logger.info(
            "PSA tiered: hot pool %d slots of one %s + %d scratch (%.2f GiB of GPU memory) over %d "
            "host pages x %d layers; placement %s, per-layer quotas %s, prefetch %s, misses read from %s, "
            "sink / window %s",
            capacity, "kv head's page" if per_head else "page (all kv heads)", union_width,
            (capacity + 1 + union_width) * slot_bytes / 2**30, num_pages, nl, cfg.hot_policy, cfg.hot_quota,
            cfg.prefetch, cfg.miss_path, "pinned" if cfg.hot_pin_window else "not pinned",
        )  # fmt: skip

    def begin_step(self) -> None:
        """Device ops before layer 0 (recorded in the decode graph). Layer 0 has no layer before it to
        predict from: previous-step and next-step prefetch (predictions made last step) start it here."""
        first = self.cfg.prefetch in ("previous-step", "next-step") and self.copy
        self.attn.begin_step(prefetch_first=self.cfg.prefetch if first else False)

    def plan_next_step(self, layer_id: int, order: torch.Tensor, seq_lens: torch.Tensor, rpi: torch.Tensor,
                       req_to_token: torch.Tensor, page_idx: torch.Tensor, counts: torch.Tensor,
                       keep_rows: torch.Tensor | None = None) -> None:  # fmt: skip
        """--psa-prefetch next-step: after layer_id's forward, store the union of the pages just below
        its cut (select_margin over `order`, the ranking the selection used) as the layer's prediction
        for the next step, prefetched then while the layer before it computes. Runs on the prefetch
        stream, joined by the next layer's forward; the last layer's runs inline (nothing after it in
        the step could join it)."""
        from sglang_psa.kernels import select_margin

        layer = layer_id - self.start_layer
        inputs = (order, seq_lens, rpi, page_idx, counts)
        last = layer + 1 >= self.attn.pool.num_layers
        ctx = contextlib.nullcontext() if last else self.attn.on_side_stream(layer + 1, *inputs)
        with ctx:
            idx, cnt = select_margin(order, seq_lens, page_idx, counts, self.page_size,
                                     self.cfg.prefetch_margin, self.cfg.dense_below, keep_rows)  # fmt: skip
            self.attn.speculate(layer, req_to_token, rpi, idx, cnt)

    def on_write(self, layer_id: int, loc: torch.Tensor, kv_pool: Any = None, decode: bool = True,
                 k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:  # fmt: skip
        """Token slots loc of this layer were just written (kv_pool holds the new rows). Write-through
        (the default) writes the pool too: a decode write updates the resident slots, a prefill write
        also places the pages it covers whole (DeviceTieredAttention.fill). The rows are k / v
        [n, Hkv, D] when they are exactly what the host tier stored (its dtype: SGLang scales only when
        it converts), else read back from the host tier. With --psa-no-write-through, or no kv_pool,
        the written pages leave the hot pool instead."""
        layer = layer_id - self.start_layer
        if not self.cfg.write_through or kv_pool is None:
            self.attn.invalidate_layer(layer, loc // self.page_size)
            return
        host_dtype = self.attn.pool.k.dtype
        if k is None or v is None or k.dtype != host_dtype or v.dtype != host_dtype:
            k, v = kv_pool.get_key_buffer(layer_id)[loc], kv_pool.get_value_buffer(layer_id)[loc]
        k, v = k.reshape(loc.shape[0], self.attn.hkv, -1), v.reshape(loc.shape[0], self.attn.hkv, -1)
        (self.attn.write_through if decode else self.attn.fill)(layer, loc, k, v)

    def forward(self, layer_id, q, req_to_token, rpi, seq_lens, page_idx, counts, sm_scale) -> torch.Tensor:
        out, _lse = self.attn.forward(
            layer_id - self.start_layer, q, req_to_token, rpi, seq_lens, page_idx, counts, sm_scale,
            prefetch_next=self.cfg.prefetch if self.copy else "off", copy=self.copy,
        )  # fmt: skip
        return out

    def speculate(self, layer_id: int, req_to_token, rpi, page_idx, counts) -> None:
        """A predicted selection of layer_id (--psa-prefetch next-layer): the previous layer's forward
        prefetches its union."""
        self.attn.speculate(layer_id - self.start_layer, req_to_token, rpi, page_idx, counts)

    def on_side_stream(self, layer_id: int, *inputs: torch.Tensor):
        """Context for layer_id's speculative selection: on the prefetch stream, joined by its forward."""
        return self.attn.on_side_stream(layer_id - self.start_layer, *inputs)

    def report(self, every: int) -> dict[str, float] | None:
        """Every `every` eager decode steps: hit rate and bytes moved since the last report (one host
        read of the device counters), logged, returned and kept as `last_report`."""
        self._steps += 1
        if self._steps % every:
            return None
        now = self.attn.stats()
        last, self._last = self._last or dict.fromkeys(now, 0), now
        d = {k: now[k] - last[k] for k in now}
        moved = (d["fetched"] + d["overflow"] + d["prefetched"]) * self.slot_bytes
        misses = d["fetched"] + d["overflow"]
        rep = {
            "steps": every,
            "hit_rate": d["hits"] / max(d["needed"], 1),
            # units moved on the side stream, overlapped with the previous layer's compute
            "prefetch_share": d["prefetched"] / max(d["prefetched"] + misses, 1),
            "pages_needed_per_step": d["needed"] / every,
            "overflow_pages_per_step": d["overflow"] / every,
            "mib_fetched_per_step": moved / every / 2**20,
            "pages_filled": d["filled"],  # by prefill writes in the window (--psa-write-through)
        }
        quotas = self.attn.pool.quotas()
        if quotas is not None:  # --psa-hot-quota: the smallest and largest layer share of the pool
            cap = max(self.attn.pool.capacity, 1)
            rep["quota_share_min"] = min(quotas) / cap
            rep["quota_share_max"] = max(quotas) / cap
        logger.info("PSA tiered: %s", ", ".join(f"{k} {v:.3g}" for k, v in rep.items()))
        self.last_report = rep
        if self.metric_labels is not None:
            _emit_prometheus(self.metric_labels, d, moved, rep["hit_rate"])
        return rep


_PROM: dict[str, Any] = {}  # one set of metric objects per process (prometheus_client refuses twins)


def _emit_prometheus(labels: dict[str, str], delta: dict[str, int], moved_bytes: int, hit_rate: float):
    """The report's window as Prometheus counters (imported late: SGLang sets the multiprocess dir
    before the scheduler starts)."""
    if not _PROM:
        from prometheus_client import Counter, Gauge

        names = list(labels)
        for key, doc in (
            ("needed", "(layer, page) units tiered decode attended (pool hits + fetched + overflow)"),
            ("hits", "units found in the GPU hot pool"),
            ("fetched", "units copied from host memory into pool slots"),
            ("overflow", "units copied from host memory into scratch slots (no pool slot free)"),
            ("prefetched", "units copied ahead of their layer on the side stream (--psa-prefetch)"),
            ("filled", "units placed from prefill writes on the GPU (--psa-write-through)"),
        ):
            _PROM[key] = Counter(f"sglang:psa_tiered_{key}_pages", f"PSA tiered: {doc}.", labelnames=names)
        _PROM["bytes"] = Counter(
            "sglang:psa_tiered_fetched_bytes", "PSA tiered: bytes copied host -> GPU.", labelnames=names
        )
        _PROM["hit_rate"] = Gauge(
            "sglang:psa_tiered_hit_rate", "PSA tiered: hot-pool hit rate, last report window.",
            labelnames=names, multiprocess_mode="mostrecent",
        )  # fmt: skip
    for key, n in delta.items():
        _PROM[key].labels(**labels).inc(n)
    _PROM["bytes"].labels(**labels).inc(moved_bytes)
    _PROM["hit_rate"].labels(**labels).set(hit_rate)


def _merge_state(o1, s1, o2, s2):
    """SGLang's guarded merge (FlashInfer's CUDA merge cannot launch above ~1024 / (D / vec) heads)."""
    try:
        from sglang.srt.layers.attention.flashinfer_backend import _safe_merge_state
    except ImportError:  # another SGLang layout: FlashInfer's own
        from flashinfer import merge_state as _safe_merge_state
    return _safe_merge_state(o1, s1, o2, s2)


class TieredPrefill:
    """Extend attention when the KV pool is in host memory (see the module docstring).

    Per batch (`plan`, host lists SGLang already has): the token slots of every request's cached
    prefix, and a ragged FlashInfer wrapper planned for (new tokens x prefix tokens). Per layer
    (`forward`): SGLang's ragged pass over the new tokens (causal, the dense backend's own planned
    wrapper, so a batch without prefixes is computed exactly as in resident mode), one gather of the
    prefix K/V from host memory (each byte crosses PCIe once), a ragged non-causal pass over it, and
    FlashInfer's merge_state. Without FlashInfer's ragged path (CPU tests, deterministic mode) the dense
    backend's own forward_extend runs instead: correct, only slower.
    """

    def __init__(self, dense: Any, req_to_token: torch.Tensor, device: torch.device):
        self.dense, self.req_to_token, self.device = dense, req_to_token, device
        self.wrapper = None
        if hasattr(dense, "prefill_wrapper_ragged") and device.type == "cuda":
            from flashinfer import BatchPrefillWithRaggedKVCacheWrapper

            self.workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
            self.wrapper = BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD")
        self.prefix_slots: torch.Tensor | None = None
        self.no_prefix_rows: torch.Tensor | None = None
        self.indptr: tuple[torch.Tensor, torch.Tensor] | None = None
        self.planned: Any = None

    def plan(self, fb: Any) -> None:
        """After the dense backend planned this extend batch: the prefix slots and the prefix pass."""
        self.prefix_slots, self.no_prefix_rows, self.planned, self.indptr = None, None, None, None
        md = getattr(self.dense, "forward_metadata", None)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if self.wrapper is None or not getattr(md, "use_ragged", False) or capturing:
            return
        self.planned = fb  # forward() takes our path only for the batch planned here
        if md.extend_no_prefix:
            return
        pre, new = list(fb.extend_prefix_lens_cpu), list(fb.extend_seq_lens_cpu)
        rows = fb.req_pool_indices.tolist()
        # rows of requests without a cached prefix keep the causal pass alone (an empty KV segment
        # in the prefix pass is not relied on)
        if not all(pre):
            flags = torch.repeat_interleave(torch.tensor([p == 0 for p in pre]), torch.tensor(new))
            self.no_prefix_rows = flags.to(self.device)[:, None, None]
        self.prefix_slots = torch.cat([self.req_to_token[r, :p] for r, p in zip(rows, pre)]).long()
        qo = torch.tensor([0, *new], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)
        kv = torch.tensor([0, *pre], dtype=torch.int32).cumsum(0, dtype=torch.int32).to(self.device)
        self.indptr = (qo, kv)  # planned by the first layer's forward, which knows the head shapes

    def forward(self, q, k, v, layer, fb, save_kv_cache: bool, kv_pool: Any) -> torch.Tensor:
        ours = self.planned is fb and k is not None
        if not ours or getattr(layer, "sliding_window_size", -1) not in (-1, None):
            return self.dense.forward_extend(q, k, v, layer, fb, save_kv_cache)
        hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
        q3, k3, v3 = q.contiguous().view(-1, hq, d), k.view(-1, hkv, d), v.view(-1, hkv, layer.v_head_dim)
        cap = getattr(layer, "logit_cap", 0.0) or 0.0
        kw = {"sm_scale": layer.scaling, "logits_soft_cap": cap}
        if self.prefix_slots is None:
            o = self.dense.prefill_wrapper_ragged.forward(q3, k3, v3, causal=True, **kw)
        else:
            if self.indptr is not None:
                self.wrapper.begin_forward(*self.indptr, hq, hkv, d, q_data_type=q3.dtype)
                self.indptr = None
            o1, s1 = self.dense.prefill_wrapper_ragged.forward_return_lse(q3, k3, v3, causal=True, **kw)
            kp = kv_pool.get_key_buffer(layer.layer_id)[self.prefix_slots]  # one PCIe read per byte
            vp = kv_pool.get_value_buffer(layer.layer_id)[self.prefix_slots]
            o2, s2 = self.wrapper.forward_return_lse(q3, kp, vp, causal=False, **kw)
            o, _ = _merge_state(o1, s1, o2, s2)
            if self.no_prefix_rows is not None:
                o = torch.where(self.no_prefix_rows, o1, o)
        if save_kv_cache:
            kv_pool.set_kv_buffer(layer, fb.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
        return o.view(-1, hq * layer.v_head_dim)
