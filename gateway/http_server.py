"""uvicorn inside the gateway's event loop, next to the grpc.aio server.

The socket is bound here, not by uvicorn, so that a port in use is a plain OSError at
startup (uvicorn would log and exit the process) and port 0 reports the port it got.
uvicorn's own signal handling is off: the gateway process owns SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

import uvicorn
from starlette.types import ASGIApp

from tandem.gateway.write_timeout import AbortableH11Protocol

log = logging.getLogger(__name__)


class _EmbeddedServer(uvicorn.Server):
    def capture_signals(self):  # uvicorn >= 0.29
        return contextlib.nullcontext()

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


def bind_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # sibling gateway processes share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(f"HTTP port {port} on {host} is already in use") from None
        raise OSError(f"cannot bind HTTP to {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(
        self, app: ASGIApp, host: str, port: int, grace_s: float, reuse_port: bool = False
    ) -> None:
        self._sock = bind_socket(host, port, reuse_port)
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            lifespan="off",
            http=AbortableH11Protocol,  # a stalled client's connection can be aborted
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(grace_s, 0.01),
            timeout_keep_alive=30,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._sock]), name="http")
        while not self._server.started:
            if self._task.done():  # failed to start: report why
                self._task.result()
                raise RuntimeError("HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new connections, wait up to grace_s for open ones, cancel what is left."""
        if self._task is None:
            self._sock.close()
            return
        if grace_s is not None:
            self._server.config.timeout_graceful_shutdown = max(grace_s, 0.01)
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self._task = None
