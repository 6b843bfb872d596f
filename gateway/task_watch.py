"""Queued tasks that vanished from the prefill stream.

Workers delete a task's stream entry only after its first delta (a token or an error)
is published, or when they drop it as a duplicate or an aborted request. So a request
that got no delta and whose entry is gone was lost with the stream itself: a Redis
restarted without its data. Such a request would otherwise wait for its deadline (300 s
by default); the gateway fails it with UNAVAILABLE once the entry was missing on two
looks at least VANISHED_GRACE_S apart (a delta published just before the entry's
deletion has arrived by then).
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

VANISHED_GRACE_S = 1.0


class VanishedTasks:
    def __init__(self, redis: aioredis.Redis, stream: str) -> None:
        self._redis = redis
        self._stream = stream
        self._missing_since: dict[str, float] = {}  # request id -> first look that missed

    async def check(self, waiting: dict[str, bytes]) -> list[str]:
        """Of `waiting` (request id -> its task's entry id, for requests that got no
        delta yet), the ids whose entry has been gone for VANISHED_GRACE_S."""
        if not waiting:
            self._missing_since.clear()
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id in waiting.values():
                pipe.xrange(self._stream, min=entry_id, max=entry_id, count=1)
            found = await pipe.execute()
        now = time.monotonic()
        self._missing_since = {
            rid: self._missing_since.get(rid, now)
            for rid, entries in zip(waiting, found, strict=True)
            if not entries
        }
        return [rid for rid, t in self._missing_since.items() if now - t >= VANISHED_GRACE_S]
