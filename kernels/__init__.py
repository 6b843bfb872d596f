"""Triton kernels for the GPU fast path, one per module, each with a `<name>_ref`
pure-torch reference beside it. All run on CPU under TRITON_INTERPRET=1 (tests)."""

from kernels.block_copy import pack_blocks, pack_blocks_ref, unpack_blocks, unpack_blocks_ref
from kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from kernels.gemv import gemv, gemv_ref
from kernels.kv_block_transfer import kv_block_transfer, kv_block_transfer_ref
from kernels.kv_store import store_kv, store_kv_ref
from kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from kernels.rmsnorm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from kernels.rotary import apply_rotary, apply_rotary_ref, build_cos_sin_cache
from kernels.rotary_decode_attention import rotary_decode_attention, rotary_decode_attention_ref
from kernels.rotary_store_kv import rotary_store_kv, rotary_store_kv_ref
from kernels.silu_mul import silu_and_mul, silu_and_mul_ref

__all__ = [
    "apply_rotary",
    "apply_rotary_ref",
    "build_cos_sin_cache",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "gemv",
    "gemv_ref",
    "kv_block_transfer",
    "kv_block_transfer_ref",
    "pack_blocks",
    "pack_blocks_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_decode_attention",
    "rotary_decode_attention_ref",
    "rotary_store_kv",
    "rotary_store_kv_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "store_kv",
    "store_kv_ref",
    "unpack_blocks",
    "unpack_blocks_ref",
]
