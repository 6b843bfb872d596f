"""`tandem serve`'s care of its child processes: restart what dies, give up what
crash-loops.

A child that exits is started again after a backoff that doubles with each exit in the
last `window_s` (0.5 s, 1 s, 2 s, ... up to `max_backoff_s`); the other children keep
serving meanwhile, since each role survives its peers' loss on its own (the registry
expires a dead worker, peers reclaim its tasks, the gateway fails or migrates its
streams). A child that exits more than `max_restarts` times within `window_s` is
crash-looping: it is given up with a loud log, and the pool runs degraded without it
(the launcher publishes that, see core.pool_status, for /ready and /metrics).
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger("tandem.serve")


@dataclass(frozen=True)
class RestartPolicy:
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_restarts: int = 5
    window_s: float = 120.0

    def __post_init__(self) -> None:
        if not 0 < self.backoff_s <= self.max_backoff_s:
            raise ValueError("need 0 < backoff_s <= max_backoff_s")
        if self.max_restarts < 0 or self.window_s <= 0:
            raise ValueError("need max_restarts >= 0 and window_s > 0")


@dataclass
class Child:
    """One supervised process: `spawn` starts it (again) and returns its Popen."""

    role: str
    spawn: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    exits: list[float] = field(default_factory=list)  # monotonic times, within the window
    restart_at: float = 0.0
    given_up: bool = False
    stopped: bool = False

    @property
    def name(self) -> str:
        return f"{self.role} (pid {self.proc.pid})" if self.proc else self.role


class Supervisor:
    def __init__(self, policy: RestartPolicy | None = None) -> None:
        self.policy = policy or RestartPolicy()
        self.children: list[Child] = []

    def add(self, role: str, spawn: Callable[[], subprocess.Popen]) -> Child:
        child = Child(role, spawn)
        self.children.append(child)
        self._start(child, time.monotonic())
        return child

    def check(self) -> None:
        """Notice exits and start what is due; call it often (every 0.2 s or so)."""
        now = time.monotonic()
        for child in self.children:
            if child.given_up or child.stopped:
                continue
            if child.proc is not None and child.proc.poll() is not None:
                self._exited(child, f"exited with status {child.proc.returncode}", now)
            if child.proc is None and not child.given_up and now >= child.restart_at:
                self._start(child, now)

    def given_up(self) -> dict[str, int]:
        """Role -> how many of its processes were given up."""
        counts: dict[str, int] = {}
        for child in self.children:
            if child.given_up:
                counts[child.role] = counts.get(child.role, 0) + 1
        return counts

    def expected(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for child in self.children:
            counts[child.role] = counts.get(child.role, 0) + 1
        return counts

    def stop(self, timeout_s: float, keep: tuple[str, ...] = ()) -> None:
        """SIGTERM every live child (but those of the roles in `keep`), then SIGKILL
        what is still there at the timeout. Nothing stopped is restarted."""
        stopping = [c for c in self.children if c.role not in keep]
        for child in stopping:
            child.stopped = True  # check() must not bring it back
        procs = [c.proc for c in stopping if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _start(self, child: Child, now: float) -> None:
        try:
            child.proc = child.spawn()
        except (OSError, RuntimeError) as exc:  # e.g. a port still held, a missing binary
            child.proc = None
            self._exited(child, f"failed to start: {exc}", now)
            return
        if child.exits:
            log.warning("restarted %s", child.name)

    def _exited(self, child: Child, why: str, now: float) -> None:
        name = child.name
        child.proc = None
        child.exits = [t for t in child.exits if now - t < self.policy.window_s] + [now]
        if len(child.exits) > self.policy.max_restarts:
            child.given_up = True
            log.error(
                "%s %s: %d exits in %.0f s, crash-looping; GIVING UP on it, the service "
                "runs degraded without it",
                name,
                why,
                len(child.exits),
                self.policy.window_s,
            )
            return
        delay = min(self.policy.max_backoff_s, self.policy.backoff_s * 2 ** (len(child.exits) - 1))
        child.restart_at = now + delay
        log.warning("%s %s; restarting it in %.1f s", name, why, delay)
