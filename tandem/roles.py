"""Subcommands that start one service role each: serve, gateway, prefill, decode, and
worker (colocated: prefill and decode in one process, no KV transfer).

`tandem serve` runs the others as child processes with exactly these command lines,
which are also what compose runs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

from tandem.core.config import KV_TRANSPORTS
from tandem.core.credentials import (
    API_KEY_ENV,
    REDIS_URL_ENV,
    add_secret_args,
    secret_from_args,
)
from tandem.engine.engine_args import add_engine_args, engine_config_from_args

FMT = argparse.ArgumentDefaultsHelpFormatter


# CLI command -> worker role
WORKER_COMMANDS = {"prefill": "prefill", "decode": "decode", "worker": "colocated"}


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    add_secret_args(p, "redis-url", REDIS_URL_ENV, "Redis shared with the gateway")
    p.add_argument("--worker-id", default="", help="default: ROLE-HOSTNAME-PID")
    p.add_argument(
        "--reclaim-idle",
        type=float,
        default=5.0,
        dest="reclaim_idle_s",
        help="seconds before the tasks of a dead prefill or colocated worker are taken over",
    )
    add_prefix_route_arg(p)


def add_prefix_route_arg(p: argparse.ArgumentParser) -> None:
    """KV-aware routing (core/prefix_routing.py); `tandem serve` passes it to its
    prefill and colocated workers."""
    p.add_argument(
        "--prefix-route-wait-ms",
        type=float,
        default=200.0,
        metavar="MS",
        dest="prefix_route_wait_ms",
        help="prefill and colocated: leave a task up to MS ms for a live peer of the "
        "same role that holds a longer cached prefix of it (0: take tasks in stream order)",
    )


def _add_kv_transfer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kv-transport",
        default="zmq",
        choices=[t for t in KV_TRANSPORTS if t != "fake"],
        help="how KV blocks move between workers",
    )
    p.add_argument(
        "--bind-host",
        default="127.0.0.1",
        help="interface for internal sockets (never all interfaces by default)",
    )
    p.add_argument(
        "--advertise-host",
        default="",
        help="address other workers use to reach this one (default: --bind-host)",
    )
    p.add_argument(
        "--kv-curve-dir",
        default=None,
        metavar="DIR",
        help="authenticate and encrypt the internal plane with the ZMQ CURVE keys in DIR "
        "(see kvtransfer/curve.py); None: TANDEM_KV_CURVE_DIR, else off",
    )
    p.add_argument(
        "--reservation-lease",
        type=float,
        default=10.0,
        dest="reservation_lease_s",
        help="seconds a decode worker keeps reserved blocks waiting for their KV",
    )
    p.add_argument(
        "--transfer-timeout",
        type=float,
        default=2.0,
        dest="transfer_timeout_s",
        help="seconds a prefill worker waits for each reserve/transfer/handoff "
        "(under half of --reclaim-idle)",
    )
    p.add_argument(
        "--decode-wait",
        type=float,
        default=30.0,
        dest="decode_wait_s",
        help="seconds a prefill worker keeps retrying to reserve decode blocks for a task "
        "while every decode worker is full, before failing it UNAVAILABLE",
    )


def add_local_prefill_args(p: argparse.ArgumentParser) -> None:
    """Decode workers' conditional disaggregation (core.local_prefill); `tandem serve`
    passes these to its decode workers."""
    p.add_argument(
        "--local-prefill-after-ms",
        type=float,
        default=None,
        metavar="MS",
        dest="local_prefill_after_ms",
        help="decode: also prefill tasks from the prefill stream, once the oldest "
        "task no prefill worker has taken has waited MS ms (unset: never)",
    )
    p.add_argument(
        "--local-prefill-uncached-tokens",
        type=int,
        default=0,
        metavar="N",
        dest="local_prefill_uncached_tokens",
        help="decode: also prefill a task whose tokens beyond the prefix this worker "
        "holds in its prefix cache (a conversation's previous turn) number at most N: "
        "no prefill worker, no KV transfer (0: never)",
    )
    p.add_argument(
        "--max-local-prefills",
        type=int,
        default=1,
        metavar="N",
        dest="max_local_prefills",
        help="decode, with either option above: at most N of its own tasks "
        "prefilling at once (bounds the prefill work mixed into its decode steps)",
    )


def add_local_prefill_tokens_arg(p: argparse.ArgumentParser) -> None:
    """`tandem serve` only: a standalone decode worker takes --max-prefill-tokens."""
    p.add_argument(
        "--local-prefill-tokens",
        type=int,
        default=0,
        metavar="N",
        dest="local_prefill_tokens",
        help="decode workers, with local prefill: --max-prefill-tokens N "
        "for them alone (prompt tokens per decode step; 0: the engine flag's value)",
    )


def local_prefill_flags(args: argparse.Namespace) -> list[str]:
    """The decode workers' flags for `args`' local prefill settings (none when off);
    given after the engine flags, so their --max-prefill-tokens wins."""
    flags = []
    if args.local_prefill_after_ms is not None:
        flags += ["--local-prefill-after-ms", f"{args.local_prefill_after_ms:g}"]
    if args.local_prefill_uncached_tokens:
        flags += ["--local-prefill-uncached-tokens", str(args.local_prefill_uncached_tokens)]
    if not flags:
        return []
    flags += ["--max-local-prefills", str(args.max_local_prefills)]
    if args.local_prefill_tokens:
        flags += ["--max-prefill-tokens", str(args.local_prefill_tokens)]
    return flags


def gpu_list(text: str) -> list[int]:
    """`--ROLE-gpus` values: "0,2,3" -> [0, 2, 3]."""
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 0:
        raise argparse.ArgumentTypeError(f"expected a comma list of GPU indices, got {text!r}")
    return gpus


def worker_config_from_args(args: argparse.Namespace, role: str):
    from tandem.core.config import WorkerConfig
    from tandem.kvtransfer.curve import curve_dir_for

    extra = {}
    if role != "colocated":  # a colocated worker moves no KV
        extra = dict(
            kv_transport=args.kv_transport,
            bind_host=args.bind_host,
            advertise_host=args.advertise_host,
            reservation_lease_s=args.reservation_lease_s,
            transfer_timeout_s=args.transfer_timeout_s,
            decode_wait_s=args.decode_wait_s,
            kv_curve_dir=curve_dir_for(role, args.kv_curve_dir),
        )
    if role == "decode":
        extra.update(
            local_prefill_after_ms=args.local_prefill_after_ms,
            local_prefill_uncached_tokens=args.local_prefill_uncached_tokens,
            max_local_prefills=args.max_local_prefills,
        )
    redis_url = secret_from_args(args, "redis-url", REDIS_URL_ENV)
    if redis_url is None:
        raise ValueError(f"give --redis-url, --redis-url-file or {REDIS_URL_ENV}")
    return WorkerConfig(
        redis_url=redis_url,
        role=role,
        worker_id=args.worker_id,
        reclaim_idle_s=args.reclaim_idle_s,
        prefix_route_wait_ms=args.prefix_route_wait_ms,
        **extra,
    )


def _cmd_worker(role: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:

        if role == "prefill":
            from tandem.prefill.worker import PrefillWorker as Worker
        elif role == "decode":
            from tandem.decode.worker import DecodeWorker as Worker
        else:
            from tandem.decode.colocated import ColocatedWorker as Worker
        worker = Worker(worker_config_from_args(args, role), engine_config_from_args(args))
        worker.install_signal_handlers()
        worker.run()
        return 0

    return run


def _cmd_gateway(args: argparse.Namespace) -> int:
    from tandem.gateway.main import config_from_args, run

    return run(config_from_args(args), args.gateway_workers)


def _cmd_serve(args: argparse.Namespace) -> int:
    from tandem.kvtransfer.curve import CURVE_DIR_ENV
    from tandem.launcher import serve

    # Workers read the CURVE directory from the environment too.
    if args.kv_curve_dir:
        os.environ[CURVE_DIR_ENV] = args.kv_curve_dir
    # The gateway child reads the key from its environment, not from its command line.
    api_key = secret_from_args(args, "api-key", API_KEY_ENV)
    if api_key is not None:
        os.environ[API_KEY_ENV] = api_key
    args.api_key = None
    return serve(args)


WORKER_HELP = {
    "prefill": "run one prefill worker",
    "decode": "run one decode worker",
    "worker": "run one colocated worker: takes tasks like a prefill worker and generates "
    "them itself (chunked prefill mixed into its decode steps, no KV transfer)",
}


def add_role_parsers(sub) -> None:
    for command, role in WORKER_COMMANDS.items():
        p = sub.add_parser(
            command,
            help=WORKER_HELP[command],
            description=WORKER_HELP[command],
            formatter_class=FMT,
        )
        add_engine_args(p)
        _add_worker_args(p)
        if role != "colocated":
            _add_kv_transfer_args(p)
        if role == "decode":
            add_local_prefill_args(p)
        p.set_defaults(func=_cmd_worker(role))

    from tandem.gateway.main import add_arguments as add_gateway_args

    g = sub.add_parser(
        "gateway", help="run the gateway (gRPC and OpenAI-style HTTP)", formatter_class=FMT
    )
    add_gateway_args(g)
    g.set_defaults(func=_cmd_gateway)

    s = sub.add_parser(
        "serve",
        help="run a complete local service: redis, workers (prefill "
        "and decode, or colocated, or both) and gateway processes",
        formatter_class=FMT,
    )
    add_engine_args(s)
    s.add_argument("--grpc-port", type=int, default=50051, help="port of the gRPC API")
    s.add_argument(
        "--http-port", type=int, default=8000, help="port of the OpenAI-style HTTP API and /metrics"
    )
    s.add_argument("--host", default="127.0.0.1", help="interface for the gateway's ports")
    s.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis instead of starting a private redis-server",
    )
    s.add_argument(
        "--state-dir",
        default=None,
        help="where the private redis-server keeps its append-only file, so queued "
        "tasks survive its restart; None: $XDG_STATE_HOME/tandem/serve-GRPC_PORT "
        "(~/.local/state/...)",
    )
    s.add_argument(
        "--prefill-workers",
        type=int,
        default=None,
        help="prefill worker processes; None: 1, or 0 beside colocated workers",
    )
    s.add_argument(
        "--decode-workers",
        type=int,
        default=None,
        help="decode worker processes; None: 1, or 0 beside colocated workers",
    )
    s.add_argument(
        "--colocated-workers",
        type=int,
        default=0,
        help="colocated worker processes (`tandem worker`: prefill and decode in "
        "one process); mixing them with prefill and decode workers is allowed",
    )
    for role in ("prefill", "decode", "colocated"):
        s.add_argument(
            f"--{role}-gpus",
            type=gpu_list,
            default=None,
            metavar="LIST",
            help=f"comma list of GPU indices: {role} worker i runs with "
            "CUDA_VISIBLE_DEVICES=LIST[i %% len(LIST)]; None: inherited",
        )
    s.add_argument(
        "--kv-transport",
        default="zmq",
        choices=[t for t in KV_TRANSPORTS if t != "fake"],
        help="how KV blocks move between workers",
    )
    s.add_argument(
        "--kv-curve-dir",
        default=None,
        metavar="DIR",
        help="passed to the prefill and decode workers (through the environment)",
    )
    add_local_prefill_args(s)
    add_local_prefill_tokens_arg(s)
    add_prefix_route_arg(s)
    add_secret_args(
        s,
        "api-key",
        API_KEY_ENV,
        "require 'Authorization: Bearer KEY' on gRPC and HTTP (not health)",
    )
    s.add_argument(
        "--migrate",
        action="store_true",
        help="continue a request on another worker when its decode or colocated worker dies",
    )
    s.add_argument(
        "--max-active-requests",
        type=int,
        default=4096,
        help="passed to the gateway: requests in flight at once (per gateway process); "
        "more get HTTP 429 / RESOURCE_EXHAUSTED",
    )
    s.add_argument(
        "--gateway-workers",
        type=int,
        default=1,
        help="passed to the gateway: processes sharing its ports (SO_REUSEPORT)",
    )
    s.add_argument(
        "--reservation-lease",
        type=float,
        default=10.0,
        help="passed to the prefill and decode workers: seconds a KV block reservation "
        "waits for its transfer (prefill workers renew theirs every third of it)",
    )
    s.add_argument(
        "--stream-write-timeout",
        type=float,
        default=30.0,
        help="passed to the gateway: seconds a client may accept no bytes of its response "
        "before its connection is cut and its request aborted",
    )
    s.add_argument(
        "--ready-timeout",
        type=float,
        default=600.0,
        help="seconds to wait for every process to be ready",
    )
    s.set_defaults(func=_cmd_serve)
