"""Load for `tandem bench serve`: seeded prompts of random token ids, a Poisson arrival
schedule, and one streamed request per prompt, timed chunk by chunk.

Two backends: gRPC through `AsyncTandemClient`, and the OpenAI-style
`/v1/completions` with server-sent events over a bare asyncio connection (no HTTP client
library is a dependency of Tandem). Imports no torch, so it runs on any client machine.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import resource
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from tandem.bench.serve_stats import RequestResult
from tandem.gateway.client import AsyncTandemClient, TandemError


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    output_len: int


def make_prompts(
    n: int, input_len: int, output_len: int, vocab_size: int, seed: str, range_ratio: float = 0.0
) -> list[Prompt]:
    """`n` prompts of random token ids; with `range_ratio` r, each length is uniform in
    [len * (1 - r), len * (1 + r)]. A string seed is stable across processes and runs."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError("--range-ratio must be in [0, 1)")
    rng = random.Random(seed)

    def length(base: int) -> int:
        low = max(1, math.floor(base * (1 - range_ratio)))
        return rng.randint(low, max(low, math.ceil(base * (1 + range_ratio))))

    prompts = []
    for _ in range(n):
        i, o = length(input_len), length(output_len)
        prompts.append(Prompt([rng.randrange(vocab_size) for _ in range(i)], o))
    return prompts


def arrival_times(n: int, rate: float, seed: str) -> list[float]:
    """Offsets in seconds of `n` Poisson arrivals at `rate` requests/s, the first at 0;
    an infinite rate sends everything at once."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


Send = Callable[[Prompt, RequestResult], Awaitable[None]]


async def run_load(
    send: Send,
    prompts: Sequence[Prompt],
    arrivals: Sequence[float],
    max_concurrency: int = 0,
    t0: float | None = None,
) -> tuple[list[RequestResult], float]:
    """Send prompt i at t0 + arrivals[i] (later if `max_concurrency` requests are already
    in flight: its clock starts when it is sent); return the results and the seconds from
    t0 (default: now) to the last completion."""
    results = [RequestResult(len(p.token_ids), p.output_len) for p in prompts]
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
    t0 = time.perf_counter() if t0 is None else t0

    async def one(i: int) -> None:
        delay = t0 + arrivals[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if limit is None:
            await send(prompts[i], results[i])
            return
        async with limit:
            await send(prompts[i], results[i])

    await asyncio.gather(*(one(i) for i in range(len(prompts))))
    last = max((r.end for r in results), default=t0)
    return results, last - t0


class GrpcBackend:
    """Streams over one gRPC channel (HTTP/2 multiplexes every request on it)."""

    def __init__(self, target: str, timeout_s: float) -> None:
        self._client = AsyncTandemClient(target, timeout=timeout_s)

    async def send(self, prompt: Prompt, result: RequestResult) -> None:
        result.start = time.perf_counter()
        try:
            async for chunk in self._client.generate(
                prompt.token_ids, max_tokens=prompt.output_len, temperature=0.0,
                ignore_eos=True,
            ):  # fmt: skip
                if chunk.token_ids:
                    result.chunks.append((time.perf_counter(), len(chunk.token_ids)))
                    result.output_tokens += len(chunk.token_ids)
        except TandemError as exc:
            result.error = str(exc)
        result.end = time.perf_counter()

    async def close(self) -> None:
        await self._client.close()


class HttpBackend:
    """POST /v1/completions with `stream: true`, one connection per request.

    The request is HTTP/1.0 so that the server ends the body by closing the connection
    instead of chunked framing: every line read is then an SSE line as sent."""

    def __init__(self, target: str, timeout_s: float) -> None:
        self.host, _, port = target.rpartition(":")
        self.host = self.host.strip("[]")
        self.port = int(port)
        self.timeout_s = timeout_s

    async def send(self, prompt: Prompt, result: RequestResult) -> None:
        result.start = time.perf_counter()
        try:
            await asyncio.wait_for(self._stream(prompt, result), self.timeout_s)
        except (OSError, ValueError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        result.end = time.perf_counter()

    async def _stream(self, prompt: Prompt, result: RequestResult) -> None:
        body = json.dumps({
            "prompt": prompt.token_ids, "max_tokens": prompt.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
        }).encode()  # fmt: skip
        head = (
            f"POST /v1/completions HTTP/1.0\r\nHost: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(head.encode() + body)
            await writer.drain()
            status = (await reader.readline()).decode(errors="replace").split(maxsplit=2)
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                pass  # headers: the SSE lines that follow are all we need
            if len(status) < 2 or status[1] != "200":
                detail = (await reader.read(2000)).decode(errors="replace").strip()
                raise ValueError(f"HTTP {' '.join(status[1:])} {detail}")
            await self._events(reader, result)
        finally:
            writer.close()

    @staticmethod
    async def _events(reader: asyncio.StreamReader, result: RequestResult) -> None:
        usage = None
        async for raw in reader:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise ValueError(f"stream error: {event['error'].get('message')}")
            if any(c.get("text") for c in event.get("choices", ())):
                result.chunks.append((time.perf_counter(), 1))
            usage = event.get("usage") or usage
        else:
            raise ValueError("the stream ended without [DONE]")
        result.output_tokens = usage["completion_tokens"] if usage else len(result.chunks)

    async def close(self) -> None:
        return None


def open_backend(kind: str, target: str, timeout_s: float) -> GrpcBackend | HttpBackend:
    if kind == "grpc":
        return GrpcBackend(target, timeout_s)
    if kind == "http":
        return HttpBackend(target, timeout_s)
    raise ValueError(f"unknown backend {kind!r}: grpc or http")


def client_job(
    backend: str,
    target: str,
    timeout_s: float,
    prompts: list[Prompt],
    arrivals: list[float],
    max_concurrency: int,
    t0: float,
) -> tuple[list[RequestResult], float]:
    """One client process's share of a run (its own event loop and connection); returns
    its results and the share of one CPU it was busy, which near 1 means the client, not
    the service, set the pace. perf_counter is CLOCK_MONOTONIC, the same in every
    process, so `t0` and the results' times are comparable across processes."""

    async def go() -> list[RequestResult]:
        client = open_backend(backend, target, timeout_s)
        try:
            return (await run_load(client.send, prompts, arrivals, max_concurrency, t0))[0]
        finally:
            await client.close()

    if backend == "http":  # a connection per request in flight: lift the soft fd limit
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpu0 = time.process_time()
    results = asyncio.run(go())
    wall = max((r.end for r in results), default=t0) - t0
    return results, (time.process_time() - cpu0) / wall if wall > 0 else 0.0
