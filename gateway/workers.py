"""Several gateway processes sharing the ports (`--gateway-workers N`).

One Python process streams tokens only as fast as one core turns deltas into client
messages; like vLLM's API-server processes, N gateways bind the same gRPC and HTTP ports
with SO_REUSEPORT and the kernel spreads connections over them. Each has its own
gateway id, hence its own reply stream and reply router: nothing is shared but Redis.
`--max-active-requests` holds per process.

The parent re-runs its own command line once per worker (flags given later win, so each
child gets `--gateway-workers 1`, its id and the concrete ports), waits for every
"gateway ready" line, prints one for the whole group, and stops them all on SIGTERM or
SIGINT, or when any of them exits.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading

from tandem.gateway.config import GatewayConfig, join_host_port
from tandem.local_redis import free_port

log = logging.getLogger(__name__)

READY_PREFIX = "gateway ready "


def worker_command(config: GatewayConfig, index: int, grpc_port: int, http_port: int) -> list[str]:
    return [
        sys.executable, *sys.orig_argv[1:],
        "--gateway-workers", "1", "--reuse-port",
        "--gateway-id", f"{config.gateway_id}-{index}",
        "--grpc-port", str(grpc_port), "--http-port", str(http_port),
    ]  # fmt: skip


def serve_workers(config: GatewayConfig, workers: int) -> int:
    """Run `workers` gateway processes until a signal or one of them exits; the exit
    status is the first failure's, or 0."""
    grpc_port = config.grpc_port or free_port()
    http_port = config.http_port or free_port()
    children = [
        subprocess.Popen(
            worker_command(config, i, grpc_port, http_port), stdout=subprocess.PIPE, text=True
        )
        for i in range(workers)
    ]
    ended = threading.Event()
    ready = threading.Semaphore(0)

    def watch(child: subprocess.Popen) -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.startswith(READY_PREFIX):
                ready.release()
            else:
                print(line, end="", flush=True)
        child.wait()
        ended.set()

    for child in children:
        threading.Thread(target=watch, args=(child,), daemon=True).start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: ended.set())
    started = 0
    while started < workers and not ended.is_set():
        started += ready.acquire(timeout=0.2)
    if started == workers:
        grpc = join_host_port(config.grpc_host, grpc_port)
        http = join_host_port(config.http_host, http_port)
        print(f"{READY_PREFIX}grpc={grpc} http={http} workers={workers}", flush=True)
        ended.wait()
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    grace = config.shutdown_grace_s + 10
    for child in children:
        try:
            child.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("gateway worker %d did not stop in %.0fs; killing it", child.pid, grace)
            child.kill()
            child.wait()
    failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM)]
    return failed[0] if failed else 0
