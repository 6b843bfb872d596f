"""Typed configuration, validated once at construction.

Every process builds its settings from these dataclasses (CLI flags map onto fields);
nothing else in the code base reads environment variables for behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.core.request_checks import MAX_LEASE_S


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int = 0  # 0: size from memory (CPU: from max_kv_tokens)
    # Keep computed full blocks findable by content hash and share them with later
    # requests that start with the same tokens (core/kv_cache_manager.py).
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError("block_size must be a positive power of two")
        if self.num_blocks < 0:
            raise ValueError("num_blocks must be >= 0")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget per step
    max_model_len: int = 8192
    enable_chunked_prefill: bool = True
    # Prefill tokens per step (prompt chunks; decodes are not counted), within the
    # budget; 0: the whole budget. A small cap keeps the steps of a worker that mixes
    # prefill into its decodes short, so its time per output token stays low.
    max_prefill_tokens: int = 0

    @property
    def prefill_budget(self) -> int:
        """Prompt tokens one step may run."""
        if self.max_prefill_tokens:
            return min(self.max_prefill_tokens, self.max_num_batched_tokens)
        return self.max_num_batched_tokens

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.max_prefill_tokens < 0:
            raise ValueError("max_prefill_tokens must be >= 0 (0: the whole token budget)")
        if not self.enable_chunked_prefill and 0 < self.max_prefill_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_prefill_tokens must cover max_model_len")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must cover max_model_len"
            )


# zmq: host-staged, any device; cuda_ipc: same node, CUDA; nccl: torch.distributed p2p
# (NCCL on CUDA, gloo on CPU); fake: in-memory, tests only.
KV_TRANSPORTS = ("zmq", "cuda_ipc", "nccl", "fake")
# colocated: one process takes tasks, prefills and decodes them itself (no KV transfer).
WORKER_ROLES = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class WorkerConfig:
    """Settings common to prefill, decode and colocated workers (the KV transfer ones
    mean nothing to a colocated worker, which moves no KV)."""

    redis_url: str
    role: str  # "prefill" | "decode" | "colocated"
    worker_id: str = ""  # "": role-hostname-pid-random
    kv_transport: str = "zmq"
    bind_host: str = "127.0.0.1"  # internal sockets never bind all interfaces by default
    advertise_host: str = ""  # "": bind_host; set in containers to the reachable name
    heartbeat_s: float = 1.0
    registry_ttl_s: float = 3.0  # a worker silent this long is gone from the registry
    drain_timeout_s: float = 30.0
    # ZMQ CURVE keys of the internal plane (kvtransfer.curve); "": no authentication.
    kv_curve_dir: str = ""
    reservation_lease_s: float = 10.0
    transfer_timeout_s: float = 2.0
    # Prefill only: how long a task may wait for a decode worker with room (reserve
    # retried meanwhile) before it fails UNAVAILABLE.
    decode_wait_s: float = 30.0
    # Peers take over a task whose stream entry sat this long untouched. A worker touches
    # its own every reclaim_idle_s / 2, and a prefill worker's loop may wait one
    # transfer_timeout_s (a reservation) in between: hence reclaim_idle_s >
    # 2 * transfer_timeout_s, checked below, or live work gets taken over.
    reclaim_idle_s: float = 5.0
    max_deliveries: int = 3
    # Decode only: also prefill tasks from the prefill stream once the oldest task no
    # worker has taken has waited this long (None: never), at most this many at a time.
    local_prefill_after_ms: float | None = None
    max_local_prefills: int = 1
    # Decode only: also prefill a task whose tokens beyond the prefix this worker holds
    # in its cache number at most this many (0: never); core/local_prefill.py.
    local_prefill_uncached_tokens: int = 0
    # Prefill: leave the oldest task this long for a live peer that holds a longer
    # cached prefix of it (core/prefix_routing.py); 0: take tasks in stream order.
    prefix_route_wait_ms: float = 200.0

    def __post_init__(self) -> None:
        if self.role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {', '.join(WORKER_ROLES)}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(
                f"unknown kv transport {self.kv_transport!r} (one of {', '.join(KV_TRANSPORTS)})"
            )
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        for name in (
            "heartbeat_s",
            "registry_ttl_s",
            "drain_timeout_s",
            "reservation_lease_s",
            "transfer_timeout_s",
            "decode_wait_s",
            "reclaim_idle_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not self.reservation_lease_s <= MAX_LEASE_S:  # NaN too: decode workers refuse it
            raise ValueError(f"reservation_lease_s must be in (0, {MAX_LEASE_S:g}]")
        if self.role == "prefill" and self.reclaim_idle_s <= 2 * self.transfer_timeout_s:
            raise ValueError(
                f"reclaim_idle_s ({self.reclaim_idle_s:g}) must exceed twice "
                f"transfer_timeout_s ({self.transfer_timeout_s:g}): a prefill worker "
                "waiting on a transfer would otherwise lose its tasks to peers"
            )
        if self.registry_ttl_s < 2 * self.heartbeat_s:
            raise ValueError("registry_ttl_s must be at least two heartbeats")
        if self.max_deliveries < 1:
            raise ValueError("max_deliveries must be >= 1")
        if self.prefix_route_wait_ms < 0:
            raise ValueError("prefix_route_wait_ms must be >= 0")
        if self.max_local_prefills < 1:
            raise ValueError("max_local_prefills must be >= 1")
        if self.local_prefill_uncached_tokens < 0:
            raise ValueError("local_prefill_uncached_tokens must be >= 0 (0: off)")
        if self.local_prefill_after_ms is not None and self.local_prefill_after_ms < 0:
            raise ValueError("local_prefill_after_ms must be >= 0")
        if not self.local_prefill:
            if self.max_local_prefills != 1:
                raise ValueError(
                    "max_local_prefills needs local_prefill_after_ms or "
                    "local_prefill_uncached_tokens"
                )
        elif self.role != "decode":
            raise ValueError("local prefill is a decode worker's option")

    @property
    def local_prefill(self) -> bool:
        """Whether this (decode) worker also prefills some tasks of the stream itself."""
        return self.local_prefill_after_ms is not None or self.local_prefill_uncached_tokens > 0
