"""One gateway, assembled: tokenizer, Redis, reply router, the shared execution core, the
gRPC server (with health and reflection) and the HTTP server (OpenAI-style API, /metrics),
both on one event loop.

`main.py` runs it as a process; tests start and stop it inside their own event loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tandem.core.redis_client import connect_async
from tandem.core.tokenizer import Tokenizer
from tandem.gateway.config import GatewayConfig, load_model_limits
from tandem.gateway.execution import Executor
from tandem.gateway.gateway_heartbeat import GatewayHeartbeat
from tandem.gateway.http_api import BodyLimit, build_http_app
from tandem.gateway.http_server import HttpServer
from tandem.gateway.metrics import GatewayMetrics
from tandem.gateway.proto import tandem_pb2 as pb
from tandem.gateway.reply_router import ReplyRouter
from tandem.gateway.server import GenerationService, add_generation_service
from tandem.gateway.token_text import TokenTexts
from tandem.gateway.worker_registry import WorkerRegistry
from tandem.gateway.write_timeout import WriteTimeout, WriteWatch

log = logging.getLogger(__name__)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
HEALTH_SERVICES = ("", GENERATION_SERVICE)  # "" is the whole server, by convention


class GatewayApp:
    def __init__(self, config: GatewayConfig, tokenizer: Tokenizer | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer or Tokenizer(config.model_dir)
        self.limits = load_model_limits(config, self.tokenizer.vocab_size)
        self.metrics = GatewayMetrics(config.model)
        self.port = 0  # bound gRPC port once started
        self.http_port = 0  # bound HTTP port once started
        self.executor: Executor | None = None
        self.http_app = None  # the FastAPI app, once started
        self._http: HttpServer | None = None
        self._redis: aioredis.Redis | None = None
        self._router: ReplyRouter | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._service: GenerationService | None = None
        self._health_tasks: set[asyncio.Task[None]] = set()
        self._owner_watch: asyncio.Task[None] | None = None
        self._heartbeat: GatewayHeartbeat | None = None
        self._write_watch = WriteWatch(config.stream_write_timeout_s)
        self._stopped = False

    async def start(self) -> int:
        """Connect, bind and serve; return the bound gRPC port (HTTP: self.http_port)."""
        cfg = self.config
        # Ports first: one in use fails at once, before waiting for Redis.
        _check_port_free("gRPC", cfg.grpc_host, cfg.grpc_port, cfg.reuse_port)
        self._redis = connect_async(cfg.redis_url, cfg.redis_timeout_s, cfg.redis_max_connections)
        self._router = ReplyRouter(
            cfg.redis_url,
            cfg.gateway_id,
            block_ms=cfg.reply_block_ms,
            redis_timeout_s=cfg.redis_timeout_s,
            on_connected=self._redis_state_changed,
        )
        registry = WorkerRegistry(self._redis, cfg.model, cache_ttl_s=cfg.worker_check_ttl_s)
        texts = TokenTexts(self.tokenizer, cfg.model_dir)
        self.executor = Executor(
            cfg, self.limits, self.tokenizer, texts, self._redis, self._router, registry,
            self.metrics,
        )  # fmt: skip
        self.http_app = WriteTimeout(
            BodyLimit(build_http_app(self.executor, texts), cfg.max_receive_message_bytes),
            self._write_watch,
            on_stall=lambda: self.metrics.error("client_stalled", "http"),
        )
        self._http = HttpServer(
            self.http_app, cfg.http_host, cfg.http_port, cfg.shutdown_grace_s, cfg.reuse_port
        )
        self.http_port = self._http.port
        await self._router.start()
        # Before any request: workers judge a gateway dead only once they saw its key.
        self._heartbeat = GatewayHeartbeat(self._redis, self._router.stream)
        await self._heartbeat.start()
        self._owner_watch = asyncio.get_running_loop().create_task(self.executor.watch_owners())
        self._service = GenerationService(self.executor, self._write_watch)
        pending = 2 * cfg.max_active_requests + 1000
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_receive_message_bytes),
                ("grpc.max_send_message_length", cfg.max_send_message_bytes),
                # A second gateway on our port must fail, loudly; siblings share it.
                ("grpc.so_reuseport", int(cfg.reuse_port)),
                # RPCs not yet taken up by the event loop: past 1,000 (the default) grpc
                # cancels some at random. Our admission limit answers overload instead.
                ("grpc.server.max_pending_requests", pending),
                ("grpc.server.max_pending_requests_hard_limit", pending),
            ]
        )
        add_generation_service(self._service, self._server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (GENERATION_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )
        try:
            self.port = self._server.add_insecure_port(cfg.grpc_address)
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC to {cfg.grpc_address}: {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {cfg.grpc_address}")
        await self._server.start()
        await self._http.start()
        await self._set_health(serving=True)
        log.info("gateway %s serving %s (grpc port %d, http port %d)", cfg.gateway_id,
                 cfg.model, self.port, self.http_port)  # fmt: skip
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new RPCs, give open streams grace_s, cancel the rest, then close."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.shutdown_grace_s if grace_s is None else grace_s
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await asyncio.gather(
            self._server.stop(grace) if self._server is not None else asyncio.sleep(0),
            self._http.stop(grace) if self._http is not None else asyncio.sleep(0),
        )
        if self._owner_watch is not None:
            self._owner_watch.cancel()
        if self.executor is not None:
            await self.executor.drain()  # cancelled streams' aborts
        if self._heartbeat is not None:
            await self._heartbeat.stop()
        await self._write_watch.stop()
        if self._health_tasks:
            await asyncio.gather(*self._health_tasks, return_exceptions=True)
        if self._router is not None:
            await self._router.stop()
        if self._redis is not None:
            await self._redis.aclose()

    def _redis_state_changed(self, connected: bool) -> None:
        # Without Redis no request can be served: let load balancers route elsewhere.
        task = asyncio.get_running_loop().create_task(self._set_health(serving=connected))
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _set_health(self, serving: bool) -> None:
        if self._health is None:
            return
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICES:
            await self._health.set(name, status)


def _check_port_free(what: str, host: str, port: int, reuse_port: bool) -> None:
    """A clear one-line error for a port in use (gRPC itself only says it cannot bind).
    With reuse_port, sibling gateways holding it with SO_REUSEPORT do not count."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"{what} port {port} on {host} is already in use") from None
            raise OSError(f"cannot bind {what} to {host}:{port}: {exc.strerror}") from None
