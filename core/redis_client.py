"""Redis connections and the stream operations the workers share.

Every call has a socket timeout longer than any BLOCK used with it, so a lost Redis
surfaces as an exception, never as a hang.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import redis
import redis.asyncio as aioredis

from tandem.core.protocol import AbortNotice, PrefillTask, TokenBatch, TokenDelta, decode, encode
from tandem.core.redis_keys import (
    ABORT_CHANNEL,
    MESSAGE_FIELD,
    PREFILL_GROUP,
    REPLY_STREAM_MAXLEN,
    REPLY_STREAM_TTL_S,
    abort_marker,
)

log = logging.getLogger(__name__)
SOCKET_TIMEOUT_S = 5.0
T = TypeVar("T")


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        health_check_interval=10,
    )


def ensure_group(client: redis.Redis, stream: str, group: str = PREFILL_GROUP) -> None:
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def add_task(client: redis.Redis, stream: str, task: PrefillTask) -> bytes:
    return client.xadd(stream, {MESSAGE_FIELD: encode(task)})


def read_tasks(
    client: redis.Redis, stream: str, consumer: str, count: int, block_ms: int | None
) -> list[tuple[bytes, PrefillTask | None]]:
    """New tasks for this consumer; a malformed entry comes back as (id, None)."""
    res = client.xreadgroup(PREFILL_GROUP, consumer, {stream: ">"}, count=count, block=block_ms)
    return [
        (entry_id, parse_task(fields)) for _, entries in res or [] for entry_id, fields in entries
    ]


# Deliver the entry ARGV[3] to consumer ARGV[2] of group ARGV[1] only if it is the next
# one the group would deliver; otherwise deliver nothing. Atomic, so a worker that judged
# that one task never ends up with a later one it did not judge.
_READ_IF_NEXT = """
local last
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local name, delivered
  for i = 1, #group, 2 do
    if group[i] == 'name' then name = group[i + 1] end
    if group[i] == 'last-delivered-id' then delivered = group[i + 1] end
  end
  if name == ARGV[1] then last = delivered end
end
if not last then return false end
local next = redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1)
if #next == 0 or next[1][1] ~= ARGV[3] then return false end
return redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
"""


def read_task_if_next(
    client: redis.Redis, stream: str, consumer: str, entry_id: bytes
) -> list[tuple[bytes, PrefillTask | None]]:
    """The task at `entry_id` for this consumer if no worker has been given it and it
    is the next the group hands out; otherwise nothing."""
    res = client.eval(_READ_IF_NEXT, 1, stream, PREFILL_GROUP, consumer, entry_id)
    entries = []
    for _, stream_entries in res or []:
        for got_id, flat in stream_entries:
            fields = dict(zip(flat[0::2], flat[1::2], strict=True))
            entries.append((got_id, parse_task(fields)))
    return entries


def reclaim_tasks(
    client: redis.Redis, stream: str, consumer: str, min_idle_ms: int, count: int
) -> list[tuple[bytes, PrefillTask | None]]:
    """Tasks a dead consumer took but never acknowledged (XAUTOCLAIM)."""
    res = client.xautoclaim(
        stream, PREFILL_GROUP, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
    )
    return [(entry_id, parse_task(fields)) for entry_id, fields in res[1] if fields]


def delivery_counts(client: redis.Redis, stream: str, entry_ids: list[bytes]) -> dict[bytes, int]:
    """How many times each pending entry has been delivered (XPENDING)."""
    pipe = client.pipeline(transaction=False)
    for entry_id in entry_ids:
        pipe.xpending_range(stream, PREFILL_GROUP, min=entry_id, max=entry_id, count=1)
    counts = {}
    for entry_id, rows in zip(entry_ids, pipe.execute(), strict=True):
        counts[entry_id] = rows[0]["times_delivered"] if rows else 0
    return counts


def dead_letter(
    client: redis.Redis, stream: str, dead_stream: str, entry_id: bytes, payload: bytes, reason: str
) -> None:
    """Move a task that keeps failing out of the way, keeping it for inspection."""
    pipe = client.pipeline(transaction=True)
    pipe.xadd(
        dead_stream,
        {MESSAGE_FIELD: payload, b"reason": reason.encode(), b"entry": entry_id},
        maxlen=10_000,
        approximate=True,
    )
    pipe.xack(stream, PREFILL_GROUP, entry_id)
    pipe.xdel(stream, entry_id)
    pipe.execute()


def parse_task(fields: dict) -> PrefillTask | None:
    try:
        return decode(fields[MESSAGE_FIELD], PrefillTask)
    except (KeyError, ValueError) as exc:
        log.warning("dropping malformed prefill task: %s", exc)
        return None


def publish_deltas(client: redis.Redis, deltas: dict[str, list[TokenDelta]]) -> None:
    """One TokenBatch per reply stream, all in one round trip."""
    if not deltas:
        return
    pipe = client.pipeline(transaction=False)
    for stream, batch in deltas.items():
        pipe.xadd(
            stream,
            {MESSAGE_FIELD: encode(TokenBatch(batch))},
            maxlen=REPLY_STREAM_MAXLEN,
            approximate=True,
        )
        # The stream of a gateway that died goes away once nobody writes to it; a live
        # gateway's is renewed by every write, and recreated by the next one if idle.
        pipe.expire(stream, REPLY_STREAM_TTL_S)
    pipe.execute()


def is_aborted(client: redis.Redis, request_id: str) -> bool:
    return bool(client.exists(abort_marker(request_id)))


def abort_listener(client: redis.Redis, stop: Callable[[], bool]) -> Iterator[str]:
    """Yield aborted request ids from the abort channel until stop(); reconnects."""
    while not stop():
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(ABORT_CHANNEL)
            while not stop():
                msg = pubsub.get_message(timeout=0.2)
                if msg and msg.get("type") == "message":
                    try:
                        yield decode(msg["data"], AbortNotice).request_id
                    except ValueError:
                        log.warning("ignoring a malformed abort notice")
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.2)
        finally:
            pubsub.close()


def connect_async(url: str, timeout_s: float, max_connections: int) -> aioredis.Redis:
    """An asyncio client whose pool holds at most `max_connections` and makes a caller
    wait for a free one instead of raising (redis-py's default pool raises "Too many
    connections" past 100). The wait is bounded all the same: every command holding a
    connection ends within `timeout_s`, and an unreachable Redis fails the connect."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=None,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis.from_pool(pool)
