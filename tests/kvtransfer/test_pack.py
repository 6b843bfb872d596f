from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.core.protocol import KVLayout
from tandem.kvtransfer.pack import check_block_ids
from tandem.kvtransfer.transport import (
    LayoutMismatch,
    check_layout,
    dtype_from_name,
    dtype_name,
    layout_of,
    pack_blocks,
    tensor_from_frame,
    tensor_to_frame,
    unpack_blocks,
)
from tests.kvtransfer.conftest import (
    BLOCK_SIZE,
    FLOAT_DTYPES,
    HEAD_DIM,
    KV_HEADS,
    NUM_BLOCKS,
    NUM_LAYERS,
    bits,
    make_caches,
)

SRC_BLOCKS = [9, 2, 5, 3]  # unordered, with gaps
DST_BLOCKS = [0, 11, 6, 4]
SENTINEL = float("nan")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_pack_unpack_round_trip_is_bit_exact_and_touches_only_target_blocks(dtype):
    src = make_caches(dtype)
    dst = make_caches(dtype, fill=SENTINEL)
    packed = pack_blocks(src, SRC_BLOCKS)
    assert packed.shape == (NUM_LAYERS, 2, len(SRC_BLOCKS), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    assert packed.dtype == dtype and packed.is_contiguous()

    unpack_blocks(dst, DST_BLOCKS, packed)

    untouched = [b for b in range(NUM_BLOCKS) if b not in DST_BLOCKS]
    sentinel_bits = bits(torch.full((), SENTINEL, dtype=dtype))
    for layer in range(NUM_LAYERS):
        for src_block, dst_block in zip(SRC_BLOCKS, DST_BLOCKS, strict=True):
            assert torch.equal(bits(dst[layer][:, dst_block]), bits(src[layer][:, src_block]))
        assert bool((bits(dst[layer][:, untouched]) == sentinel_bits).all())


def test_pack_orders_blocks_as_given_and_keeps_k_and_v_apart():
    caches = [torch.zeros(2, 4, 1, 1, 1) for _ in range(2)]
    for layer, cache in enumerate(caches):
        for kv in range(2):
            for block in range(4):
                cache[kv, block] = layer * 100 + kv * 10 + block
    packed = pack_blocks(caches, [3, 1])
    assert packed.flatten().tolist() == [3, 1, 13, 11, 103, 101, 113, 111]


def test_pack_into_a_reused_buffer_and_empty_block_list():
    src = make_caches(torch.float32)
    staging = torch.empty(NUM_LAYERS, 2, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    assert pack_blocks(src, [4, 1], out=staging) is staging
    assert torch.equal(staging[:, :, 0], torch.stack([c[:, 4] for c in src]))
    with pytest.raises(ValueError, match="out is"):
        pack_blocks(src, [4, 1, 2], out=staging)
    empty = pack_blocks(src, [])
    assert empty.shape[2] == 0
    unpack_blocks(src, [], empty)  # a no-op, not an error


@pytest.mark.parametrize(
    ("block_ids", "message"),
    [
        ([0, NUM_BLOCKS], "out of range"),
        ([-1], "out of range"),
        ([2, 2], "repeat"),
        ([1.5], "integer"),
        ([3, "4"], "'4' is not an integer"),
        ([[1]], "integer"),
        ([1, 2**70], "out of range"),
        ([7, 1, 7, 3], "repeat"),
    ],
)
def test_bad_block_ids_are_rejected_before_touching_memory(block_ids, message):
    caches = make_caches(torch.float32)
    with pytest.raises(ValueError, match=message):
        pack_blocks(caches, block_ids)


def test_checked_block_ids_come_back_as_int64_in_order():
    for ids in ([3, 0, 7], np.array([3, 0, 7], dtype=np.uint32), [np.int16(3), 0, 7]):
        checked = check_block_ids(ids, NUM_BLOCKS)
        assert checked.dtype == np.int64 and checked.tolist() == [3, 0, 7]
    assert check_block_ids([], NUM_BLOCKS).tolist() == []


def test_unpack_rejects_wrong_shape_or_dtype():
    caches = make_caches(torch.float32)
    packed = pack_blocks(caches, [1, 2])
    with pytest.raises(ValueError, match="caches need"):
        unpack_blocks(caches, [1, 2, 3], packed)
    with pytest.raises(ValueError, match="float16"):
        unpack_blocks(caches, [1, 2], packed.half())


def test_dtype_names_round_trip_and_unknown_names_are_rejected():
    for dtype in (*FLOAT_DTYPES, torch.float8_e4m3fn, torch.int8):
        assert dtype_from_name(dtype_name(dtype)) is dtype
    assert dtype_name(torch.bfloat16) == "bfloat16"
    for bad in ("torch.float32", "Tensor", "float", "", "__class__"):
        with pytest.raises(ValueError, match="unsupported"):
            dtype_from_name(bad)
    with pytest.raises(ValueError, match="unsupported"):
        dtype_name(torch.complex64)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_frame_round_trip_is_bit_exact(dtype):
    tensor = torch.randn(3, 5).to(dtype)
    frame = tensor_to_frame(tensor)
    assert frame.nbytes == tensor.numel() * tensor.element_size()
    back = tensor_from_frame(bytes(frame), dtype_name(dtype), [3, 5])
    assert back.dtype == dtype and torch.equal(bits(back), bits(tensor))


def test_frame_of_a_non_contiguous_tensor_holds_its_logical_order():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    back = tensor_from_frame(bytes(tensor_to_frame(tensor)), "float32", [4, 3])
    assert torch.equal(back, tensor)


def test_frame_from_writable_buffer_is_zero_copy_and_read_only_one_is_copied():
    buffer = bytearray(torch.arange(4, dtype=torch.float32).numpy().tobytes())
    aliased = tensor_from_frame(buffer, "float32", [4])
    buffer[0:4] = torch.tensor([7.0]).numpy().tobytes()
    assert aliased[0].item() == 7.0
    copied = tensor_from_frame(bytes(buffer), "float32", [4])  # no non-writable warning
    assert copied.tolist() == [7.0, 1.0, 2.0, 3.0]


def test_frame_at_a_misaligned_offset_is_read_correctly():
    values = torch.tensor([1.5, -2.25, 3.0], dtype=torch.float32)
    buffer = bytearray(1) + bytearray(values.numpy().tobytes())
    back = tensor_from_frame(memoryview(buffer)[1:], "float32", [3])
    assert back.data_ptr() % 4 == 0 and torch.equal(back, values)


@pytest.mark.parametrize(
    ("size", "dtype", "shape", "message"),
    [
        (15, "float32", [4], "needs 16 bytes"),
        (17, "float32", [4], "needs 16 bytes"),
        (8, "bfloat16", [2, 3], "needs 12 bytes"),
        (8, "float32", [-2, -1], "invalid tensor shape"),
        (8, "complex64", [1], "unsupported"),
    ],
)
def test_frame_with_wrong_size_shape_or_dtype_is_rejected(size, dtype, shape, message):
    with pytest.raises(ValueError, match=message):
        tensor_from_frame(bytes(size), dtype, shape)


def test_layout_of_describes_the_caches_and_validates_them():
    caches = make_caches(torch.bfloat16)
    layout = layout_of(caches, "smollm2", BLOCK_SIZE)
    assert layout == KVLayout(
        model="smollm2",
        dtype="bfloat16",
        block_size=BLOCK_SIZE,
        num_layers=NUM_LAYERS,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
    )
    with pytest.raises(ValueError, match="blocks of"):
        layout_of(caches, "smollm2", BLOCK_SIZE * 2)
    with pytest.raises(ValueError, match="layer 1"):
        layout_of([caches[0], caches[1].float()], "smollm2", BLOCK_SIZE)


def test_check_layout_names_the_differing_field():
    mine = layout_of(make_caches(torch.float16), "smollm2", BLOCK_SIZE)
    check_layout(mine, mine)
    theirs = layout_of(make_caches(torch.float32), "smollm2", BLOCK_SIZE)
    with pytest.raises(LayoutMismatch, match="dtype") as info:
        check_layout(mine, theirs)
    assert isinstance(info.value, ValueError)
    with pytest.raises(LayoutMismatch, match="head_dim: 8 != 16"):
        check_layout(mine, KVLayout(**{**_fields(mine), "head_dim": 16}))


def _fields(layout: KVLayout) -> dict:
    return {name: getattr(layout, name) for name in layout.__struct_fields__}


@pytest.mark.parametrize(
    "kind, heads, dtype",
    [("latent", 1, "bfloat16"), ("kv", 2, "float8_e4m3fn"), ("latent", 1, "float8_e5m2")],
)
def test_any_declared_layout_packs_ships_and_unpacks_bit_exact(kind, heads, dtype):
    """A latent (MLA) or FP8 cache goes through the same pack / frame / unpack path as
    today's K/V cache: the transports read the layout, they do not spell it out."""
    from tandem.core.kv_layout import KVLayout
    from tandem.engine.kv_cache import KVCache
    from tandem.kvtransfer.wire import kv_header, kv_payload_nbytes

    layout = KVLayout(
        model="m",
        dtype=dtype,
        block_size=4,
        num_layers=3,
        num_kv_heads=heads,
        head_dim=16,
        kind=kind,
    )
    src, dst = KVCache(layout, 10, "cpu"), KVCache(layout, 12, "cpu")
    src.tensor.view(torch.uint8).copy_(
        torch.randint(0, 120, src.tensor.view(torch.uint8).shape, dtype=torch.uint8)
    )
    assert layout_of(src.layers, "m", 4, kind=kind) == layout
    blocks, _ = src.blocks.reserve("r", 9)
    packed = src.pack(blocks)
    assert tuple(packed.shape) == layout.cache_shape(3)
    header = kv_header("r", blocks, packed)
    assert kv_payload_nbytes(header) == 3 * layout.bytes_per_block
    frame = tensor_to_frame(packed)
    received = tensor_from_frame(frame, header.dtype, header.shape)
    targets, _ = dst.blocks.reserve("r", 9)
    dst.unpack(targets, received)
    for s, d in zip(blocks, targets, strict=True):
        assert torch.equal(bits(dst.tensor[:, :, d]), bits(src.tensor[:, :, s]))
    assert dst.blocks.num_used_blocks == 3


def test_layout_sizes_follow_kind_and_dtype():
    from tandem.core.kv_layout import KVLayout

    base = dict(model="m", block_size=16, num_layers=32, num_kv_heads=8, head_dim=128)
    bf16 = KVLayout(dtype="bfloat16", **base)
    assert bf16.bytes_per_token == 32 * 2 * 8 * 128 * 2  # Llama-3.1-8B: 128 KiB per token
    assert bf16.bytes_per_block == 16 * bf16.bytes_per_token
    assert KVLayout(dtype="float8_e4m3fn", **base).bytes_per_token == bf16.bytes_per_token // 2
    latent = KVLayout(
        **{**base, "num_kv_heads": 1, "head_dim": 576}, dtype="bfloat16", kind="latent"
    )
    assert latent.layer_shape(5) == (1, 5, 16, 1, 576)
    assert latent.bytes_per_token == 32 * 576 * 2
    with pytest.raises(ValueError, match="one head"):
        KVLayout(**base, dtype="bfloat16", kind="latent")
    assert bf16.cache_salt() != KVLayout(dtype="float8_e4m3fn", **base).cache_salt()
