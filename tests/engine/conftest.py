"""Tiny random Hugging Face checkpoints written to disk, so the engine loads them through
the same safetensors path as a real model and transformers serves as the reference."""

from __future__ import annotations

import pytest
import torch

TINY = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.3,
    eos_token_id=1,
    bos_token_id=0,
)

FAMILIES = {
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        tie_word_embeddings=False,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "llama_tied": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=True
    ),
    "qwen2": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=False
    ),
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"],
        model_type="qwen3",
        head_dim=16,
        tie_word_embeddings=True,
    ),
}


def make_tiny_checkpoint(path, family: str, seed: int = 0, **overrides):
    import transformers

    kwargs = {**TINY, **FAMILIES[family], **overrides}
    arch = kwargs.pop("architectures")[0]
    model_type = kwargs.pop("model_type")
    cfg = transformers.AutoConfig.for_model(model_type, **kwargs)
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).float().eval()
    if family == "qwen2":  # give the QKV biases values worth testing
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (
                    layer.self_attn.q_proj,
                    layer.self_attn.k_proj,
                    layer.self_attn.v_proj,
                ):
                    proj.bias.normal_(0, 0.3)
    model.save_pretrained(str(path), safe_serialization=True)
    return model


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        out[family] = (path, make_tiny_checkpoint(path, family))
    return out


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens with EOS ignored: the model's own forward over the
    whole sequence at each step, argmax of the last position (no cache API involved, so
    this holds across transformers versions)."""
    ids = list(prompt_ids)
    device = next(model.parameters()).device
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids], device=device)).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]
