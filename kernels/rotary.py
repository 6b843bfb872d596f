"""Rotary position embedding, rotate-half (GPT-NeoX / Hugging Face Llama) layout: the
cos/sin table the kernels read, and the pure-torch reference they are tested against.

For a head vector x = [x1, x2] (halves of head_dim) at position p:
    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin
with cos/sin of p * inv_freq read from a [max_pos, head_dim] float32 table (first half
cos, second half sin). The kernels (rotary_store_kv, rotary_decode_attention) fuse the
rotation into their launches; the math is float32 with one rounding to the q/k dtype.
"""

from __future__ import annotations

import torch


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
    """Rotate q [T, H, D] and k [T, KVH, D] at `positions`; returns NEW tensors."""
    half = cos_sin_cache.shape[1] // 2
    table = cos_sin_cache[positions.long()]
    cos, sin = table[:, None, :half], table[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)
