"""rotary_store_kv (rotate q in place, rotated k and v into the paged cache) against
its reference: the unfused rotary + store_kv references."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.rotary import build_cos_sin_cache
from tandem.kernels.rotary_store_kv import rotary_store_kv, rotary_store_kv_ref
from tests.kernels.helpers import DTYPES, assert_close


def _case(device, dtype, tokens, heads, kv_heads, head_dim, block_size, blocks, max_pos):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    table = build_cos_sin_cache(inv_freq, max_pos, device)
    # q/k/v as views into one fused QKV output, as the model produces them.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype).to(device)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, max_pos, (tokens,), device=device)
    slots = torch.randperm(blocks * block_size, device=device)[:tokens]
    slots[torch.rand(tokens, device=device) < 0.25] = -1  # padding tokens
    cache = torch.full(
        (2, blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=device
    )
    return qkv, q, k, v, positions, table, cache, slots


def _check(case, seed):
    qkv, q, k, v, positions, table, cache, slots = case
    k_before = k.clone()
    want_cache = cache.clone()
    want_q = rotary_store_kv_ref(q, k, v, positions, table, want_cache, slots)
    got = rotary_store_kv(q, k, v, positions, table, cache, slots)
    assert got is q  # in place
    assert_close(q, want_q, seed, "q")
    # Slots never written stay NaN on both sides; written ones match.
    assert torch.equal(cache.isnan(), want_cache.isnan()), f"seed={seed}"
    written = ~want_cache.isnan()
    assert_close(cache[written], want_cache[written], seed, "cache")
    assert torch.equal(k, k_before), f"k must only be read (seed={seed})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "heads,kv_heads,head_dim,block_size", [(4, 2, 64, 16), (3, 3, 128, 8), (8, 1, 16, 4)]
)
def test_rotary_store_kv_matches_reference(
    device, seed, dtype, heads, kv_heads, head_dim, block_size
):
    _check(_case(device, dtype, 19, heads, kv_heads, head_dim, block_size, 7, 256), seed)


@pytest.mark.gpu
def test_rotary_store_kv_real_shapes(device, seed):
    _check(_case(device, torch.bfloat16, 4096, 32, 8, 128, 16, 2048, 8192), seed)
