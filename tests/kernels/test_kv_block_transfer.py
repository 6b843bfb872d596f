"""kv_block_transfer (every layer's blocks between two caches, one launch) against its
torch reference: bit-exact, and blocks outside the destination ids untouched."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.kv_block_transfer import kv_block_transfer, kv_block_transfer_ref
from tests.kernels.helpers import DTYPES, poisoned


def _ids(src_blocks: int, dst_blocks: int, n: int, device: str) -> torch.Tensor:
    """Unordered, non-contiguous source and destination ids (each without repeats)."""
    src = torch.randperm(src_blocks)[:n]
    dst = torch.randperm(dst_blocks)[:n]
    return torch.stack([src, dst]).to(torch.int32).to(device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "layers,block_size,heads,dim",
    [(3, 16, 2, 64), (2, 4, 1, 128), (2, 3, 1, 24), (1, 5, 3, 7)],
    ids=["even", "one-head", "masked-tail", "unaligned"],
)
@pytest.mark.parametrize("n", [0, 1, 5])
def test_matches_reference_bit_exact(device, seed, dtype, layers, block_size, heads, dim, n):
    src = torch.randn(layers, 2, 9, block_size, heads, dim).to(dtype).to(device)
    dst = poisoned((layers, 2, 6, block_size, heads, dim), dtype, device)
    want = dst.clone()
    ids = _ids(9, 6, n, device)
    kv_block_transfer(src, dst, ids)
    kv_block_transfer_ref(src, want, ids)
    # NaN poison compares equal bit for bit, so untouched blocks are checked too.
    assert torch.equal(_bits(dst), _bits(want)), f"seed={seed}"


@pytest.mark.parametrize("n", [1, 4])
def test_a_latent_cache_of_one_plane_moves_the_same_way(device, seed, n):
    """KVLayout kind "latent" (MLA): [layers, 1, blocks, block_size, 1, latent]."""
    src = torch.randn(3, 1, 7, 4, 1, 40, device=device)
    dst = poisoned((3, 1, 5, 4, 1, 40), torch.float32, device)
    want = dst.clone()
    ids = _ids(7, 5, n, device)
    kv_block_transfer(src, dst, ids)
    kv_block_transfer_ref(src, want, ids)
    assert torch.equal(_bits(dst), _bits(want)), f"seed={seed}"


def test_destination_view_with_an_offset_and_more_blocks(device, seed):
    # A window of a bigger tensor: non-zero base offset, strides of the bigger cache.
    src = torch.randn(3, 2, 5, 8, 2, 32, device=device)
    big = poisoned((3, 2, 20, 8, 2, 32), torch.float32, device)
    dst = big[:, :, 4:15]
    expected = big.clone()
    ids = _ids(5, 11, 4, device)
    kv_block_transfer(src, dst, ids)
    kv_block_transfer_ref(src, expected[:, :, 4:15], ids)
    assert torch.equal(_bits(big), _bits(expected)), f"seed={seed}"


@pytest.mark.parametrize(
    "dst_shape,dtype,why",
    [
        ((2, 2, 4, 4, 1, 16), torch.float32, "differ beyond blocks"),
        ((1, 2, 4, 4, 2, 16), torch.float32, "differ beyond blocks"),
        ((2, 2, 4, 4, 2, 16), torch.bfloat16, "dst is torch.bfloat16"),
        ((2, 4, 4, 2, 16), torch.float32, "need KVLayout.cache_shape"),
    ],
)
def test_rejects_incompatible_caches(device, dst_shape, dtype, why):
    src = torch.zeros(2, 2, 4, 4, 2, 16, device=device)
    dst = torch.zeros(dst_shape, dtype=dtype, device=device)
    ids = torch.zeros(2, 1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match=why):
        kv_block_transfer(src, dst, ids)


def test_rejects_ids_that_are_not_two_int32_rows(device):
    src = torch.zeros(1, 2, 4, 4, 2, 16, device=device)
    dst = torch.zeros_like(src)
    for ids in (
        torch.zeros(2, 3, dtype=torch.int64, device=device),
        torch.zeros(3, 2, dtype=torch.int32, device=device),
        torch.zeros(3, 2, dtype=torch.int32, device=device).t(),
    ):
        with pytest.raises(ValueError, match="block_ids"):
            kv_block_transfer(src, dst, ids)


def test_rejects_non_contiguous_blocks(device):
    src = torch.zeros(1, 2, 4, 4, 16, 2, device=device).transpose(4, 5)
    with pytest.raises(ValueError, match="not contiguous"):
        kv_block_transfer(src, src.clone(), torch.zeros(2, 1, dtype=torch.int32, device=device))


@pytest.mark.gpu
def test_llama_8b_shape_between_caches_of_different_sizes(device, seed):
    # 128 blocks of 16 tokens: one 2048-token request, 256 MiB of bf16 KV.
    src = torch.randn(32, 2, 1024, 16, 8, 128, device=device, dtype=torch.bfloat16)
    dst = poisoned((32, 2, 512, 16, 8, 128), torch.bfloat16, device)
    want = dst.clone()
    ids = _ids(1024, 512, 128, device)
    kv_block_transfer(src, dst, ids)
    kv_block_transfer_ref(src, want, ids)
    assert torch.equal(_bits(dst), _bits(want)), f"seed={seed}"
