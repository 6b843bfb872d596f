"""A client that stops reading is cut after a write timeout.

A streamed answer is written as fast as the workers make tokens; a client that stops
reading (hung, or a slow consumer behind a full window) would hold its request, and the
KV blocks of its request on the workers, until the request timeout. So every write to a
client is bounded: a write that has not gone out after `timeout_s` (the kernel's and the
transport's buffers full, nothing accepted meanwhile) ends the connection.

One `WriteWatch` per gateway watches every open response. HTTP: `WriteTimeout` marks
each ASGI `send`; on a stall it aborts the connection (`AbortableH11Protocol` puts the
transport's abort in the scope: a plain close would wait for the unread buffer to flush,
forever); uvicorn then reports `http.disconnect`, so the request ends as for any client
that left: cancelled, and its abort published to the workers. gRPC (gateway.server): a
stall cancels the RPC's handler, which publishes the request's abort as it unwinds and
ends the RPC with DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

ABORT_CONNECTION = "tandem.abort_connection"  # scope key: drops the client's connection


class ClientStalled(Exception):
    """The client accepted no bytes for the write timeout."""


class Write:
    """One open response: when its current write began (None: none under way)."""

    __slots__ = ("on_stall", "since", "stalled")

    def __init__(self, on_stall: Callable[[], None]) -> None:
        self.on_stall = on_stall
        self.since: float | None = None
        self.stalled = False


class WriteWatch:
    """Every open response's writes, checked by one sweeper task every `check_s`: a
    timer per write cost ~8 us, a large share of a gateway's time per token; this costs
    two attribute writes. A stalled write is cut between timeout_s and timeout_s +
    check_s after it began."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.check_s = min(1.0, timeout_s / 4)
        self._open: set[Write] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def open(self, on_stall: Callable[[], None]) -> Write:
        if self._sweeper is None:  # on the serving loop, at its first response
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        write = Write(on_stall)
        self._open.add(write)
        return write

    def close(self, write: Write) -> None:
        self._open.discard(write)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None

    def message(self) -> str:
        return f"client accepted no bytes for {self.timeout_s:g} s"

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.check_s)
            now = loop.time()
            for write in [w for w in self._open if w.since is not None]:
                if now - write.since > self.timeout_s:  # type: ignore[operator]
                    self._open.discard(write)
                    write.stalled = True
                    try:
                        write.on_stall()
                    except Exception:  # one failed cut must not end the sweeps
                        log.exception("cutting a stalled client failed")


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
    """Cuts an HTTP response whose current `send` has not completed for the timeout."""

    def __init__(self, app: ASGIApp, watch: WriteWatch, on_stall: Callable[[], None]) -> None:
        self.app = app
        self.watch = watch
        self.on_stall = on_stall

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        abort: Callable[[], None] | None = scope.get(ABORT_CONNECTION)
        task = asyncio.current_task()
        assert task is not None

        def stall() -> None:
            self.on_stall()
            client = scope.get("client") or ("?", 0)
            log.warning("http %s from %s:%s: %s; connection cut", scope.get("path"), client[0],
                        client[1], self.watch.message())  # fmt: skip
            # Our protocol: the connection is dropped, uvicorn's blocked send returns and
            # the app sees http.disconnect. Another server: cancel the response instead.
            (abort or task.cancel)()

        write = self.watch.open(stall)
        now = asyncio.get_running_loop().time

        async def bounded_send(message: Message) -> None:
            if write.stalled:  # the connection is gone: later writes go nowhere
                return
            write.since = now()
            try:
                await send(message)
            finally:
                write.since = None

        try:
            await self.app(scope, receive, bounded_send)
        finally:
            self.watch.close(write)
