"""The tandem.v1.Generation servicer: validate, queue for prefill, stream tokens back.

A request's life here: checks (API key, model, fields, load, live workers), then the
shared execution core (gateway.execution) queues it and yields its outputs, one
response per output, until a finish, an error, a stop string, the deadline, or the
client leaves; every way out that leaves work running on the workers publishes an abort.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from tandem.gateway.execution import Executor, Output, RequestError
from tandem.gateway.proto import tandem_pb2 as pb
from tandem.gateway.proto import tandem_pb2_grpc as pb_grpc
from tandem.gateway.validation import MalformedRequest, parse_request, validate_request
from tandem.gateway.write_timeout import ClientStalled, WriteWatch

log = logging.getLogger(__name__)

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}

ERROR_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for(error_code: str | None) -> grpc.StatusCode:
    return ERROR_CODES.get(error_code or "", grpc.StatusCode.INTERNAL)


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(self, executor: Executor, write_watch: WriteWatch) -> None:
        self._ex = executor
        self._watch = write_watch

    async def Generate(  # noqa: N802 - the gRPC method name
        self, request: pb.GenerateRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ) -> None:
        try:
            await self._generate(request, context)
        except ClientStalled as exc:  # the request was aborted as the handler unwound
            self._ex.metrics.error("client_stalled", "grpc")
            log.warning("grpc stream cut: %s", exc)
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except RequestError as exc:
            self._ex.metrics.error(exc.code, "grpc")
            await context.abort(status_for(exc.code), exc.message)

    async def _generate(
        self, request: pb.GenerateRequest | MalformedRequest, context: grpc.aio.ServicerContext
    ) -> None:
        arrival = time.monotonic()
        ex = self._ex
        metadata = dict(context.invocation_metadata() or ())
        ex.check_api_key(metadata.get("authorization"))
        if isinstance(request, MalformedRequest):
            raise RequestError("invalid_argument", request.reason)
        ex.check_model(request.model)
        try:
            with ex.admitted():
                prompt_ids, sampling = await validate_request(
                    request, ex.config, ex.limits, ex.encode
                )
        except ValueError as exc:
            raise RequestError("invalid_argument", str(exc)) from exc
        await ex.check_available()

        timeout_s = ex.config.request_timeout_s
        client_left = context.time_remaining()
        if client_left is not None:
            timeout_s = min(timeout_s, client_left)
        task = asyncio.current_task()
        assert task is not None
        write = self._watch.open(task.cancel)  # a stalled client cancels this handler
        now = asyncio.get_running_loop().time
        try:
            async with ex.generate(prompt_ids, sampling, timeout_s, "grpc", arrival) as gen:
                async for out in gen:
                    write.since = now()
                    await context.write(_response(gen.request_id, out))
                    write.since = None
        except asyncio.CancelledError:
            if not write.stalled:
                raise
            task.uncancel()  # ours: leaving `generate` published the abort
            raise ClientStalled(self._watch.message()) from None
        finally:
            self._watch.close(write)


def _response(request_id: str, out: Output) -> pb.GenerateResponse:
    response = pb.GenerateResponse(request_id=request_id, token_ids=out.token_ids, text=out.text)
    for position in out.logprobs:
        response.logprobs.add().logprobs.update(position)
    if out.finish_reason is not None:
        response.finish_reason = FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
        response.usage.prompt_tokens = out.prompt_tokens
        response.usage.completion_tokens = out.completion_tokens
        response.usage.cached_tokens = out.cached_tokens
    return response


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
