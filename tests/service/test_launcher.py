"""`tandem serve` must leave nothing behind when stopped."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from tests.service.conftest import generate, start_service, stop_service


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_leaves_no_process_behind(sig):
    svc = start_service()
    children = psutil.Process(svc.proc.pid).children(recursive=True)
    roles = " ".join(" ".join(c.cmdline()) for c in children)
    for role in ("redis-server", " prefill ", " decode ", " gateway "):
        assert role in roles, f"{role.strip()} not started: {roles}"
    tokens, _, _ = generate(svc.stub(), prompt="Hello", max_tokens=3)
    assert len(tokens) == 3
    assert stop_service(svc, sig) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(c.is_running() and
                                              c.status() != psutil.STATUS_ZOMBIE
                                              for c in children):
        time.sleep(0.1)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == []
