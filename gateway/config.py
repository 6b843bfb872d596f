"""The gateway's settings, validated once; the model's limits read from its config.json."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from tandem.core.request_checks import ModelLimits

DEFAULT_MAX_TOKENS = 16  # proto max_tokens 0; the completions default of OpenAI and vLLM
MiB = 1024 * 1024


def _new_gateway_id() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True)
class GatewayConfig:
    model: str  # the served model's name: names its prefill stream and registry entries
    model_dir: Path  # holds tokenizer.json and config.json
    redis_url: str = "redis://127.0.0.1:6379/0"
    grpc_host: str = "127.0.0.1"  # loopback unless asked: compose passes 0.0.0.0
    grpc_port: int = 50051  # 0: any free port (tests)
    http_host: str = "127.0.0.1"  # the OpenAI-style HTTP API and /metrics
    http_port: int = 8000  # 0: any free port (tests)
    api_key: str | None = None  # when set, clients must send "Authorization: Bearer KEY"
    gateway_id: str = field(default_factory=_new_gateway_id)
    request_timeout_s: float = 300.0  # whole request, also the PrefillTask deadline
    max_receive_message_bytes: int = 4 * MiB
    max_send_message_bytes: int = 4 * MiB
    max_prompt_bytes: int = 1 * MiB
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    redis_timeout_s: float = 5.0  # socket timeout of every non-blocking Redis call
    # Connections of the shared pool; past them a call waits for one (it never fails for
    # want of one). Writes are batched, so a few carry thousands of streams.
    redis_max_connections: int = 32
    reply_block_ms: int = 1000  # XREAD BLOCK of the reply router
    worker_check_ttl_s: float = 1.0  # how long a "workers are live" answer is trusted
    shutdown_grace_s: float = 5.0  # streams left after this are cancelled
    # A client that accepts no bytes of its stream this long is cut and its request
    # aborted (gateway/write_timeout.py): a stalled reader must not hold KV blocks.
    stream_write_timeout_s: float = 30.0
    max_active_requests: int = 4096  # in flight at once; past it: overload (HTTP 429)
    # Tasks waiting in (or being prefilled from) the model's prefill stream, all gateways
    # together; past it new requests are refused at once instead of queueing. 0: no bound.
    max_queued_tasks: int = 2048
    # A request whose decode or colocated worker vanished from the registry: False ends
    # it with UNAVAILABLE, True re-queues it (prompt + tokens so far) for another worker.
    migrate: bool = False
    owner_check_s: float = 1.0
    # With migrate: an owner must stay out of the registry this long before its requests
    # are re-queued. A live worker re-registers within a heartbeat (1 s) even after a
    # restarted Redis lost every entry, and a request re-queued while its worker still
    # generates would run twice.
    owner_grace_s: float = 2.0
    max_choices: int = 8  # bound on n (times the prompts of a batch) per HTTP request
    # One of several gateway processes sharing the ports (--gateway-workers): binds with
    # SO_REUSEPORT, so the kernel spreads connections over them.
    reuse_port: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        if not self.model:
            raise ValueError("model name must not be empty")
        if not (self.model_dir / "tokenizer.json").exists():
            raise ValueError(f"no tokenizer.json in {self.model_dir}")
        if not (self.model_dir / "config.json").exists():
            raise ValueError(f"no config.json in {self.model_dir}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis_url must be redis://, rediss:// or unix://: {self.redis_url}")
        for name in ("grpc_port", "http_port"):
            if not (0 <= getattr(self, name) <= 65535):
                raise ValueError(f"{name} must be in [0, 65535]")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for no key)")
        if not self.gateway_id or not self.gateway_id.replace("-", "").isalnum():
            raise ValueError("gateway_id must be non-empty letters, digits and dashes")
        for name in (
            "request_timeout_s",
            "redis_timeout_s",
            "worker_check_ttl_s",
            "stream_write_timeout_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.shutdown_grace_s < 0:
            raise ValueError("shutdown_grace_s must be >= 0")
        if self.owner_grace_s < 0:
            raise ValueError("owner_grace_s must be >= 0")
        for name in ("max_receive_message_bytes", "max_send_message_bytes", "max_prompt_bytes"):
            if getattr(self, name) < 1024:
                raise ValueError(f"{name} must be at least 1024")
        if self.max_prompt_bytes > self.max_receive_message_bytes:
            raise ValueError("max_prompt_bytes cannot exceed max_receive_message_bytes")
        if self.reply_block_ms < 1:
            raise ValueError("reply_block_ms must be >= 1")
        if self.max_model_len < 0:
            raise ValueError("max_model_len must be >= 0")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.max_active_requests < 1:
            raise ValueError("max_active_requests must be >= 1")
        if self.max_queued_tasks < 0:
            raise ValueError("max_queued_tasks must be >= 0 (0: no bound)")
        if self.redis_max_connections < 1:
            raise ValueError("redis_max_connections must be >= 1")
        if self.max_choices < 1:
            raise ValueError("max_choices must be >= 1")

    @property
    def grpc_address(self) -> str:
        return join_host_port(self.grpc_host, self.grpc_port)

    @property
    def http_address(self) -> str:
        return join_host_port(self.http_host, self.http_port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_model_limits(config: GatewayConfig, tokenizer_vocab_size: int) -> ModelLimits:
    """The model's limits as its config.json (and --max-model-len) give them."""
    hf = json.loads((config.model_dir / "config.json").read_text())
    # Multimodal checkpoints nest the language model's settings.
    hf = hf.get("text_config", hf)
    context = int(hf.get("max_position_embeddings") or 0)
    if config.max_model_len:
        if context and config.max_model_len > context:
            raise ValueError(
                f"max_model_len {config.max_model_len} exceeds the model's "
                f"max_position_embeddings {context}"
            )
        context = config.max_model_len
    if context < 1:
        raise ValueError(
            f"{config.model_dir}/config.json has no max_position_embeddings; set max_model_len"
        )
    # The embedding table bounds what a worker can look up; the tokenizer may be
    # larger (added tokens) or smaller (padded embeddings): ids must fit both.
    vocab = int(hf.get("vocab_size") or tokenizer_vocab_size)
    return ModelLimits(max_model_len=context, vocab_size=min(vocab, tokenizer_vocab_size))
