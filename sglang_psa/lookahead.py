"""Layer l+1's query, estimated while layer l runs (--psa-prefetch next-layer).

Tiered mode fetches the pages a layer selects from host memory. Those pages are known only once the
layer's query exists, so without a prediction every miss is copied while decode waits. The residual
stream changes little from one decoder layer to the next, so layer l+1's query is close to layer
l+1's own projection of the stream *entering layer l* (InfiniGen, OSDI'24, speculates the next
layer's attention this way). A forward pre-hook on decoder layer l computes

    q_hat[l+1] = RoPE_{l+1}(W_q^{l+1} . RMSNorm_{l+1}(stream_l))

exactly as layer l+1 would on that input (on CUDA in one Triton launch, kernels/next_query.py), and
hands it to `on_query(attention of layer l+1, q_hat, forward_batch)`;
the backend selects pages with it and the tiered pool prefetches their union on a side stream while
layer l attends and runs its MLP (memory/device_tiered.py). Only decode batches are hooked; extend
batches run untouched. The hook is plain tensor ops on fixed shapes, so it is recorded into decode
CUDA graphs like the rest of the layer.

Shapes and dtypes (T tokens of the batch; one per request in decode):
    positions [T] int64; hidden_states, residual [T, hidden] model dtype (SGLang's decoder-layer
    inputs: the stream is hidden_states + residual, or hidden_states alone at the first layer)
    -> q_hat [T, Hq_local * head_dim] model dtype

Supported: Llama-style decoder layers (`input_layernorm` RMSNorm, `self_attn.qkv_proj` unquantized
QKVParallelLinear, `self_attn.rotary_emb`, `self_attn.attn` RadixAttention), which covers SGLang's
Llama, Mistral and Qwen2 families. Anything else raises at server start, naming the option.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sglang_psa.kernels.next_query import next_query

OnQuery = Callable[[Any, torch.Tensor, Any], None]  # (RadixAttention of the layer, q_hat, ForwardBatch)


def decoder_layers(model: torch.nn.Module) -> tuple[Any, int, int]:
    """SGLang's decoder layers of `model` (a *ForCausalLM): (layers, start_layer, end_layer)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(
            f"--psa-prefetch next-layer needs a model with Llama-style decoder layers (model.model.layers); "
            f"{type(model).__name__} has none: use --psa-prefetch previous-step or off"
        )
    start = int(getattr(inner, "start_layer", 0))
    end = int(getattr(inner, "end_layer", len(layers)))
    return layers, start, end


def _check_layer(layer: Any, index: int) -> None:
    attn = getattr(layer, "self_attn", None)
    missing = [
        name
        for name, obj in (
            ("input_layernorm", getattr(layer, "input_layernorm", None)),
            ("self_attn.qkv_proj", getattr(attn, "qkv_proj", None)),
            ("self_attn.rotary_emb", getattr(attn, "rotary_emb", None)),
            ("self_attn.attn", getattr(attn, "attn", None)),
        )
        if obj is None
    ]
    if getattr(attn, "q_norm", None) is not None:
        missing.append("no self_attn.q_norm (per-head query norms are not estimated)")
    method = type(getattr(getattr(attn, "qkv_proj", None), "quant_method", None)).__name__
    if not missing and method != "UnquantizedLinearMethod":
        missing.append(f"an unquantized qkv_proj (found {method})")
    if missing:
        raise ValueError(
            f"--psa-prefetch next-layer estimates each layer's query with Llama-style modules; decoder "
            f"layer {index} ({type(layer).__name__}) lacks {', '.join(missing)}: use --psa-prefetch "
            "previous-step or off"
        )


def fusable(layer: Any) -> bool:
    """Whether kernels/next_query.py computes `layer`'s estimate: plain RMSNorm, neox RoPE over the
    whole head from a cos/sin cache, a contiguous qkv weight."""
    norm, attn = layer.input_layernorm, layer.self_attn
    rope = attn.rotary_emb
    return (
        getattr(norm, "variance_size_override", None) is None
        and not getattr(norm, "cast_x_before_out_mul", False)
        and getattr(norm, "override_orig_dtype", None) is None
        and bool(getattr(rope, "is_neox_style", False))
        and getattr(rope, "rotary_dim", None) == attn.head_dim
        and getattr(rope, "head_size", attn.head_dim) == attn.head_dim
        and isinstance(getattr(rope, "cos_sin_cache", None), torch.Tensor)
        and not hasattr(rope, "sin_cos_cache")
        and attn.qkv_proj.weight.stride(-1) == 1
        and attn.head_dim in (32, 64, 128, 256)
    )


def use_fused(layer: Any) -> bool:
    """The estimate's default path: fused on CUDA when `fusable(layer)`, unless
    SGLANG_PSA_LOOKAHEAD_TORCH=1 (the A/B switch for timing both)."""
    return (
        os.environ.get("SGLANG_PSA_LOOKAHEAD_TORCH") != "1"
        and layer.self_attn.qkv_proj.weight.is_cuda
        and fusable(layer)
    )


def estimate_query(layer: Any, positions: torch.Tensor, hidden: torch.Tensor,
                   residual: torch.Tensor | None, fused: bool | None = None) -> torch.Tensor:  # fmt: skip
    """What `layer` would compute as its query if (hidden, residual) were its own inputs:
    [T, Hq_local * head_dim]; reads the module's weights, writes nothing of them.

    fused: one Triton launch (kernels/next_query.py) instead of the native torch paths of SGLang's
    RMSNorm, linear and RoPE (~20 kernels); None = `use_fused(layer)`."""
    if fused is None:
        fused = use_fused(layer)
    if fused:
        attn, norm = layer.self_attn, layer.input_layernorm
        return next_query(
            hidden.contiguous(), None if residual is None else residual.contiguous(), norm.weight,
            norm.variance_epsilon, attn.qkv_proj.weight, attn.qkv_proj.bias, attn.q_size,
            attn.rotary_emb.cos_sin_cache, positions, attn.head_dim,
        )  # fmt: skip
    norm = layer.input_layernorm
    x = norm.forward_native(hidden) if residual is None else norm.forward_native(hidden, residual)[0]
    attn = layer.self_attn
    q_rows = slice(0, attn.q_size)
    bias = attn.qkv_proj.bias
    q = F.linear(x, attn.qkv_proj.weight[q_rows], None if bias is None else bias[q_rows])
    key = q.new_zeros(q.shape[0], attn.head_dim)  # RoPE's native path rotates a key too: one dummy head
    q, _ = attn.rotary_emb.forward_native(positions, q, key)
    return q


class NextLayerQuery:
    """Forward pre-hooks on decoder layers start .. end-2: each estimates the next layer's query at
    decode and calls on_query(next layer's RadixAttention, q_hat [T, Hq * D], forward_batch)."""

    def __init__(self, model: torch.nn.Module, on_query: OnQuery):
        layers, start, end = decoder_layers(model)
        for i in range(start, end):
            _check_layer(layers[i], i)
        self.on_query = on_query
        # fused estimate or torch path, decided once per layer (not on every decode step)
        self.handles = [
            layers[i].register_forward_pre_hook(
                self._hook(layers[i + 1], use_fused(layers[i + 1])), with_kwargs=True
            )  # fmt: skip
            for i in range(start, end - 1)
        ]

    def _hook(self, nxt: Any, fused: bool) -> Callable:
        def hook(module, args, kwargs):
            positions, hidden, fb, residual = _layer_inputs(args, kwargs)
            mode = getattr(fb, "forward_mode", None)
            if mode is None or not mode.is_decode():
                return None
            with torch.no_grad():
                q_hat = estimate_query(nxt, positions, hidden, residual, fused=fused)
                self.on_query(nxt.self_attn.attn, q_hat, fb)
            return None

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _layer_inputs(args: tuple, kwargs: dict) -> tuple:
    """(positions, hidden_states, forward_batch, residual) of a decoder layer's call, positional
    (as SGLang's model loops call them) or by keyword."""
    names = ("positions", "hidden_states", "forward_batch", "residual")
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    return tuple(vals.get(n) for n in names)
