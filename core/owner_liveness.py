"""A gateway that dies stops owning its requests: workers abort them.

Each gateway keeps `{reply stream}:alive` in Redis with a short TTL, refreshed every
second (gateway/gateway_heartbeat.py). A worker's liveness thread looks, once a
`check_s`, at the keys of the reply streams its requests answer to. A gateway whose key
this worker has seen, and which has then stayed missing for `grace_s`, is dead: its
requests are aborted (their ids go to the worker's abort queue, so the model loop drops
them and frees their blocks as for a client that left) instead of running on to their
deadline for nobody.

A stream is judged only if it had a gateway: this worker saw its heartbeat key, or its
`{reply stream}:known` key (set with each beat, an hour's TTL) exists. So a task of a dead
gateway that no worker had taken yet (queued while workers were busy, or taken by a worker
started later) is aborted too, while a stream that never had a heartbeat (a test or tool
writing tasks by hand) is never judged. The grace covers a Redis restarted without data:
a live gateway sets its keys again within a heartbeat. Only TTLs and this worker's own
clock are used, never another host's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import redis

from tandem.core.redis_keys import gateway_alive_key, gateway_known_key

log = logging.getLogger(__name__)

CHECK_S = 1.0
GRACE_S = 2.0


class OwnerLiveness:
    def __init__(
        self,
        client: redis.Redis,
        held: Callable[[], Mapping[str, str]],
        abort: Callable[[str], None],
        grace_s: float = GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """held(): request id -> reply stream of every request the worker holds now
        (called from this thread: a copy). abort(request id): drop it on the model loop."""
        self.client = client
        self.held = held
        self.abort = abort
        self.grace_s = grace_s
        self.clock = clock
        self._seen: set[str] = set()  # streams whose key this worker has seen
        self._missing_since: dict[str, float] = {}  # judged streams whose key is gone

    def check(self) -> list[str]:
        """One look at the held requests' gateways; returns the request ids aborted."""
        held = self.held()
        streams = sorted(set(held.values()))
        if not streams:
            self._seen.clear()
            self._missing_since.clear()
            return []
        pipe = self.client.pipeline(transaction=False)
        for stream in streams:
            pipe.exists(gateway_alive_key(stream))
            pipe.exists(gateway_known_key(stream))
        found = pipe.execute()
        alive = dict(zip(streams, found[0::2], strict=True))
        known = dict(zip(streams, found[1::2], strict=True))
        now = self.clock()
        dead: set[str] = set()
        for stream, present in alive.items():
            if present:
                self._seen.add(stream)
                self._missing_since.pop(stream, None)
            elif stream in self._seen or known[stream]:
                since = self._missing_since.setdefault(stream, now)
                if now - since >= self.grace_s:
                    dead.add(stream)
        # Forget streams no request of ours answers to any more.
        self._seen &= set(streams)
        self._missing_since = {s: t for s, t in self._missing_since.items() if s in alive}
        aborted = [rid for rid, stream in held.items() if stream in dead]
        for stream in dead:
            log.warning("gateway of %s gone (no heartbeat for %.0f s): aborting its requests",
                        stream, self.grace_s)  # fmt: skip
        for rid in aborted:
            self.abort(rid)
        return aborted

    def run(self, stopped: Callable[[float], bool], check_s: float = CHECK_S) -> None:
        """check() every check_s until stopped(check_s) (a wait that says whether to stop)."""
        while True:
            try:
                self.check()
            except redis.RedisError as exc:  # Redis away: no judgement this round
                log.warning("owner liveness check failed: %s", exc)
            except Exception:  # a bad snapshot must not end the checks for good
                log.exception("owner liveness check failed")
            if stopped(check_s):
                return
