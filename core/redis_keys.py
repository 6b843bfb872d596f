"""The Redis layout, in one place.

tandem:{model}:prefill          stream of PrefillTask (field "m"), group "prefill"
tandem:{model}:prefill:dead     dead-letter stream for tasks delivered too often
tandem:reply:{gateway_id}       stream of TokenBatch (field "m") for one gateway, with a TTL
tandem:reply:{gateway_id}:alive the gateway's heartbeat (short TTL): workers abort the
                                requests of a gateway whose key is gone (core/owner_liveness.py)
tandem:reply:{gateway_id}:known set with each heartbeat, with a long TTL: the stream had a
                                gateway, so its tasks are judged even by a worker that never
                                saw the heartbeat key
tandem:abort                    pub/sub channel of AbortNotice
tandem:abort:{request_id}       short-lived marker, so a task read late is dropped too
tandem:worker:{worker_id}       registry entry: field "info" = WorkerInfo, with a TTL
tandem:{model}:pool             PoolStatus of a supervising `tandem serve`, with a TTL
"""

from __future__ import annotations

PREFILL_GROUP = "prefill"
MESSAGE_FIELD = b"m"
ABORT_CHANNEL = "tandem:abort"
ABORT_MARKER_TTL_S = 120
WORKER_PREFIX = "tandem:worker:"
REPLY_PREFIX = "tandem:reply:"
WORKER_TTL_S = 3
REPLY_STREAM_MAXLEN = 100_000
REPLY_STREAM_TTL_S = 900  # renewed by each write; longer than any request's deadline
GATEWAY_HEARTBEAT_S = 1.0
GATEWAY_ALIVE_TTL_S = 3.0  # three heartbeats: one late write does not make a gateway dead
GATEWAY_KNOWN_TTL_S = 3600  # longer than any request's deadline (a queued task's lifetime)


def prefill_stream(model: str) -> str:
    return f"tandem:{model}:prefill"


def dead_letter_stream(model: str) -> str:
    return f"tandem:{model}:prefill:dead"


def reply_stream(gateway_id: str) -> str:
    return f"{REPLY_PREFIX}{gateway_id}"


def gateway_alive_key(reply_stream: str) -> str:
    """Set by the gateway that reads `reply_stream` while it lives (a string, with a TTL)."""
    return f"{reply_stream}:alive"


def gateway_known_key(reply_stream: str) -> str:
    """Set beside the heartbeat with a long TTL: `reply_stream` has (had) a gateway."""
    return f"{reply_stream}:known"


def abort_marker(request_id: str) -> str:
    return f"tandem:abort:{request_id}"


def cached_blocks_key(model: str, worker_id: str) -> str:
    """The hashes of the KV blocks a worker can serve from its prefix cache (a set)."""
    return f"tandem:{model}:kvblocks:{worker_id}"


def routing_load_key(model: str, worker_id: str) -> str:
    """How many tasks a prefill worker holds now, for routing (a string, with a TTL)."""
    return f"tandem:{model}:kvload:{worker_id}"


def worker_key(worker_id: str) -> str:
    return f"{WORKER_PREFIX}{worker_id}"


def pool_status_key(model: str) -> str:
    return f"tandem:{model}:pool"
