"""tandem.supervisor with real processes: a dead child is restarted after a backoff, a
crash-looping one is given up, a live one is left alone, and nothing stopped returns."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tandem.supervisor import RestartPolicy, Supervisor

FAST = RestartPolicy(backoff_s=0.05, max_backoff_s=0.2, max_restarts=3, window_s=60)


def python(code: str):
    return lambda: subprocess.Popen([sys.executable, "-c", code])


def supervise_until(sup: Supervisor, cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, [(c.role, c.exits, c.given_up) for c in sup.children]
        sup.check()
        time.sleep(0.02)


@pytest.fixture
def sup():
    supervisor = Supervisor(FAST)
    try:
        yield supervisor
    finally:
        supervisor.stop(5)


def test_a_killed_child_is_restarted_and_its_peer_left_alone(sup: Supervisor) -> None:
    victim = sup.add("decode", python("import time; time.sleep(60)"))
    peer = sup.add("prefill", python("import time; time.sleep(60)"))
    first, peer_pid = victim.proc.pid, peer.proc.pid
    victim.proc.kill()
    supervise_until(sup, lambda: victim.proc is not None and victim.proc.pid != first)
    assert victim.proc.poll() is None and len(victim.exits) == 1
    assert peer.proc.pid == peer_pid and peer.proc.poll() is None
    assert sup.given_up() == {}


def test_a_crash_looping_child_is_given_up_while_the_rest_runs(sup: Supervisor) -> None:
    looping = sup.add("decode", python("raise SystemExit(3)"))
    steady = sup.add("decode", python("import time; time.sleep(60)"))
    supervise_until(sup, lambda: looping.given_up)
    assert len(looping.exits) == FAST.max_restarts + 1 and looping.proc is None
    for _ in range(10):  # given up means never started again
        sup.check()
    assert looping.proc is None
    assert steady.proc.poll() is None
    assert sup.given_up() == {"decode": 1} and sup.expected() == {"decode": 2}


def test_backoff_doubles_with_each_exit(sup: Supervisor) -> None:
    child = sup.add("gateway", python("raise SystemExit(1)"))
    delays = []
    while len(delays) < 3:
        exits = len(child.exits)
        sup.check()
        if len(child.exits) > exits:
            delays.append(round(child.restart_at - child.exits[-1], 3))
        time.sleep(0.01)
    assert delays == [0.05, 0.1, 0.2]


def test_a_child_that_cannot_start_counts_as_an_exit(sup: Supervisor) -> None:
    def broken():
        raise OSError("no such program")

    child = sup.add("redis", broken)
    assert child.proc is None and len(child.exits) == 1
    supervise_until(sup, lambda: child.given_up)


def test_stopped_children_stay_stopped(sup: Supervisor) -> None:
    redis = sup.add("redis", python("import time; time.sleep(60)"))
    worker = sup.add("decode", python("import time; time.sleep(60)"))
    sup.stop(5, keep=("redis",))
    assert worker.proc.poll() is not None and redis.proc.poll() is None
    sup.check()
    assert worker.proc.poll() is not None and worker.exits == []


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError):
        RestartPolicy(backoff_s=0)
    with pytest.raises(ValueError):
        RestartPolicy(backoff_s=5, max_backoff_s=1)
    with pytest.raises(ValueError):
        RestartPolicy(max_restarts=-1)
