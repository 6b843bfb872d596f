"""Worker registry in Redis: each worker refreshes its own entry, entries expire.

A worker that dies simply stops refreshing; after its TTL (WORKER_TTL_S by default) its entry is gone and
nobody routes to it. Readers never trust an entry they cannot decode.
"""

from __future__ import annotations

import logging

import redis

from tandem.core.protocol import WorkerInfo, decode, encode
from tandem.core.redis_keys import WORKER_PREFIX, WORKER_TTL_S, worker_key

log = logging.getLogger(__name__)


# A prefill worker sends KV through two senders: one named by its worker id, one (on
# its shipping thread) by the id and this suffix.
SHIP_SENDER_SUFFIX = "/ship"
LEASE_SENDER_SUFFIX = "/lease"  # a prefill worker's lease renewals (prefill.lease_renewal)


def worker_of_sender(identity: str) -> str:
    """The worker id behind a KV sender's identity."""
    return identity.removesuffix(SHIP_SENDER_SUFFIX).removesuffix(LEASE_SENDER_SUFFIX)


def publish_worker(client: redis.Redis, info: WorkerInfo, ttl_s: float = WORKER_TTL_S) -> None:
    key = worker_key(info.worker_id)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, "info", encode(info))
    pipe.pexpire(key, int(ttl_s * 1000))
    pipe.execute()


def remove_worker(client: redis.Redis, worker_id: str) -> None:
    client.delete(worker_key(worker_id))


def list_workers(
    client: redis.Redis, role: str | None = None, model: str | None = None
) -> list[WorkerInfo]:
    keys = list(client.scan_iter(match=f"{WORKER_PREFIX}*", count=200))
    if not keys:
        return []
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hget(key, "info")
    workers = []
    for raw in pipe.execute():
        if raw is None:
            continue  # expired between SCAN and HGET
        try:
            info = decode(raw, WorkerInfo)
        except ValueError:
            log.warning("ignoring an undecodable registry entry")
            continue
        if (role is None or info.role == role) and (model is None or info.model == model):
            workers.append(info)
    return workers
