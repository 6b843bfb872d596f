"""Paged attention: metadata for one step, KV store, and the pure-torch backend.

A step runs a flat batch of tokens from several sequences. Sequence i contributes
`query_lens[i]` new tokens at the end of a context of `context_lens[i]` tokens (new
tokens included); its KV lives in the blocks of `block_tables[i]`. A decode is a
query of length 1, a prefill chunk a longer one that may follow tokens already cached
(chunked prefill, recompute after preemption): one code path serves all three.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [tokens] cache slot (block * block_size + offset) per token
    block_tables: torch.Tensor  # [seqs, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [seqs] int32, tokens in the cache after this step
    query_start_loc: torch.Tensor  # [seqs + 1] int32, prefix sums of query lengths
    # Host copies for the torch backend's per-sequence loop (no device syncs).
    query_lens_host: list[int]
    context_lens_host: list[int]
    block_tables_host: list[list[int]]
    max_query_len: int = 0
    decode_splits: int | None = None  # fixed per CUDA-graph bucket; None: kernel decides

    @cached_property
    def num_decode_rows(self) -> int:
        """Leading sequences with one query token (the scheduler puts decodes first): a
        mixed step attends for them with the decode kernel instead of a prefill tile of
        padding. Computed on first use, so pure decode steps never pay for it."""
        rows = 0
        for q_len in self.query_lens_host:
            if q_len != 1:
                break
            rows += 1
        return rows

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_host)


def store_kv(
    cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter new K/V ([tokens, kv_heads, head_dim]) into the layer cache
    [2, num_blocks, block_size, kv_heads, head_dim]."""
    flat = cache.view(2, -1, cache.shape[-2], cache.shape[-1])
    flat[0].index_copy_(0, slot_mapping, key.to(cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: list[int], length: int) -> tuple[torch.Tensor, ...]:
    """A sequence's first `length` cached K and V as [length, kv_heads, head_dim]."""
    blocks = torch.tensor(block_table, dtype=torch.long, device=cache.device)
    k = cache[0].index_select(0, blocks).flatten(0, 1)[:length]
    v = cache[1].index_select(0, blocks).flatten(0, 1)[:length]
    return k, v


def paged_attention_torch(
    query: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """query: [tokens, heads, head_dim] -> [tokens, heads, head_dim], causal per sequence."""
    out = torch.empty_like(query)
    num_heads, num_kv_heads = query.shape[1], cache.shape[-2]
    group = num_heads // num_kv_heads
    start = 0
    for q_len, ctx_len, table in zip(
        meta.query_lens_host, meta.context_lens_host, meta.block_tables_host, strict=True
    ):
        q = query[start : start + q_len].transpose(0, 1)  # [heads, q_len, d]
        k, v = gather_kv(cache, table, ctx_len)
        k = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [heads, ctx, d]
        v = v.transpose(0, 1).repeat_interleave(group, dim=0)
        if q_len == 1:
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale)
        elif q_len == ctx_len:
            o = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), is_causal=True, scale=scale
            )
        else:
            # Query i sits at absolute position ctx_len - q_len + i and sees keys up to it.
            q_pos = torch.arange(ctx_len - q_len, ctx_len, device=q.device)
            mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale
            )
        out[start : start + q_len] = o.transpose(0, 1)
        start += q_len
    return out
