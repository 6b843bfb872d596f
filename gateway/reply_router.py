"""One reader of the gateway's reply stream, fanning deltas out to per-request queues.

Workers publish TokenBatches to one stream per gateway (not per request), so a gateway
with thousands of open streams still holds one blocking Redis read. Deltas carry the
offset of their first token in the output, which lets a request ignore tokens it has
already seen: a prefill retried after a worker died re-sends the first token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tandem.core import hop_trace, redis_keys
from tandem.core.protocol import TokenBatch, TokenDelta, decode

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_COUNT = 512  # entries per XREAD; a batch already holds a step's deltas
TRIM_INTERVAL_S = 1.0
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0


class RequestStream:
    """Deltas for one request in output order, each token delivered once."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_offset = 0  # output position of the next token the client has not seen
        self.closed = False  # a finish or an error was delivered: nothing more is
        self.owner: str | None = None  # the worker generating it (decode, colocated)
        self.token_ids: list[int] = []  # every output token delivered (for migration)
        self.deltas = 0  # deltas that arrived: a worker answered (execution.queued_entry)
        self._mailbox: Mailbox[TokenDelta] = Mailbox()

    def push(self, delta: TokenDelta) -> None:
        if self.closed:
            return
        self.deltas += 1
        ends = delta.finish_reason is not None or delta.error is not None
        seen = self.next_offset - delta.offset
        if seen > 0:
            ids = delta.token_ids[seen:]
            if not ids and not ends:
                return
            logprobs = delta.logprobs[seen:] if delta.logprobs else delta.logprobs
            delta = msgspec.structs.replace(
                delta, token_ids=ids, offset=self.next_offset, logprobs=logprobs
            )
        elif seen < 0 and delta.error is None and (delta.token_ids or ends):
            # Tokens went missing; their text cannot be recovered, so fail loudly.
            delta = TokenDelta(
                request_id=delta.request_id,
                error=f"output tokens {self.next_offset}..{delta.offset - 1} were lost",
                error_code="internal",
            )
            ends = True
        if delta.worker_id is not None:
            self.owner = delta.worker_id
        if hop_trace.ENABLED and self.next_offset == 0 and delta.token_ids:
            hop_trace.mark(self.request_id, "routed")
        self.next_offset += len(delta.token_ids)
        self.token_ids.extend(delta.token_ids)
        self.closed = ends
        self._mailbox.put(delta)

    async def get_many(self, timeout_s: float | None = None) -> list[TokenDelta]:
        """Every delta queued now, waiting for one; TimeoutError when none comes in time.

        Taking all at once lets a client that fell behind catch up in one message.
        """
        return await self._mailbox.take(timeout_s)


class Mailbox(Generic[T]):
    """Items for one reader, who takes all there are at once. A list and one future:
    on the per-token path an asyncio.Queue costs a put and a get per item, and
    asyncio.wait_for a task per wait."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self, timeout_s: float | None = None) -> list[T]:
        """Every item there, waiting for one; TimeoutError when none comes in time."""
        if not self._items:
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            timer = None if timeout_s is None else loop.call_later(timeout_s, _expire, self._waiter)
            try:
                await self._waiter
            finally:
                if timer is not None:
                    timer.cancel()
                self._waiter = None
        items, self._items = self._items, []
        return items


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(asyncio.TimeoutError())


class ReplyRouter:
    def __init__(
        self,
        redis_url: str,
        gateway_id: str,
        block_ms: int = 1000,
        redis_timeout_s: float = 5.0,
        on_connected: Callable[[bool], None] | None = None,
    ) -> None:
        self.stream = redis_keys.reply_stream(gateway_id)
        self._block_ms = block_ms
        # A blocked XREAD must not look like a dead socket: its timeout outlasts BLOCK.
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_timeout=block_ms / 1000 + redis_timeout_s,
            socket_connect_timeout=redis_timeout_s,
        )
        self._on_connected = on_connected or (lambda _up: None)
        self._streams: dict[str, RequestStream] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_id = b"0-0"
        self._last_trim = 0.0
        # redis-py can swallow a cancellation that lands inside a blocking XREAD; the
        # loop also checks this flag, so stop() always ends within one BLOCK.
        self._stopping = False

    @property
    def active(self) -> int:
        return len(self._streams)

    def register(self, request_id: str) -> RequestStream:
        stream = self._streams[request_id] = RequestStream(request_id)
        return stream

    def unregister(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def start(self) -> None:
        """Wait until Redis answers (compose may start us first), then start reading."""
        backoff = BACKOFF_MIN_S
        while True:
            try:
                await self._sync_position(first=True)
                break
            except (RedisError, OSError) as exc:
                log.warning("waiting for Redis: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)
        self._task = asyncio.create_task(self._run(), name=f"reply-router {self.stream}")

    async def stop(self, delete_stream: bool = True) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            if delete_stream:  # the stream is ours alone; nobody reads it after us
                await self._redis.delete(self.stream)
        except RedisError as exc:
            log.warning("could not delete %s: %s", self.stream, exc)
        finally:
            await self._redis.aclose()

    async def _sync_position(self, first: bool) -> None:
        last = await self._redis.xrevrange(self.stream, count=1)
        top = last[0][0] if last else None
        if first:
            # Entries already there (a previous gateway with this id) are not for us.
            self._last_id = top or b"0-0"
        elif top is None or _id_tuple(top) < _id_tuple(self._last_id):
            # Redis restarted and lost the stream: every entry in it now is new.
            self._last_id = b"0-0"

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        connected = True
        self._on_connected(True)
        while not self._stopping:
            try:
                if not connected:
                    await self._sync_position(first=False)
                    connected = True
                    self._on_connected(True)
                    log.info("reply router reconnected to Redis")
                reply = await self._redis.xread(
                    {self.stream: self._last_id}, count=READ_COUNT, block=self._block_ms
                )
                backoff = BACKOFF_MIN_S
                for _name, entries in reply or ():
                    for entry_id, fields in entries:
                        self._last_id = entry_id
                        self._route(fields.get(redis_keys.MESSAGE_FIELD))
                await self._maybe_trim()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if connected:
                    log.warning("reply router lost Redis (%s); retrying", exc)
                    connected = False
                    self._on_connected(False)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    def _route(self, data: bytes | None) -> None:
        if data is None:
            log.warning("reply entry without field %r dropped", redis_keys.MESSAGE_FIELD)
            return
        try:
            batch: TokenBatch = decode(data, TokenBatch)
        except ValueError as exc:
            log.warning("malformed reply entry dropped: %s", exc)
            return
        for delta in batch.deltas:
            stream = self._streams.get(delta.request_id)
            if stream is not None:  # unknown: finished, cancelled, or another gateway's
                stream.push(delta)

    async def _maybe_trim(self) -> None:
        # Entries before the last one read are done with: one reader per stream.
        now = time.monotonic()
        if now - self._last_trim >= TRIM_INTERVAL_S and self._last_id != b"0-0":
            self._last_trim = now
            await self._redis.xtrim(self.stream, minid=self._last_id, approximate=True)


def _id_tuple(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)
