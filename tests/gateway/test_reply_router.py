"""Routing of reply-stream entries to requests: order, duplicates, gaps, Redis restarts."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.core import redis_keys
from tandem.core.protocol import TokenBatch, TokenDelta, encode
from tandem.gateway.proto import tandem_pb2 as pb
from tandem.gateway.reply_router import ReplyRouter, RequestStream
from tandem.local_redis import LocalRedis
from tests.gateway.conftest import Gateway, LoopThread, wait_for
from tests.gateway.fake_worker import FakeWorker


def drain(stream: RequestStream) -> list[TokenDelta]:
    return asyncio.run(stream.get_many(1.0))


def delta(offset: int, ids: list[int], **kw) -> TokenDelta:
    return TokenDelta(request_id="r", token_ids=ids, offset=offset, **kw)


def test_overlapping_deltas_keep_only_new_tokens() -> None:
    s = RequestStream("r")
    s.push(delta(0, [10, 11]))
    s.push(delta(0, [10, 11, 12], logprobs=[{10: -0.1}, {11: -0.2}, {12: -0.3}]))  # replay
    s.push(delta(1, [11]))  # nothing new: dropped
    s.push(delta(3, [13], finish_reason="length"))
    got = drain(s)
    assert [d.token_ids for d in got] == [[10, 11], [12], [13]]
    assert got[1].offset == 2 and got[1].logprobs == [{12: -0.3}]
    assert got[-1].finish_reason == "length"


def test_finished_stream_ignores_late_deltas() -> None:
    s = RequestStream("r")
    s.push(delta(0, [1], finish_reason="stop"))
    s.push(delta(1, [2]))
    assert [d.token_ids for d in drain(s)] == [[1]]


def test_gap_fails_the_request() -> None:
    s = RequestStream("r")
    s.push(delta(0, [1]))
    s.push(delta(3, [4]))
    got = drain(s)
    assert got[-1].error_code == "internal"
    assert "output tokens 1..2 were lost" in got[-1].error


def test_router_routes_by_request_id(redis_server: LocalRedis, loop_thread: LoopThread) -> None:
    async def scenario() -> tuple[list[TokenDelta], list[TokenDelta]]:
        router = ReplyRouter(redis_server.url, "router-test", block_ms=100)
        client = redis.asyncio.Redis.from_url(redis_server.url)
        await router.start()
        a, b = router.register("a"), router.register("b")
        stream = router.stream
        await client.xadd(stream, {redis_keys.MESSAGE_FIELD: b"\xc1 malformed"})
        await client.xadd(stream, {b"other": b"no m field"})
        batch = TokenBatch(
            [
                TokenDelta(request_id="a", token_ids=[1]),
                TokenDelta(request_id="unknown", token_ids=[9]),
                TokenDelta(request_id="b", token_ids=[2, 3], finish_reason="length"),
            ]
        )
        await client.xadd(stream, {redis_keys.MESSAGE_FIELD: encode(batch)})
        got = await a.get_many(2.0), await b.get_many(2.0)
        await router.stop()
        assert not await client.exists(stream)
        await client.aclose()
        return got

    got_a, got_b = loop_thread.run(scenario())
    assert [d.token_ids for d in got_a] == [[1]]
    assert [d.token_ids for d in got_b] == [[2, 3]]


def health(gateway: Gateway) -> int:
    stub = health_pb2_grpc.HealthStub(gateway.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status


def test_gateway_survives_a_redis_restart(start_gateway, loop_thread: LoopThread) -> None:
    server = LocalRedis().start()
    try:
        gateway = start_gateway(redis_url=server.url)
        request = pb.GenerateRequest(
            prompt="before and after", sampling=pb.SamplingParams(max_tokens=4)
        )
        worker = loop_thread.run(FakeWorker(server.url, gateway.config.model).start())
        assert len(list(gateway.stub.Generate(request, timeout=10))) == 4
        loop_thread.run(worker.stop())

        server.stop()
        assert wait_for(lambda: health(gateway) == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as info:
            list(gateway.stub.Generate(request, timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE

        server = LocalRedis(port=server.port).start()  # empty: streams and groups are gone
        assert wait_for(lambda: health(gateway) == health_pb2.HealthCheckResponse.SERVING, 8)
        worker = loop_thread.run(FakeWorker(server.url, gateway.config.model).start())
        responses = list(gateway.stub.Generate(request, timeout=10))
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        loop_thread.run(worker.stop())
    finally:
        server.stop()
