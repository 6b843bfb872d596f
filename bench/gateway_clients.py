"""Many concurrent streaming clients of one gateway, over gRPC or HTTP, on one event loop.

Used by the load tests and by `tandem bench gateway` (which runs them in processes of
their own). The HTTP client is a bare HTTP/1.1 + server-sent-events reader on asyncio
streams: a full HTTP library would cost more CPU per token than the gateway under test.
Each stream records what it got, so callers can check that every stream is complete and
in order, and when each message came (for the latency the gateway adds).
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from tandem.gateway.client import FINISH_REASONS
from tandem.gateway.proto import tandem_pb2 as pb
from tandem.gateway.proto import tandem_pb2_grpc as pb_grpc

STREAMS_PER_CHANNEL = 100  # HTTP/2 streams per gRPC connection, as a client pool would
RATE_WINDOW_S = 0.1  # receipts are also counted per window of this, for the steady rate


@dataclass
class StreamResult:
    """One stream: its output and how it ended (`status` is 200 / "OK" when it worked)."""

    status: int | str = 0
    error: str = ""
    token_ids: list[int] = field(default_factory=list)  # gRPC only
    text: str = ""
    finish_reason: str | None = None
    retry_after: str | None = None  # HTTP 429/503
    # (time.time() at receipt, token ids in the message) per message, when recorded.
    arrivals: list[tuple[float, list[int]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status in (200, "OK") and self.finish_reason is not None


async def grpc_stream(
    stub: pb_grpc.GenerationStub, prompt_ids: Sequence[int], max_tokens: int, record: bool
) -> StreamResult:
    request = pb.GenerateRequest(
        prompt_token_ids=prompt_ids,
        sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
    )
    result = StreamResult()
    texts: list[str] = []
    try:
        async for msg in stub.Generate(request):
            result.token_ids.extend(msg.token_ids)
            texts.append(msg.text)
            if record:
                result.arrivals.append((time.time(), list(msg.token_ids)))
            if msg.finish_reason:
                result.finish_reason = FINISH_REASONS.get(msg.finish_reason)
        result.status = "OK"
    except grpc.aio.AioRpcError as exc:
        result.status = exc.code().name
        result.error = exc.details() or ""
    result.text = "".join(texts)
    return result


async def http_stream(
    host: str, port: int, prompt_ids: Sequence[int], max_tokens: int, record: bool
) -> StreamResult:
    """POST /v1/completions with stream=true; the text of every chunk, in order."""
    body = json.dumps(
        {
            "prompt": list(prompt_ids),
            "max_tokens": max_tokens,
            "stream": True,
            "ignore_eos": True,
        }  # fmt: skip
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    result = StreamResult()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(head + body)
        status_line = await reader.readline()
        result.status = int(status_line.split()[1])
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "retry-after":
                result.retry_after = value.strip()
        if result.status != 200:
            result.error = (await reader.read()).decode(errors="replace")
            return result
        texts: list[str] = []
        # The body is chunked; every SSE event is one chunk, so its data line is whole.
        while line := await reader.readline():
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                result.status = event["error"].get("code") or "error"
                result.error = event["error"].get("message", "")
                break
            for choice in event.get("choices", ()):
                texts.append(choice["text"])
                if record:
                    result.arrivals.append((time.time(), []))
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
        result.text = "".join(texts)
        return result
    finally:
        writer.close()


async def run_streams(
    api: str,
    target: str,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    record: bool = False,
) -> list[StreamResult]:
    """One stream per prompt, all at once; `target` is host:port of the API used."""
    host, _, port = target.rpartition(":")
    if api == "http":
        return list(
            await asyncio.gather(
                *(http_stream(host, int(port), p, max_tokens, record) for p in prompts)
            )
        )
    channels = [
        grpc.aio.insecure_channel(target) for _ in range(0, len(prompts), STREAMS_PER_CHANNEL)
    ]
    try:
        stubs = [pb_grpc.GenerationStub(c) for c in channels]
        return list(
            await asyncio.gather(
                *(
                    grpc_stream(stubs[i // STREAMS_PER_CHANNEL], p, max_tokens, record)
                    for i, p in enumerate(prompts)
                )
            )
        )
    finally:
        await asyncio.gather(*(c.close() for c in channels))


def summarize(
    results: Sequence[StreamResult], started: float, stamped: bool, cpu_before_s: float = 0.0
) -> dict:
    """What a client process reports: counts, failures, the time span of its receipts,
    and (stamped gRPC tokens) every token's age at receipt, in seconds."""
    cpu_s = _cpu_s() - cpu_before_s  # the streams' CPU, not this summary's
    from tandem.bench.fake_pool import stamp_age_s

    arrivals = [t for r in results for t, _ in r.arrivals]
    ages = (
        [stamp_age_s(tok, t) for r in results for t, toks in r.arrivals for tok in toks]
        if stamped
        else []
    )
    failures = [f"{r.status}: {r.error[:200]}" for r in results if not r.ok]
    per_window: dict[int, int] = {}  # tokens received per RATE_WINDOW_S of wall time
    for r in results if stamped else ():
        for t, toks in r.arrivals:
            window = int(t / RATE_WINDOW_S)
            per_window[window] = per_window.get(window, 0) + len(toks)
    return {
        "streams": len(results),
        "failed": len(failures),
        "failures": failures[:5],
        "tokens": sum(len(r.token_ids) for r in results) if stamped else None,
        "messages": len(arrivals),
        "started": started,
        "ended": max(arrivals, default=started),
        "ages_s": ages,
        "cpu_s": cpu_s,
        "tokens_per_window": sorted(per_window.items()),
    }


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    """`python -m tandem.bench.gateway_clients`: one client process of the gateway bench;
    prints its summary as one JSON line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tandem.bench.gateway_clients")
    parser.add_argument("--api", choices=["grpc", "http"], required=True)
    parser.add_argument("--target", required=True, metavar="HOST:PORT")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--max-tokens", type=int, required=True)
    parser.add_argument("--stamped", action="store_true", help="the pool stamps token ids")
    parser.add_argument("--start-at", type=float, default=0.0, help="time.time() to begin")
    args = parser.parse_args()
    prompts = [[1000 + i, 300] for i in range(args.streams)]

    cpu_before_s = 0.0

    async def go() -> list[StreamResult]:
        nonlocal cpu_before_s
        await asyncio.sleep(max(args.start_at - time.time(), 0.0))
        cpu_before_s = _cpu_s()
        return await run_streams(args.api, args.target, prompts, args.max_tokens, record=True)

    started = max(args.start_at, time.time())
    results = asyncio.run(go())
    stamped = args.stamped and args.api == "grpc"
    print(json.dumps(summarize(results, started, stamped, cpu_before_s)))


if __name__ == "__main__":
    main()
