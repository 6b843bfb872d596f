"""`tandem serve`: a whole local service from one command.

Starts a private redis-server (unless --redis-url), then prefill, decode and colocated
workers and the gateway, each as its own process running the same `tandem COMMAND ...`
command compose uses; a worker given a GPU list runs with its own CUDA_VISIBLE_DEVICES.
Waits until every worker is in the registry and the gateway answers, prints the
endpoints, then supervises (tandem.supervisor): a process that dies later, Redis
included, is restarted with backoff while the rest serves, and one that crash-loops is
given up and reported as a degraded pool (core.pool_status). The bundled Redis keeps an
append-only file under --state-dir, so a restarted one still has the queued tasks. On
Ctrl-C / SIGTERM it stops everything it started.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import redis

from tandem.core.pool_status import POOL_STATUS_TTL_S, PoolStatus, encode_status
from tandem.core.redis_keys import pool_status_key
from tandem.local_redis import LocalRedis, die_with_parent
from tandem.roles import WORKER_COMMANDS, local_prefill_flags
from tandem.supervisor import Supervisor

log = logging.getLogger("tandem.serve")


def tandem_command() -> list[str]:
    exe = shutil.which("tandem", path=os.path.dirname(sys.executable)) or shutil.which("tandem")
    return [exe] if exe else [sys.executable, "-m", "tandem.cli"]


def resolve_worker_counts(args: argparse.Namespace) -> None:
    """Fill in --prefill-workers / --decode-workers left unset (0 beside colocated
    workers, else 1) and refuse a set of workers that cannot serve a request."""
    if args.colocated_workers < 0:
        raise ValueError("--colocated-workers must be >= 0")
    default = 0 if args.colocated_workers > 0 else 1
    for role in ("prefill", "decode"):
        name = f"{role}_workers"
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 0:
            raise ValueError(f"--{role}-workers must be >= 0")
    if (args.prefill_workers > 0) != (args.decode_workers > 0):
        # Prefill workers would take tasks and fail them, with nobody to hand them to.
        raise ValueError(
            "prefill and decode workers come together: give both, or neither "
            "(with --colocated-workers)"
        )
    if not args.prefill_workers and not args.colocated_workers:
        raise ValueError(
            "no workers: give --prefill-workers and --decode-workers, or --colocated-workers"
        )
    _check_decode_flags(args)
    _check_nccl_gpus(args)


def _check_decode_flags(args: argparse.Namespace) -> None:
    """The decode workers' own check of their local prefill flags and reservation lease,
    made here once, so a bad value stops `tandem serve` before anything starts."""
    from tandem.core.config import WorkerConfig

    WorkerConfig(
        redis_url="redis://",
        role="decode",
        reservation_lease_s=args.reservation_lease,
        local_prefill_after_ms=args.local_prefill_after_ms,
        local_prefill_uncached_tokens=args.local_prefill_uncached_tokens,
        max_local_prefills=args.max_local_prefills,
    )
    local = args.local_prefill_after_ms is not None or args.local_prefill_uncached_tokens > 0
    if local and not args.decode_workers:
        raise ValueError(
            "--local-prefill-after-ms and --local-prefill-uncached-tokens are a decode "
            "worker's options: give --decode-workers"
        )
    if args.local_prefill_tokens < 0:
        raise ValueError("--local-prefill-tokens must be >= 0")
    if args.local_prefill_tokens and not local:
        raise ValueError(
            "--local-prefill-tokens needs --local-prefill-after-ms or "
            "--local-prefill-uncached-tokens"
        )


def _check_nccl_gpus(args: argparse.Namespace) -> None:
    """NCCL cannot pair a GPU with itself: refuse at once what would fail every transfer."""
    if (
        args.kv_transport != "nccl"
        or not args.prefill_workers
        or not (args.device or "").startswith("cuda")
    ):
        return
    prefill, decode = set(args.prefill_gpus or []), set(args.decode_gpus or [])
    if not prefill or not decode or prefill & decode:
        raise ValueError(
            "--kv-transport nccl needs prefill and decode workers on different "
            "GPUs: give --prefill-gpus and --decode-gpus (e.g. 0 and 1), or use "
            "cuda_ipc on one GPU"
        )


def worker_env(gpus: list[int] | None, index: int) -> dict[str, str] | None:
    """The environment of worker `index` of a role: inherited, with only
    CUDA_VISIBLE_DEVICES set when the role has a GPU list (None: inherit as is)."""
    if not gpus:
        return None
    return {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpus[index % len(gpus)])}


def engine_flags(args: argparse.Namespace) -> list[str]:
    flags = [
        "--model",
        args.model,
        "--load-format",
        args.load_format,
        "--block-size",
        str(args.block_size),
        "--num-blocks",
        str(args.num_blocks),
        "--max-num-seqs",
        str(args.max_num_seqs),
        "--max-num-batched-tokens",
        str(args.max_num_batched_tokens),
        "--max-prefill-tokens",
        str(args.max_prefill_tokens),
        "--max-model-len",
        str(args.max_model_len),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        "--attention-backend",
        args.attention_backend,
        "--prefill-graph-tokens",
        str(args.prefill_graph_tokens),
    ]
    if args.enforce_eager:
        flags.append("--enforce-eager")
    if not args.prefix_caching:
        flags.append("--no-prefix-caching")
    threads = args.threads
    if not threads and args.device != "cuda":
        # Workers sharing the CPU each get a slice: oversubscribed OpenMP threads spin
        # against each other and slow every step down many times over.
        workers = args.prefill_workers + args.decode_workers + args.colocated_workers
        threads = max(1, (os.cpu_count() or 1) // workers)
    flags += ["--threads", str(threads)]
    for name in ("device", "dtype", "seed"):
        if getattr(args, name) is not None:
            flags += [f"--{name}", str(getattr(args, name))]
    return flags


class Service:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.redis: LocalRedis | None = None
        self.supervisor = Supervisor()
        self.redis_url = args.redis_url or ""
        self._published_at = 0.0
        self._status_client: redis.Redis | None = None

    def start(self) -> None:
        if not self.redis_url:
            self.redis = LocalRedis(state_dir=state_dir(self.args) / "redis")
            self.supervisor.add("redis", lambda: self.redis.start().proc)
            self.redis_url = self.redis.url
        base = tandem_command()
        log_level = ["--log-level", self.args.log_level]
        transfer = [
            "--kv-transport",
            self.args.kv_transport,
            "--reservation-lease",
            f"{self.args.reservation_lease:g}",
        ]
        local_prefill = local_prefill_flags(self.args)
        routing = ["--prefix-route-wait-ms", f"{self.args.prefix_route_wait_ms:g}"]
        for command, role in WORKER_COMMANDS.items():
            flags = [
                *engine_flags(self.args),
                "--redis-url",
                self.redis_url,
                *(transfer if role != "colocated" else []),
                *(local_prefill if role == "decode" else []),
                *(routing if role in ("prefill", "colocated") else []),
            ]
            gpus = getattr(self.args, f"{role}_gpus")
            for i in range(getattr(self.args, f"{role}_workers")):
                self._spawn(role, [*base, *log_level, command, *flags], worker_env(gpus, i))
        self._spawn(
            "gateway",
            [
                *base,
                *log_level,
                "gateway",
                "--model",
                self.args.model,
                "--redis-url",
                self.redis_url,
                "--grpc-host",
                self.args.host,
                "--grpc-port",
                str(self.args.grpc_port),
                "--http-host",
                self.args.host,
                "--http-port",
                str(self.args.http_port),
                *(["--api-key", self.args.api_key] if self.args.api_key else []),
                *(["--migrate"] if self.args.migrate else []),
                "--max-active-requests",
                str(self.args.max_active_requests),
                "--gateway-workers",
                str(self.args.gateway_workers),
                "--stream-write-timeout",
                str(self.args.stream_write_timeout),
            ],
        )

    def _spawn(self, role: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.supervisor.add(
            role,
            lambda: subprocess.Popen(
                cmd, start_new_session=True, preexec_fn=die_with_parent, env=env
            ),
        )

    def dead_child(self) -> str | None:
        for child in self.supervisor.children:
            if child.proc is None or child.proc.poll() is not None:
                status = child.proc.returncode if child.proc else "(not started)"
                return f"{child.name} exited with status {status}"
        return None

    def supervise(self) -> None:
        """Restart what died (see tandem.supervisor) and tell the gateways about it."""
        self.supervisor.check()
        now = time.monotonic()
        if now - self._published_at < 1.0:
            return
        self._published_at = now
        from tandem.core.redis_client import connect
        from tandem.engine.checkpoint_resolver import model_name

        self._status_client = self._status_client or connect(self.redis_url)
        status = PoolStatus(
            expected=self.supervisor.expected(), given_up=self.supervisor.given_up()
        )
        try:
            self._status_client.set(
                pool_status_key(model_name(self.args.model)),
                encode_status(status),
                ex=POOL_STATUS_TTL_S,
            )
        except redis.RedisError as exc:  # Redis itself down: being restarted
            log.warning("pool status not published: %s", exc)

    def wait_ready(self, timeout_s: float, interrupted) -> None:
        from tandem.core.redis_client import connect
        from tandem.core.registry import list_workers
        from tandem.engine.checkpoint_resolver import model_name

        client = connect(self.redis_url)
        name = model_name(self.args.model)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if interrupted():
                raise KeyboardInterrupt
            # Before the service was ever ready an exit is a bad flag or a broken setup,
            # not a crash to restart: say so at once.
            if (why := self.dead_child()) is not None:
                raise RuntimeError(why)
            roles = [w.role for w in list_workers(client, model=name)]
            if (
                all(
                    roles.count(role) >= getattr(self.args, f"{role}_workers")
                    for role in WORKER_COMMANDS.values()
                )
                and _port_open(self.args.host, self.args.grpc_port)
                and _port_open(self.args.host, self.args.http_port)
            ):
                return
            time.sleep(0.2)
        raise RuntimeError(f"service not ready after {timeout_s:.0f}s")

    def stop(self, timeout_s: float = 15.0) -> None:
        # Redis last: draining workers still publish their last tokens through it.
        self.supervisor.stop(timeout_s, keep=("redis",))
        self.supervisor.stop(5.0)
        if self.redis is not None:
            self.redis.stop()


def state_dir(args: argparse.Namespace) -> Path:
    """--state-dir, or one per gRPC port under $XDG_STATE_HOME/tandem (two services on
    one host must not share an append-only file)."""
    if args.state_dir:
        return Path(args.state_dir)
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "tandem" / f"serve-{args.grpc_port}"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def serve(args: argparse.Namespace) -> int:
    from tandem.engine.checkpoint_resolver import model_name, resolve_model

    resolve_worker_counts(args)
    for port in (args.grpc_port, args.http_port):
        if _port_open(args.host, port):
            raise OSError(f"port {port} on {args.host} is already in use")
    resolve_model(args.model)  # convert the bundled model once, before workers race for it
    stop = {"signal": 0}

    def on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    service = Service(args)
    try:
        service.start()
        service.wait_ready(args.ready_timeout, lambda: bool(stop["signal"]))
        grpc = f"{args.host}:{args.grpc_port}"
        http = f"{args.host}:{args.http_port}"
        print(
            f"tandem ready: model={args.model} grpc={grpc} http={http} "
            f"redis={service.redis_url} prefill={args.prefill_workers} "
            f"decode={args.decode_workers} colocated={args.colocated_workers}",
            flush=True,
        )
        print(
            f"  try: .venv/bin/python -m tandem.gateway.client --target {grpc} 'Hello!'", flush=True
        )
        print(
            f"  or:  curl -s http://{http}/v1/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{model_name(args.model)}", "prompt": "Hello!", '
            f'"max_tokens": 16}}\'',
            flush=True,
        )
        while not stop["signal"]:
            service.supervise()
            time.sleep(0.2)
        return 0
    finally:
        service.stop()
