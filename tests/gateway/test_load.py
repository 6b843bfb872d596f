"""Many concurrent streams through one gateway: none may fail below its admission limit.

The in-process tests run the gateway and the fake pool on the fixtures' event loop; the
`load` ones (selected with -m load; CI runs them) run the gateway as `tandem gateway`
and the fake pool as a process of its own, and clients on the test's own event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tandem.bench.gateway_bench import Process, gateway_command, pool_command, ready_ports
from tandem.bench.gateway_clients import run_streams
from tandem.core.tokenizer import Tokenizer
from tandem.local_redis import LocalRedis
from tests.gateway.conftest import MODEL, Gateway, LoopThread, close_gateway, open_gateway
from tests.gateway.fake_worker import FakeWorker, expected_output


def prompts(count: int) -> list[list[int]]:
    """A distinct prompt per stream, so that crossed streams show."""
    return [[1000 + i % 3000, 2000 + i // 3000, 300] for i in range(count)]


def check_streams(results, prompts_sent, max_tokens: int, tokenizer: Tokenizer, api: str) -> None:
    failed = [(r.status, r.error) for r in results if not r.ok]
    assert not failed, f"{len(failed)} of {len(results)} streams failed, e.g. {failed[:3]}"
    for result, prompt in zip(results, prompts_sent, strict=True):
        want = expected_output(prompt, max_tokens)
        if api == "grpc":
            assert result.token_ids == want
        assert result.text == tokenizer.decode(want)
        assert result.finish_reason == "length"


def test_200_concurrent_http_streams_all_complete(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    """Issue 16: past ~100 concurrent requests redis-py's pool raised "Too many
    connections" and half the streams got HTTP 503."""
    fake_worker.token_delay_s = 0.01
    sent = prompts(200)
    target = f"127.0.0.1:{gateway.app.http_port}"
    results = asyncio.run(run_streams("http", target, sent, 32))
    check_streams(results, sent, 32, tokenizer, "http")


def test_a_busy_redis_pool_makes_requests_wait_not_fail(
    start_gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    """Two connections for 200 concurrent streams: every request waits its turn."""
    gateway = start_gateway(redis_max_connections=2)
    fake_worker.token_delay_s = 0.01
    sent = prompts(200)
    target = f"127.0.0.1:{gateway.app.http_port}"
    results = asyncio.run(run_streams("http", target, sent, 8))
    check_streams(results, sent, 8, tokenizer, "http")


def test_unreachable_redis_is_503_and_unavailable(loop_thread: LoopThread, model_dir: Path) -> None:
    """Redis gone: refused at once with 503 + Retry-After / UNAVAILABLE, not a wait."""
    with LocalRedis() as server:
        worker = loop_thread.run(FakeWorker(server.url, MODEL).start())
        gateway = open_gateway(server, loop_thread, model_dir, worker_check_ttl_s=0.01)
        try:
            server.stop()

            async def both() -> list:
                return await asyncio.gather(
                    run_streams("http", f"127.0.0.1:{gateway.app.http_port}", [[5]], 4),
                    run_streams("grpc", gateway.target, [[5]], 4),
                )

            http, grpc_ = asyncio.run(asyncio.wait_for(both(), 30))
        finally:
            close_gateway(gateway, loop_thread)
            loop_thread.run(worker.stop(), timeout=30)
    assert (http[0].status, http[0].retry_after) == (503, "1"), http[0].error
    assert grpc_[0].status == "UNAVAILABLE", grpc_[0].error


@pytest.fixture(scope="module")
def fake_pool(redis_server: LocalRedis, tmp_path_factory) -> Iterator[Process]:
    """The fake pool as a process of its own, streaming as fast as it can."""
    log = tmp_path_factory.mktemp("pool") / "pool.log"
    pool = Process(pool_command(redis_server.url, 0.0, stamp=False), "fake pool ready", log)
    yield pool
    pool.stop()


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[[list[str], str], Process]]:
    """Processes started by their command line, stopped at the end even on failure."""
    started: list[Process] = []

    def start(cmd: list[str], ready: str) -> Process:
        started.append(Process(cmd, ready, tmp_path / f"process{len(started)}.log"))
        return started[-1]

    yield start
    for process in reversed(started):
        process.stop()


@pytest.fixture
def start_gateway_process(
    redis_server: LocalRedis, model_dir: Path, start_process
) -> Callable[..., dict[str, str]]:
    """`tandem gateway` as a process; returns its {"grpc": ..., "http": ...} addresses."""

    def start(workers: int = 1, *flags: str, redis_url: str = redis_server.url) -> dict:
        cmd = gateway_command(redis_url, model_dir, workers, *flags)
        return ready_ports(start_process(cmd, "gateway ready").ready_line)

    return start


@pytest.mark.load
@pytest.mark.parametrize("api", ["grpc", "http"])
def test_2000_concurrent_streams_complete_in_order(
    api: str, fake_pool: Process, start_gateway_process, tokenizer: Tokenizer
) -> None:
    ports = start_gateway_process()
    sent = prompts(2000)
    results = asyncio.run(asyncio.wait_for(run_streams(api, ports[api], sent, 16), 240))
    check_streams(results, sent, 16, tokenizer, api)


@pytest.mark.load
@pytest.mark.parametrize("api", ["grpc", "http"])
def test_over_the_admission_limit_only_429s(
    api: str, start_process, start_gateway_process, tokenizer: Tokenizer
) -> None:
    """Past --max-active-requests a stream is refused with 429 + Retry-After (HTTP) or
    RESOURCE_EXHAUSTED (gRPC); never a 5xx; the ones admitted complete. The pool takes
    a few seconds per stream here, so that all 400 are open at once."""
    sent = prompts(400)
    with LocalRedis() as redis_server:
        start_process(pool_command(redis_server.url, 0.05, stamp=False), "fake pool ready")
        ports = start_gateway_process(1, "--max-active-requests", "100", redis_url=redis_server.url)
        results = asyncio.run(asyncio.wait_for(run_streams(api, ports[api], sent, 64), 240))
    refused = [r for r in results if not r.ok]
    admitted = [(r, p) for r, p in zip(results, sent, strict=True) if r.ok]
    assert refused and admitted
    for r in refused:
        if api == "http":
            assert (r.status, r.retry_after) == (429, "1"), r.error
        else:
            assert r.status == "RESOURCE_EXHAUSTED", r.error
    check_streams(*zip(*admitted, strict=True), 64, tokenizer, api)


@pytest.mark.load
def test_gateway_workers_share_the_ports(
    fake_pool: Process, start_gateway_process, tokenizer: Tokenizer
) -> None:
    """--gateway-workers 2: two processes on one port, each routing its own replies."""
    ports = start_gateway_process(2)
    sent = prompts(400)
    for api in ("grpc", "http"):
        results = asyncio.run(asyncio.wait_for(run_streams(api, ports[api], sent, 16), 240))
        check_streams(results, sent, 16, tokenizer, api)
