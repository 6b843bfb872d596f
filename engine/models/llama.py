"""Llama-family decoder (Llama 2/3/3.1, Mistral, SmolLM2), also serving Qwen2 (QKV bias)
and Qwen3 (per-head q/k RMSNorm) through switches in ModelConfig.

Tokens of all sequences in a step are one flat batch ([tokens, hidden]); only attention
looks at sequence boundaries, through AttentionMetadata. Q/K/V and gate/up projections
are fused at load time (see `weight_mapping`). The residual stream is carried next to
the hidden state so that "add residual, then RMSNorm" is one fused op on the GPU.
Device-specific work goes through `ops` (engine/ops.py).
"""

from __future__ import annotations

import torch
from torch import nn

from tandem.engine.attention import AttentionMetadata
from tandem.engine.model_config import ModelConfig
from tandem.engine.ops import TorchOps
from tandem.engine.rope import rope_inv_freq


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: TorchOps) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.ops = eps, ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear whose matmul goes through `ops` (on the GPU, one row is a GEMV kernel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, ops: TorchOps) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: TorchOps) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(
            cfg.hidden_size, self.q_size + 2 * self.kv_size, cfg.attention_bias, ops
        )
        self.o_proj = Linear(self.q_size, cfg.hidden_size, False, ops)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, ops) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, rope: tuple, cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.ops.rotary_attention(q, k, v, rope, cache, meta, self.scale)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: TorchOps) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, False, ops)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, False, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: TorchOps) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.self_attn = Attention(cfg, ops)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.mlp = MLP(cfg, ops)

    def forward(self, x, residual, rope, cache, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, rope, cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: TorchOps | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.ops = ops = ops or TorchOps()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, ops) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False, ops)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.inv_freq: torch.Tensor = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.cos_sin_cache: torch.Tensor | None = None  # built by the runner for kernels

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.ops.rope_tables(positions, self.inv_freq, self.cos_sin_cache, x.dtype)
        residual = None
        for layer, cache in zip(self.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, cache, meta)
        x, _ = self.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    @staticmethod
    def weight_mapping(hf_name: str) -> tuple[str, str | None]:
        """Map a Hugging Face weight name to (our parameter name, shard id).

        A shard id says which slice of a fused parameter the tensor fills
        ("q"/"k"/"v" of qkv_proj, "gate"/"up" of gate_up_proj), None for a plain copy.
        """
        name = hf_name.removeprefix("model.")
        for part in ("q", "k", "v"):
            key = f"self_attn.{part}_proj."
            if key in name:
                return name.replace(key, "self_attn.qkv_proj."), part
        for part in ("gate", "up"):
            key = f"mlp.{part}_proj."
            if key in name:
                return name.replace(key, "mlp.gate_up_proj."), part
        return name, None
