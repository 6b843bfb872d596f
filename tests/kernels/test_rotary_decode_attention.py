"""rotary_decode_attention (rotary + KV store + decode attention in one launch) against
its reference: rotary_store_kv_ref, then paged_decode_attention_ref."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.rotary import build_cos_sin_cache
from tandem.kernels.rotary_decode_attention import (
    rotary_decode_attention,
    rotary_decode_attention_ref,
)
from tests.kernels.helpers import DTYPES, assert_close, make_paged_batch, poisoned

# (ctx_lens, heads, kv_heads, head_dim, block_size, num_splits)
CASES = [
    ([1, 16, 17, 75, 0], 4, 4, 64, 16, 1),  # MHA, direct, a first token, a padding row
    ([33, 130, 5, 64], 8, 2, 64, 16, 3),  # GQA 4, the newest token alone in its split
    ([9, 64, 200], 8, 2, 128, 8, None),  # head_dim 128, heuristic splits
    ([70, 0, 1], 10, 2, 64, 16, 2),  # GQA 5, padding row
    ([40, 97], 32, 1, 32, 16, 4),  # two head blocks share a kv head: one stores it
]


def _case(device, dtype, ctx_lens, heads, kv_heads, head_dim, block_size):
    batch = make_paged_batch(
        ctx_lens, [1] * len(ctx_lens), kv_heads, head_dim, block_size, dtype, device
    )
    n = len(ctx_lens)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * head_dim).to(dtype).to(device)
    q = qkv[:, : heads * head_dim].view(n, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(n, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(n, kv_heads, head_dim)
    slots, positions = [], []
    for ctx, table in zip(ctx_lens, batch.tables, strict=True):
        newest = ctx - 1
        slots.append(table[newest // block_size] * block_size + newest % block_size if ctx else -1)
        positions.append(max(newest, 0))
    slot_t = torch.tensor(slots, device=device)
    for slot in slots:  # the newest slot holds junk: it must be written, never read
        if slot >= 0:
            batch.cache[:, slot // block_size, slot % block_size] = float("nan")
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    table = build_cos_sin_cache(inv_freq, max(ctx_lens) + 1, device)
    return batch, q, k, v, torch.tensor(positions, device=device), table, slot_t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ctx_lens,heads,kv_heads,head_dim,block_size,splits", CASES)
def test_rotary_decode_matches_reference(
    device, seed, dtype, ctx_lens, heads, kv_heads, head_dim, block_size, splits
):
    batch, q, k, v, positions, table, slots = _case(
        device, dtype, ctx_lens, heads, kv_heads, head_dim, block_size
    )
    qkv_before = [t.clone() for t in (q, k, v)]
    want_cache = batch.cache.clone()
    want = rotary_decode_attention_ref(
        q,
        k,
        v,
        positions,
        table,
        want_cache,
        batch.block_tables,
        batch.context_lens,
        slots,
        head_dim**-0.5,
    )
    out = poisoned(q.shape, dtype, device)
    got = rotary_decode_attention(
        q,
        k,
        v,
        positions,
        table,
        batch.cache,
        batch.block_tables,
        batch.context_lens,
        slots,
        head_dim**-0.5,
        splits,
        out,
    )
    assert got is out
    assert_close(got, want, seed, f"out ctx={ctx_lens} splits={splits}")
    assert not batch.cache.isnan().any(), f"the newest slots were not written (seed={seed})"
    assert_close(batch.cache, want_cache, seed, "cache")
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), qkv_before, strict=True))
    if 0 in ctx_lens:
        assert torch.count_nonzero(got[ctx_lens.index(0)]) == 0, f"seed={seed}"


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [None, 8, 1])
def test_rotary_decode_real_shapes(device, seed, splits):
    ctx_lens = [1, 128, 385, 4000, 17, 0, 2048, 511]
    batch, q, k, v, positions, table, slots = _case(
        device, torch.bfloat16, ctx_lens, 32, 8, 128, 16
    )
    want_cache = batch.cache.clone()
    want = rotary_decode_attention_ref(
        q, k, v, positions, table, want_cache, batch.block_tables, batch.context_lens, slots, 0.088
    )
    got = rotary_decode_attention(
        q,
        k,
        v,
        positions,
        table,
        batch.cache,
        batch.block_tables,
        batch.context_lens,
        slots,
        0.088,
        splits,
    )
    assert_close(got, want, seed, f"real shapes splits={splits}")
    assert_close(batch.cache, want_cache, seed, "cache")
