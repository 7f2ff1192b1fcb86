"""PSA options: one dataclass, one validation path.

The same `PSAConfig` is built from `--psa-*` flags (CLI or `--config` YAML), from
`Engine(psa_tau=...)` keyword arguments, or from the environment. `validate()` checks the options
alone, `validate_against_server()` against the rest of the server configuration. Every error is a
ValueError naming the offending option and the fix, so the server stops at start with one clear
line instead of failing deep inside a kernel.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

MODES = ("estimated", "progressive", "certified", "topk")
HOT_POLICIES = ("clock", "lru")  # DevicePagePool placement policies (memory/device_pool.py)
HOT_GRANULARITIES = ("page", "head")  # a hot-pool slot holds a page of all kv heads, or of one
HOT_QUOTAS = ("off", "adaptive")  # DevicePagePool per-layer quotas (memory/device_pool.py)
REUSE_MODES = ("estimated", "topk")  # modes that store a page list --psa-reuse-steps can reuse
# A page's estimated mass logit (kernels/page_bounds.py): the Quest interval's midpoint, or the
# log-normal estimate (midpoint + half the logit variance, from the key ranges). Value: variance_weight.
MASS_ESTIMATES = {"center": 0.0, "lognormal": 1.0 / 24.0}
RANK_BY = ("bound", "estimate")  # estimated mode: order pages by Quest bound or by the mass estimate
# tiered: what layer l+1's side-stream prefetch fetches while layer l computes (memory/device_tiered.py)
PREFETCH_MODES = ("off", "previous-step", "next-layer", "next-step")
# tiered: where decode attention reads a page the hot pool missed (memory/device_tiered.py)
MISS_PATHS = ("pool", "host", "split")
# Page sizes the kernels are written for (tl.arange needs powers of two; 16 keeps the bound cost
# at 1/16 of the K+V bytes, 128 is the largest tile the decode kernel keeps in registers).
MIN_PAGE_SIZE = 16
MAX_PAGE_SIZE = 128
ENV_VAR = "SGLANG_PSA_CONFIG"
# Attribute attached to ServerArgs. A leading underscore: SGLang's ServerArgs.__setattr__ only
# freezes public fields after resolution, and pickling (spawn of the scheduler) keeps __dict__.
SERVER_ARGS_ATTR = "_psa_config"


def _bad(flag: str, want: str, got: Any) -> ValueError:
    return ValueError(f"--psa-{flag} must be {want}, got {got!r}")


def _int_at_least(x: Any, lo: int) -> bool:
    """x is an int (a bool is not) and x >= lo."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


@dataclasses.dataclass
class PSAConfig:
    """PSA decode options. Field `foo_bar` is the CLI flag `--psa-foo-bar`."""

    tau: float = 0.9  # attention-mass threshold; 1.0 selects every page (dense result)
    mode: str = "estimated"  # estimated | progressive | certified | topk
    topk: int = 64  # pages per (request, kv head) in topk mode
    min_pages: int = 0
    max_pages: int = 256  # budget cap per (request, kv head); also the width of page arrays
    sink_pages: int = 1
    local_pages: int = 4
    page_size: int = 32  # used as --page-size when the user gives none
    block_size: int = 0  # logical sub-page for the bounds; 0 means the page size (no sub-pages)
    reuse_steps: int = 1  # a selection serves up to this many decode steps (1 = select every step)
    dense_below: int = 2048  # requests shorter than this (tokens) decode densely
    first_round_pages: int = 16  # progressive / certified modes: pages in the first round
    mass_estimate: str = "center"  # center | lognormal: page mass that estimated / progressive stop on
    rank_by: str = "bound"  # bound | estimate: page order of estimated mode
    # decoder layers that read only their sink pages and local window (LServe's streaming heads, a
    # whole layer at a time), e.g. "0-2,5"; the others select as --psa-mode says
    streaming_layers: str = ""
    stats: bool = False  # accumulate per-layer selection statistics on the device
    stats_interval: int = 256  # decode steps between two read-outs (the only host sync)
    measure_recall: bool = False  # stats also report attention-mass recall (dense pass; eval only)
    access_log: str = ""  # directory for the selection access log ("" = off); see access_log.py
    access_log_requests: int = 4  # requests traced at a time when the access log is on
    access_log_source: str = "server"  # label stored in the log (e.g. dummy-weights-server)
    # tiered mode (sglang_psa/tiered.py): the token KV pool lives in pinned host memory, decode reads
    # the selected pages through a GPU hot-page pool shared by all layers and requests
    tiered: bool = False
    host_kv_gb: float = 0.0  # host tier size per tp rank; 0 = half of the host's available memory
    hot_pool_gb: float = 0.0  # GPU hot pool size; 0 = what SGLang would have given the KV pool
    hot_policy: str = "clock"  # clock | lru
    hot_granularity: str = "page"  # page (all kv heads per slot) | head (one kv head per slot)
    prefetch: str = "off"  # tiered: off | previous-step | next-layer | next-step (module docstring)
    prefetch_margin: int = 32  # next-step: pages below each (request, kv head)'s cut fetched ahead
    # tiered: "pool" copies a layer's misses into the pool before its attention; "host" attends them
    # straight from pinned host memory and copies them into the pool beside it (side stream); "split"
    # (default) copies them into their slots beside the resident pages' attention, then a second pass.
    # H200, 8 x 64k, H100-sized pool: split 610 tok/s, pool 554, host slower than pool in bench_tiered
    # (tiered-split2-5c7c505-h200.json)
    miss_path: str = "split"
    # tiered: programs of the side-stream copies, prefetch and the host / split miss paths' copies (0 =
    # the main copy's grid, 8 per SM). The copy is PCIe-bound; a full grid takes SMs from the layer it
    # overlaps (bench_fetch_overlap.py, H200, 640 head pages a layer: 37% of the fetch hidden with 1056
    # programs, 79% with 66)
    prefetch_programs: int = 66
    # tiered: KV writes update the pool instead of dropping its copies: decode writes the resident
    # slots of the written page (the page a step appends to stays a hit), prefill also places the
    # pages it writes whole, at low priority. H200, 8 x 64k, H100-sized pool: 3.99 ms of exposed fetch
    # a step vs 5.93 dropping them (tiered-writes-b918172-h200.json); --psa-no-write-through drops them
    write_through: bool = True
    # tiered: pin each request's --psa-sink-pages first and --psa-local-pages last pages in the hot
    # pool (leases renewed by each step's use, so a page that leaves the window, or a finished
    # request's, is released a step later). Off by default: the pool already keeps them unless it
    # holds less than about one step's pages; replays (pool-policies-20261203.json) see pinning help
    # only such tight pools and cost hit rate at 2x a step's pages
    hot_pin_window: bool = False
    # tiered: per-layer hot-pool quotas that follow each layer's pages per step (an exponential
    # average, weight --psa-hot-quota-smoothing on the newest step, re-derived every
    # --psa-hot-quota-interval steps); a layer under its quota reclaims slots from layers over theirs.
    # Off by default: replayed through this device pool (CLOCK) the recorded selections gain 0 to 0.036
    # hit rate at 1-2x a step's pages in seven rows of eight and lose 0.03 in one
    # (pool-quota-device-*-20261205.json), for a longer sequential scan per placement whose GPU cost is
    # not measured yet
    hot_quota: str = "off"
    hot_quota_interval: int = 8
    hot_quota_smoothing: float = 0.5

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> PSAConfig:
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown PSA option(s) {unknown}; known: "
                + ", ".join(f"--psa-{n.replace('_', '-')}" for n in cls.field_names())
            )
        return cls(**d)

    @classmethod
    def from_namespace(cls, ns: Any) -> PSAConfig:
        """From a Namespace holding `psa_<field>` attributes (missing ones keep defaults)."""
        d = {}
        for name in cls.field_names():
            key = f"psa_{name}"
            if hasattr(ns, key) and getattr(ns, key) is not None:
                d[name] = getattr(ns, key)
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_env(cls) -> PSAConfig | None:
        raw = os.environ.get(ENV_VAR)
        return cls.from_dict(json.loads(raw)) if raw else None

    @classmethod
    def from_server_args(cls, server_args: Any) -> PSAConfig:
        """The config the launcher attached to ServerArgs; else the environment; else defaults."""
        d = getattr(server_args, SERVER_ARGS_ATTR, None)
        if d is not None:
            return d if isinstance(d, PSAConfig) else cls.from_dict(d)
        return cls.from_env() or cls()

    # ------------------------------------------------------------------ derived values
    def effective_block_size(self, page_size: int) -> int:
        return self.block_size or page_size

    def select_width(self) -> int:
        """Static width W of the page_idx arrays select_pages returns."""
        return self.topk if self.mode == "topk" else self.max_pages

    def streaming_layer_ids(self) -> frozenset[int]:
        """--psa-streaming-layers "0-2,5" -> {0, 1, 2, 5}; a ValueError names the option."""
        ids: set[int] = set()
        for item in filter(None, str(self.streaming_layers).replace(" ", "").split(",")):
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
            if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
                raise _bad("streaming-layers", "layer ids and ranges like 0-2,5", self.streaming_layers)
            ids.update(range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1))
        return frozenset(ids)

    def dense_pages(self, page_size: int) -> int:
        """Pages a request just below dense_below spans."""
        return -(-max(self.dense_below - 1, 0) // page_size)

    # ------------------------------------------------------------------ validation
    def validate(self, page_size: int | None = None) -> PSAConfig:
        """Check the options alone (and against page_size when given). Returns self."""

        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise _bad("tau", "a number in (0, 1]", self.tau)
        if not (0.0 < float(self.tau) <= 1.0):
            raise _bad("tau", "in (0, 1]", self.tau)
        if self.mode not in MODES:
            raise _bad("mode", f"one of {', '.join(MODES)}", self.mode)
        if self.mass_estimate not in MASS_ESTIMATES:
            raise _bad("mass-estimate", f"one of {', '.join(MASS_ESTIMATES)}", self.mass_estimate)
        if self.rank_by not in RANK_BY:
            raise _bad("rank-by", f"one of {', '.join(RANK_BY)}", self.rank_by)
        if self.rank_by == "estimate" and self.mode != "estimated":
            raise ValueError(
                "--psa-rank-by estimate orders the pages of --psa-mode estimated, not --psa-mode "
                f"{self.mode} "
                "(progressive / certified visit pages in bound order, topk is Quest's bound ranking); "
                "use --psa-mode estimated or --psa-rank-by bound"
            )
        self.streaming_layer_ids()
        for name in ("min_pages", "sink_pages", "local_pages", "dense_below"):
            if int(getattr(self, name)) < 0:
                raise _bad(name.replace("_", "-"), ">= 0", getattr(self, name))
        for name in (
            "max_pages", "topk", "reuse_steps", "first_round_pages", "stats_interval", "access_log_requests",
        ):  # fmt: skip
            if int(getattr(self, name)) < 1:
                raise _bad(name.replace("_", "-"), ">= 1", getattr(self, name))
        if self.min_pages > self.max_pages:
            raise ValueError(
                f"--psa-min-pages ({self.min_pages}) must not exceed --psa-max-pages "
                f"({self.max_pages}); raise --psa-max-pages or lower --psa-min-pages"
            )
        if self.sink_pages + self.local_pages > self.select_width():
            flag = "topk" if self.mode == "topk" else "max-pages"
            raise ValueError(
                f"--psa-sink-pages + --psa-local-pages ({self.sink_pages + self.local_pages}) must "
                f"fit in --psa-{flag} ({self.select_width()}); raise --psa-{flag}"
            )
        if not _is_pow2(self.page_size) or not (MIN_PAGE_SIZE <= self.page_size <= MAX_PAGE_SIZE):
            raise _bad("page-size", f"a power of two in {MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}", self.page_size)
        if self.block_size and not _is_pow2(self.block_size):
            raise _bad("block-size", "0 (= page size) or a power of two", self.block_size)
        if self.reuse_steps > 1 and self.mode not in REUSE_MODES:
            # progressive / certified visit pages in rounds inside the decode kernel: there is no
            # stored page list a later step could reuse.
            raise ValueError(
                f"--psa-reuse-steps {self.reuse_steps} reuses a stored page selection, which --psa-mode "
                f"{self.mode} does not make (it visits pages in rounds); use --psa-mode "
                f"{' or '.join(REUSE_MODES)}, or --psa-reuse-steps 1"
            )
        if self.prefetch not in PREFETCH_MODES:
            raise _bad("prefetch", f"one of {', '.join(PREFETCH_MODES)}", self.prefetch)
        if self.hot_quota not in HOT_QUOTAS:
            raise _bad("hot-quota", f"one of {', '.join(HOT_QUOTAS)}", self.hot_quota)
        # options of --psa-tiered's host tier and hot pool; write_through (on by default) is inert elsewhere
        for on, what, drop in (
            (self.prefetch != "off", f"--psa-prefetch {self.prefetch} fetches pages from the host tier",
             "--psa-prefetch"),
            (self.hot_pin_window, "--psa-hot-pin-window pins pages in the hot pool", "it"),
            (self.hot_quota != "off",
             f"--psa-hot-quota {self.hot_quota} sets per-layer quotas in the hot pool", "it"),
        ):  # fmt: skip
            if on and not self.tiered:
                raise ValueError(f"{what} of --psa-tiered; add --psa-tiered or drop {drop}")
        if not _int_at_least(self.hot_quota_interval, 1):
            raise _bad("hot-quota-interval", "an integer >= 1 (decode steps)", self.hot_quota_interval)
        sm = self.hot_quota_smoothing
        if isinstance(sm, bool) or not isinstance(sm, (int, float)) or not 0.0 < sm <= 1.0:
            raise _bad("hot-quota-smoothing", "a number in (0, 1]", sm)
        if not _int_at_least(self.prefetch_programs, 0):
            raise _bad("prefetch-programs", "an integer >= 0 (0 = the default grid)", self.prefetch_programs)
        if self.miss_path not in MISS_PATHS:
            raise _bad("miss-path", f"one of {', '.join(MISS_PATHS)}", self.miss_path)
        if not _int_at_least(self.prefetch_margin, 1):
            raise _bad("prefetch-margin", "an integer >= 1 (pages per request and kv head)",
                       self.prefetch_margin)  # fmt: skip
        if self.tiered:
            self._validate_tiered()
        if page_size is not None:
            self.validate_page_size(page_size)
        return self

    def _validate_tiered(self) -> None:
        if self.mode not in REUSE_MODES:
            # progressive / certified read K/V inside their own decode kernel, not through a page list
            raise ValueError(
                f"--psa-tiered serves the page lists of --psa-mode {' or '.join(REUSE_MODES)}, "
                f"not --psa-mode {self.mode}; change --psa-mode or drop --psa-tiered"
            )
        for name in ("host_kv_gb", "hot_pool_gb"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise _bad(name.replace("_", "-"), "a size in GiB >= 0", v)
        for flag, value, choices in (
            ("hot-policy", self.hot_policy, HOT_POLICIES),
            ("hot-granularity", self.hot_granularity, HOT_GRANULARITIES),
        ):
            if value not in choices:
                raise _bad(flag, f"one of {', '.join(choices)}", value)
        if self.hot_quota != "off" and self.hot_policy != "clock":
            raise ValueError(
                f"--psa-hot-quota {self.hot_quota} is built into the clock placement; use --psa-hot-policy "
                f"clock (the default) or drop --psa-hot-quota, got --psa-hot-policy {self.hot_policy}"
            )

    def validate_page_size(self, page_size: int | None) -> None:
        if page_size is None or not _is_pow2(page_size) or not (MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE):
            raise ValueError(
                f"--attention-backend psa needs --page-size a power of two in "
                f"{MIN_PAGE_SIZE}..{MAX_PAGE_SIZE} (PSA scores whole pages), got --page-size "
                f"{page_size}; pass e.g. --page-size 32 or omit it (PSA then uses --psa-page-size)"
            )
        blk = self.effective_block_size(page_size)
        if blk > page_size or page_size % blk:
            raise ValueError(
                f"--psa-block-size ({self.block_size}) must divide --page-size ({page_size}); "
                f"use a power of two <= {page_size} or 0"
            )
        if self.dense_pages(page_size) > self.select_width():
            flag = "topk" if self.mode == "topk" else "max-pages"
            raise ValueError(
                f"--psa-dense-below {self.dense_below} spans {self.dense_pages(page_size)} "
                f"pages of {page_size} tokens, more than --psa-{flag} ({self.select_width()}) "
                "can hold; "
                f"raise --psa-{flag} to >= {self.dense_pages(page_size)} or lower --psa-dense-below"
            )


def uses_psa(server_args: Any) -> bool:
    """True when any attention phase of this server is served by PSA."""
    names = (
        getattr(server_args, "attention_backend", None),
        getattr(server_args, "decode_attention_backend", None),
        getattr(server_args, "prefill_attention_backend", None),
    )
    return "psa" in names


def decode_graphs_off(server_args: Any) -> bool:
    """True when decode runs eagerly (--disable-cuda-graph or --cuda-graph-backend-decode disabled)."""
    if getattr(server_args, "disable_cuda_graph", False):
        return True
    cfg = getattr(server_args, "cuda_graph_config", None)
    backend = getattr(getattr(cfg, "decode", None), "backend", None)
    return backend is not None and str(getattr(backend, "value", backend)).lower() == "disabled"


def validate_against_server(cfg: PSAConfig, server_args: Any, model_config: Any = None) -> None:
    """Combinations of SGLang options PSA cannot serve. One ValueError naming option and fix."""
    sa = server_args
    prefill = getattr(sa, "prefill_attention_backend", None)
    decode = getattr(sa, "decode_attention_backend", None)
    if prefill not in (None, "psa") or decode not in (None, "psa"):
        raise ValueError(
            "--attention-backend psa serves prefill and decode itself (prefill runs FlashInfer "
            "and keeps PSA's page summaries); drop --prefill-attention-backend / "
            f"--decode-attention-backend (got prefill={prefill!r}, decode={decode!r})"
        )
    cfg.validate_page_size(getattr(sa, "page_size", None))
    if cfg.measure_recall and not (cfg.stats and decode_graphs_off(sa)):
        # recall needs a dense pass over every key with a host-side length: not graph-capturable
        raise ValueError(
            "--psa-measure-recall computes exact attention for every decode step (eval only); it needs "
            "--psa-stats and --disable-cuda-graph, or drop --psa-measure-recall"
        )
    if getattr(sa, "speculative_algorithm", None):
        raise ValueError(
            "--attention-backend psa does not support speculative decoding "
            f"(--speculative-algorithm {sa.speculative_algorithm}); remove --speculative-algorithm "
            "or use --attention-backend flashinfer"
        )
    kv_dtype = getattr(sa, "kv_cache_dtype", "auto")
    if kv_dtype not in ("auto", "bfloat16", "float16", "bf16", "fp16", None):
        raise ValueError(
            f"--attention-backend psa needs a 16-bit KV cache, got --kv-cache-dtype {kv_dtype}; "
            "use --kv-cache-dtype auto"
        )
    if getattr(sa, "enable_hierarchical_cache", False):
        # HiCache loads pages back from host memory without set_kv_buffer: summaries would go stale.
        raise ValueError(
            "--attention-backend psa does not support --enable-hierarchical-cache yet (pages "
            "loaded back from host skip PSA's page summaries); remove --enable-hierarchical-cache"
        )
    radix = getattr(sa, "radix_cache_backend", None)
    if cfg.tiered and radix != "psa":
        raise ValueError(
            "--psa-tiered keeps the token KV pool in host memory and needs PSA's radix cache: add "
            f"--radix-cache-backend psa (got --radix-cache-backend {radix!r})"
        )
    if cfg.tiered and int(getattr(sa, "tp_size", 1) or 1) > 1 and not cfg.host_kv_gb:
        raise ValueError(
            "--psa-tiered with --tp-size > 1: every rank pins its own host tier; give "
            "--psa-host-kv-gb (GiB per rank) so the ranks together fit the host's memory"
        )
    if cfg.tiered and getattr(sa, "enable_mixed_chunk", False):
        # a mixed batch would gather every decoding request's whole context on every layer
        raise ValueError("--psa-tiered does not support --enable-mixed-chunk; remove --enable-mixed-chunk")
    if getattr(sa, "enable_hisparse", False):
        raise ValueError(
            "--attention-backend psa and --enable-hisparse are two sparse decoders; remove --enable-hisparse"
        )
    if getattr(sa, "enable_two_batch_overlap", False) or getattr(sa, "enable_pdmux", False):
        raise ValueError(
            "--attention-backend psa does not support --enable-two-batch-overlap / "
            "--enable-pdmux; remove the flag"
        )
    if getattr(sa, "enable_dp_attention", False):
        raise ValueError("--attention-backend psa does not support --enable-dp-attention yet; remove it")
    if model_config is not None:
        validate_model(cfg, model_config)


def validate_model(cfg: PSAConfig, model_config: Any) -> None:
    arch = getattr(model_config, "attention_arch", None)
    if getattr(arch, "name", str(arch)) == "MLA" or getattr(model_config, "use_mla", False):
        raise ValueError(
            "--attention-backend psa serves GQA/MHA models; this model uses MLA "
            "(DeepSeek-style latent attention); use --attention-backend flashinfer or flashmla, "
            "or SGLang's --enable-hisparse for DSA models"
        )
    if getattr(model_config, "is_encoder_decoder", False):
        raise ValueError(
            "--attention-backend psa does not support encoder-decoder models (cross attention); "
            "use --attention-backend flashinfer"
        )
    if getattr(model_config, "is_hybrid_swa", False):
        raise ValueError(
            "--attention-backend psa does not support sliding-window (hybrid SWA) models yet; "
            "use --attention-backend flashinfer"
        )
    hf = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    cap = getattr(hf, "attn_logit_softcapping", None) if hf is not None else None
    if cap:
        raise ValueError(
            f"--attention-backend psa does not support attention logit soft-capping "
            f"(attn_logit_softcapping={cap}); use --attention-backend flashinfer"
        )
    n_layers = getattr(model_config, "num_hidden_layers", None)
    streaming = cfg.streaming_layer_ids()
    if n_layers is not None and streaming and max(streaming) >= int(n_layers):
        raise ValueError(
            f"--psa-streaming-layers {cfg.streaming_layers} names layer {max(streaming)}, but the model "
            f"has {n_layers} decoder layers (0..{int(n_layers) - 1})"
        )
    head_dim = getattr(model_config, "head_dim", None)
    if head_dim is not None and head_dim not in (64, 128, 256):
        raise ValueError(
            f"--attention-backend psa supports head_dim 64, 128 or 256, this model has {head_dim}; "
            "use --attention-backend flashinfer"
        )
