"""Prefill and mixed steps of up to a few hundred tokens, replayed as piecewise CUDA graphs.

A short prompt (what a cached prefix leaves to compute, a chat turn) makes a step whose
GPU work is small: 100 tokens of Llama-3.1-8B take ~7 ms on an H100, while launching
the step's ~300 kernels from Python took ~14 ms (bench/NOTES.md). Such a step is
launch-bound, and its request's time to first token with it.

Attention cannot be captured: its grid and its decode/prefill split follow the step's
sequences. So each token bucket's forward pass is captured as pieces cut at each
attention: embedding and layer 0 up to the rotary KV store; each layer's output
projection, MLP and the next layer's QKV projection and KV store; the last layer's tail
and the final norm. A step copies its tokens, positions and KV slots into the bucket's
static buffers (padding rows get slot -1: no KV write) and replays the pieces, launching
the attention kernels between them on the q each piece left behind, into one static
output buffer that the next piece reads. Per step that is layers + 1 replays and one or
two attention launches per layer instead of ~10 launches per layer. (vLLM's piecewise
graphs do the same through torch.compile.)

Every graph and the q tensors kept for the attention calls share one memory pool; the
pieces of all buckets replay one step at a time, in the order they were captured.
"""

from __future__ import annotations

import logging

import torch

from tandem.engine.attention import AttentionMetadata
from tandem.engine.cuda_graphs import smallest_bucket

log = logging.getLogger(__name__)


def prefill_buckets(max_tokens: int) -> list[int]:
    """Token counts captured: powers of two from 16 up to `max_tokens` (and it)."""
    buckets, n = [], 16
    while n < max_tokens:
        buckets.append(n)
        n *= 2
    return buckets + [max_tokens] if max_tokens >= 16 else []


class _Bucket:
    """One token count's pieces, the attention call after each piece but the last, and
    the static hidden state the last piece writes."""

    def __init__(self) -> None:
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.attention: list[tuple[torch.Tensor, torch.Tensor, float]] = []  # q, cache, scale
        self.hidden: torch.Tensor | None = None


class PrefillGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],
        max_tokens: int,
        device: torch.device,
    ) -> None:
        self.model, self.kv_caches, self.ops = model, kv_caches, model.ops
        self.buckets = prefill_buckets(max_tokens)
        top = self.buckets[-1]
        cfg = model.config
        self.input_ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.long, device=device)
        dtype = model.embed_tokens.weight.dtype
        # Zeroed once: padding rows keep finite values (the kernels never write them).
        self.attn_out = torch.zeros(top, cfg.num_heads, cfg.head_dim, dtype=dtype, device=device)
        self.graphs: dict[int, _Bucket] = {}
        self.num_replays = 0  # steps run through these graphs

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def _capture_meta(self, n: int) -> AttentionMetadata:
        """What the captured pieces read of the metadata: the KV slots (and a query
        length above one, so the attention takes the prefill path that splits)."""
        unused = torch.zeros(1, dtype=torch.int32, device=self.input_ids.device)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            block_tables=unused.view(1, 1),
            context_lens=unused,
            query_start_loc=unused,
            query_lens_host=[n],
            context_lens_host=[n],
            block_tables_host=[[]],
            max_query_len=n,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.input_ids.device)
        for n in reversed(self.buckets):  # largest first: the rest reuse its memory
            self.graphs[n] = self._capture_bucket(n, pool, stream)
        torch.cuda.synchronize()
        log.info(
            "captured piecewise prefill CUDA graphs for %d token buckets (%d..%d)",
            len(self.buckets),
            self.buckets[0],
            self.buckets[-1],
        )

    def _forward(self, n: int) -> torch.Tensor:
        meta = self._capture_meta(n)
        return self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, meta)

    def _capture_bucket(self, n: int, pool, stream: torch.cuda.Stream) -> _Bucket:
        bucket = _Bucket()
        out = self.attn_out[:n]
        # Warm up eagerly (kernel compiles stay out of the graphs); slots are all -1, so
        # nothing is written to the cache, and no attention runs.
        self.ops.split_attention = lambda q, cache, meta, scale: out
        try:
            self._forward(n)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()

            def split(q: torch.Tensor, cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
                nonlocal graph
                graph.capture_end()
                bucket.pieces.append(graph)
                bucket.attention.append((q, cache, scale))
                graph = torch.cuda.CUDAGraph()
                graph.capture_begin(pool=pool)
                return out

            self.ops.split_attention = split
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=pool)
                bucket.hidden = self._forward(n)
                graph.capture_end()
                bucket.pieces.append(graph)
            torch.cuda.current_stream().wait_stream(stream)
        finally:
            self.ops.split_attention = None
        return bucket

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The step's final hidden states [tokens, hidden], through the smallest bucket
        that holds its tokens."""
        n = input_ids.shape[0]
        size = smallest_bucket(self.buckets, n)
        assert size is not None, "step larger than the biggest captured bucket"
        bucket = self.graphs[size]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        if size > n:
            self.slot_mapping[n:size].fill_(-1)
        out = self.attn_out[:size]
        for piece, (q, cache, scale) in zip(bucket.pieces, bucket.attention, strict=False):
            piece.replay()
            self.ops.attend(q, cache, meta, scale, out=out)
        bucket.pieces[-1].replay()
        self.num_replays += 1
        return bucket.hidden[:n]
