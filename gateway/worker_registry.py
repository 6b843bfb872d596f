"""Is anyone there to serve a request? A read-only view of the worker registry.

Workers refresh their registry hash every second and it expires after a few, so a
present, non-draining entry is a live worker. A request is only queued when the model
has at least one colocated worker, or one prefill and one decode worker; otherwise it
would wait for nothing until its deadline, and the client is better told UNAVAILABLE at
once.
"""

from __future__ import annotations

import logging
import time

import redis.asyncio as aioredis

from tandem.core import redis_keys
from tandem.core.pool_status import PoolStatus, decode_status
from tandem.core.protocol import WorkerInfo, decode
from tandem.gateway.redis_batch import SingleFlight

log = logging.getLogger(__name__)

REQUIRED_ROLES = ("prefill", "decode")  # unless a colocated worker serves on its own
SCAN_COUNT = 1000  # registry keys are few; SCAN walks the whole keyspace anyway


class WorkerRegistry:
    def __init__(self, redis: aioredis.Redis, model: str, cache_ttl_s: float = 1.0) -> None:
        self._redis = redis
        self._model = model
        self._cache_ttl_s = cache_ttl_s
        self._live_until = 0.0  # monotonic time until which "live" is trusted
        # Requests arriving together, after the cache expired, share one registry scan.
        self._live_roles = SingleFlight(self._read_live_roles)
        self._scanned: list[WorkerInfo] = []  # the last scan's workers...
        self._scanned_at = float("-inf")  # ...and when it was made (monotonic)
        # The smallest context any live worker registered; 0 while none has.
        self.max_model_len = 0

    async def live_workers(self) -> list[WorkerInfo]:
        """Every registered, non-draining worker of the served model."""
        return [w for w in await self.workers() if not w.draining]

    async def workers(self, max_age_s: float = 0.0) -> list[WorkerInfo]:
        """Every registered worker of the served model, draining ones included. The last
        scan is reused while younger than `max_age_s`: SCAN walks the whole keyspace, so
        a frequent reader (/metrics) must not make one per call."""
        if time.monotonic() - self._scanned_at < max_age_s:
            return self._scanned
        workers = await self._scan()
        self._scanned, self._scanned_at = workers, time.monotonic()
        contexts = [w.max_model_len for w in workers if w.max_model_len and not w.draining]
        if contexts:
            self.max_model_len = min(contexts)
        return workers

    async def _scan(self) -> list[WorkerInfo]:
        keys = [
            k
            async for k in self._redis.scan_iter(
                match=f"{redis_keys.WORKER_PREFIX}*", count=SCAN_COUNT
            )
        ]
        if not keys:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hget(key, "info")
            blobs = await pipe.execute()
        workers = []
        for key, blob in zip(keys, blobs, strict=True):
            if blob is None:  # expired between SCAN and HGET
                continue
            try:
                info: WorkerInfo = decode(blob, WorkerInfo)
            except ValueError as exc:
                log.warning("registry entry %r unreadable: %s", key, exc)
                continue
            if info.model == self._model:
                workers.append(info)
        return workers

    async def pool_status(self) -> PoolStatus | None:
        """What a supervising `tandem serve` reports (None: no launcher says anything)."""
        return decode_status(await self._redis.get(redis_keys.pool_status_key(self._model)))

    async def unavailable_reason(self) -> str | None:
        """None when the model can be served now; otherwise a client-facing reason.

        Only a positive answer is cached: after an outage the first request that finds
        workers again gets through, with no stale "unavailable" to wait out.
        """
        if time.monotonic() < self._live_until:
            return None
        roles = await self._live_roles()
        missing = [r for r in REQUIRED_ROLES if r not in roles]
        if missing and "colocated" not in roles:
            return f"no live {' or '.join(missing)} worker for model {self._model!r}"
        self._live_until = time.monotonic() + self._cache_ttl_s
        return None

    async def _read_live_roles(self) -> set[str]:
        return {w.role for w in await self.live_workers()}
