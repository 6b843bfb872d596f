"""The gateway's heartbeat: while it lives, `{reply stream}:alive` exists in Redis.

Set every GATEWAY_HEARTBEAT_S with a TTL of GATEWAY_ALIVE_TTL_S, so the key is gone a
few seconds after the gateway dies, however it dies; the workers then abort its requests
(core/owner_liveness.py) instead of generating for nobody until the deadline. A Redis
outage only delays the next write: the key is set again as soon as Redis answers.

Each beat also sets `{reply stream}:known` (an hour's TTL, kept after a clean stop): a
worker that takes a task of this gateway after it died, never having seen its heartbeat
key, knows from it that the stream had a gateway and judges it; tasks written by hand
to a stream without one are never judged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tandem.core.redis_keys import (
    GATEWAY_ALIVE_TTL_S,
    GATEWAY_HEARTBEAT_S,
    GATEWAY_KNOWN_TTL_S,
    gateway_alive_key,
    gateway_known_key,
)

log = logging.getLogger(__name__)


class GatewayHeartbeat:
    def __init__(
        self,
        client: aioredis.Redis,
        reply_stream: str,
        interval_s: float = GATEWAY_HEARTBEAT_S,
        ttl_s: float = GATEWAY_ALIVE_TTL_S,
    ) -> None:
        self.client = client
        self.key = gateway_alive_key(reply_stream)
        self.known_key = gateway_known_key(reply_stream)
        self.interval_s = interval_s
        self.ttl_ms = int(ttl_s * 1000)
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        pipe = self.client.pipeline(transaction=False)
        pipe.set(self.key, b"1", px=self.ttl_ms)
        pipe.set(self.known_key, b"1", ex=GATEWAY_KNOWN_TTL_S)
        await pipe.execute()

    async def start(self) -> None:
        """The first beat before any request is taken, then one every interval."""
        with contextlib.suppress(RedisError, OSError):  # the loop says so and retries
            await self.beat()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat")

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except (RedisError, OSError) as exc:
                if not failing:  # once per outage, not once a second
                    log.warning("gateway heartbeat failed: %s", exc)
                failing = True
            else:
                failing = False

    async def stop(self) -> None:
        """Stop beating and remove the heartbeat key (not the known key: a task of ours
        still queued is then judged dead too): the gateway has aborted its streams."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        with contextlib.suppress(RedisError, OSError):
            await self.client.delete(self.key)
