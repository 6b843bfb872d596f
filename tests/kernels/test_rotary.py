"""apply_rotary (in place) against its torch reference."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache
from tests.kernels.helpers import DTYPES, assert_close


def _qkv(tokens, heads, kv_heads, head_dim, dtype, device):
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype).to(device)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    return qkv, q, k


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 64), (3, 3, 128), (8, 1, 16)])
def test_rotary_in_place(device, seed, dtype, heads, kv_heads, head_dim):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    table = build_cos_sin_cache(inv_freq, 512, device)
    qkv, q, k = _qkv(11, heads, kv_heads, head_dim, dtype, device)
    positions = torch.randint(0, 512, (11,), device=device)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    want_q, want_k = apply_rotary_ref(q, k, positions, table)
    got_q, got_k = apply_rotary(q, k, positions, table)
    assert got_q is q and got_k is k  # in place
    assert_close(q, want_q, seed, "q")
    assert_close(k, want_k, seed, "k")
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before), f"seed={seed}"


@pytest.mark.gpu
def test_rotary_real_shapes(device, seed):
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
    table = build_cos_sin_cache(inv_freq, 8192, device)
    _, q, k = _qkv(4096, 32, 8, 128, torch.bfloat16, device)
    positions = torch.randint(0, 8192, (4096,), device=device)
    want_q, want_k = apply_rotary_ref(q, k, positions, table)
    apply_rotary(q, k, positions, table)
    assert_close(q, want_q, seed, "q")
    assert_close(k, want_k, seed, "k")
