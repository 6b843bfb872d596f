"""A real redis-server, a real gateway on a free port and a fake worker pool.

The gateway and the fake worker run on an event loop in a background thread; tests are
plain synchronous code with a blocking gRPC client, as a real client would be.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import redis

from tandem.core.tokenizer import Tokenizer
from tandem.engine.checkpoint_resolver import resolve_model
from tandem.gateway.app import GatewayApp
from tandem.gateway.config import GatewayConfig
from tandem.gateway.proto import tandem_pb2_grpc as pb_grpc
from tandem.local_redis import LocalRedis
from tests.gateway.fake_worker import FakeWorker

T = TypeVar("T")
MODEL = "smollm2"


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


@dataclasses.dataclass
class Gateway:
    app: GatewayApp
    channel: grpc.Channel
    stub: pb_grpc.GenerationStub

    @property
    def config(self) -> GatewayConfig:
        return self.app.config

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.app.port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.app.http_port}"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return resolve_model(MODEL)


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture(scope="module")
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture
def redis_client(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    client.close()


def open_gateway(
    redis_server: LocalRedis, loop_thread: LoopThread, model_dir: Path, **overrides: Any
) -> Gateway:
    fields = {"model": MODEL, "model_dir": model_dir, "redis_url": redis_server.url}
    config = GatewayConfig(**{**fields, "grpc_port": 0, "http_port": 0, **overrides})
    app = GatewayApp(config, tokenizer=_shared_tokenizer(model_dir))
    port = loop_thread.run(app.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    return Gateway(app, channel, pb_grpc.GenerationStub(channel))


def close_gateway(gw: Gateway, loop_thread: LoopThread) -> None:
    gw.channel.close()
    loop_thread.run(gw.app.stop(grace_s=0))


_tokenizers: dict[Path, Tokenizer] = {}


def _shared_tokenizer(model_dir: Path) -> Tokenizer:
    """Loading tokenizer.json takes a tenth of a second: once per session is enough."""
    if model_dir not in _tokenizers:
        _tokenizers[model_dir] = Tokenizer(model_dir)
    return _tokenizers[model_dir]


@pytest.fixture
def start_gateway(
    redis_server: LocalRedis, loop_thread: LoopThread, model_dir: Path
) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(**overrides: Any) -> Gateway:
        gw = open_gateway(redis_server, loop_thread, model_dir, **overrides)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        close_gateway(gw, loop_thread)


@pytest.fixture(scope="module")
def module_gateway(
    redis_server: LocalRedis, loop_thread: LoopThread, model_dir: Path
) -> Iterator[Gateway]:
    """One gateway for a whole module, for tests that change none of its settings."""
    gw = open_gateway(redis_server, loop_thread, model_dir)
    yield gw
    close_gateway(gw, loop_thread)


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway()


@pytest.fixture
def fake_worker(redis_server: LocalRedis, loop_thread: LoopThread) -> Iterator[FakeWorker]:
    worker = loop_thread.run(FakeWorker(redis_server.url, MODEL).start())
    yield worker
    loop_thread.run(worker.stop())


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())
