"""paged_decode_attention (split-KV) against its float32 torch reference."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.decode_attention import (
    decode_num_splits,
    heads_per_program,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from tests.kernels.helpers import DTYPES, assert_close, make_paged_batch, poisoned

# (ctx_lens, heads, kv_heads, head_dim, block_size, num_splits)
CASES = [
    ([1, 16, 17, 75, 0], 4, 4, 64, 16, 1),  # MHA, block-boundary contexts, direct path
    ([33, 130, 5, 64], 8, 2, 64, 16, 3),  # GQA 4, splits with an empty tail split
    ([9, 64, 200], 8, 2, 128, 8, None),  # head_dim 128, block 8, heuristic splits
    ([70, 0, 1], 10, 2, 64, 16, 2),  # GQA 5 (not a power of two), empty padding row
    ([40, 97], 32, 1, 32, 16, 4),  # GQA 32: two head blocks share one kv head
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx_lens,heads,kv_heads,head_dim,block_size,splits", CASES)
def test_decode_matches_reference(
    device, seed, dtype, ctx_lens, heads, kv_heads, head_dim, block_size, splits
):
    batch = make_paged_batch(
        ctx_lens, [1] * len(ctx_lens), kv_heads, head_dim, block_size, dtype, device
    )
    q = torch.randn(len(ctx_lens), heads, head_dim).to(dtype).to(device)
    scale = head_dim**-0.5
    out = poisoned(q.shape, dtype, device)
    got = paged_decode_attention(
        q, batch.cache, batch.block_tables, batch.context_lens, scale, num_splits=splits, out=out
    )
    assert got is out
    want = paged_decode_attention_ref(q, batch.cache, batch.block_tables, batch.context_lens, scale)
    assert_close(got, want, seed, f"decode ctx={ctx_lens} splits={splits}")
    if 0 in ctx_lens:  # a padding row must come out as zeros, not NaN
        assert torch.count_nonzero(got[ctx_lens.index(0)]) == 0, f"seed={seed}"


def test_decode_split_counts_agree(device, seed):
    """Every split count gives the same answer (up to fp32 reassociation)."""
    batch = make_paged_batch([150, 31], [1, 1], 2, 64, 16, torch.float32, device)
    q = torch.randn(2, 4, 64, device=device)
    outs = [
        paged_decode_attention(
            q, batch.cache, batch.block_tables, batch.context_lens, 0.1, num_splits=s
        )
        for s in (1, 2, 5, 16)
    ]
    for s, o in zip((2, 5, 16), outs[1:], strict=True):
        assert_close(o, outs[0], seed, f"num_splits={s} vs 1")


def test_decode_strided_query(device, seed):
    """q as a view into a fused QKV output (row stride > heads * head_dim)."""
    batch = make_paged_batch([20, 45], [1, 1], 2, 64, 16, torch.float32, device)
    qkv = torch.randn(2, (4 + 2 * 2) * 64, device=device)
    q = qkv[:, : 4 * 64].view(2, 4, 64)
    got = paged_decode_attention(
        q, batch.cache, batch.block_tables, batch.context_lens, 0.125, num_splits=2
    )
    want = paged_decode_attention_ref(q, batch.cache, batch.block_tables, batch.context_lens, 0.125)
    assert_close(got, want, seed, "strided q")


def test_split_heuristic_fills_an_h100():
    cpu = torch.device("cpu")  # num_sms() reports an H100's 132 off-GPU
    # Big batch: already > 2 waves of (sequence, kv head) programs -> no split.
    assert decode_num_splits(64, 8, 4096, cpu) == 1
    # One long sequence: split until ~264 programs, capped by 256-token slices.
    assert decode_num_splits(1, 8, 8192, cpu) == 32
    assert decode_num_splits(1, 8, 1024, cpu) == 4
    assert decode_num_splits(4, 1, 1 << 20, cpu) == 64  # MAX_SPLITS
    assert decode_num_splits(1, 1, 10, cpu) == 1
    # The short-context graphs slice into single tiles (64 tokens).
    assert decode_num_splits(1, 8, 512, cpu, min_tokens_per_split=64) == 8
    assert decode_num_splits(8, 8, 512, cpu, min_tokens_per_split=64) == 5
    assert [heads_per_program(g) for g in (1, 4, 5, 8, 16, 32, 24, 7)] == [
        1,
        4,
        5,
        8,
        16,
        16,
        12,
        7,
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, None, 8])
@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (32, 32), (28, 4)])
def test_decode_real_shapes(device, seed, splits, heads, kv_heads):
    ctx_lens = torch.randint(1, 4097, (64,)).tolist()
    ctx_lens[:3] = [1, 16, 4096]
    dtype = torch.bfloat16
    batch = make_paged_batch(ctx_lens, [1] * 64, kv_heads, 128, 16, dtype, device)
    q = torch.randn(64, heads, 128, device=device, dtype=dtype)
    out = poisoned(q.shape, dtype, device)
    paged_decode_attention(
        q,
        batch.cache,
        batch.block_tables,
        batch.context_lens,
        128**-0.5,
        num_splits=splits,
        out=out,
    )
    want = paged_decode_attention_ref(
        q, batch.cache, batch.block_tables, batch.context_lens, 128**-0.5
    )
    assert_close(out, want, seed, f"decode real shapes splits={splits}")
