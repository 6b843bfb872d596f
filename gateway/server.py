"""The tandem.v1.Generation servicer: validate, queue for prefill, stream tokens back.

A request's life here: checks (model, fields, live workers), a gateway-owned id, a
queue registered with the reply router *before* the task is queued (so no token can
arrive unrouted), an XADD to the model's prefill stream, then one response per batch of
deltas until a finish, an error, a stop string, the deadline, or the client leaves.
Every way out that leaves work running on the workers publishes an abort.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from core import redis_keys
from core.protocol import AbortNotice, PrefillTask, TokenDelta, encode
from core.sampling_params import SamplingParams
from core.tokenizer import Tokenizer
from gateway.config import GatewayConfig, ModelLimits
from gateway.detokenizer import TextStream
from gateway.proto import tandem_pb2 as pb
from gateway.proto import tandem_pb2_grpc as pb_grpc
from gateway.reply_router import ReplyRouter, RequestStream
from gateway.validation import MalformedRequest, parse_request, validate_request
from gateway.worker_registry import WorkerRegistry

log = logging.getLogger(__name__)

# Tokenizing is fast, but a megabyte prompt would stall every other stream on the loop.
TOKENIZE_IN_THREAD_CHARS = 4096

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}

ERROR_CODES = {
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
}


def status_for(error_code: str | None) -> grpc.StatusCode:
    return ERROR_CODES.get(error_code or "", grpc.StatusCode.INTERNAL)


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(
        self,
        config: GatewayConfig,
        limits: ModelLimits,
        tokenizer: Tokenizer,
        redis: aioredis.Redis,
        router: ReplyRouter,
        registry: WorkerRegistry,
    ) -> None:
        self._config = config
        self._limits = limits
        self._tok = tokenizer
        self._redis = redis
        self._router = router
        self._registry = registry
        self._prefill_stream = redis_keys.prefill_stream(config.model)
        self._abort_tasks: set[asyncio.Task[None]] = set()

    async def Generate(  # noqa: N802 - the gRPC method name
        self, request: pb.GenerateRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ) -> None:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
        if request.model and request.model != self._config.model:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"model {request.model!r} is not served here (this gateway serves "
                f"{self._config.model!r})",
            )
        try:
            prompt_ids, sampling = await validate_request(
                request, self._config, self._limits, self._encode
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            reason = await self._registry.unavailable_reason()
        except RedisError as exc:
            reason = f"worker registry unreachable: {exc}"
        if reason is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, reason)

        timeout_s = self._config.request_timeout_s
        client_left = context.time_remaining()
        if client_left is not None:
            timeout_s = min(timeout_s, client_left)
        request_id = uuid.uuid4().hex
        stream = self._router.register(request_id)
        # Why the workers must drop the request; None only when they finished it. A
        # worker-reported error still aborts: another worker may hold a reservation.
        abort_reason: str | None = "cancelled, timed out or failed at the gateway"
        try:
            task = PrefillTask(
                request_id=request_id,
                prompt_token_ids=prompt_ids,
                sampling=sampling,
                reply_stream=self._router.stream,
                deadline=time.time() + timeout_s,
            )
            try:
                await self._redis.xadd(
                    self._prefill_stream, {redis_keys.MESSAGE_FIELD: encode(task)}
                )
            except RedisError as exc:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"prefill queue unreachable: {exc}"
                )
            abort_reason = await self._relay(
                request_id, stream, prompt_ids, sampling, timeout_s, context
            )
        finally:
            self._router.unregister(request_id)
            if abort_reason is not None:
                # Not awaited: a handler being cancelled must not lose the abort.
                self._abort_later(request_id, abort_reason)

    async def _relay(
        self,
        request_id: str,
        stream: RequestStream,
        prompt_ids: list[int],
        sampling: SamplingParams,
        timeout_s: float,
        context: grpc.aio.ServicerContext,
    ) -> str | None:
        """Stream responses until the end; why to abort, or None if the workers ended it."""
        text = TextStream(self._tok, prompt_ids, sampling.stop)
        deadline = time.monotonic() + timeout_s
        completion_tokens = 0
        while True:
            try:
                deltas = await stream.get_many(max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:
                await context.abort(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"request {request_id} did not finish within {timeout_s:.1f}s",
                )
            response = pb.GenerateResponse(request_id=request_id)
            finish: str | None = None
            pieces: list[str] = []
            for delta in deltas:
                if delta.error is not None:
                    await context.abort(status_for(delta.error_code), delta.error)
                response.token_ids.extend(delta.token_ids)
                _add_logprobs(response, delta)
                completion_tokens += len(delta.token_ids)
                pieces.append(text.add(delta.token_ids))
                finish = delta.finish_reason
                if text.stopped:
                    finish = "stop"
                    break
                if finish is not None:
                    pieces.append(text.finish())
                    break
            response.text = "".join(pieces)
            if finish is not None:
                response.finish_reason = FINISH_REASONS.get(finish, pb.FINISH_REASON_UNSPECIFIED)
                response.usage.prompt_tokens = len(prompt_ids)
                response.usage.completion_tokens = completion_tokens
                await context.write(response)
                # A stop string ends the request here; the workers do not know yet.
                return None if delta.finish_reason is not None else "stop string"
            if response.token_ids or response.text:
                await context.write(response)

    async def _encode(self, prompt: str) -> list[int]:
        if len(prompt) > TOKENIZE_IN_THREAD_CHARS:
            return await asyncio.to_thread(self._tok.encode, prompt, True)
        return self._tok.encode(prompt, add_special_tokens=True)

    def _abort_later(self, request_id: str, reason: str) -> None:
        task = asyncio.get_running_loop().create_task(self.publish_abort(request_id, reason))
        self._abort_tasks.add(task)
        task.add_done_callback(self._abort_tasks.discard)

    async def publish_abort(self, request_id: str, reason: str = "client cancelled") -> None:
        """Tell every worker to drop the request: a marker for late readers, then pub/sub."""
        notice = encode(AbortNotice(request_id=request_id, reason=reason))
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                # The marker goes first so that a worker woken by the message finds it.
                pipe.set(
                    redis_keys.abort_marker(request_id), notice, ex=redis_keys.ABORT_MARKER_TTL_S
                )
                pipe.publish(redis_keys.ABORT_CHANNEL, notice)
                await pipe.execute()
        except RedisError as exc:
            # The task's deadline still bounds how long workers keep it.
            log.warning("abort of %s not published: %s", request_id, exc)

    async def drain(self) -> None:
        """Wait for aborts still being published (at shutdown)."""
        if self._abort_tasks:
            await asyncio.gather(*self._abort_tasks, return_exceptions=True)


def add_generation_service(service: GenerationService, server: grpc.aio.Server) -> None:
    """Like the generated add_GenerationServicer_to_server, with a forgiving parser."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            service.Generate,
            request_deserializer=parse_request,
            response_serializer=pb.GenerateResponse.SerializeToString,
        )
    }
    name = pb.DESCRIPTOR.services_by_name["Generation"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


def _add_logprobs(response: pb.GenerateResponse, delta: TokenDelta) -> None:
    for position in delta.logprobs or ():
        response.logprobs.add().logprobs.update(position)
