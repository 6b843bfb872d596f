"""Fill a model's parameters from Hugging Face safetensors, or with random values.

Safetensors only (single file, or sharded with `model.safetensors.index.json`): never
pickle checkpoints. Fused parameters are filled slice by slice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from tandem.engine.model_config import ModelConfig

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(
        f"no safetensors checkpoint in {model_dir} (use --load-format dummy for random weights)"
    )


def _shard_slices(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    q, kv, inter = (
        cfg.num_heads * cfg.head_dim,
        cfg.num_kv_heads * cfg.head_dim,
        cfg.intermediate_size,
    )
    return {
        "q": (0, q),
        "k": (q, q + kv),
        "v": (q + kv, q + 2 * kv),
        "gate": (0, inter),
        "up": (inter, 2 * inter),
    }


@torch.no_grad()
def load_safetensors(model: nn.Module, model_dir: Path) -> None:
    cfg: ModelConfig = model.config
    params = dict(model.named_parameters())
    slices = _shard_slices(cfg)
    filled: dict[str, int] = {}  # parameter -> elements written
    files = checkpoint_files(model_dir)
    bar = tqdm(
        total=len(params),
        desc=f"loading {model_dir.name}",
        unit="tensor",
        disable=None,
        leave=False,
    )  # disable=None: only on a terminal
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                bar.update(1)
                if hf_name.endswith(IGNORED_SUFFIXES):
                    continue
                if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue
                name, shard = model.weight_mapping(hf_name)
                if name not in params:
                    raise KeyError(f"checkpoint tensor {hf_name} has no parameter ({name})")
                tensor = f.get_tensor(hf_name)
                target = params[name]
                if shard is not None:
                    lo, hi = slices[shard]
                    target = target[lo:hi]
                if target.shape != tensor.shape:
                    raise ValueError(
                        f"{hf_name}: shape {tuple(tensor.shape)} does not fit "
                        f"{name} {tuple(target.shape)}"
                    )
                target.copy_(tensor)
                filled[name] = filled.get(name, 0) + tensor.numel()
    bar.close()
    missing = [n for n, p in params.items() if filled.get(n, 0) != p.numel()]
    if missing:
        raise ValueError(f"checkpoint leaves parameters unfilled: {missing[:5]}")


@torch.no_grad()
def init_dummy(model: nn.Module, seed: int = 0) -> None:
    """Small random weights, made on the parameters' own device: enough for benchmarks
    and shape checks, never for quality."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
            continue
        gen = gens.get(p.device)
        if gen is None:
            gen = gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        p.uniform_(-0.02, 0.02, generator=gen)
