"""The architecture facts the engine needs, read once from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tandem.core.kv_layout import KVLayout

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    rope_scaling: dict[str, Any] | None = None
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    dtype: str = "float32"  # the checkpoint's dtype

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for rotary embeddings")

    def kv_layout(self, dtype: str, block_size: int) -> KVLayout:
        """The KV cache this model's attention reads and writes: K and V of every KV
        head, per layer (MHA / GQA). A latent-attention model would declare kind
        "latent" here, and nothing downstream would change."""
        return KVLayout(
            model=self.name,
            dtype=dtype,
            block_size=block_size,
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
        )

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], name: str) -> ModelConfig:
        archs = cfg.get("architectures") or []
        family = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if family is None:
            family = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(
                cfg.get("model_type", "")
            )
        if family is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')}; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        # transformers >= 5 nests rope settings in rope_parameters; older files keep
        # rope_theta at the top level and scaling in rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or rope or None
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind != "llama3":
                raise ValueError(f"unsupported rope scaling {kind!r}")
        eos = cfg.get("eos_token_id")
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        return cls(
            name=name,
            family=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            rope_scaling=scaling,
            eos_token_ids=eos_ids,
            dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
        )

    def num_parameters(self) -> int:
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        layer = attn + 3 * h * self.intermediate_size + norms
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + h

    @classmethod
    def from_dir(cls, model_dir: str | Path, name: str | None = None) -> ModelConfig:
        model_dir = Path(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        return cls.from_dict(cfg, name or model_dir.name)
