"""What workers send back to gateways: token deltas built from sequences, and an outbox
that makes a worker's Redis writes in order on its own thread.

Every worker that samples tokens (prefill for the first one, decode and colocated for
the rest) publishes the same TokenDelta: the newest token, its offset in the output (so
the gateway drops repeats and detects gaps), the finish reason once there is one, and
the id of the worker that owns the request from now on (the gateway's owner watch).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from functools import partial

import redis

from tandem.core import hop_trace
from tandem.core.protocol import TokenDelta
from tandem.core.redis_client import publish_deltas
from tandem.core.sequence import Sequence

log = logging.getLogger(__name__)

# Deltas of one step, grouped by the reply stream of the gateway that waits for them.
Deltas = defaultdict[str, list[TokenDelta]]


def new_deltas() -> Deltas:
    return defaultdict(list)


def token_delta(seq: Sequence, owner: str) -> TokenDelta:
    """The token `seq` just sampled; `owner` is the worker that generates the rest."""
    if hop_trace.ENABLED and len(seq.output_token_ids) == 1:
        hop_trace.mark(seq.request_id, "first_token")
    return TokenDelta(
        request_id=seq.request_id,
        token_ids=[seq.output_token_ids[-1]],
        offset=len(seq.output_token_ids) - 1,
        finish_reason=seq.finish_reason.value if seq.is_finished else None,
        logprobs=seq.output_logprobs[-1:] or None,
        worker_id=owner,
        cached_tokens=seq.num_cached_tokens if len(seq.output_token_ids) == 1 else 0,
    )


def error_delta(request_id: str, code: str, message: str) -> TokenDelta:
    """Ends the client's stream with an error (code: unavailable, deadline, ...)."""
    return TokenDelta(request_id=request_id, finish_reason="abort", error=message, error_code=code)


def publish_safely(client: redis.Redis, deltas: dict[str, list[TokenDelta]]) -> None:
    """Publish, surviving a Redis outage: the gateway then sees a gap or its deadline
    and ends the request explicitly; the worker itself must keep running."""
    try:
        publish_deltas(client, deltas)
    except redis.RedisError as exc:
        log.error("could not publish to the gateway: %s", exc)


class Outbox:
    """A worker's Redis writes (token deltas, acknowledgements, requeued tasks), made in
    the order they were asked for on one thread, so the model loop never waits on a
    socket. Order matters: a first token is published before its task is acknowledged,
    and a preempted request's last tokens before it is requeued."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._queue: queue.Queue[Callable[[], object] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True, name="outbox")

    def start(self) -> None:
        self._thread.start()

    def publish(self, deltas: dict[str, list[TokenDelta]]) -> None:
        if deltas:
            self._queue.put(partial(publish_safely, self._client, dict(deltas)))

    def call(self, fn: Callable[..., object], *args: object) -> None:
        """Run fn(*args) on the outbox thread after everything queued before it."""
        self._queue.put(partial(fn, *args))

    def close(self, timeout_s: float = 5.0) -> None:
        """Finish what is queued (at most `timeout_s`), then stop the thread."""
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            try:
                job()
            except redis.RedisError as exc:
                log.warning("redis write failed: %s", exc)
            except Exception:  # one bad write must not stop every later one
                log.exception("outbox job failed")
