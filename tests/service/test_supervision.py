"""`tandem serve` supervises its roles: a process SIGKILLed while streams run (a decode, a
prefill, a colocated worker, the gateway, the bundled Redis) is restarted while the
others keep serving; streams on other workers end token-exact, a replacement registers,
and later requests equal the in-process engine's."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import grpc
import psutil
import pytest
from redis.exceptions import BusyLoadingError

from tandem.core import redis_keys
from tandem.core.protocol import TokenBatch, decode
from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.core.sampling_params import SamplingParams
from tests.service.conftest import (
    RunningService,
    assert_every_worker_clean,
    check_concurrent_streams,
    start_service,
    stop_service,
    tandem_pb2,
    wait_for,
)

STREAMS = 4
STREAM_TOKENS = 32
LONG_TOKENS = 3000  # a minute or more of CPU decoding: not done when checked
PROMPTS = [f"Count slowly to one hundred, take {i}:" for i in range(STREAMS)]


@pytest.fixture(scope="module")
def svc():
    service = start_service(
        "--prefill-workers", "1", "--decode-workers", "2", "--colocated-workers", "1"
    )
    try:
        yield service
    finally:
        stop_service(service)


def child(svc: RunningService, word: str) -> psutil.Process:
    """The launcher's live child whose command line has `word` (a role's subcommand, or
    the program's name)."""
    for proc in psutil.Process(svc.proc.pid).children(recursive=True):
        try:
            # redis-server rewrites its command line ("redis-server HOST:PORT"): by name.
            named = word in proc.cmdline() or proc.name() == word
            if named and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except psutil.NoSuchProcess:
            continue
    raise LookupError(word)


class Streams:
    """STREAMS greedy streams in threads: tokens so far, and the error each ended with."""

    def __init__(self, svc: RunningService) -> None:
        self.tokens: list[list[int]] = [[] for _ in PROMPTS]
        self.errors: list[grpc.StatusCode | None] = [None] * STREAMS
        stub = svc.stub()
        self.threads = [
            threading.Thread(target=self._run, args=(stub, i), daemon=True) for i in range(STREAMS)
        ]
        for t in self.threads:
            t.start()

    def _run(self, stub, i: int) -> None:
        req = tandem_pb2.GenerateRequest(
            prompt=PROMPTS[i],
            sampling=tandem_pb2.SamplingParams(
                max_tokens=STREAM_TOKENS, temperature=0.0, ignore_eos=True
            ),
        )
        try:
            for msg in stub.Generate(req, timeout=180):
                self.tokens[i] += list(msg.token_ids)
        except grpc.RpcError as exc:
            self.errors[i] = exc.code()

    def join(self) -> None:
        for t in self.threads:
            t.join(200)
            assert not t.is_alive(), "a stream hangs"


@pytest.fixture(scope="module")
def answers(engine) -> list[list[int]]:
    """The in-process engine's answers to PROMPTS, computed once for every round."""
    sp = SamplingParams(max_tokens=STREAM_TOKENS, temperature=0.0, ignore_eos=True)
    return [out.token_ids for out in engine.generate(PROMPTS, sp)]


def running_on(svc: RunningService, role: str) -> dict[int, int]:
    """pid -> sequences running, for the live workers of `role`."""
    return {w.pid: w.running for w in list_workers(connect(svc.redis_url), role=role)}


def kill_mid_stream(svc: RunningService, answers, role: str, word: str) -> None:
    """SIGKILL the `role` worker running most streams once every stream is decoding;
    exactly its streams fail (UNAVAILABLE), the rest equal the engine's answers."""
    streams = Streams(svc)
    wait_for(lambda: all(len(t) >= 2 for t in streams.tokens), "every stream to decode", svc)
    everywhere = ("decode", "colocated")
    wait_for(
        lambda: sum(sum(running_on(svc, r).values()) for r in everywhere) == STREAMS,
        "the registry to show every stream",
        svc,
    )
    on_role = running_on(svc, role)
    if role in everywhere:
        victim = max(on_role, key=on_role.get)
        doomed = on_role[victim]
    else:
        # Every stream decodes elsewhere now, so a prefill worker holds none of them. Its
        # registry entry may still count the last prefill it ran (a heartbeat behind).
        victim, doomed = child(svc, word).pid, 0
    os.kill(victim, signal.SIGKILL)
    streams.join()
    failed = [i for i, e in enumerate(streams.errors) if e is not None]
    assert {streams.errors[i] for i in failed} <= {grpc.StatusCode.UNAVAILABLE}
    assert len(failed) == doomed, (streams.errors, doomed)
    for i in set(range(STREAMS)) - set(failed):
        assert streams.tokens[i] == answers[i], f"stream {i} disturbed"
    wait_for(
        lambda: (
            any(w.pid not in (victim, 0) for w in list_workers(connect(svc.redis_url), role))
            and len(list_workers(connect(svc.redis_url), role)) == len(on_role)
        ),
        f"a replacement {role} worker to register",
        svc,
    )
    assert child(svc, word).pid != victim


@pytest.mark.parametrize(
    ("role", "word"), [("decode", "decode"), ("prefill", "prefill"), ("colocated", "worker")]
)
def test_a_killed_worker_is_replaced_while_the_rest_serves(svc, engine, answers, role, word):
    kill_mid_stream(svc, answers, role, word)
    check_concurrent_streams(svc, engine, 2)
    assert any(f"{role} (pid" in line and "restarting it" in line for line in svc.log)


def test_a_killed_gateway_is_restarted_and_its_requests_freed(svc, engine):
    """Its clients' streams end with UNAVAILABLE; the workers, once its heartbeat key is
    gone, abort its requests (long ones, far from done: the last delta written to its
    reply stream has no finish reason) and free their blocks; a new gateway serves."""
    long = tandem_pb2.SamplingParams(max_tokens=LONG_TOKENS, temperature=0.0, ignore_eos=True)
    streams = [svc.stub().Generate(tandem_pb2.GenerateRequest(prompt=p, sampling=long),
                                   timeout=180) for p in PROMPTS[:2]]  # fmt: skip
    for stream in streams:
        next(stream)
    wait_for(lambda: sum(sum(running_on(svc, r).values()) for r in ("decode", "colocated")) == 2,
             "the registry to show both streams", svc)  # fmt: skip
    old = child(svc, "gateway")
    old.kill()
    old.wait(10)
    killed_at = time.time()
    for stream in streams:
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE

    def ready() -> bool:
        with urllib.request.urlopen(svc.http_url + "/ready", timeout=5) as res:
            return res.status == 200

    wait_for(lambda: child(svc, "gateway").pid != old.pid and ready(), "a new gateway", svc)
    assert_every_worker_clean(svc, killed_at)
    redis = connect(svc.redis_url)
    dead = [
        key for key in redis.scan_iter(match=redis_keys.REPLY_PREFIX + "*", _type="stream")
        if not redis.exists(redis_keys.gateway_alive_key(key.decode()))
    ]  # fmt: skip
    assert len(dead) == 1, dead
    [(_id, fields)] = redis.xrevrange(dead[0], count=1)
    last = decode(fields[redis_keys.MESSAGE_FIELD], TokenBatch).deltas[-1]
    assert last.finish_reason is None and last.offset < LONG_TOKENS - 1, last
    check_concurrent_streams(svc, engine, 2)


def test_a_killed_redis_is_restarted_with_its_data(svc, engine):
    redis = connect(svc.redis_url)
    redis.set("survives-a-restart", b"1")
    time.sleep(1.5)  # the append-only file is fsynced every second
    old = child(svc, "redis-server")
    old.kill()
    old.wait(10)
    wait_for(lambda: child(svc, "redis-server").pid != old.pid, "a new redis-server", svc)

    def loaded() -> bool:  # a restarted server answers LOADING while it replays its AOF
        try:
            connect(svc.redis_url).get("survives-a-restart")
        except BusyLoadingError:
            return False
        return True

    wait_for(loaded, "the new redis-server to load its data", svc)
    assert connect(svc.redis_url).get("survives-a-restart") == b"1"
    wait_for(lambda: len(list_workers(connect(svc.redis_url))) == 4, "workers re-registered", svc)
    check_concurrent_streams(svc, engine, 2)
