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
from pathlib import Path

from core.models import local_model_dir, model_name
from gateway.app import GatewayApp
from gateway.config import GatewayConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
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
        help="directory with tokenizer.json and config.json (default: from --model)",
    )
    parser.add_argument("--redis-url", default=defaults["redis_url"].default)
    parser.add_argument("--grpc-host", default=defaults["grpc_host"].default)
    parser.add_argument("--grpc-port", type=int, default=defaults["grpc_port"].default)
    parser.add_argument(
        "--gateway-id", default=None, help="names this gateway's reply stream (default: random)"
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=defaults["request_timeout_s"].default,
        help="seconds a request may take from arrival to its last token",
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=0,
        help="context limit for prompt + max_tokens (default: the model's)",
    )


def resolve_model(model: str, model_dir: Path | None) -> tuple[str, Path]:
    """(served name, directory of tokenizer and config) for a --model value."""
    return model_name(model), model_dir or local_model_dir(model)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    name, model_dir = resolve_model(args.model, args.model_dir)
    extra = {"gateway_id": args.gateway_id} if args.gateway_id else {}
    return GatewayConfig(
        model=name,
        model_dir=model_dir,
        redis_url=args.redis_url,
        grpc_host=args.grpc_host,
        grpc_port=args.grpc_port,
        request_timeout_s=args.request_timeout,
        max_model_len=args.max_model_len,
        **extra,
    )


async def serve_gateway(config: GatewayConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop` is set), then shut down gracefully."""
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
        print(f"gateway ready grpc={config.grpc_host}:{port}", flush=True)
        log.info("gateway ready grpc=%s:%d", config.grpc_host, port)
        await stop.wait()
        log.info("gateway shutting down")
    finally:
        await app.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def run(config: GatewayConfig) -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    asyncio.run(serve_gateway(config))


def main(argv: list[str] | None = None) -> None:
    """`python -m gateway.main`: the gateway alone, until the CLI delegates here."""
    parser = argparse.ArgumentParser(prog="tandem gateway", description=__doc__)
    add_arguments(parser)
    run(config_from_args(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
