"""Tokenizer over a Hugging Face `tokenizer.json`, with the model's chat template.

Uses the `tokenizers` library directly (no torch, no transformers) so that the gateway
stays light; encodings are the same as transformers' fast tokenizer for the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
        self._tok = _HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template_path = model_dir / "chat_template.jinja"
        self.chat_template: str | None = (
            template_path.read_text() if template_path.exists() else cfg.get("chat_template")
        )
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.eos_token_ids = frozenset(self._eos_ids(model_dir))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._template: jinja2.Template | None = None

    def _eos_ids(self, model_dir: Path) -> set[int]:
        ids: set[int] = set()
        for name in ("config.json", "generation_config.json"):
            p = model_dir / name
            if p.exists():
                eos = json.loads(p.read_text()).get("eos_token_id")
                if isinstance(eos, int):
                    ids.add(eos)
                elif isinstance(eos, list):
                    ids.update(int(e) for e in eos)
        if self.eos_token and (tid := self._tok.token_to_id(self.eos_token)) is not None:
            ids.add(tid)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def added_tokens(self) -> dict[int, tuple[str, bool]]:
        """Tokens added beside the vocabulary: id -> (content, special)."""
        return {i: (t.content, t.special) for i, t in self._tok.get_added_tokens_decoder().items()}

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise_template_error
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        # The template already holds the special tokens, as in transformers.
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _token_text(tok: object) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _raise_template_error(message: str) -> None:
    raise ValueError(f"chat template: {message}")
