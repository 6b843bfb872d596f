"""Requests that do not end normally: no workers, client cancel, deadline, shutdown."""

from __future__ import annotations

import os
import time

import grpc
import pytest
import redis

from tandem.core import redis_keys
from tandem.core.protocol import WorkerInfo, encode
from tandem.gateway.proto import tandem_pb2 as pb
from tests.gateway.conftest import MODEL, Gateway, LoopThread, wait_for
from tests.gateway.fake_worker import FakeWorker

LONG = pb.SamplingParams(max_tokens=500)


def register(client: redis.Redis, worker_id: str, role: str, model: str = MODEL, **kw) -> None:
    info = WorkerInfo(worker_id=worker_id, role=role, model=model, pid=os.getpid(), **kw)
    key = redis_keys.worker_key(worker_id)
    client.hset(key, "info", encode(info))
    client.expire(key, redis_keys.WORKER_TTL_S)


def assert_unavailable(gateway: Gateway, reason: str) -> None:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        list(gateway.stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason in info.value.details()
    assert time.monotonic() - start < 1.0


def test_no_workers_is_unavailable_at_once(gateway: Gateway, redis_client: redis.Redis) -> None:
    assert_unavailable(gateway, "no live prefill or decode worker for model 'smollm2'")
    assert redis_client.xlen(redis_keys.prefill_stream(MODEL)) == 0  # nothing queued


def test_workers_that_cannot_serve_do_not_count(
    gateway: Gateway, redis_client: redis.Redis
) -> None:
    register(redis_client, "p1", "prefill")
    register(redis_client, "d-other", "decode", model="another-model")
    register(redis_client, "d-draining", "decode", draining=True)
    redis_client.hset(redis_keys.worker_key("garbage"), "info", b"\x00not msgpack")
    try:
        assert_unavailable(gateway, "no live decode worker")
    finally:
        redis_client.delete(
            *(redis_keys.worker_key(w) for w in ("p1", "d-other", "d-draining", "garbage"))
        )


def test_a_live_colocated_worker_alone_can_serve(
    gateway: Gateway, redis_client: redis.Redis, loop_thread: LoopThread
) -> None:
    registry = gateway.app.executor.registry
    register(redis_client, "c-draining", "colocated", draining=True)
    register(redis_client, "p1", "prefill")
    try:
        assert_unavailable(gateway, "no live decode worker")
        register(redis_client, "c1", "colocated")
        assert loop_thread.run(registry.unavailable_reason()) is None
    finally:
        redis_client.delete(*(redis_keys.worker_key(w) for w in ("c-draining", "p1", "c1")))


def test_client_cancel_publishes_abort(
    gateway: Gateway, fake_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    fake_worker.token_delay_s = 0.02
    call = gateway.stub.Generate(
        pb.GenerateRequest(prompt="count with me", sampling=LONG), timeout=10
    )
    rid = next(call).request_id
    call.cancel()

    marker = redis_keys.abort_marker(rid)
    assert wait_for(lambda: redis_client.exists(marker))
    assert 0 < redis_client.ttl(marker) <= redis_keys.ABORT_MARKER_TTL_S
    assert wait_for(lambda: any(n.request_id == rid for n in fake_worker.notices))
    assert wait_for(lambda: rid in fake_worker.aborted)
    assert fake_worker.sent[rid] < 500


def test_gateway_deadline_ends_stalled_request(
    start_gateway, fake_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    gateway = start_gateway(request_timeout_s=0.5)
    fake_worker.stall = True
    start = time.time()
    with pytest.raises(grpc.RpcError) as info:
        list(gateway.stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=10))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    task = fake_worker.tasks[-1]
    assert start + 0.4 < task.deadline < start + 1.5  # the workers got the same deadline
    assert wait_for(lambda: redis_client.exists(redis_keys.abort_marker(task.request_id)))


def test_client_deadline_bounds_the_task_deadline(
    gateway: Gateway, fake_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    fake_worker.stall = True
    start = time.time()
    with pytest.raises(grpc.RpcError) as info:
        list(gateway.stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=0.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    task = fake_worker.tasks[-1]
    assert task.deadline < start + 1.5
    assert wait_for(lambda: redis_client.exists(redis_keys.abort_marker(task.request_id)))


def test_shutdown_cancels_open_streams_and_aborts_them(
    start_gateway, fake_worker: FakeWorker, loop_thread: LoopThread, redis_client: redis.Redis
) -> None:
    gateway = start_gateway()
    fake_worker.token_delay_s = 0.02
    call = gateway.stub.Generate(pb.GenerateRequest(prompt="long story", sampling=LONG), timeout=10)
    rid = next(call).request_id
    loop_thread.run(gateway.app.stop(grace_s=0))
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert redis_client.exists(redis_keys.abort_marker(rid))
    assert not redis_client.exists(redis_keys.reply_stream(gateway.config.gateway_id))


def test_the_gateway_heartbeat_key_lives_with_the_gateway(
    start_gateway, loop_thread: LoopThread, redis_client: redis.Redis
) -> None:
    """Set before the first request, kept alive past its TTL, removed at a clean stop
    (the workers' liveness check, core/owner_liveness.py, reads it)."""
    gateway = start_gateway()
    key = redis_keys.gateway_alive_key(redis_keys.reply_stream(gateway.config.gateway_id))
    assert 0 < redis_client.pttl(key) <= redis_keys.GATEWAY_ALIVE_TTL_S * 1000
    first_ttl_end = time.monotonic() + redis_keys.GATEWAY_ALIVE_TTL_S
    assert not wait_for(lambda: not redis_client.exists(key), redis_keys.GATEWAY_ALIVE_TTL_S + 2)
    assert time.monotonic() > first_ttl_end  # so the key was refreshed
    loop_thread.run(gateway.app.stop(grace_s=0))
    assert not redis_client.exists(key)
