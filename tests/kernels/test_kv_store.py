"""store_kv scatter against its torch reference."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.kv_store import store_kv, store_kv_ref
from tests.kernels.helpers import DTYPES, assert_close


def _case(device, cache_dtype, src_dtype, tokens, kv_heads, head_dim, block_size, blocks):
    cache = torch.full(
        (2, blocks, block_size, kv_heads, head_dim), float("nan"), dtype=cache_dtype, device=device
    )
    slots = torch.randperm(blocks * block_size, device=device)[:tokens]
    slots[torch.rand(tokens, device=device) < 0.25] = -1  # padding tokens
    # K/V as views into one fused QKV output, as the model produces them.
    qkv = torch.randn(tokens, (2 + 2 * kv_heads) * head_dim, device=device).to(src_dtype)
    key = qkv[:, 2 * head_dim : (2 + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    value = qkv[:, (2 + kv_heads) * head_dim :].view(tokens, kv_heads, head_dim)
    return cache, key, value, slots


@pytest.mark.parametrize(
    "src_dtype,cache_dtype", [(d, d) for d in DTYPES] + [(torch.float32, torch.bfloat16)]
)
@pytest.mark.parametrize("kv_heads,head_dim,block_size", [(2, 64, 16), (3, 128, 8), (1, 16, 16)])
def test_store_kv_matches_reference(
    device, seed, src_dtype, cache_dtype, kv_heads, head_dim, block_size
):
    cache, key, value, slots = _case(
        device, cache_dtype, src_dtype, 37, kv_heads, head_dim, block_size, 9
    )
    want = cache.clone()
    store_kv_ref(want, key, value, slots)
    store_kv(cache, key, value, slots)
    # Untouched slots stay NaN in both. Same-dtype stores are bitwise copies; a casting
    # store may differ by one bf16 ulp, since the interpreter truncates fp32 -> bf16 where
    # the GPU (and torch) round to nearest even.
    exact = src_dtype == cache_dtype
    torch.testing.assert_close(
        cache,
        want,
        rtol=0 if exact else 1e-2,
        atol=0 if exact else 1e-2,
        equal_nan=True,
        msg=lambda m: f"seed={seed}\n{m}",
    )
    written = int((~cache[0].isnan()).all(-1).all(-1).sum())
    assert written == int((slots >= 0).sum()), f"seed={seed}"


@pytest.mark.gpu
def test_store_kv_real_shapes(device, seed):
    cache, key, value, slots = _case(device, torch.bfloat16, torch.bfloat16, 8192, 8, 128, 16, 4096)
    want = cache.clone()
    store_kv_ref(want, key, value, slots)
    store_kv(cache, key, value, slots)
    assert_close(cache.nan_to_num(0.0), want.nan_to_num(0.0), seed, "store_kv real shapes")
    assert torch.equal(cache.isnan(), want.isnan()), f"seed={seed}"
