"""A request's owner (the decode or colocated worker named in its deltas) missing from
the registry: with --migrate the gateway re-queues the request only once the owner
stayed out for owner_grace_s, never while it still generates (a restarted Redis loses
every registry entry until the next heartbeat); without --migrate it fails at once."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import redis

from tandem.core import redis_keys
from tandem.gateway.proto import tandem_pb2 as pb
from tests.gateway.conftest import Gateway
from tests.gateway.fake_worker import FakeWorker, expected_output

PROMPT_IDS = [11, 12, 13]
TOKENS = 60


def _request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt_token_ids=PROMPT_IDS, sampling=pb.SamplingParams(max_tokens=TOKENS)
    )


def _forget_registry_while_streaming(
    gateway: Gateway, fake_worker: FakeWorker, redis_client: redis.Redis
) -> tuple[list[int], Exception | None]:
    """Stream one request; once it has tokens, delete every registry entry (as a Redis
    restarted without data does) and let the still-live worker re-register."""
    tokens: list[int] = []
    failure: list[Exception] = []

    def run() -> None:
        try:
            for msg in gateway.stub.Generate(_request(), timeout=30):
                tokens.extend(msg.token_ids)
        except grpc.RpcError as exc:
            failure.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while len(tokens) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    redis_client.delete(*redis_client.keys(redis_keys.WORKER_PREFIX + "*"))
    t.join(30)
    return tokens, (failure[0] if failure else None)


@pytest.fixture
def owned_worker(fake_worker: FakeWorker) -> FakeWorker:
    fake_worker.owned = True
    fake_worker.token_delay_s = 0.05  # 60 tokens: ~3 s, across the re-registration
    return fake_worker


def test_a_live_owner_briefly_out_of_the_registry_is_not_migrated(
    start_gateway, owned_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    gateway = start_gateway(migrate=True, owner_check_s=0.05)
    tokens, failure = _forget_registry_while_streaming(gateway, owned_worker, redis_client)
    assert failure is None
    assert tokens == expected_output(PROMPT_IDS, TOKENS)
    assert len(owned_worker.tasks) == 1, "re-queued while its worker was generating"


def test_an_owner_gone_for_good_is_migrated_after_the_grace(
    start_gateway, owned_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    gateway = start_gateway(migrate=True, owner_check_s=0.05, owner_grace_s=0.3)
    owned_worker.decode_id = "decode-that-died"  # never in the registry
    tokens, failure = _forget_registry_while_streaming(gateway, owned_worker, redis_client)
    assert len(owned_worker.tasks) >= 2, "never migrated"
    assert owned_worker.tasks[1].request_id == owned_worker.tasks[0].request_id
    assert owned_worker.tasks[1].output_token_ids, "migrated with the tokens so far"


def test_a_queued_task_lost_with_redis_data_fails_instead_of_waiting(
    start_gateway, fake_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    """A task taken but not answered stays in the stream (nothing is failed while it
    is there); once the stream is gone, as after a Redis restart without its data, the
    request fails UNAVAILABLE, long before its 300 s deadline."""
    gateway = start_gateway(owner_check_s=0.1)
    fake_worker.stall = True  # takes the task (XACK, no XDEL) and never answers
    call = gateway.stub.Generate(_request(), timeout=30)
    stream = redis_keys.prefill_stream(fake_worker.model)
    deadline = time.monotonic() + 10
    while not fake_worker.tasks:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(1.5)  # more than the grace: a task still in the stream is left alone
    assert call.running()
    redis_client.delete(stream)
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "queued task was lost" in info.value.details()


def test_a_task_deleted_after_its_first_token_is_not_taken_for_lost(
    start_gateway, fake_worker: FakeWorker
) -> None:
    """Workers delete a task's entry once its first delta is out; a request answered by a
    worker that names no owner (a prefill worker's first token) must not then be failed
    as "queued task lost" by the vanished-task check."""
    fake_worker.token_delay_s = 0.05  # 60 tokens: ~3 s, several checks past the grace
    gateway = start_gateway(owner_check_s=0.05)
    tokens = [t for msg in gateway.stub.Generate(_request(), timeout=30) for t in msg.token_ids]
    assert tokens == expected_output(PROMPT_IDS, TOKENS)
