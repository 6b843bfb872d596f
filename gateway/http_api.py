"""The OpenAI-style HTTP API: /v1/completions, /v1/chat/completions, /v1/models, plus
/health (liveness), /ready (readiness) and /metrics (Prometheus).

Requests run through the same execution core as gRPC (gateway.execution): the same
validation, detokenizer, stop strings, reply router and aborts. A generation runs under
a watch on the connection: when the client goes away, streaming or not, it is cancelled
and its abort published. A streamed answer is held back until its first output, so that
an early failure still gets a proper status code; a failure after that arrives as an
SSE event `data: {"error": {...}}` followed by `data: [DONE]`.

Errors always have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tandem.gateway.execution import Executor, RequestError
from tandem.gateway.fanout import Choices
from tandem.gateway.json_body import BoundedJsonRoute
from tandem.gateway.metrics import CONTENT_TYPE_LATEST
from tandem.gateway.openai_requests import (
    ChatCompletionRequest,
    ChoiceSpec,
    CompletionRequest,
    chat_choices,
    completion_choices,
    param_of,
)
from tandem.gateway.openai_responses import ResponseBuilder
from tandem.gateway.token_text import TokenTexts

log = logging.getLogger(__name__)

HTTP_STATUS = {
    "invalid_argument": 400,
    "unauthenticated": 401,
    "not_found": 404,
    "resource_exhausted": 429,
    "unavailable": 503,
    "deadline": 504,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
OPENAI_CODES = {
    "unauthenticated": "invalid_api_key",
    "not_found": "model_not_found",
    "resource_exhausted": "rate_limit_exceeded",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 429, 503, 504)
}


def error_payload(status: int, message: str, param: str | None, code: str | None) -> dict:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def request_error_payload(exc: RequestError) -> tuple[int, dict]:
    status = HTTP_STATUS.get(exc.code, 500)
    code = OPENAI_CODES.get(exc.code, exc.code)
    if "exceeds the model context" in exc.message:
        code = "context_length_exceeded"
    return status, error_payload(status, exc.message, exc.param, code)


def _json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False, allow_nan=False).encode("utf-8")


_SSE_JSON = msgspec.json.Encoder().encode


def _finite(payload: Any) -> Any:
    """Logprobs of -inf (a masked token) are not JSON: clamp them."""
    if isinstance(payload, float) and not math.isfinite(payload):
        return -9999.0 if payload < 0 or math.isnan(payload) else 9999.0
    if isinstance(payload, dict):
        return {k: _finite(v) for k, v in payload.items()}
    if isinstance(payload, list):
        return [_finite(v) for v in payload]
    return payload


async def _send_json(send: Send, status: int, payload: Any, headers: list) -> None:
    body = _json_bytes(_finite(payload))
    retry = [(b"retry-after", b"1")] if status in (429, 503) else []  # as _request_error
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()), *retry, *headers],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class GenerationResponse(Response):
    """Runs a generation while watching the connection; cancels it if the client leaves."""

    def __init__(self, run: Callable[[Send], Awaitable[None]]) -> None:
        super().__init__()
        self._run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        work = asyncio.ensure_future(self._run(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, watch):
                task.cancel()
            await asyncio.gather(work, watch, return_exceptions=True)
        if not work.cancelled() and work.exception() is not None:
            raise work.exception()  # type: ignore[misc]


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuse bodies over the limit: 413 by Content-Length before anything reads them;
    a chunked body that grows past it fails to parse (400)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            length = dict(scope.get("headers") or ()).get(b"content-length", b"0")
            if not length.isdigit() or int(length) > self.max_bytes:
                status = 413 if length.isdigit() else 400
                message = (f"request body is larger than {self.max_bytes} bytes"
                           if status == 413 else "invalid Content-Length")  # fmt: skip
                await _send_json(send, status, error_payload(status, message, None, None), [])
                return
            received = 0

            async def limited() -> dict:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(f"request body is larger than {self.max_bytes} bytes")
                return message

            await self.app(scope, limited, send)
            return
        await self.app(scope, receive, send)


def build_http_app(executor: Executor, texts: TokenTexts) -> FastAPI:
    ex = executor
    cfg = ex.config
    started = int(time.time())
    app = FastAPI(
        title="Tandem",
        version="0.1.0",
        description="OpenAI-style HTTP API of a Tandem gateway",
        docs_url=None,
        redoc_url=None,
    )

    def error_response(status: int, message: str, param=None, code=None, api_code=None):
        ex.metrics.error(api_code or "invalid_argument", "http")
        return JSONResponse(error_payload(status, message, param, code), status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(_request: Request, exc: RequestError) -> JSONResponse:
        ex.metrics.error(exc.code, "http")
        status, payload = request_error_payload(exc)
        # Overload is momentary: tell well-behaved clients when to come back.
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        return JSONResponse(payload, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = f"request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            loc = []
        else:
            message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return error_response(400, message, loc[0] if loc else None, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 401: "unauthenticated"}.get(exc.status_code)
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:
            message = "request body could not be parsed (it must be UTF-8 JSON)"
        return error_response(exc.status_code, message, api_code=code or "invalid_argument")

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in the HTTP API", exc_info=exc)
        return error_response(500, "internal error in the gateway", api_code="internal")

    async def require_key(request: Request) -> None:
        ex.check_api_key(request.headers.get("authorization"))

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)], responses=ERROR_RESPONSES,
                   route_class=BoundedJsonRoute)  # fmt: skip

    def model_card() -> dict[str, Any]:
        return {"id": cfg.model, "object": "model", "created": started, "owned_by": "tandem",
                "max_model_len": ex.limits.max_model_len}  # fmt: skip

    @v1.get("/models", summary="The served model")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @v1.get("/models/{model_id}", summary="One model")
    async def get_model(model_id: str) -> dict[str, Any]:
        ex.check_model(model_id)
        return model_card()

    def run(
        kind: str, specs: list[ChoiceSpec], prompt_lens: list[int], top_logprobs: int | None,
        stream: bool, include_usage: bool, arrival: float,
    ) -> GenerationResponse:  # fmt: skip
        prefix = "chatcmpl-" if kind == "chat" else "cmpl-"
        response_id = prefix + secrets.token_hex(12)
        builder = ResponseBuilder(kind, response_id, cfg.model, int(time.time()), len(specs),
                                  prompt_lens, texts, top_logprobs)  # fmt: skip
        headers = [(b"x-request-id", response_id.encode())]
        log.info("http %s %s: %d choice(s), stream=%s", kind, response_id, len(specs), stream,
                 extra={"request_id": response_id})  # fmt: skip

        async def whole(send: Send) -> None:
            try:
                async with Choices(ex, specs, "http", arrival) as choices:
                    async for index, out in choices:
                        builder.add(index, out)
            except RequestError as exc:
                ex.metrics.error(exc.code, "http")
                await _send_json(send, *request_error_payload(exc), headers)
                return
            await _send_json(send, 200, builder.response(), headers)

        async def sse(send: Send, payload: Any) -> None:
            # Without logprobs a chunk holds no float to clamp, and msgspec encodes it
            # in ~1 µs where json.dumps + _finite take ~10: this runs once per chunk.
            body = _json_bytes(_finite(payload)) if top_logprobs is not None else _SSE_JSON(payload)
            data = b"data: " + body + b"\n\n"
            await send({"type": "http.response.body", "body": data, "more_body": True})

        async def streamed(send: Send) -> None:
            async with Choices(ex, specs, "http", arrival) as choices:
                try:
                    first = await choices.__anext__()
                except RequestError as exc:
                    ex.metrics.error(exc.code, "http")
                    await _send_json(send, *request_error_payload(exc), headers)
                    return
                await send({
                    "type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"),
                                (b"x-accel-buffering", b"no"), *headers],
                })  # fmt: skip
                failed = False
                try:
                    for chunk in builder.opening_chunks(include_usage):
                        await sse(send, chunk)
                    index, out = first
                    while True:
                        chunk = builder.stream_chunk(index, out, include_usage)
                        if chunk is not None:
                            await sse(send, chunk)
                        try:
                            index, out = await choices.__anext__()
                        except StopAsyncIteration:
                            break
                except RequestError as exc:
                    failed = True
                    ex.metrics.error(exc.code, "http")
                    await sse(send, request_error_payload(exc)[1])
                if include_usage and not failed:
                    await sse(send, builder.usage_chunk())
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": False})  # fmt: skip

        return GenerationResponse(streamed if stream else whole)

    @v1.post("/completions", summary="Text completion (OpenAI-compatible)")
    async def completions(body: CompletionRequest) -> GenerationResponse:
        arrival = time.monotonic()
        ex.check_model(body.model)
        try:
            with ex.admitted():
                specs, prompt_lens = await completion_choices(body, cfg, ex.limits, ex.encode)
        except ValueError as exc:
            raise RequestError("invalid_argument", str(exc), param_of(str(exc), body)) from exc
        await ex.check_available(len(specs))
        return run("completion", specs, prompt_lens, body.logprobs, body.stream,
                   body.include_usage, arrival)  # fmt: skip

    @v1.post("/chat/completions", summary="Chat completion (OpenAI-compatible)")
    async def chat_completions(body: ChatCompletionRequest) -> GenerationResponse:
        arrival = time.monotonic()
        ex.check_model(body.model)
        try:
            with ex.admitted():
                specs, prompt_lens = await chat_choices(body, cfg, ex.limits, ex.encode_chat)
        except ValueError as exc:
            raise RequestError("invalid_argument", str(exc), param_of(str(exc), body)) from exc
        await ex.check_available(len(specs))
        top = (body.top_logprobs or 0) if body.logprobs else None
        return run("chat", specs, prompt_lens, top, body.stream, body.include_usage, arrival)

    app.include_router(v1)

    @app.get("/health", summary="Liveness: the gateway process answers")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: Redis answers and workers are live",
             responses={503: {"model": ErrorResponse}})  # fmt: skip
    async def ready() -> JSONResponse:
        pool = None
        try:
            await ex.redis.ping()
            reason = await ex.registry.unavailable_reason()
            pool = await ex.registry.pool_status()
        except (RedisError, OSError) as exc:
            reason = f"redis unreachable: {exc}"
        if reason is not None:
            payload = error_payload(503, reason, None, "unavailable")
            return JSONResponse({"status": "not ready", **payload}, status_code=503)
        if pool is not None and pool.degraded:  # still 200: the rest of the pool serves
            return JSONResponse({"status": "degraded", "model": cfg.model,
                                 "given_up": pool.given_up})  # fmt: skip
        return JSONResponse({"status": "ready", "model": cfg.model})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics() -> Response:
        await _refresh_pool_metrics(ex)
        return Response(ex.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


async def _refresh_pool_metrics(ex: Executor) -> None:
    """Queue depth and worker figures, read from Redis at scrape time (best effort)."""
    try:
        async with ex.redis.pipeline(transaction=False) as pipe:
            pipe.xlen(ex.prefill_stream)
            pipe.xpending(ex.prefill_stream, "prefill")
            depth, pending = await pipe.execute(raise_on_error=False)
        ex.metrics.set_queue(
            depth if isinstance(depth, int) else 0,
            pending.get("pending", 0) if isinstance(pending, dict) else 0,
        )
        ex.metrics.set_workers(await ex.registry.workers(max_age_s=ex.config.worker_check_ttl_s))
        ex.metrics.set_pool_status(await ex.registry.pool_status())
    except (RedisError, OSError) as exc:
        log.warning("metrics: pool figures unavailable: %s", exc)
