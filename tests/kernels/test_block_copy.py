"""pack_blocks / unpack_blocks (all layers, one launch) against their torch references."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.block_copy import pack_blocks, pack_blocks_ref, unpack_blocks, unpack_blocks_ref
from tests.kernels.helpers import DTYPES, poisoned


def _caches(layers, blocks, block_size, kv_heads, head_dim, dtype, device):
    return [
        torch.randn(2, blocks, block_size, kv_heads, head_dim).to(dtype).to(device)
        for _ in range(layers)
    ]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,kv_heads,head_dim", [(16, 2, 64), (8, 1, 128)])
def test_pack_unpack_round_trip(device, seed, dtype, block_size, kv_heads, head_dim):
    src = _caches(3, 12, block_size, kv_heads, head_dim, dtype, device)
    ids = torch.randperm(12, device=device)[:5]  # unordered, non-contiguous
    out = poisoned((3, 2, 5, block_size, kv_heads, head_dim), dtype, device)
    packed = pack_blocks(src, ids, out=out)
    assert packed is out
    assert torch.equal(packed, pack_blocks_ref(src, ids)), f"seed={seed}"

    dst = [torch.full_like(c, float("nan")) for c in src]
    want = [c.clone() for c in dst]
    dst_ids = torch.randperm(12, device=device)[:5]
    unpack_blocks(dst, dst_ids, packed)
    unpack_blocks_ref(want, dst_ids, packed)
    for layer, (got, ref) in enumerate(zip(dst, want, strict=True)):
        # Bitwise, and blocks outside dst_ids stay untouched (NaN).
        assert torch.equal(got.nan_to_num(7.0), ref.nan_to_num(7.0)), f"layer {layer} seed={seed}"
        assert torch.equal(got.isnan(), ref.isnan()), f"layer {layer} seed={seed}"


def test_pack_rejects_mixed_layers(device):
    caches = _caches(2, 4, 16, 2, 64, torch.float32, device)
    caches[1] = caches[1].to(torch.bfloat16)
    with pytest.raises(ValueError):
        pack_blocks(caches, torch.tensor([0, 1], device=device))


@pytest.mark.gpu
def test_pack_unpack_real_shapes(device, seed):
    src = _caches(32, 2048, 16, 8, 128, torch.bfloat16, device)
    ids = torch.randperm(2048, device=device)[:256]
    packed = pack_blocks(src, ids)
    assert torch.equal(packed, pack_blocks_ref(src, ids)), f"seed={seed}"
    dst = [torch.zeros_like(c) for c in src]
    unpack_blocks(dst, ids, packed)
    for layer in range(32):
        assert torch.equal(dst[layer][:, ids], src[layer][:, ids]), f"seed={seed}"
