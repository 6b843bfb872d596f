"""The gateway as a process: flags, the serve loop, signals.

The `tandem` CLI owns the command line; it calls `add_arguments` on its `gateway`
subparser, `config_from_args` on the parsed flags, then `run`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

from tandem.core.credentials import API_KEY_ENV, REDIS_URL_ENV, add_secret_args, secret_from_args
from tandem.core.model_paths import local_model_dir, model_name
from tandem.gateway.config import GatewayConfig, join_host_port
from tandem.gateway.logs import use_json_logs
from tandem.gateway.workers import serve_workers

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The gateway's flags; every one has help, so --help shows every default."""
    defaults = GatewayConfig.__dataclass_fields__
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="served model: a name (its files in the tandem model cache) or a checkpoint "
        "directory; workers must use the same name",
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="directory with tokenizer.json and config.json; None: found from --model",
    )
    add_secret_args(
        parser,
        "redis-url",
        REDIS_URL_ENV,
        f"Redis shared with the workers; None: {defaults['redis_url'].default}",
    )
    parser.add_argument(
        "--grpc-host", default=defaults["grpc_host"].default, help="interface of the gRPC API"
    )
    parser.add_argument(
        "--grpc-port", type=int, default=defaults["grpc_port"].default,
        help="port of the gRPC API (0: any free port)",
    )  # fmt: skip
    parser.add_argument(
        "--http-host",
        default=defaults["http_host"].default,
        help="interface of the OpenAI-style HTTP API and /metrics",
    )
    parser.add_argument(
        "--http-port", type=int, default=defaults["http_port"].default,
        help="port of the OpenAI-style HTTP API and /metrics (0: any free port)",
    )  # fmt: skip
    add_secret_args(
        parser,
        "api-key",
        API_KEY_ENV,
        "require 'Authorization: Bearer KEY' on /v1 (HTTP) and in gRPC 'authorization' "
        "metadata; None: no key",
    )
    parser.add_argument(
        "--max-active-requests",
        type=int,
        default=defaults["max_active_requests"].default,
        help="requests in flight at once; more are refused (HTTP 429, RESOURCE_EXHAUSTED)",
    )
    parser.add_argument(
        "--max-queued-tasks",
        type=int,
        default=defaults["max_queued_tasks"].default,
        help="tasks waiting for the prefill pool (all gateways); more are refused "
        "(HTTP 429, RESOURCE_EXHAUSTED); 0: no bound",
    )
    parser.add_argument(
        "--migrate",
        action="store_true",
        help="when a request's decode or colocated worker dies, continue it on another one "
        "(prompt and tokens so far recomputed by a prefill or colocated worker) instead of "
        "failing it with UNAVAILABLE",
    )
    parser.add_argument(
        "--gateway-id", default=None, help="names this gateway's reply stream; None: random"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=defaults["request_timeout_s"].default,
        help="seconds a request may take from arrival to its last token",
    )
    parser.add_argument(
        "--stream-write-timeout",
        type=float,
        default=defaults["stream_write_timeout_s"].default,
        help="seconds a client may accept no bytes of its response before its connection "
        "is cut and its request aborted",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=0,
        help="context limit for prompt + max_tokens; 0: the model's (the smallest context "
        "a live worker registered wins when it is lower)",
    )
    parser.add_argument(
        "--model-wait",
        type=float,
        default=0.0,
        help="seconds to wait for the model's tokenizer.json and config.json to appear "
        "(in compose a worker writes them into the shared model cache on first start)",
    )
    parser.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="gateway processes sharing the ports (SO_REUSEPORT), each with its own reply "
        "stream; --max-active-requests holds per process",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        help="bind with SO_REUSEPORT, so that several gateways share the ports "
        "(--gateway-workers sets it on its processes)",
    )
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="json: one JSON object per line, request lines with a request_id field",
    )


def resolve_model(model: str, model_dir: Path | None) -> tuple[str, Path]:
    """(served name, directory of tokenizer and config) for a --model value."""
    return model_name(model), model_dir or local_model_dir(model)


def wait_for_model(model_dir: Path, timeout_s: float) -> None:
    """Wait until a worker has written the model's files into a shared cache."""
    deadline = time.monotonic() + timeout_s
    needed = [model_dir / "tokenizer.json", model_dir / "config.json"]
    while not all(p.exists() for p in needed) and time.monotonic() < deadline:
        time.sleep(0.5)
    if all(p.exists() for p in needed):
        time.sleep(0.5 if timeout_s else 0)  # let a writer finish the file it just created


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    name, model_dir = resolve_model(args.model, args.model_dir)
    if getattr(args, "log_format", "text") == "json":
        use_json_logs()  # a process setting, applied here so that every entry point has it
    if getattr(args, "model_wait", 0):
        wait_for_model(model_dir, args.model_wait)
    extra = {"gateway_id": args.gateway_id} if args.gateway_id else {}
    if not (model_dir / "tokenizer.json").exists():
        raise ValueError(
            f"model {args.model!r} not found: no tokenizer.json in {model_dir} (start a worker "
            "once to convert the bundled model, or pass --model-dir)"
        )
    return GatewayConfig(
        model=name,
        model_dir=model_dir,
        redis_url=secret_from_args(args, "redis-url", REDIS_URL_ENV)
        or GatewayConfig.__dataclass_fields__["redis_url"].default,
        grpc_host=args.grpc_host,
        grpc_port=args.grpc_port,
        http_host=getattr(args, "http_host", "127.0.0.1"),
        http_port=getattr(args, "http_port", 8000),
        api_key=secret_from_args(args, "api-key", API_KEY_ENV),
        max_active_requests=getattr(args, "max_active_requests", 4096),
        max_queued_tasks=getattr(args, "max_queued_tasks", 2048),
        migrate=getattr(args, "migrate", False),
        request_timeout_s=args.request_timeout,
        stream_write_timeout_s=getattr(args, "stream_write_timeout", 30.0),
        max_model_len=args.max_model_len,
        reuse_port=getattr(args, "reuse_port", False),
        **extra,
    )


async def serve_gateway(config: GatewayConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then shut down gracefully."""
    # Imported here: building the CLI's parsers must not need grpc (engine-only benches).
    from tandem.gateway.app import GatewayApp

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Signal handlers exist only in the main thread; elsewhere `stop` is the way.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    app = GatewayApp(config)
    try:
        # Startup waits for Redis; a signal meanwhile must still end the process.
        starting = asyncio.ensure_future(app.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return
        stopping.cancel()
        port = starting.result()
        grpc_address = join_host_port(config.grpc_host, port)
        http_address = join_host_port(config.http_host, app.http_port)
        print(f"gateway ready grpc={grpc_address} http={http_address}", flush=True)
        log.info("gateway ready grpc=%s http=%s", grpc_address, http_address)
        await stop.wait()
        log.info("gateway shutting down")
    finally:
        await app.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def _default_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )


def run(config: GatewayConfig, workers: int = 1) -> int:
    """Serve in this process, or in `workers` processes sharing the ports; exit status."""
    _default_logging()
    if workers < 1:
        raise ValueError("--gateway-workers must be >= 1")
    if workers > 1:
        return serve_workers(config, workers)
    asyncio.run(serve_gateway(config))
    return 0


def main(argv: list[str] | None = None) -> None:
    """`python -m tandem.gateway.main`: the gateway alone, until the CLI delegates here."""
    parser = argparse.ArgumentParser(
        prog="tandem gateway",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    _default_logging()
    try:
        status = run(config_from_args(args), args.gateway_workers)
    except (ValueError, OSError) as exc:
        parser.exit(2, f"tandem gateway: error: {exc}\n")
    parser.exit(status)


if __name__ == "__main__":
    main()
