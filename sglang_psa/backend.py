"""`--attention-backend psa`: dense prefill through FlashInfer, sparse decode through PSA.

The backend is glue. SGLang's metadata (req_to_token, req_pool_indices, seq_lens, out_cache_loc)
goes straight into the PSA kernels, which read page counts on the device; nothing in the decode
path syncs with the host, so the decode step is captured in CUDA graphs like any other backend
(SGLang hands forward_decode the graph runner's static buffers during capture, so the kernels
recorded there read each replay's values).

Every KV write refreshes the page summaries of the written blocks: prefill/extend after FlashInfer
stored K/V, decode after our own set_kv_buffer. Requests shorter than --psa-dense-below select all
their pages inside the kernels (their bounds are skipped), which equals dense attention.

--psa-reuse-steps R > 1 (estimated / topk modes; see SelectionReuse): a batch row may decode with
the page lists selected for it up to R - 1 steps earlier, skipping bounds and select for that row.

--psa-tiered (sglang_psa/tiered.py): the KV pool is in pinned host memory; the selected pages reach
the attention kernel through TieredDecode's GPU hot pool. KV writes go through to that pool (a decode
write updates the resident slots, a prefill write also places the pages it fills whole);
--psa-no-write-through invalidates the written pages there instead.

--psa-streaming-layers: those layers read only their sink pages and local window (no bounds, no
select, no summary updates), whatever --psa-mode says for the others.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from sglang_psa.kernels import select_streaming
from sglang_psa.kernels._common import num_pages_of
from sglang_psa.memory.summary_pool import SummaryPool, set_active_pool

from .config import MASS_ESTIMATES, PSAConfig, validate_against_server
from .kernel_ops import KernelOps, select_params
from .recall import selection_recall
from .reuse import SelectionReuse
from .stats import DecodeStats

if TYPE_CHECKING:
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch

logger = logging.getLogger(__name__)


class PSAAttnBackend(AttentionBackend):
    def __init__(self, model_runner: Any, dense_backend: AttentionBackend | None = None):
        super().__init__()
        sa = model_runner.server_args
        self.cfg: PSAConfig = PSAConfig.from_server_args(sa)
        self.page_size = int(model_runner.page_size)
        self.cfg.validate(self.page_size)
        # Second line of defence: the launcher checked too, but Engine paths that build ServerArgs
        # differently (or a stale environment) end up here, with the real model config.
        validate_against_server(self.cfg, sa, model_runner.model_config)
        if model_runner.use_mla_backend:
            raise ValueError("--attention-backend psa serves GQA/MHA models, not MLA")

        self.device = torch.device(model_runner.device)
        self.block_size = self.cfg.effective_block_size(self.page_size)
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.kv_pool = model_runner.token_to_kv_pool
        # N: static width of the bounds; covers the longest context a request can have.
        self.max_pages_ctx = -(-self.req_to_token.shape[1] // self.page_size)
        self.params = select_params(self.cfg)
        self.width = self.cfg.select_width()
        self.ops = KernelOps.for_device(self.device)

        if dense_backend is None:
            from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

            dense_backend = FlashInferAttnBackend(
                model_runner, init_new_workspace=getattr(model_runner, "init_new_workspace", False)
            )
        self.dense = dense_backend

        self.summaries = SummaryPool.from_kv_pool(self.kv_pool, self.block_size)
        set_active_pool(self.summaries)
        logger.info(
            "PSA backend: %s; page %d, block %d, N=%d pages, summaries %.1f MB",
            self.cfg.to_json(),
            self.page_size,
            self.block_size,
            self.max_pages_ctx,
            self.summaries.mem_bytes() / 2**20,
        )
        self._use_centers = self.cfg.mode in ("estimated", "progressive")
        self._streaming_layers = self.cfg.streaming_layer_ids()  # --psa-streaming-layers
        self._variance_weight = MASS_ESTIMATES[self.cfg.mass_estimate]
        self._capturing = False
        self.stats: DecodeStats | None = None
        if self.cfg.stats:
            k0 = self.kv_pool.get_key_buffer(self.kv_pool.start_layer)
            self.stats = DecodeStats(
                num_layers=self.kv_pool.layer_num,
                start_layer=self.kv_pool.start_layer,
                page_size=self.page_size,
                block_size=self.block_size,
                head_dim=k0.shape[2],
                elem_bytes=k0.element_size(),
                interval=self.cfg.stats_interval,
                device=self.device,
                labels={"tp_rank": str(getattr(model_runner, "tp_rank", 0))},
                enable_metrics=bool(getattr(sa, "enable_metrics", False)),
            )

        self.access_log = self._make_access_log(model_runner) if self.cfg.access_log else None
        self._log_step = 0
        self.tiered = self.tiered_prefill = None
        if self.cfg.tiered:
            from .tiered import TieredDecode, TieredPrefill

            reserve = self.summaries.mem_bytes() + (256 << 20)  # + prefill workspace and gathers
            self.tiered = TieredDecode(
                self.cfg, self.kv_pool, self.page_size, self.req_to_token.shape[0], self.width, self.device,
                reserve_bytes=reserve,
            )  # fmt: skip
            self.tiered_prefill = TieredPrefill(self.dense, self.req_to_token, self.device)
            if getattr(sa, "enable_metrics", False):
                self.tiered.metric_labels = {"tp_rank": str(getattr(model_runner, "tp_rank", 0))}
        self.lookahead = None
        if self.tiered is not None and self.cfg.prefetch == "next-layer":
            from .lookahead import NextLayerQuery

            self.lookahead = NextLayerQuery(model_runner.model, self._speculate)
        self.reuse: SelectionReuse | None = None
        if self.cfg.reuse_steps > 1:
            self.reuse = SelectionReuse(
                self.cfg.reuse_steps, self.kv_pool.layer_num, self.kv_pool.head_num, self.width,
                max_rows=self.req_to_token.shape[0], device=self.device,
            )  # fmt: skip

    def _make_access_log(self, model_runner: Any):
        """Opt-in selection log (--psa-access-log DIR): bounded, rotated .npz files per tp rank."""
        from .access_log import AccessLogger

        k0 = self.kv_pool.get_key_buffer(self.kv_pool.start_layer)
        rank = getattr(model_runner, "tp_rank", 0)
        return AccessLogger(
            os.path.join(self.cfg.access_log, f"tp{rank}"), source=self.cfg.access_log_source,
            num_layers=self.kv_pool.layer_num, num_kv_heads=self.kv_pool.head_num,
            width=self.width, page_size=self.page_size, head_dim=k0.shape[2],
            elem_bytes=k0.element_size(), start_layer=self.kv_pool.start_layer, device=self.device,
            max_requests=self.cfg.access_log_requests, meta=self.cfg.to_dict(),
        )  # fmt: skip

    # ------------------------------------------------------------------ metadata
    def init_forward_metadata(self, forward_batch: ForwardBatch):
        if forward_batch.forward_mode.is_decode_or_idle():
            self._on_decode_step(in_capture=False)
            self._log_begin_step(forward_batch)
            self._begin_decode_on_device(forward_batch, in_graph=False)
        else:
            self._invalidate_reuse()
            self.dense.init_forward_metadata(forward_batch)
            if self.tiered_prefill is not None:
                self.tiered_prefill.plan(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch: ForwardBatch, in_capture=False):
        if forward_batch.forward_mode.is_decode_or_idle():
            # Host-side per-step work only (no FlashInfer plan: PSA decode does not use it).
            self._on_decode_step(in_capture)
            if not in_capture:
                self._log_begin_step(forward_batch)
        else:
            self._invalidate_reuse()
            self.dense.init_forward_metadata_out_graph(forward_batch, in_capture=in_capture)
            if self.tiered_prefill is not None:
                self.tiered_prefill.plan(forward_batch)

    def init_forward_metadata_in_graph(self, forward_batch: ForwardBatch):
        if forward_batch.forward_mode.is_decode_or_idle():
            self._begin_decode_on_device(forward_batch, in_graph=True)
        else:
            self._invalidate_reuse()  # one in-place add on a permanent tensor: recordable
            self.dense.init_forward_metadata_in_graph(forward_batch)

    def _begin_decode_on_device(self, forward_batch: ForwardBatch, in_graph: bool) -> None:
        """A decode step's device-side start (recorded in the graph when in_graph): dense-page count,
        selection-reuse tags, the tiered pool's new step."""
        self._count_dense_step(forward_batch)
        if self.reuse is not None:
            self.reuse.begin_decode(forward_batch, self.page_size, in_graph=in_graph)
        if self.tiered is not None:
            self.tiered.begin_step()

    def _invalidate_reuse(self) -> None:
        if self.reuse is not None:
            self.reuse.invalidate()

    def _log_begin_step(self, forward_batch: ForwardBatch) -> None:
        # The next begin_step closes the previous step, so no after-forward hook is needed.
        if self.access_log is not None:
            self.access_log.begin_step(self._log_step, getattr(forward_batch, "rids", None) or [])
            self._log_step += 1

    def _count_dense_step(self, forward_batch: ForwardBatch) -> None:
        """Stats: the KV units a dense decode step would read (recorded in the graph, no sync)."""
        bs = forward_batch.batch_size
        if self.stats is not None and bs > 0:
            npages = num_pages_of(forward_batch.seq_lens[:bs], self.page_size)
            self.stats.add_step(npages.sum() * self.kv_pool.head_num)

    def _on_decode_step(self, in_capture: bool) -> None:
        self._capturing = in_capture
        if self.reuse is not None:
            self.reuse.on_decode_step(in_capture)
        if self.tiered is not None and not in_capture:
            self.tiered.report(self.cfg.stats_interval)
        if self.stats is None:
            return
        if in_capture:
            # Warm-up and capture runs also add to the counters; start clean after them.
            self._stats_dirty = True
            return
        if getattr(self, "_stats_dirty", False):
            self.stats.reset()
            self._stats_dirty = False
        self.stats.on_step()

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, **kwargs):
        self.dense.init_cuda_graph_state(max_bs, max_num_tokens, **kwargs)
        if self.reuse is not None:
            self.reuse.init_graph_rows(max_bs)

    def get_cuda_graph_seq_len_fill_value(self):
        # Padded rows: seq_len 1 in req_to_token row 0 (SGLang's padding row), i.e. page 0.
        return 1

    def on_after_cuda_graph_warmup(self):
        self.dense.on_after_cuda_graph_warmup()

    # ------------------------------------------------------------------ forward
    def forward_extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ):
        if self.tiered_prefill is not None:  # the cached prefix is in host memory
            o = self.tiered_prefill.forward(q, k, v, layer, forward_batch, save_kv_cache, self.kv_pool)
        else:
            o = self.dense.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
        if save_kv_cache and k is not None:
            self._update_summaries(layer, forward_batch.out_cache_loc, k=k, v=v)
        return o

    def forward_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer: RadixAttention,
        forward_batch: ForwardBatch,
        save_kv_cache: bool = True,
        **kwargs,
    ):
        if k is not None and save_kv_cache:
            self.kv_pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, layer.k_scale, layer.v_scale)
            self._update_summaries(layer, forward_batch.out_cache_loc, decode=True, k=k, v=v)
        bs = forward_batch.batch_size
        q3 = q.reshape(-1, layer.tp_q_head_num, layer.head_dim)[:bs]
        if q3.stride(2) != 1:
            q3 = q3.contiguous()
        out = self._psa_decode(q3, layer, forward_batch)
        return out.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _update_summaries(self, layer: RadixAttention, loc: torch.Tensor, decode: bool = False,
                          k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> None:  # fmt: skip
        if layer.layer_id not in self._streaming_layers:  # a streaming layer never reads its bounds
            k_cache = self.kv_pool.get_key_buffer(layer.layer_id)
            self.summaries.update(layer.layer_id, k_cache, loc, self.ops.update_page_summaries)
        if self.tiered is not None:
            self.tiered.on_write(layer.layer_id, loc, self.kv_pool, decode=decode, k=k, v=v)

    def _bounds(self, q, lid, rpi, seq_lens, scaling, reuse_kw):
        """Page bounds [bs, Hkv, N] and (estimated / progressive) centers of layer lid."""
        kmin, kmax = self.summaries.get(lid)
        # centers: the calibrated per-page mass estimate that estimated mode stops on and progressive
        # mode estimates the tail with (see page_bounds); topk and certified never read them.
        # Requests below dense_below take every page, so their bounds are skipped (and select never
        # reads them).
        res = self.ops.page_bounds(
            q, kmin, kmax, self.req_to_token, rpi, seq_lens, self.page_size, self.block_size,
            scaling, self.max_pages_ctx, with_centers=self._use_centers, skip_below=self.cfg.dense_below,
            fill=False,  # select / certified mask by page count: the unused width stays unwritten
            variance_weight=self._variance_weight, **reuse_kw,
        )  # fmt: skip
        return res if self._use_centers else (res, None)

    def _select(self, order, centers, seq_lens, reuse_kw, select_out):
        """Estimated / topk selection from the ranking `order` (bounds or centers, --psa-rank-by):
        page_idx [bs, Hkv, W] int32, counts [bs, Hkv] int32."""
        return self.ops.select_pages(
            order, seq_lens, self.page_size, self.params, mass_logits=centers,
            dense_below=self.cfg.dense_below, **select_out, **reuse_kw,
        )  # fmt: skip

    def _page_lists(self, q, layer, rpi, seq_lens, reuse_kw, select_out):
        """One layer's page lists (page_idx [bs, Hkv, W], counts [bs, Hkv]) in estimated / topk mode,
        and the ranking [bs, Hkv, N] they were cut from: bounds -> select, or sinks + local window on a
        --psa-streaming-layers layer (no bounds, ranking None)."""
        if layer.layer_id in self._streaming_layers:
            cfg = self.cfg
            return (*select_streaming(seq_lens, layer.tp_k_head_num, self.width, self.page_size,
                                      cfg.sink_pages, cfg.local_pages, cfg.dense_below), None)  # fmt: skip
        bounds, centers = self._bounds(q, layer.layer_id, rpi, seq_lens, layer.scaling, reuse_kw)
        order = centers if self.cfg.rank_by == "estimate" else bounds  # --psa-rank-by
        return (*self._select(order, centers, seq_lens, reuse_kw, select_out), order)

    def _speculate(self, layer: RadixAttention, q_hat: torch.Tensor, forward_batch: ForwardBatch) -> None:
        """--psa-prefetch next-layer: select layer's pages with its estimated query (lookahead.py);
        the tiered pool prefetches their union during the previous layer. All of it runs on the
        prefetch stream, beside the previous layer's compute."""
        bs = forward_batch.batch_size
        q = q_hat.reshape(-1, layer.tp_q_head_num, layer.head_dim)[:bs]
        rpi, seq_lens = forward_batch.req_pool_indices[:bs], forward_batch.seq_lens[:bs]
        with self.tiered.on_side_stream(layer.layer_id, q_hat):
            page_idx, counts, _ = self._page_lists(q, layer, rpi, seq_lens, {}, {})  # streaming: exact
            self.tiered.speculate(layer.layer_id, self.req_to_token, rpi, page_idx, counts)

    def _psa_decode(self, q, layer, forward_batch) -> torch.Tensor:
        bs = q.shape[0]
        lid = layer.layer_id
        k_cache = self.kv_pool.get_key_buffer(lid)
        v_cache = self.kv_pool.get_value_buffer(lid)
        rpi = forward_batch.req_pool_indices[:bs]
        seq_lens = forward_batch.seq_lens[:bs]
        ops = self.ops
        dense_below = self.cfg.dense_below
        # --psa-reuse-steps: rows flagged in `keep` decode over the lists the buffers still hold from
        # an earlier step; bounds and select skip them (extra kernel arguments only when reuse is on).
        reuse_kw, select_out = {}, {}
        bufs = self.reuse.current if self.reuse is not None else None
        if bufs is not None and bs <= bufs.rows:
            li = lid - self.kv_pool.start_layer
            reuse_kw = {"keep_rows": bufs.keep[:bs]}
            select_out = {"page_idx": bufs.page_idx[li, :bs], "counts": bufs.counts[li, :bs]}
        if self.cfg.mode in ("certified", "progressive") and lid not in self._streaming_layers:
            bounds, centers = self._bounds(q, lid, rpi, seq_lens, layer.scaling, reuse_kw)
            out, _lse, counts, logged = ops.certified_decode(
                q, k_cache, v_cache, self.req_to_token, rpi, seq_lens, bounds, self.page_size,
                layer.scaling, float(self.cfg.tau), self.cfg.sink_pages, self.cfg.local_pages,
                self.cfg.first_round_pages,
                # progressive: estimate the unvisited tail from the centers; certified: bound it
                rest_logits=centers if self.cfg.mode == "progressive" else None, dense_below=dense_below,
            )  # fmt: skip
        else:
            page_idx, counts, order = self._page_lists(q, layer, rpi, seq_lens, reuse_kw, select_out)
            logged = page_idx
            if self.tiered is not None:  # the selected pages come through the hot pool
                out = self.tiered.forward(
                    lid, q, self.req_to_token, rpi, seq_lens, page_idx, counts, layer.scaling
                )
                # after forward: the prediction for the next step goes on the side stream behind this
                # layer's miss copy (split path), which the resident pages' attention waits on
                if self.cfg.prefetch == "next-step" and order is not None:
                    self.tiered.plan_next_step(lid, order, seq_lens, rpi, self.req_to_token, page_idx,
                                               counts, reuse_kw.get("keep_rows"))  # fmt: skip
            else:
                out, _lse = ops.sparse_decode(
                    q, k_cache, v_cache, self.req_to_token, rpi, seq_lens, page_idx, counts,
                    self.page_size, layer.scaling,
                )  # fmt: skip
        if self.stats is not None:
            self.stats.add_layer(lid, counts)
            if self.cfg.measure_recall:
                self.stats.add_recall(
                    selection_recall(
                        q, k_cache, self.req_to_token, rpi, seq_lens, logged, counts, self.page_size,
                        layer.scaling,
                    )
                )  # fmt: skip
        if self.access_log is not None:
            # progressive/certified log their visiting order; pages past the log width are dropped
            self.access_log.record_layer(lid, logged[..., : self.width], counts, seq_lens)
        return out

    def support_triton(self):
        return self.dense.support_triton()
