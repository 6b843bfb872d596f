"""Rotary position embedding, rotate-half (GPT-NeoX / Hugging Face Llama) layout, in place.

For a head vector x = [x1, x2] (halves of head_dim) at position p:
    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin
with cos/sin of p * inv_freq read from a [max_pos, head_dim] float32 table (first half
cos, second half sin). One program per token rotates all q and k heads of that token,
so the cos/sin row is loaded once. Math is float32 with one rounding to the q/k dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tandem.kernels._utils import next_pow2


@triton.jit
def _rotate_heads(
    ptr, stride_t, stride_h, token, num_heads, cos, sin, BLOCK_H: tl.constexpr, HALF: tl.constexpr
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, HALF)
    mask = (heads < num_heads)[:, None]
    p1 = ptr + token * stride_t + heads[:, None] * stride_h + dims[None, :]
    x1 = tl.load(p1, mask=mask).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(p1, out1.to(ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, out2.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    num_heads,
    num_kv_heads,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF)
    cos = tl.load(cache_ptr + pos * stride_cache + dims)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + dims)
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, num_heads, cos, sin, BLOCK_HQ, HALF)
    _rotate_heads(k_ptr, stride_kt, stride_kh, token, num_kv_heads, cos, sin, BLOCK_HK, HALF)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, H, D] and k [T, KVH, D] IN PLACE at `positions` [T]; returns (q, k).

    q/k may be strided views (e.g. slices of a fused QKV output) as long as head_dim is
    contiguous. Positions must be < cos_sin_cache.shape[0] (not checked on device).
    """
    num_tokens, num_heads, head_dim = q.shape
    if k.shape[0] != num_tokens or k.shape[2] != head_dim or positions.shape != (num_tokens,):
        raise ValueError("q, k and positions disagree on tokens or head_dim")
    if cos_sin_cache.shape[1] != head_dim or cos_sin_cache.dtype != torch.float32:
        raise ValueError("cos_sin_cache must be float32 [max_pos, head_dim]")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rotary works in place and needs a contiguous head_dim")
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_heads,
        k.shape[1],
        HALF=half,
        BLOCK_HQ=next_pow2(num_heads),
        BLOCK_HK=next_pow2(k.shape[1]),
        num_warps=4 if num_heads * head_dim >= 2048 else 2,
    )
    return q, k


def build_cos_sin_cache(
    inv_freq: torch.Tensor, max_position: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """[max_position, head_dim] float32: cos(p * inv_freq) | sin(p * inv_freq).

    `inv_freq` is engine.layers.rope_inv_freq(...) (Llama-3 scaling already applied); the
    products are formed exactly as RotaryEmbedding.cos_sin does, so values agree bitwise.
    """
    inv_freq = inv_freq.to(device=device, dtype=torch.float32)
    positions = torch.arange(max_position, device=inv_freq.device).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).contiguous()


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch apply_rotary; returns NEW tensors (inputs untouched)."""
    half = cos_sin_cache.shape[1] // 2
    table = cos_sin_cache[positions.long()]
    cos, sin = table[:, None, :half], table[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
