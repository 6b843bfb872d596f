"""paged_prefill_attention (varlen, causal, chunked) against its float32 torch reference."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.prefill_attention import (
    MAX_PREFILL_SPLITS,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    prefill_splits,
)
from tests.kernels.helpers import DTYPES, assert_close, make_paged_batch, poisoned

# (query_lens, ctx_lens, heads, kv_heads, head_dim, block_size)
CASES = [
    ([1, 17, 40], [1, 17, 40], 4, 4, 64, 16),  # whole prompts, MHA, single-token prompt
    ([20, 1, 35], [50, 33, 51], 8, 2, 64, 16),  # chunks after cached tokens, a decode row
    ([30, 9], [30, 100], 4, 2, 128, 8),  # head_dim 128, block 8, short chunk long prefix
    ([70], [70], 2, 1, 32, 16),  # several query blocks in one sequence (BLOCK_M 64)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("query_lens,ctx_lens,heads,kv_heads,head_dim,block_size", CASES)
def test_prefill_matches_reference(
    device, seed, dtype, query_lens, ctx_lens, heads, kv_heads, head_dim, block_size
):
    batch = make_paged_batch(ctx_lens, query_lens, kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(sum(query_lens), heads, head_dim).to(dtype).to(device)
    scale = head_dim**-0.5
    out = poisoned(q.shape, dtype, device)
    args = (batch.block_tables, batch.query_start_loc, batch.context_lens, scale, max(query_lens))
    got = paged_prefill_attention(q, batch.cache, *args, out=out)
    assert got is out
    want = paged_prefill_attention_ref(q, batch.cache, *args)
    assert_close(got, want, seed, f"prefill q={query_lens} ctx={ctx_lens}")


def test_prefill_oversized_grid_and_strided_q(device, seed):
    """max_query_len above every chunk (CUDA-graph style bucket) launches programs with
    nothing to do; they must not write. q is a view of a fused QKV buffer."""
    query_lens, ctx_lens = [3, 12], [19, 12]
    batch = make_paged_batch(ctx_lens, query_lens, 1, 64, 16, torch.float32, device)
    qkv = torch.randn(15, (2 + 2) * 64, device=device)
    q = qkv[:, : 2 * 64].view(15, 2, 64)
    out = poisoned(q.shape, torch.float32, device)
    args = (batch.block_tables, batch.query_start_loc, batch.context_lens, 0.125)
    paged_prefill_attention(q, batch.cache, *args, 100, out=out)
    assert_close(out, paged_prefill_attention_ref(q, batch.cache, *args, 12), seed, "oversized")


def test_prefill_from_first_seq_leaves_earlier_rows_alone(device, seed):
    """first_seq skips the leading sequences (a mixed step's decode rows, attended by
    the decode kernel): their rows of `out` keep what was there, the rest match."""
    query_lens, ctx_lens = [1, 1, 1, 14, 5], [9, 30, 2, 14, 40]
    batch = make_paged_batch(ctx_lens, query_lens, 2, 64, 16, torch.float32, device)
    q = torch.randn(sum(query_lens), 4, 64, device=device)
    out = poisoned(q.shape, torch.float32, device)
    args = (batch.block_tables, batch.query_start_loc, batch.context_lens, 0.125, 14)
    paged_prefill_attention(q, batch.cache, *args, out=out, first_seq=3)
    want = paged_prefill_attention_ref(q, batch.cache, *args)
    assert out[:3].isnan().all()  # still the poison
    assert_close(out[3:], want[3:], seed, "prefill after first_seq")


@pytest.mark.parametrize("num_splits", [2, 3])
def test_prefill_split_kv_matches_reference_and_spares_other_rows(device, seed, num_splits):
    """Short chunks after long cached prefixes, their unmasked tiles split among
    programs and merged: the prefix-caching case. Decode rows before first_seq and a
    graph bucket's padding rows past num_rows keep what was there."""
    query_lens, ctx_lens = [1, 1, 9, 3, 20], [40, 7, 150, 97, 60]
    batch = make_paged_batch(ctx_lens, query_lens, 2, 64, 16, torch.float32, device)
    rows = sum(query_lens)
    q = torch.randn(rows + 5, 4, 64, device=device)  # 5 padding rows
    out = poisoned(q.shape, torch.float32, device)
    args = (batch.block_tables, batch.query_start_loc, batch.context_lens, 0.125, 20)
    paged_prefill_attention(
        q, batch.cache, *args, out=out, first_seq=2, num_splits=num_splits, num_rows=rows
    )
    want = paged_prefill_attention_ref(q[:rows], batch.cache, *args)
    assert out[:2].isnan().all() and out[rows:].isnan().all()  # still the poison
    assert_close(out[2:rows], want[2:], seed, f"prefill, {num_splits} KV splits")


def test_prefill_splits_fill_the_device_only_where_the_grid_is_small():
    assert prefill_splits(32, 2112, 132) == 4  # 100 tokens after 2,000: 32 programs
    assert prefill_splits(32, 8192, 132) == MAX_PREFILL_SPLITS  # after 8,000
    assert prefill_splits(544, 2112, 132) == 1  # a whole 2,100-token prompt fills it
    assert prefill_splits(128, 2112, 132) == 1  # 500 tokens: the merge would cost more
    assert prefill_splits(32, 1000, 132) == 1  # too short a context to split


def test_prefill_only_sees_the_causal_past(device, seed):
    """Poison the cache beyond each sequence's context and in unowned blocks: a kernel
    that reads past ctx (or past the query position) turns the output into NaN."""
    query_lens, ctx_lens = [5, 21], [13, 21]
    batch = make_paged_batch(ctx_lens, query_lens, 2, 64, 16, torch.float32, device)
    owned = {b for t in batch.tables for b in t}
    for b in range(batch.cache.shape[1]):
        if b not in owned:
            batch.cache[:, b] = float("nan")
    for table, ctx in zip(batch.tables, ctx_lens, strict=True):
        last, used = table[-1], ctx - 16 * (len(table) - 1)
        batch.cache[:, last, used:] = float("nan")
    q = torch.randn(26, 2, 64, device=device)
    args = (batch.block_tables, batch.query_start_loc, batch.context_lens, 0.125, 21)
    got = paged_prefill_attention(q, batch.cache, *args)
    assert_close(got, paged_prefill_attention_ref(q, batch.cache, *args), seed, "causal")
    # Changing a future token's value must not change an earlier query's output.
    pos = ctx_lens[1] - 1
    batch.cache[:, batch.tables[1][pos // 16], pos % 16] += 100.0
    again = paged_prefill_attention(q, batch.cache, *args)
    assert torch.equal(again[5:25], got[5:25]), f"seed={seed}: a query saw a future key"
    assert not torch.equal(again[25], got[25]), f"seed={seed}: last query missed its own key"


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 32)])
def test_prefill_real_shapes(device, seed, heads, kv_heads):
    # Mixed: full prompts, chunks after long prefixes, single tokens; contexts up to 4096.
    query_lens = [512, 2048, 1, 300, 1024, 7, 129]
    ctx_lens = [512, 4096, 4000, 300, 3000, 7, 1500]
    dtype = torch.bfloat16
    batch = make_paged_batch(ctx_lens, query_lens, kv_heads, 128, 16, dtype, device)
    q = torch.randn(sum(query_lens), heads, 128, device=device, dtype=dtype)
    out = poisoned(q.shape, dtype, device)
    args = (batch.block_tables, batch.query_start_loc, batch.context_lens, 128**-0.5, 2048)
    paged_prefill_attention(q, batch.cache, *args, out=out)
    assert_close(out, paged_prefill_attention_ref(q, batch.cache, *args), seed, "prefill real")


@pytest.mark.gpu
def test_prefill_split_kv_real_shapes(device, seed):
    # Llama-3.1-8B heads: 100 tokens after a 2,000-token cached prefix split the KV.
    query_lens, ctx_lens = [100], [2100]
    dtype = torch.bfloat16
    batch = make_paged_batch(ctx_lens, query_lens, 8, 128, 16, dtype, device)
    q = torch.randn(100, 32, 128, device=device, dtype=dtype)
    args = (batch.block_tables, batch.query_start_loc, batch.context_lens, 128**-0.5, 100)
    split = paged_prefill_attention(q, batch.cache, *args)
    whole = paged_prefill_attention(q, batch.cache, *args, num_splits=1)
    want = paged_prefill_attention_ref(q, batch.cache, *args)
    assert_close(split, want, seed, "split prefill real")
    assert_close(whole, want, seed, "unsplit prefill real")
