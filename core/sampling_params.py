"""Per-request sampling settings, shared by the gateway, the workers and the engine.

A msgspec Struct so it travels inside wire messages unchanged; `validate` is the one
place bounds are enforced, so every entry point (gRPC, HTTP, in-process) rejects the
same inputs with the same message.
"""

from __future__ import annotations

import msgspec

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_CACHE_SALT_CHARS = 256


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives to return per token
    # Prefix caching: requests share cached KV blocks only when their salts are equal
    # (tenants who must not share, e.g. against timing side channels, set their own).
    # Not a sampling setting, but the per-request options that travel with a request
    # through every hop (tasks, retries, migration, preemption) live here.
    cache_salt: str = ""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_model_len: int | None = None, prompt_len: int = 0) -> None:
        """Raise ValueError with a client-facing message when a field is out of bounds.

        Every float bound is a range test, which NaN fails, and no range is open to
        infinity: non-finite values are refused too."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if max_model_len is not None and prompt_len + self.max_tokens > max_model_len:
            raise ValueError(
                f"prompt ({prompt_len} tokens) + max_tokens ({self.max_tokens}) exceeds "
                f"the model context of {max_model_len} tokens"
            )
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if not (0.0 <= self.temperature <= 100.0):
            raise ValueError("temperature must be in [0, 100]")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0 disables it)")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError("min_p must be in [0, 1]")
        if self.seed is not None and not (0 <= self.seed < 2**64):
            raise ValueError("seed must be in [0, 2^64)")
        if not (0.0 < self.repetition_penalty <= 10.0):
            raise ValueError("repetition_penalty must be in (0, 10]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise ValueError(f"{name} must be in [-2, 2]")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s or len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise ValueError(f"stop strings must be 1..{MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop token ids")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
        if len(self.cache_salt) > MAX_CACHE_SALT_CHARS:
            raise ValueError(f"cache_salt must be at most {MAX_CACHE_SALT_CHARS} characters")

    def validate_vocab(self, vocab_size: int) -> None:
        """Bounds that depend on the model's vocabulary (the sampler indexes and builds
        int64 tensors from these; a larger top_k once overflowed inside the worker)."""
        if self.top_k > vocab_size:
            raise ValueError(f"top_k must be at most the vocabulary size {vocab_size}")
        if any(not (0 <= t < vocab_size) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab_size})")
