"""Redis traffic of many requests at once, coalesced.

A gateway with thousands of streams starting or ending together would otherwise spend
a connection and a round trip per request: task XADDs, abort notices and registry reads
arrive in bursts. `RedisBatcher` queues the writes and sends whatever is queued as one
pipeline while the previous one is in flight, so one connection carries a burst;
`SingleFlight` lets concurrent readers of the same figure share one read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import RedisError

from tandem.core import redis_keys
from tandem.core.protocol import AbortNotice, encode

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BATCH = 1024  # writes per pipeline; a larger burst goes in several


class _Write:
    __slots__ = ("add", "commands", "result", "what")

    def __init__(
        self, add: Callable[[Pipeline], None], commands: int, result: asyncio.Future | None,
        what: str,
    ) -> None:  # fmt: skip
        self.add = add  # queues this write's commands on a pipeline
        self.commands = commands
        self.result = result  # None: nobody waits (its failure is logged)
        self.what = what


class RedisBatcher:
    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._queued: list[_Write] = []
        self._flusher: asyncio.Task[None] | None = None

    async def xadd(self, stream: str, message: bytes) -> bytes:
        """Append to a stream; the entry id, or the RedisError of its pipeline."""
        result = asyncio.get_running_loop().create_future()
        fields = {redis_keys.MESSAGE_FIELD: message}
        self._queue(_Write(lambda pipe: pipe.xadd(stream, fields), 1, result, stream))
        return await result

    def abort(self, request_id: str, reason: str) -> None:
        """Tell every worker to drop a request: a marker for late readers, then pub/sub.
        Not awaited: a handler being cancelled must not lose its abort."""
        notice = encode(AbortNotice(request_id=request_id, reason=reason))

        def add(pipe: Pipeline) -> None:
            # The marker goes first so that a worker woken by the message finds it.
            pipe.set(redis_keys.abort_marker(request_id), notice, ex=redis_keys.ABORT_MARKER_TTL_S)
            pipe.publish(redis_keys.ABORT_CHANNEL, notice)

        self._queue(_Write(add, 2, None, f"abort of {request_id}"))

    async def drain(self) -> None:
        """Wait until everything queued so far is sent (at shutdown)."""
        while self._flusher is not None and not self._flusher.done():
            await asyncio.gather(self._flusher, return_exceptions=True)

    def _queue(self, write: _Write) -> None:
        self._queued.append(write)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._queued:
            batch = self._queued[:MAX_BATCH]
            del self._queued[:MAX_BATCH]
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for write in batch:
                        write.add(pipe)
                    replies = await pipe.execute(raise_on_error=False)
            except (RedisError, OSError) as exc:
                for write in batch:
                    _settle(write, RedisError(str(exc)))
                continue
            first = 0
            for write in batch:
                reply = replies[first : first + write.commands]
                first += write.commands
                error = next((r for r in reply if isinstance(r, Exception)), None)
                _settle(write, error, reply[0])


def _settle(write: _Write, error: BaseException | None, reply: Any = None) -> None:
    if write.result is None:
        if error is not None:
            # The task's deadline still bounds how long workers keep the request.
            log.warning("%s not sent to Redis: %s", write.what, error)
    elif not write.result.done():  # its caller may have been cancelled meanwhile
        if error is not None:
            write.result.set_exception(error)
        else:
            write.result.set_result(reply)


class SingleFlight(Generic[T]):
    """Calls of `fetch` made while one is running wait for that one's answer."""

    def __init__(self, fetch: Callable[[], Awaitable[T]]) -> None:
        self._fetch = fetch
        self._running: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._fetch())
            # Retrieved here too, in case every caller was cancelled before it ended.
            self._running.add_done_callback(lambda f: f.cancelled() or f.exception())
        # Shielded: one caller giving up must not cancel the read the others wait for.
        return await asyncio.shield(self._running)
