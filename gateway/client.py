"""Python clients of the gateway's gRPC API, and a command line to try it.

    from tandem.gateway.client import TandemClient

    with TandemClient("127.0.0.1:50051") as client:
        for chunk in client.generate("Write a haiku about rivers.", max_tokens=40):
            print(chunk.text, end="", flush=True)
        answer = client.complete([1, 2, 3], max_tokens=8)   # token ids work too

`AsyncTandemClient` is the same on asyncio (grpc.aio). Sampling follows the proto:
temperature 0 (the default) is greedy. Failures raise TandemError with the gRPC status.

    python -m tandem.gateway.client --target 127.0.0.1:50051 --max-tokens 40 "Hello!"
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import grpc

from tandem.gateway.proto import tandem_pb2 as pb
from tandem.gateway.proto import tandem_pb2_grpc as pb_grpc

FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
OPTIONAL_FIELDS = ("seed", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "logprobs")  # fmt: skip
PLAIN_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "min_tokens", "ignore_eos")


class TandemError(Exception):
    """A request the gateway refused or could not finish: `code` is the gRPC status name
    (INVALID_ARGUMENT, UNAVAILABLE, DEADLINE_EXCEEDED, ...)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Chunk:
    """One streamed message: the tokens and text new in it; finish and usage at the end."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None  # "stop" | "length" | "abort" on the last chunk
    usage: Usage | None = None  # on the last chunk
    logprobs: list[dict[int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None
    logprobs: list[dict[int, float]]


def build_request(
    prompt: str | Sequence[int], model: str = "", stop: Sequence[str] | str | None = None,
    stop_token_ids: Sequence[int] | None = None, **sampling: object,
) -> pb.GenerateRequest:  # fmt: skip
    """A GenerateRequest; sampling keywords are the proto's SamplingParams fields."""
    unknown = set(sampling) - set(OPTIONAL_FIELDS) - set(PLAIN_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling arguments: {', '.join(sorted(unknown))}")
    request = pb.GenerateRequest(model=model)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    sp = request.sampling
    for name, value in sampling.items():
        if value is not None:
            setattr(sp, name, value)
    if stop is not None:
        sp.stop.extend([stop] if isinstance(stop, str) else stop)
    if stop_token_ids:
        sp.stop_token_ids.extend(stop_token_ids)
    return request


def to_chunk(response: pb.GenerateResponse) -> Chunk:
    finish = FINISH_REASONS.get(response.finish_reason)
    usage = None
    if response.HasField("usage"):
        usage = Usage(response.usage.prompt_tokens, response.usage.completion_tokens)
    return Chunk(
        request_id=response.request_id,
        token_ids=list(response.token_ids),
        text=response.text,
        finish_reason=finish,
        usage=usage,
        logprobs=[dict(lp.logprobs) for lp in response.logprobs],
    )


def _gather(chunks: list[Chunk]) -> Completion:
    last = chunks[-1] if chunks else None
    return Completion(
        request_id=last.request_id if last else "",
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        finish_reason=last.finish_reason if last else None,
        usage=last.usage if last else None,
        logprobs=[lp for c in chunks for lp in c.logprobs],
    )


def _error(exc: grpc.RpcError) -> TandemError:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return TandemError(code.name if code is not None else "UNKNOWN", details or "")


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class TandemClient:
    """A blocking client; one channel, any number of requests (thread-safe)."""

    def __init__(self, target: str, *, api_key: str | None = None,
                 timeout: float | None = None) -> None:  # fmt: skip
        self.target = target
        self.timeout = timeout
        self._metadata = _metadata(api_key)
        self._channel = grpc.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                 **kwargs: object) -> Iterator[Chunk]:  # fmt: skip
        """Stream a request's chunks; leaving the loop early cancels the request."""
        request = build_request(prompt, **kwargs)  # type: ignore[arg-type]
        call = self._stub.Generate(
            request, timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            for response in call:
                yield to_chunk(response)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()  # a no-op once the call is done

    def complete(self, prompt: str | Sequence[int], **kwargs: object) -> Completion:
        return _gather(list(self.generate(prompt, **kwargs)))  # type: ignore[arg-type]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TandemClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTandemClient:
    """The asyncio client (grpc.aio); create and use it inside one event loop."""

    def __init__(self, target: str, *, api_key: str | None = None,
                 timeout: float | None = None) -> None:  # fmt: skip
        self.target = target
        self.timeout = timeout
        self._metadata = _metadata(api_key)
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = pb_grpc.GenerationStub(self._channel)

    async def generate(self, prompt: str | Sequence[int], *, timeout: float | None = None,
                       **kwargs: object) -> AsyncIterator[Chunk]:  # fmt: skip
        request = build_request(prompt, **kwargs)  # type: ignore[arg-type]
        call = self._stub.Generate(
            request, timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            async for response in call:
                yield to_chunk(response)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            call.cancel()

    async def complete(self, prompt: str | Sequence[int], **kwargs: object) -> Completion:
        return _gather([c async for c in self.generate(prompt, **kwargs)])  # type: ignore[arg-type]

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncTandemClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tandem.gateway.client",
        description="Send one prompt to a Tandem gateway over gRPC and print the streamed text.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--target", default="127.0.0.1:50051", help="the gateway's gRPC HOST:PORT")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for the request")
    parser.add_argument("--usage", action="store_true",
                        help="print the finish reason and token counts to stderr")  # fmt: skip
    args = parser.parse_args(argv)
    last: Chunk | None = None
    try:
        with TandemClient(args.target, api_key=args.api_key, timeout=args.timeout) as client:
            for chunk in client.generate(
                args.prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop,
                ignore_eos=args.ignore_eos,
            ):  # fmt: skip
                print(chunk.text, end="", flush=True)
                last = chunk
    except TandemError as exc:
        print(f"\ngateway.client: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print()
    if args.usage and last is not None and last.usage is not None:
        print(f"finish={last.finish_reason} prompt_tokens={last.usage.prompt_tokens} "
              f"completion_tokens={last.usage.completion_tokens}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
