"""SGLang plugin entry point (`sglang.srt.plugins` group, see pyproject.toml).

SGLang calls `register()` through `load_plugins()` in every process that builds a server: the
launcher (`launch_server`, `sglang serve`, `Engine`) before it parses arguments, and each scheduler
subprocess before it builds the model runner. `register()` therefore only records things and never
imports heavy modules (FlashInfer, kernels) itself: the backend factory imports them lazily.

How PSA options reach the scheduler: the `--psa-*` values become a `PSAConfig` that is attached to
the `ServerArgs` instance as `_psa_config` (a plain dict; ServerArgs is pickled to the scheduler
with spawn, and pickling keeps `__dict__`), and is also exported as `SGLANG_PSA_CONFIG` (inherited
by every child process) as a fallback for code paths that rebuild ServerArgs from its fields.
"""

from __future__ import annotations

import argparse
import contextvars
import logging
import os
from typing import Any

from .config import (
    ENV_VAR,
    HOT_QUOTAS,
    MASS_ESTIMATES,
    MODES,
    PREFETCH_MODES,
    RANK_BY,
    SERVER_ARGS_ATTR,
    PSAConfig,
    uses_psa,
    validate_against_server,
)

logger = logging.getLogger(__name__)

BACKEND_NAME = "psa"
_SA = "sglang.srt.server_args.ServerArgs"
# Config parsed from the CLI, visible to the ServerArgs.__init__ hook while from_cli_args runs.
_cli_config: contextvars.ContextVar[PSAConfig | None] = contextvars.ContextVar("psa_cli_config", default=None)
_registered = False


# ---------------------------------------------------------------------------------- CLI flags
_FLAG_HELP = {
    "tau": "PSA attention-mass threshold in (0, 1]; 1.0 selects every page (dense result).",
    "mode": "PSA selection: estimated (one pass; mass predicted from page summaries), progressive "
    "(rounds in bound order, exact mass of visited pages, tail estimated), certified (rounds until "
    "the captured mass provably reaches tau) or topk (fixed page budget).",
    "topk": "PSA pages per request and kv head in --psa-mode topk.",
    "min_pages": "PSA lower bound on selected pages per request and kv head.",
    "max_pages": "PSA budget cap: most pages selected per request and kv head.",
    "sink_pages": "PSA pages at the start of the context that are always kept.",
    "local_pages": "PSA most recent pages that are always kept.",
    "page_size": "--page-size PSA uses when none is given (power of two in 16..128).",
    "block_size": "PSA logical sub-page size for the page bounds (0 = page size).",
    "reuse_steps": "PSA (estimated / topk modes): a page selection serves up to this many decode steps "
    "(LServe-style reuse; 1 = select every step). A request reselects early when its page count grows, "
    "its batch row changes, or after any prefill/extend. Costs rows x layers x kv heads x W x 4 bytes "
    "of GPU memory (rows = the largest CUDA-graph batch size, and the largest eager batch beyond it; "
    "W = --psa-max-pages, or --psa-topk in topk mode).",
    "dense_below": "PSA: requests shorter than this many tokens decode densely.",
    "first_round_pages": "PSA progressive/certified modes: pages visited in the first round.",
    "mass_estimate": "PSA page-mass estimate that estimated mode stops on and progressive mode "
    "estimates the unvisited tail with: center (q at the midpoint of the page's key range) or lognormal "
    "(center + half the logit variance from the key ranges; tracks peaked pages, selects fewer).",
    "streaming_layers": "PSA: decoder layers (ids and ranges, e.g. 0-2,5) that read only their sink pages "
    "and local window, as LServe's streaming heads; the other layers select as --psa-mode says.",
    "rank_by": "PSA estimated mode: order pages by their Quest upper bound (bound) or by the mass "
    "estimate (estimate).",
    "stats": "PSA: collect per-layer selection statistics (logged; Prometheus with --enable-metrics).",
    "stats_interval": "PSA: decode steps between two statistics read-outs.",
    "measure_recall": "PSA: also report the attention-mass recall of every selection against exact "
    "softmax (a dense pass per layer; for evaluation, needs --psa-stats and --disable-cuda-graph).",
    "access_log": "PSA: directory for a bounded, rotated log of selected pages ('' = off).",
    "access_log_requests": "PSA: how many requests the access log traces at a time.",
    "access_log_source": "PSA: source label written into the access log.",
    "tiered": "PSA tiered mode: SGLang's token KV pool lives in pinned host memory (its capacity is "
    "--psa-host-kv-gb, so more and longer requests are admitted) and decode reads the selected pages "
    "through one GPU hot-page pool shared by all layers and requests. Needs --radix-cache-backend psa.",
    "host_kv_gb": "PSA tiered: GiB of pinned host memory for the token KV pool, per tensor-parallel "
    "rank (0 = half of the host's available memory; give it explicitly with --tp > 1).",
    "hot_pool_gb": "PSA tiered: GiB of GPU memory for the hot-page pool (0 = the KV-pool budget SGLang "
    "computes from --mem-fraction-static).",
    "hot_policy": "PSA tiered: hot-pool replacement, clock (fused Triton placement) or lru.",
    "hot_granularity": "PSA tiered: a hot-pool slot holds one page of all kv heads (page) or of one kv "
    "head (head: a miss moves only what that head reads; each head gets 1/Hkv of the pool).",
    "prefetch": "PSA tiered: while layer l computes, fetch a prediction of layer l+1's pages on a side "
    "stream: off, previous-step (the pages layer l+1 read at the previous step), next-layer (pages "
    "selected with layer l+1's query estimated from the residual stream entering layer l; Llama-style "
    "models) or next-step (the --psa-prefetch-margin pages ranked just below layer l+1's cut at the "
    "previous step, where the pages a selection gains come from).",
    "miss_path": "PSA tiered: where decode attention reads the pages the hot pool misses: pool (copy them "
    "into their pool slots first, then attend), host (attend them straight from pinned host memory "
    "over PCIe, inside the attention kernel, while their copy into the pool runs on a side stream) or "
    "split (the default: copy them into their slots on a side stream while the attention over the pages "
    "already resident runs, then attend them and merge; 1.10x pool's decode throughput on the H200).",
    "prefetch_margin": "PSA tiered, --psa-prefetch next-step: pages below each request's and kv head's "
    "selection cut that are fetched ahead for the next step.",
    "prefetch_programs": "PSA tiered: Triton programs of the side-stream copies (prefetch; with "
    "--psa-miss-path host / split also the misses' copies); 0 = the same grid as the main-stream "
    "copy, 8 per SM; fewer leave SMs to the layer the copy overlaps.",
    "write_through": "PSA tiered: KV writes go to the hot pool too instead of dropping its copies: a decode "
    "write updates the slots of the written page (the page a request appends to stays resident rather than "
    "being fetched again by every layer and kv head at every step), a prefill write also places the pages "
    "it fills whole, at low priority (a request's first decode steps find them on the GPU). On by default.",
    "hot_pin_window": "PSA tiered: pin each request's --psa-sink-pages first and --psa-local-pages last "
    "pages in the hot pool (a pin lasts while the page stays in the window, one step past it). Helps a "
    "pool that holds less than about one decode step's pages; off by default.",
    "hot_quota": "PSA tiered: per-layer hot-pool quotas, off or adaptive (each layer's share of the pool "
    "follows the pages it selects per step; a layer under its quota reclaims slots from layers over theirs, "
    "a layer at its quota evicts its own). Clock placement only; off by default.",
    "hot_quota_interval": "PSA tiered, --psa-hot-quota adaptive: decode steps between two quota updates.",
    "hot_quota_smoothing": "PSA tiered, --psa-hot-quota adaptive: weight of the newest step in each layer's "
    "average pages per step (1 = the last step only).",
}


def add_psa_cli_args(parser: argparse.ArgumentParser) -> None:
    """Add the `--psa-*` flags (store / store_true only, so SGLang's --config YAML maps to them)."""
    defaults = PSAConfig()
    group = parser.add_argument_group("PSA (sglang-psa plugin)")
    existing = {a.dest for a in parser._actions}
    for name in PSAConfig.field_names():
        dest = f"psa_{name}"
        if dest in existing:  # add_cli_args called twice on one parser
            continue
        flag = "--psa-" + name.replace("_", "-")
        default = getattr(defaults, name)
        if isinstance(default, bool):
            group.add_argument(flag, dest=dest, action="store_true", default=default, help=_FLAG_HELP[name])
            if default:  # on by default: a --psa-no-* flag turns it off
                no_flag = "--psa-no-" + name.replace("_", "-")
                group.add_argument(no_flag, dest=dest, action="store_false", help=f"Turn off {flag}.")
            continue
        kwargs: dict[str, Any] = {"type": type(default), "default": default}
        if name == "mode":
            kwargs["choices"] = list(MODES)
        elif name == "mass_estimate":
            kwargs["choices"] = list(MASS_ESTIMATES)
        elif name == "rank_by":
            kwargs["choices"] = list(RANK_BY)
        elif name == "prefetch":
            kwargs["choices"] = list(PREFETCH_MODES)
        elif name == "hot_quota":
            kwargs["choices"] = list(HOT_QUOTAS)
        group.add_argument(flag, dest=dest, help=_FLAG_HELP[name] + f" Default {default}.", **kwargs)


# ---------------------------------------------------------------------------------- hooks
def _around_add_cli_args(original, parser, *args, **kwargs):
    result = original(parser, *args, **kwargs)
    add_psa_cli_args(parser)
    return result


def _around_from_cli_args(original, cls, args, *rest, **kwargs):
    cfg = PSAConfig.from_namespace(args)
    token = _cli_config.set(cfg)
    try:
        return original(cls, args, *rest, **kwargs)
    finally:
        _cli_config.reset(token)


def _around_init(original, self, *args, **kwargs):
    """ServerArgs(...): take psa_* keyword arguments (Engine path), default the page size."""
    psa_kwargs = {k[4:]: kwargs.pop(k) for k in list(kwargs) if k.startswith("psa_")}
    cfg = _cli_config.get()
    if psa_kwargs:
        base = cfg.to_dict() if cfg is not None else {}
        base.update(psa_kwargs)
        cfg = PSAConfig.from_dict(base)
    if cfg is None:
        cfg = PSAConfig.from_env() or PSAConfig()
    wants_psa = "psa" in (
        kwargs.get("attention_backend"),
        kwargs.get("decode_attention_backend"),
        kwargs.get("prefill_attention_backend"),
    )
    if wants_psa:
        cfg.validate()  # before SGLang resolves anything: bad flags fail first, by name
        if kwargs.get("page_size") is None and not args:
            # PSA cannot serve SGLang's default page size 1; pick ours rather than fail.
            kwargs["page_size"] = cfg.page_size
    original(self, *args, **kwargs)
    attach_config(self, cfg)
    if uses_psa(self):
        model_config = None
        try:
            model_config = self.get_model_config()
        except Exception as e:  # the backend re-checks with the runner's model config
            logger.debug("PSA: model config not available at argument time: %s", e)
        validate_against_server(cfg, self, model_config)
        os.environ[ENV_VAR] = cfg.to_json()
        logger.info("PSA config: %s", cfg.to_json())


# The decode CUDA-graph runner hands attention backends a replay view (a SimpleNamespace) without the
# request ids; the access log needs them to know which rows belong to the requests it traces.
_REPLAY_VIEW = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.build_replay_fb_view"


def _around_replay_view(original, *args, **kwargs):
    view = original(*args, **kwargs)
    fb = kwargs["forward_batch"] if "forward_batch" in kwargs else (args[0] if args else None)
    if not hasattr(view, "rids"):
        view.rids = getattr(fb, "rids", None)
    return view


def attach_config(server_args: Any, cfg: PSAConfig) -> None:
    # object.__setattr__: ServerArgs freezes public fields after resolution; ours is private.
    object.__setattr__(server_args, SERVER_ARGS_ATTR, cfg.to_dict())


# Tiered mode (--psa-tiered): the token KV pool in pinned host memory (sglang_psa/tiered.py). The
# hooks pass through unless this process's PSA config asks for tiered mode.
_PROFILE = "sglang.srt.mem_cache.kv_cache_configurator.KVCacheConfigurator._profile_available_bytes"
_KV_BUFFERS = "sglang.srt.mem_cache.memory_pool.MHATokenToKVPool._create_buffers_normal"


def _around_profile(original, self, *args, **kwargs):
    from .tiered import profile_available_bytes

    return profile_available_bytes(original, self, *args, **kwargs)


def _around_kv_buffers(original, self):
    from .tiered import create_kv_buffers

    return create_kv_buffers(original, self)


# ---------------------------------------------------------------------------------- factories
def create_psa_backend(runner):
    from .backend import PSAAttnBackend

    return PSAAttnBackend(runner)


def psa_radix_cache_factory(ctx):
    from .radix_cache import build_psa_radix_cache

    return build_psa_radix_cache(ctx)


def register() -> None:
    """Entry point: register the backend, the radix cache backend, the CLI flags. Idempotent."""
    global _registered
    if _registered:
        return
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.mem_cache.registry import (
        register_radix_cache_backend,
        registered_radix_cache_backends,
    )
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    register_attention_backend(BACKEND_NAME)(create_psa_backend)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    if BACKEND_NAME not in registered_radix_cache_backends():
        register_radix_cache_backend(BACKEND_NAME, psa_radix_cache_factory)
    HookRegistry.register(f"{_SA}.add_cli_args", _around_add_cli_args, HookType.AROUND)
    HookRegistry.register(f"{_SA}.from_cli_args", _around_from_cli_args, HookType.AROUND)
    HookRegistry.register(_REPLAY_VIEW, _around_replay_view, HookType.AROUND)
    HookRegistry.register(f"{_SA}.__init__", _around_init, HookType.AROUND)
    HookRegistry.register(_PROFILE, _around_profile, HookType.AROUND)
    HookRegistry.register(_KV_BUFFERS, _around_kv_buffers, HookType.AROUND)
    _registered = True


def ensure_registered() -> None:
    """register() + apply the hooks: for scripts and tests that do not go through load_plugins()."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.plugins.hook_registry import HookRegistry

    load_plugins()  # runs our entry point when the package is installed
    register()
    HookRegistry.apply_hooks()
