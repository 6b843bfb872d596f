"""Model classes by family.

Qwen2 (QKV bias) and Qwen3 (per-head q/k RMSNorm) differ from Llama only in switches
that ModelConfig sets from config.json, so one decoder file serves all three.
"""

from __future__ import annotations

from torch import nn

from tandem.engine.model_config import ModelConfig
from tandem.engine.models.llama import LlamaForCausalLM
from tandem.engine.ops import TorchOps

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
    "qwen3": LlamaForCausalLM,
}


def build_model(cfg: ModelConfig, ops: TorchOps | None = None) -> nn.Module:
    return MODEL_CLASSES[cfg.family](cfg, ops)
