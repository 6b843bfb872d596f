"""Decode steps replayed as CUDA graphs, one graph per batch-size bucket.

A decode step (one token per sequence) launches hundreds of small kernels; at batch 1
their launch overhead alone is a large share of the step. Each bucket's forward pass,
logits included, is captured once into static buffers; a step copies its inputs into
the buffers of the smallest bucket that fits and replays. Padding rows write to slot -1
(skipped by the KV store kernel) and attend to an empty context.

Small buckets get a second graph for short contexts. The attention's split count is
fixed at capture, and the one chosen for the longest context wastes time on short ones:
on an H100 at batch 1, a 384-token context takes 6.1 us per layer in 32 splits and
5.4 us in 8 one-tile splits (tests/kernels and bench/NOTES.md).
"""

from __future__ import annotations

import logging

import torch

from tandem.engine.attention import AttentionMetadata

log = logging.getLogger(__name__)

SHORT_CONTEXT = 512  # contexts up to this replay the short-context graph...
SHORT_BATCH = 8  # ...in buckets up to this; larger batches fill the SMs on their own
_SHORT_SPLIT_TOKENS = 64  # one tile of the decode kernel


def graph_buckets(max_batch: int) -> list[int]:
    small = [1, 2, 4, 8]
    return (
        [b for b in small if b < max_batch] + list(range(16, max_batch + 1, 16))
        if max_batch >= 16
        else [b for b in small if b <= max_batch]
    )


def smallest_bucket(buckets: list[int], size: int) -> int | None:
    """The first of the ascending `buckets` that holds `size`; None if none does."""
    return next((b for b in buckets if b >= size), None)


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_batch: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model, self.kv_caches = model, kv_caches
        self.buckets = graph_buckets(max_batch)
        top = self.buckets[-1]
        self.block_size = block_size
        self.input_ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros((top, max_blocks_per_seq), dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(top, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(top + 1, dtype=torch.int32, device=device)
        # Keyed by (bucket, short context).
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _meta(self, bs: int, short: bool) -> AttentionMetadata:
        from tandem.kernels.decode_attention import (
            MIN_TOKENS_PER_SPLIT,
            decode_num_splits,
            heads_per_program,
        )

        cfg = self.model.config
        group = cfg.num_heads // cfg.num_kv_heads
        head_blocks = cfg.num_heads // heads_per_program(group)
        max_context = self.block_tables.shape[1] * self.block_size
        min_tokens = MIN_TOKENS_PER_SPLIT
        if short:
            max_context, min_tokens = min(max_context, SHORT_CONTEXT), _SHORT_SPLIT_TOKENS
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            context_lens=self.context_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            query_lens_host=[],
            context_lens_host=[],
            block_tables_host=[],
            max_query_len=1,
            decode_splits=decode_num_splits(
                bs, head_blocks, max_context, self.input_ids.device, min_tokens
            ),
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        # Largest bucket first: the later graphs reuse its memory pool.
        keys = [
            (bs, short)
            for bs in reversed(self.buckets)
            for short in (False, True)
            if not short or bs <= SHORT_BATCH
        ]
        for key in keys:
            bs = key[0]
            meta = self._meta(*key)

            def run(bs: int = bs, meta=meta) -> torch.Tensor:
                inputs = self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta
                return self.model.compute_logits(self.model(*inputs))

            torch.cuda.synchronize()
            for _ in range(2):  # warm up: autotuning and lazy init stay out of the graph
                run()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[key] = run()
            pool = graph.pool()
            self.graphs[key] = graph
        torch.cuda.synchronize()
        log.info(
            "captured %d decode CUDA graphs (batch %d..%d)",
            len(self.graphs),
            self.buckets[0],
            self.buckets[-1],
        )

    def bucket_for(self, batch: int) -> int | None:
        return smallest_bucket(self.buckets, batch)

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Replay the smallest bucket holding this decode batch; returns logits [n, vocab]."""
        n = input_ids.shape[0]
        bs = self.bucket_for(n)
        assert bs is not None, "batch larger than the biggest captured graph"
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(meta.context_lens, non_blocking=True)
        width = meta.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        if bs > n:  # padding rows: no KV write, empty context
            self.slot_mapping[n:bs].fill_(-1)
            self.context_lens[n:bs].zero_()
        key = (bs, bs <= SHORT_BATCH and max(meta.context_lens_host) <= SHORT_CONTEXT)
        self.graphs[key].replay()
        return self.logits[key][:n]
