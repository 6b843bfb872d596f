"""A client that stops reading is cut after a write timeout.

A streamed answer is written as fast as the workers make tokens; a client that stops
reading (hung, or a slow consumer behind a full window) would hold its request, and the
KV blocks of its request on the workers, until the request timeout. So every write to a
client is bounded: a write that has not gone out after `timeout_s` (the kernel's and the
transport's buffers full, nothing accepted meanwhile) ends the connection.

HTTP: `WriteTimeout` bounds each ASGI `send`. On a timeout it aborts the connection
(`AbortableH11Protocol` puts the transport's abort in the scope: a plain close would wait
for the unread buffer to flush, forever); uvicorn then reports `http.disconnect`, so the
request ends as for any client that left: cancelled, and its abort published to the
workers. gRPC: `bounded_write` does the same for each streamed message; the request's
abort is published as the RPC's handler unwinds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

ABORT_CONNECTION = "tandem.abort_connection"  # scope key: drops the client's connection


class ClientStalled(Exception):
    """The client accepted no bytes for the write timeout."""


class AbortableH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, with each request's scope holding its transport's abort."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        app = self.app

        async def with_abort(scope: Scope, receive: Receive, send: Send) -> None:
            scope[ABORT_CONNECTION] = transport.abort
            await app(scope, receive, send)

        self.app = with_abort


class WriteTimeout:
    """Bounds each `send` of an HTTP response to `timeout_s`."""

    def __init__(self, app: ASGIApp, timeout_s: float, on_stall: Callable[[], None]) -> None:
        self.app = app
        self.timeout_s = timeout_s
        self.on_stall = on_stall

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        abort: Callable[[], None] | None = scope.get(ABORT_CONNECTION)
        stalled = False

        async def bounded_send(message: Message) -> None:
            nonlocal stalled
            if stalled:  # the connection is gone: later writes go nowhere
                return
            try:
                async with asyncio.timeout(self.timeout_s):
                    await send(message)
            except TimeoutError:
                stalled = True
                self._stalled(scope)
                if abort is None:  # not our protocol: fail the response instead
                    raise ClientStalled(self._message()) from None
                abort()  # uvicorn sees the connection lost: http.disconnect follows

        await self.app(scope, receive, bounded_send)

    def _message(self) -> str:
        return f"client accepted no bytes for {self.timeout_s:g} s"

    def _stalled(self, scope: Scope) -> None:
        self.on_stall()
        client = scope.get("client") or ("?", 0)
        log.warning("http %s from %s:%s: %s; connection cut", scope.get("path"), client[0],
                    client[1], self._message())  # fmt: skip


async def bounded_write(write: Awaitable[None], timeout_s: float) -> None:
    """One streamed gRPC message, written within `timeout_s` or ClientStalled."""
    try:
        async with asyncio.timeout(timeout_s):
            await write
    except TimeoutError:
        raise ClientStalled(f"client accepted no bytes for {timeout_s:g} s") from None
