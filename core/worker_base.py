"""What every worker process does besides its model work: identity, Redis, registry
heartbeat, abort notices and signals. The model loop stays in the role's own module;
these threads only feed it through thread-safe queues and flags.

Signals: the first SIGTERM/SIGINT starts a drain (the registry entry says `draining`,
no new work is taken, work in hand finishes within `drain_timeout_s`); a second one
stops at once.
"""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import queue
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping

import redis

from tandem.core.config import WorkerConfig
from tandem.core.owner_liveness import OwnerLiveness
from tandem.core.prefix_routing import HashPublisher
from tandem.core.protocol import WorkerInfo
from tandem.core.redis_client import abort_listener, connect
from tandem.core.registry import publish_worker, remove_worker

log = logging.getLogger(__name__)

RECENT_ABORT_TTL_S = 120.0


class WorkerBase:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        # A start-unique suffix: a container restarted in place keeps its hostname and pid
        # 1, and a replacement under the same id would hide the old process's death (and
        # its streams) from the gateway when it registers within the registry TTL.
        self.worker_id = config.worker_id or (
            f"{config.role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        )
        self.redis: redis.Redis = connect(config.redis_url)
        self.aborted: queue.Queue[str] = queue.Queue()
        self._recent_aborts: dict[str, float] = {}  # request id -> forget after (monotonic)
        self._stop = threading.Event()
        self._drain = threading.Event()
        self._drain_deadline = float("inf")
        self._threads: list[threading.Thread] = []
        # Set by a worker that prefills: its cached block hashes, refreshed with each
        # heartbeat and expiring with its registry entry (core/prefix_routing.py).
        self.hash_publisher: HashPublisher | None = None

    @property
    def stopping(self) -> bool:
        """Stop now: a second signal, or the drain finished or timed out."""
        return self._stop.is_set() or (
            self._drain.is_set() and time.monotonic() > self._drain_deadline
        )

    @property
    def draining(self) -> bool:
        return self._drain.is_set() or self._stop.is_set()

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def request_drain(self, *_: object) -> None:
        if self._drain.is_set():
            log.warning("second stop signal: exiting now")
            self._stop.set()
            return
        log.info("draining: finishing work in hand (at most %.0fs)", self.config.drain_timeout_s)
        self._drain_deadline = time.monotonic() + self.config.drain_timeout_s
        self._drain.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_drain)
        signal.signal(signal.SIGINT, self.request_drain)
        # `kill -USR1 PID` prints every thread's stack: the first tool for a stuck worker.
        faulthandler.register(signal.SIGUSR1, all_threads=True)

    def start_background(self, snapshot: Callable[[], WorkerInfo]) -> None:
        """Heartbeat (registry entry), abort-listener and gateway-liveness threads."""
        self._spawn(self._heartbeat_loop, snapshot)
        self._spawn(self._abort_loop)
        liveness = OwnerLiveness(self.redis, self.held_reply_streams, self.aborted.put)
        self._spawn(liveness.run, self._stop.wait)

    def held_reply_streams(self) -> Mapping[str, str]:
        """Request id -> reply stream of every request this worker holds, for the
        gateway-liveness thread (so a copy, safe to take off the model loop)."""
        return {}

    def _spawn(self, fn: Callable, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=fn.__name__)
        t.start()
        self._threads.append(t)

    def _heartbeat_loop(self, snapshot: Callable[[], WorkerInfo]) -> None:
        while not self._stop.is_set():
            try:
                info = snapshot()
                info.heartbeat = time.time()
                publish_worker(self.redis, info, ttl_s=self.config.registry_ttl_s)
                if self.hash_publisher is not None:
                    self.hash_publisher.flush()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:  # a bad snapshot must not silence the heartbeat for good
                log.exception("heartbeat snapshot failed")
            self._stop.wait(self.config.heartbeat_s)

    def _abort_loop(self) -> None:
        for request_id in abort_listener(self.redis, self._stop.is_set):
            self.aborted.put(request_id)

    def drain_aborts(self) -> set[str]:
        """Abort notices that arrived since the last call; remembered for a while so a
        reservation or handoff that arrives after its abort is refused too."""
        ids: set[str] = set()
        now = time.monotonic()
        while True:
            try:
                ids.add(self.aborted.get_nowait())
            except queue.Empty:
                break
        for rid in ids:
            self._recent_aborts[rid] = now + RECENT_ABORT_TTL_S
        if len(self._recent_aborts) > 10_000 or ids:
            self._recent_aborts = {r: t for r, t in self._recent_aborts.items() if t > now}
        return ids

    def was_aborted(self, request_id: str) -> bool:
        return request_id in self._recent_aborts

    def shutdown(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
            remove_worker(self.redis, self.worker_id)
            if self.hash_publisher is not None:
                self.redis.delete(self.hash_publisher.key, self.hash_publisher.load_key)
        for t in self._threads:
            t.join(timeout=2)
