"""The bundled redis-server: with a state directory its queued tasks survive a SIGKILL
and restart; it never outlives the process that started it, even one SIGKILLed; and
what workers write into it (reply streams) does not outlive its reader."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import psutil
import redis

from tandem.core.protocol import TokenDelta
from tandem.core.redis_client import ensure_group, publish_deltas
from tandem.core.redis_keys import PREFILL_GROUP, REPLY_STREAM_TTL_S, reply_stream
from tandem.local_redis import LocalRedis, free_port

STREAM = "tandem:m:prefill"


def test_queued_tasks_and_their_group_survive_a_sigkill(tmp_path) -> None:
    server = LocalRedis(state_dir=tmp_path / "redis").start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        ensure_group(client, STREAM)
        ids = [client.xadd(STREAM, {b"m": f"task {i}".encode()}) for i in range(3)]
        client.xreadgroup(PREFILL_GROUP, "w1", {STREAM: ">"}, count=1)  # one taken, pending
        client.close()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(5)
        server.start()  # same port, same directory
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        assert [e for e, _ in client.xrange(STREAM)] == ids
        assert client.xpending(STREAM, PREFILL_GROUP)["pending"] == 1
        # The group remembers what was delivered: the next read gets the second task.
        ((_, entries),) = client.xreadgroup(PREFILL_GROUP, "w2", {STREAM: ">"}, count=1)
        assert entries[0][0] == ids[1]
        client.close()
    finally:
        server.stop()


def test_without_a_state_directory_nothing_is_kept() -> None:
    server = LocalRedis().start()
    try:
        redis.Redis.from_url(server.url).set("k", "v")
        server.proc.kill()
        server.proc.wait(5)
        server.start()
        assert redis.Redis.from_url(server.url).get("k") is None
    finally:
        server.stop()


def test_dies_with_a_sigkilled_parent() -> None:
    port = free_port()
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from tandem.local_redis import LocalRedis; "
            f"LocalRedis(port={port}).start(); print('up', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout.readline().strip() == "up"
        (server,) = psutil.Process(parent.pid).children()
        parent.kill()
        parent.wait(5)
        deadline = time.monotonic() + 10
        while server.is_running() and server.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "redis-server outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()


def test_reply_streams_expire_once_nobody_writes_to_them() -> None:
    """A dead gateway's reply stream is not kept forever: every write renews a TTL."""
    with LocalRedis() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        stream = reply_stream("gone-gateway")
        publish_deltas(client, {stream: [TokenDelta(request_id="r", token_ids=[1])]})
        assert 0 < client.ttl(stream) <= REPLY_STREAM_TTL_S
        client.expire(stream, 1)
        publish_deltas(client, {stream: [TokenDelta(request_id="r", token_ids=[2], offset=1)]})
        assert client.ttl(stream) > 1 and client.xlen(stream) == 2
        client.close()
