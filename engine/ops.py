"""The few operations whose implementation depends on the device, behind one interface.

`TorchOps` is the reference: plain torch, Hugging Face numerics, any device (the CPU
path and the tests). `TritonOps` calls the fused kernels in kernels/ (GPU fast path,
CUDA-graph safe: no host syncs, no data-dependent shapes on the decode path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tandem.engine.attention import AttentionMetadata, paged_attention_torch, store_kv


class TorchOps:
    name = "torch"

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(dtype)

    def add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the pre-norm residual stream, one call."""
        residual = residual + x
        return self.rms_norm(residual, weight, eps), residual

    @staticmethod
    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @staticmethod
    def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    @staticmethod
    def rope_tables(
        positions: torch.Tensor,
        inv_freq: torch.Tensor,
        cos_sin_cache: torch.Tensor | None,
        dtype: torch.dtype,
    ) -> tuple:
        """Per-step rotary tables, computed once and shared by every layer. Computed
        from positions exactly as transformers does, for bitwise-equal float32 output."""
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    @staticmethod
    def rotary(
        q: torch.Tensor, k: torch.Tensor, tables: tuple
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = tables
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def rotary_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple,
        cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Rotate q and k, store k and v in the cache, attend over the cache."""
        q, k = self.rotary(q, k, rope)
        store_kv(cache, k, v, meta.slot_mapping)
        return paged_attention_torch(q, cache, meta, scale)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class TritonOps(TorchOps):
    name = "triton"

    def __init__(self) -> None:
        from tandem.kernels.decode_attention import paged_decode_attention
        from tandem.kernels.gemv import gemv
        from tandem.kernels.prefill_attention import paged_prefill_attention
        from tandem.kernels.rmsnorm import fused_add_rms_norm, rms_norm
        from tandem.kernels.rotary_decode_attention import rotary_decode_attention
        from tandem.kernels.rotary_store_kv import rotary_store_kv
        from tandem.kernels.silu_mul import silu_and_mul

        self._rms_norm, self._add_rms_norm = rms_norm, fused_add_rms_norm
        self._silu_and_mul = silu_and_mul
        self._gemv = gemv
        self._rotary_store_kv = rotary_store_kv
        self._rotary_decode, self._prefill = rotary_decode_attention, paged_prefill_attention
        self._decode = paged_decode_attention
        # Set while engine/prefill_graphs.py captures a forward pass: called in place of
        # the attention kernels (after the rotary KV store), it ends one graph piece.
        self.split_attention = None

    def rms_norm(self, x, weight, eps):  # type: ignore[override]
        return self._rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        return self._add_rms_norm(x, residual, weight, eps)

    def silu_and_mul(self, x):  # type: ignore[override]
        return self._silu_and_mul(x)

    def linear(self, x, weight, bias):  # type: ignore[override]
        # One token (batch-1 decode): a weight stream, faster as a GEMV than as cuBLAS's
        # GEMM tiles (kernels/gemv.py). The interpreter would crawl through it on CPU.
        if x.shape[0] == 1 and x.is_cuda and x.stride(-1) == 1:
            return self._gemv(x, weight, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def rope_tables(positions, inv_freq, cos_sin_cache, dtype):  # type: ignore[override]
        return positions, cos_sin_cache

    def rotary_attention(self, q, k, v, rope, cache, meta, scale):
        positions, cos_sin_cache = rope
        if meta.max_query_len == 1:  # decode: rotary, store and attention in one kernel
            return self._rotary_decode(
                q,
                k,
                v,
                positions,
                cos_sin_cache,
                cache,
                meta.block_tables,
                meta.context_lens,
                meta.slot_mapping,
                scale,
                num_splits=meta.decode_splits,
            )
        # One kernel rotates q and k and writes k and v into the cache.
        q = self._rotary_store_kv(q, k, v, positions, cos_sin_cache, cache, meta.slot_mapping)
        if self.split_attention is not None:
            return self.split_attention(q, cache, meta, scale)
        return self.attend(q, cache, meta, scale)

    def attend(self, q, cache, meta, scale, out=None):
        """Attention of a step whose q is rotated and whose K/V are in the cache, into
        `out` (like q) or a new tensor."""
        decodes = meta.num_decode_rows
        rows = sum(meta.query_lens_host)  # q may have padding rows past them (graphs)
        if decodes == 0:
            return self._prefill(
                q,
                cache,
                meta.block_tables,
                meta.query_start_loc,
                meta.context_lens,
                scale,
                meta.max_query_len,
                out=out,
                num_rows=rows,
            )
        # A mixed step (chunked prefill beside decodes): the prefill kernel sizes its
        # query tiles by the longest chunk, so each decode row would compute up to 128
        # padded rows over its whole context; the decode kernel reads it once instead.
        # Sequence i < decodes is token i.
        out = torch.empty_like(q) if out is None else out
        self._decode(
            q[:decodes],
            cache,
            meta.block_tables[:decodes],
            meta.context_lens[:decodes],
            scale,
            out=out[:decodes],
        )
        self._prefill(
            q,
            cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.context_lens,
            scale,
            meta.max_query_len,
            out=out,
            first_seq=decodes,
            num_rows=rows,
        )
        return out


def make_ops(backend: str, device: torch.device) -> TorchOps:
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "torch":
        return TorchOps()
    if backend == "triton":
        return TritonOps()
    raise ValueError(f"unknown attention backend {backend!r} (auto, torch, triton)")
