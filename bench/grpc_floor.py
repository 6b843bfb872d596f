"""`tandem bench grpc-floor`: what a bare grpc.aio server costs per streamed message.

The floor under the gateway's gRPC path: a server with the gateway's Generate method and
nothing behind it (no Redis, no router, no detokenizer), whose every stream sends
`--max-tokens` one-token messages, as the gateway does when each stream gets a token
per step. Clients are the gateway bench's own (bench/gateway_clients.py) in processes
of their own, so one run here beside `tandem bench gateway` on the same machine splits
a gateway's CPU per message into grpc.aio's share and the gateway's own.

Per handler style (`--handlers write,yield`: `context.write` per message, or an async
generator yielding them), it reports messages/s, server CPU µs per message, the cores
the server used, and the stamped age of each message at the client (as the gateway
bench's added latency, minus Redis and the pool). `--token-delay D` paces every stream
at one message per D seconds on one clock (offered messages/s = streams / D); 0 sends
as fast as flow control allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

from tandem.bench.gateway_bench import Process, as_ms, percentile, run_clients

SERVER_READY = "grpc floor ready"


class Ticks:
    """One clock for every stream: each waits for the next tick, as the gateway's
    streams wait for the next pool step. Delay 0: no waiting at all."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._next: asyncio.Future[None] | None = None
        self.late = 0  # ticks that came after their time (the server fell behind)

    async def wait(self) -> None:
        if self.delay_s <= 0:
            return
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        await self._next

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.delay_s
            await asyncio.sleep(max(next_at - loop.time(), 0.0))
            now = loop.time()
            if now > next_at + self.delay_s:
                self.late += 1
                next_at = now
            if self._next is not None:
                self._next.set_result(None)
                self._next = None


def serve(handler_style: str, delay_s: float) -> None:
    import grpc

    from tandem.bench.fake_pool import stamp_token
    from tandem.gateway.proto import tandem_pb2 as pb

    ticks = Ticks(delay_s)

    def response(rid: str, i: int, n: int) -> pb.GenerateResponse:
        out = pb.GenerateResponse(request_id=rid, token_ids=[stamp_token(time.time())], text=" x")
        if i == n - 1:
            out.finish_reason = pb.FINISH_REASON_LENGTH
            out.usage.completion_tokens = n
        return out

    async def write_handler(request: pb.GenerateRequest, context) -> None:
        rid, n = uuid.uuid4().hex, request.sampling.max_tokens
        for i in range(n):
            await ticks.wait()
            await context.write(response(rid, i, n))

    async def yield_handler(request: pb.GenerateRequest, context):
        rid, n = uuid.uuid4().hex, request.sampling.max_tokens
        for i in range(n):
            await ticks.wait()
            yield response(rid, i, n)

    handler = {"write": write_handler, "yield": yield_handler}[handler_style]

    async def main() -> None:
        import signal

        server = grpc.aio.server(
            options=[
                ("grpc.server.max_pending_requests", 65536),
                ("grpc.server.max_pending_requests_hard_limit", 65536),
            ]
        )
        method = grpc.unary_stream_rpc_method_handler(
            handler,
            request_deserializer=pb.GenerateRequest.FromString,
            response_serializer=pb.GenerateResponse.SerializeToString,
        )
        name = pb.DESCRIPTOR.services_by_name["Generation"].full_name
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(name, {"Generate": method}),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ticker = asyncio.create_task(ticks.run() if delay_s > 0 else asyncio.sleep(0))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        print(f"{SERVER_READY} grpc=127.0.0.1:{port}", flush=True)
        await stop.wait()
        ticker.cancel()
        await server.stop(0)
        print(json.dumps({"late_ticks": ticks.late}), flush=True)

    asyncio.run(main())


def measure(args, handler_style: str, work_dir: Path) -> dict:
    cmd = [
        sys.executable, "-m", "tandem.bench.grpc_floor", "--serve", handler_style,
        "--token-delay", str(args.token_delay),
    ]  # fmt: skip
    server = Process(cmd, SERVER_READY, work_dir / f"server-{handler_style}.log")
    try:
        target = server.ready_line.split("grpc=", 1)[1]
        cpu_before = server.cpu_s()
        reports = run_clients("grpc", target, args.streams, args.client_processes, args.max_tokens)
        cpu = server.cpu_s() - cpu_before
    finally:
        tail = server.stop()
    late = [json.loads(line) for line in tail.splitlines() if line.startswith("{")]
    failed = sum(r["failed"] for r in reports)
    messages = sum(r["messages"] for r in reports)
    span = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    ages = [a for r in reports for a in r["ages_s"]]
    return {
        "handler": handler_style,
        "streams": args.streams,
        "failed_streams": failed,
        "failures": [f for r in reports for f in r["failures"]][:5],
        "messages": messages,
        "messages_per_s": round(messages / span, 1) if span > 0 else None,
        "server_cpu_s": round(cpu, 2),
        "cores_used": round(cpu / span, 2) if span > 0 else None,
        "server_cpu_us_per_message": round(cpu / messages * 1e6, 1) if messages else None,
        "age_p50_ms": as_ms(percentile(ages, 50)),
        "age_p99_ms": as_ms(percentile(ages, 99)),
        "late_ticks": late[-1]["late_ticks"] if late else None,
        "client_max_cpu_share": round(max(r["cpu_s"] for r in reports) / span, 2)
        if span > 0
        else None,
        "seconds": round(span, 2),
    }


def run(args) -> Path:
    from tandem.bench.results import git_commit, write_result

    handlers = [h for h in args.handlers.split(",") if h]
    with tempfile.TemporaryDirectory(prefix="tandem-grpc-floor-") as tmp:
        runs = []
        for style in handlers:
            runs.append(measure(args, style, Path(tmp)))
            print(json.dumps(runs[-1]), flush=True)
    params = {
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "token_delay_s": args.token_delay,
        "client_processes": args.client_processes,
        "cpu_count": os.cpu_count(),
        "commit": git_commit(),
    }
    return write_result(
        "grpc-floor", "none", params, {"runs": runs}, args.out_dir,
        label=f"{args.streams}streams", card=f"cpu x{os.cpu_count()}",
    )  # fmt: skip


def main() -> None:
    """`python -m tandem.bench.grpc_floor --serve write|yield`: the server process."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tandem.bench.grpc_floor")
    parser.add_argument("--serve", choices=["write", "yield"], required=True)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args()
    serve(args.serve, args.token_delay)


if __name__ == "__main__":
    main()
