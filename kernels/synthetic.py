"""A synthetic decode batch whose attention is skewed the way long-context LLM attention is.

Dummy weights give flat attention, so tests and benchmarks need a cache with the structure sparse
attention relies on. Each (request, kv head) gets:
  * locally coherent keys: a key is its segment's mean plus small noise (neighbouring tokens of real
    models' keys cluster, which is what makes Quest's per-page min/max bounds tight);
  * attention sinks: the first tokens carry a large logit boost;
  * recency: the last tokens carry a boost that decays with distance;
  * a few heavy-hitter regions (a page or a few) anywhere in the context;
  * length-aware boosts: the logits of the relevant tokens (sinks, heavy hitters) grow by ln(n / 4096)
    past 4k tokens, as long-context models sharpen with length (the log-n scaling behind YaRN's and
    scalable-softmax's temperature). Without it the mass of the flat background would grow linearly
    with n and no length-independent budget could exist, against LServe's and DuoAttention's
    observation that a roughly constant token budget suffices at any length;
  * a per-head skew in [0, 1] that scales all boosts: ~0 gives nearly flat attention (a head that
    needs many pages), ~1 a head that needs very few. Per-layer profiles are drawn by `layer_skews`.
Boosts are placed along the group's mean query direction, so they raise every query head of a GQA
group together. Physical pages are shuffled, as a long-running SGLang pool would leave them; page 0
stays unused (SGLang reserves it for padded writes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._common import check_page_size


@dataclass
class SkewedBatch:
    q: torch.Tensor  # [bs, Hq, D]
    k_cache: torch.Tensor  # [num_slots, Hkv, D]
    v_cache: torch.Tensor  # [num_slots, Hkv, D]
    req_to_token: torch.Tensor  # [bs, max_len] int32
    req_pool_indices: torch.Tensor  # [bs] int64
    seq_lens: torch.Tensor  # [bs] int32
    page_size: int
    sm_scale: float
    skew: torch.Tensor  # [bs, Hkv] float32, the skew each head was built with

    @property
    def written_slots(self) -> torch.Tensor:
        """Every written slot, request by request in order (an out_cache_loc of the whole prefill)."""
        rows = [self.req_to_token[b, : int(n)] for b, n in enumerate(self.seq_lens.tolist())]
        return torch.cat(rows).to(torch.int64)


def layer_skews(num_layers: int, hkv: int, seed: int = 0) -> torch.Tensor:
    """Per-layer, per-head skews [num_layers, Hkv]: early layers flatter, most heads sharp, a few flat.

    A coarse reading of published per-layer budget studies (PSA, DuoAttention): layer 0-1 attend
    broadly, later layers mostly concentrate, and some heads in every layer stay broad.
    """
    gen = torch.Generator().manual_seed(seed)
    depth = torch.linspace(0.0, 1.0, num_layers)[:, None]
    base = 0.35 + 0.55 * torch.sqrt(depth)  # 0.35 (first layer) .. 0.9 (last)
    noise = torch.rand(num_layers, hkv, generator=gen) * 0.3 - 0.15
    flat = torch.rand(num_layers, hkv, generator=gen) < 0.12
    return torch.where(flat, torch.full_like(noise, 0.08), (base + noise).clamp(0.05, 1.0))


def make_skewed_batch(
    bs: int,
    hq: int,
    hkv: int,
    d: int,
    seq_lens: list[int] | int,
    page_size: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    skew: float | torch.Tensor = 0.7,
    seed: int = 0,
    num_heavy: int = 4,
    spare_pages: int = 0,
) -> SkewedBatch:
    """Build a decode batch over a paged cache with skewed attention (see the module docstring).

    skew: a float, or a [Hkv] / [bs, Hkv] tensor. spare_pages: extra unused physical pages.
    """
    check_page_size(page_size)
    if hq % hkv:
        raise ValueError(f"hq {hq} must be a multiple of hkv {hkv}")
    lens = [seq_lens] * bs if isinstance(seq_lens, int) else list(seq_lens)
    if len(lens) != bs or min(lens) < 1:
        raise ValueError(f"seq_lens must give {bs} lengths >= 1, got {lens}")
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    skew_t = torch.as_tensor(skew, dtype=torch.float32).to(device).expand(bs, hkv).contiguous()

    npages = [math.ceil(n / page_size) for n in lens]
    total_pages = sum(npages) + 1 + spare_pages
    perm = torch.randperm(total_pages - 1, generator=gen, device=device) + 1
    max_len = max(npages) * page_size
    req_to_token = torch.zeros(bs, max_len, dtype=torch.int32, device=device)
    k_cache = torch.zeros(total_pages * page_size, hkv, d, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    g = hq // hkv
    q = torch.empty(bs, hq, d, dtype=torch.float32, device=device)
    used = 0
    for b, n in enumerate(lens):
        pages = perm[used : used + npages[b]]
        used += npages[b]
        slots = (pages[:, None] * page_size + torch.arange(page_size, device=device)).flatten()
        req_to_token[b, : slots.numel()] = slots.to(torch.int32)
        base = torch.randn(hkv, 1, d, generator=gen, device=device)
        qb = base + 0.5 * torch.randn(hkv, g, d, generator=gen, device=device)
        q[b] = qb.reshape(hq, d)
        qdir = qb.mean(dim=1)
        qdir = qdir / qdir.norm(dim=-1, keepdim=True)  # [Hkv, D]
        # logit change per unit of key shift along qdir (q.qdir * sm_scale), so boosts are in logits
        gain = (qb * qdir[:, None]).sum(-1).mean(-1) / math.sqrt(d)  # [Hkv]
        keys = _coherent_keys(n, hkv, d, gen, device)
        boost = _boost_profile(n, hkv, skew_t[b], num_heavy, page_size, gen, device)  # [n, Hkv]
        keys += (boost / gain.clamp(min=0.3))[:, :, None] * qdir[None]
        k_cache[slots[:n]] = keys.to(dtype)
        v_cache[slots[:n]] = torch.randn(n, hkv, d, generator=gen, device=device).to(dtype)
    return SkewedBatch(
        q=q.to(dtype),
        k_cache=k_cache,
        v_cache=v_cache,
        req_to_token=req_to_token,
        req_pool_indices=torch.arange(bs, dtype=torch.int64, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        page_size=page_size,
        sm_scale=1.0 / math.sqrt(d),
        skew=skew_t,
    )


def _coherent_keys(n: int, hkv: int, d: int, gen, device) -> torch.Tensor:
    """Keys [n, Hkv, D]: per-segment means (segments of 16..256 tokens) plus small token noise."""
    seg_len = torch.randint(16, 257, (n // 16 + 2,), generator=gen, device=device)
    seg_id = torch.bucketize(torch.arange(n, device=device), torch.cumsum(seg_len, 0), right=True)
    means = torch.randn(int(seg_id.max()) + 1, hkv, d, generator=gen, device=device)
    return means[seg_id] + 0.35 * torch.randn(n, hkv, d, generator=gen, device=device)


def _boost_profile(n, hkv, skew, num_heavy, page_size, gen, device) -> torch.Tensor:
    """Logit boosts [n, Hkv] for sinks, recency and heavy hitters, scaled by each head's skew."""
    pos = torch.arange(n, device=device, dtype=torch.float32)
    boost = torch.zeros(n, hkv, device=device)
    sharpen = max(0.0, math.log(n / 4096))  # length-aware: see the module docstring
    boost[: min(4, n)] += 12.0 + sharpen  # attention sinks
    dist = (n - 1) - pos
    boost += (6.0 * torch.exp(-dist / 48.0))[:, None]  # recency
    for _ in range(num_heavy):
        length = int(torch.randint(page_size // 2, 3 * page_size, (1,), generator=gen, device=device))
        start = int(torch.randint(0, max(1, n - length), (1,), generator=gen, device=device))
        height = 7.0 + sharpen + 4.0 * torch.rand(hkv, generator=gen, device=device)
        boost[start : start + length] += height
    return boost * (skew * 1.1)[None, :]
