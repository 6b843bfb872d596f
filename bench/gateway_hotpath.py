"""The gateway's own CPU per streamed message, without grpc and without Redis reads.

`python -m tandem.bench.gateway_hotpath [--streams N] [--steps T] [--profile]`: a real
GatewayApp (a private redis-server for its startup and task XADDs), N requests entered
through `Executor.generate`, then T steps of one token per request routed straight into
the reply router (as its XREAD loop would), while each request's task turns its Outputs
into GenerateResponses and serializes them (as the gRPC handler does, minus the write).
Prints CPU µs per message; `--profile` adds the top of a cProfile.

On one machine its figures are steady to a few percent, where the end-to-end bench
moves by tens of percent with other load: the tool for comparing two versions of the
hot path (run each under its own PYTHONPATH). Beside `tandem bench grpc-floor` (grpc's
share) and `tandem bench gateway` (the whole), it splits a gateway's cost per message.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import time
from pathlib import Path

from tandem.bench.gateway_bench import MODEL, tokenizer_dir
from tandem.core.protocol import TokenBatch, TokenDelta, encode
from tandem.core.sampling_params import SamplingParams
from tandem.gateway.app import GatewayApp
from tandem.gateway.config import GatewayConfig
from tandem.gateway.execution import Generation
from tandem.gateway.server import _response
from tandem.local_redis import LocalRedis


async def measure(streams: int, steps: int, profile: bool, model_dir: Path | None = None) -> float:
    with LocalRedis() as redis_server:
        config = GatewayConfig(
            model=MODEL, model_dir=tokenizer_dir(model_dir),
            redis_url=redis_server.url,
            grpc_port=0, http_port=0, max_active_requests=streams + 1,
        )  # fmt: skip
        app = GatewayApp(config)
        await app.start()
        try:
            return await _run(app, streams, steps, profile)
        finally:
            await app.stop(grace_s=0)


async def _run(app: GatewayApp, streams: int, steps: int, profile: bool) -> float:
    ex = app.executor
    assert ex is not None
    sampling = SamplingParams(max_tokens=steps, ignore_eos=True)
    gens = [ex.generate([1000 + i, 300], sampling) for i in range(streams)]
    for gen in gens:
        await gen.__aenter__()
    messages = 0

    async def consume(gen: Generation) -> None:
        nonlocal messages
        async for out in gen:
            _response(gen.request_id, out).SerializeToString()
            messages += 1
            await asyncio.sleep(0)  # where the handler awaits its write
        await gen.__aexit__(None, None, None)

    tasks = [asyncio.create_task(consume(g)) for g in gens]
    await asyncio.sleep(0.1)
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler is not None:
        profiler.enable()
    for step in range(steps):
        finish = "length" if step == steps - 1 else None
        batch = TokenBatch([
            TokenDelta(request_id=g.request_id, token_ids=[1000 + step], offset=step,
                       finish_reason=finish)
            for g in gens
        ])  # fmt: skip
        ex.router._route(encode(batch))
        for _ in range(4):  # every stream's task runs before the next step
            await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    if profiler is not None:
        profiler.disable()
    cpu_s = time.process_time() - started
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    return cpu_s / messages * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tandem.bench.gateway_hotpath")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--model-dir", type=Path, default=None, help="any tokenizer.json + config.json"
    )
    args = parser.parse_args()
    us = asyncio.run(measure(args.streams, args.steps, args.profile, args.model_dir))
    print(f"{us:.1f} us of gateway CPU per message ({args.streams} streams x {args.steps} steps)")


if __name__ == "__main__":
    main()
