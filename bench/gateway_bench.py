"""`tandem bench gateway`: what one gateway (or --gateway-workers N) can carry.

Against the fake worker pool (bench/fake_pool.py), which answers every task at once and
then streams one token per running request per step, so the gateway is all there is to
measure. Every part runs as its own process, so that none starves another: a private
redis-server, the fake pool, the gateway (`tandem gateway`), and the client processes
(bench/gateway_clients.py). For each API and each gateway process count, every stream
opens at once, and the run reports:

- tokens/s streamed to the clients, and the streams carried (all of them, or failures);
- added latency, p50/p99: from the fake pool's XADD of a token to the client's receipt
  (gRPC; token ids carry their send time, see fake_pool.stamp_token);
- gateway CPU seconds per 1,000 tokens (user + system, every gateway process).

No torch: the machine that runs it needs only the gateway's dependencies.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from tandem.bench.gateway_clients import RATE_WINDOW_S
from tandem.bench.results import git_commit
from tandem.core.model_paths import local_model_dir
from tandem.local_redis import LocalRedis

MODEL = "smollm2"  # its tokenizer only: the fake pool needs no weights
START_TIMEOUT_S = 60.0


class Process:
    """A child started by its command line, ready once it printed a line with `ready`."""

    def __init__(self, cmd: Sequence[str], ready: str, log_path: Path, wait: bool = True) -> None:
        """wait=False: started, not yet waited for; `wait_ready()` before using it."""
        self._log = log_path.open("w")
        self._ready = ready
        self._log_path = log_path
        self.popen = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=self._log, text=True,
            start_new_session=True,
        )  # fmt: skip
        self.ready_line = ""
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        self.ready_line = self._wait_for(self._ready, self._log_path)

    def _wait_for(self, ready: str, log_path: Path) -> str:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline()
            if ready in line:
                return line.strip()
            if not line and self.popen.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"{self.popen.args[:4]} did not start; see {log_path}")

    def stop(self, timeout_s: float = 20.0) -> str:
        """SIGTERM (SIGKILL after timeout_s); returns what it printed after its ready line."""
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        self._log.close()
        assert self.popen.stdout is not None
        if self.popen.stdout.closed:
            return ""
        rest = self.popen.stdout.read()
        self.popen.stdout.close()
        return rest

    def cpu_s(self) -> float:
        """CPU seconds of the process and its children so far."""
        proc = psutil.Process(self.popen.pid)
        total = 0.0
        for p in [proc, *proc.children(recursive=True)]:
            try:
                times = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        return total


def gateway_command(redis_url: str, model_dir: Path, workers: int, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "tandem.gateway.main", "--model", MODEL,
        "--model-dir", str(model_dir), "--redis-url", redis_url,
        "--grpc-port", "0", "--http-port", "0", "--gateway-workers", str(workers), *flags,
    ]  # fmt: skip


def pool_command(redis_url: str, token_delay_s: float, stamp: bool) -> list[str]:
    return [
        sys.executable, "-m", "tandem.bench.fake_pool", "--redis-url", redis_url,
        "--model", MODEL, "--token-delay", str(token_delay_s),
        *(["--stamp-tokens"] if stamp else []),
    ]  # fmt: skip


def ready_ports(line: str) -> dict[str, str]:
    """{"grpc": HOST:PORT, "http": HOST:PORT} from a "gateway ready ..." line."""
    return dict(part.split("=", 1) for part in line.split()[2:4])


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(int(q / 100 * len(ordered)), len(ordered) - 1)]


def run_clients(api: str, target: str, streams: int, processes: int, max_tokens: int) -> list:
    """Client processes, `streams` split between them, all starting at the same moment."""
    start_at = time.time() + 2.0  # every process imported and waiting by then
    share = [streams // processes + (i < streams % processes) for i in range(processes)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tandem.bench.gateway_clients",
                "--api",
                api,
                "--target",
                target,
                "--streams",
                str(n),
                "--max-tokens",
                str(max_tokens),
                "--start-at",
                str(start_at),
                "--stamped",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for n in share
        if n
    ]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def tokenizer_dir(model_dir: Path | None) -> Path:
    path = model_dir or local_model_dir(MODEL)
    if not (path / "tokenizer.json").exists() or not (path / "config.json").exists():
        raise ValueError(
            f"no tokenizer.json and config.json in {path}: pass --model-dir (any model's "
            "directory with both; token ids 1000..41000 must be in its vocabulary)"
        )
    return path


def start_pools(redis_url: str, args, log_dir: Path, tag: str) -> list[Process]:
    """`args.pool_processes` fake pools sharing the task stream, each its own consumer."""
    pools: list[Process] = []
    try:
        for i in range(args.pool_processes):  # all start at once, then each is waited for
            pools.append(Process(
                pool_command(redis_url, args.token_delay, stamp=True),
                "fake pool ready", log_dir / f"pool{i}-{tag}.log", wait=False,
            ))  # fmt: skip
        for pool in pools:
            pool.wait_ready()
    except BaseException:
        for pool in pools:
            pool.stop()
        raise
    return pools


def pool_report(outputs: list[str]) -> dict:
    """The pools' own counts (their last JSON line each), summed."""
    total = {"tokens": 0, "steps": 0, "late_steps": 0}
    for out in outputs:
        lines = [line for line in out.splitlines() if line.startswith("{")]
        for key, value in (json.loads(lines[-1]) if lines else {}).items():
            total[key] = total.get(key, 0) + value
    return total


def steady_tokens_per_s(reports: list[dict]) -> float | None:
    """The median, over windows of RATE_WINDOW_S from the first receipt to the last, of
    the tokens every client received in it: the rate once the streams are open (gRPC;
    tokens_per_s also counts the ramp while 2,000 streams open and take a first step)."""
    totals: dict[int, int] = {}
    for report in reports:
        for window, tokens in report.get("tokens_per_window", ()):
            totals[window] = totals.get(window, 0) + tokens
    if not totals:
        return None
    every = [totals.get(w, 0) for w in range(min(totals), max(totals) + 1)]
    return round(percentile(every, 50) / RATE_WINDOW_S, 1)


def measure(args, api: str, workers: int, work_dir: Path) -> dict:
    model_dir = tokenizer_dir(args.model_dir)
    tag = f"{api}-{workers}"
    with LocalRedis() as redis_server:
        pools = start_pools(redis_server.url, args, work_dir, tag)
        try:
            gateway = Process(
                gateway_command(
                    redis_server.url, model_dir, workers,
                    "--max-active-requests", str(max(args.streams, 1)),
                    "--max-queued-tasks", "0",
                ),
                "gateway ready", work_dir / f"gateway-{tag}.log",
            )  # fmt: skip
            try:
                target = ready_ports(gateway.ready_line)[api]
                cpu_before = gateway.cpu_s()
                pool_cpu_before = sum(p.cpu_s() for p in pools)
                reports = run_clients(
                    api, target, args.streams, args.client_processes, args.max_tokens
                )
                cpu = gateway.cpu_s() - cpu_before
                pool_cpu = sum(p.cpu_s() for p in pools) - pool_cpu_before
            finally:
                gateway.stop()
        finally:
            pooled = pool_report([p.stop() for p in pools])
    failed = sum(r["failed"] for r in reports)
    tokens = (args.streams - failed) * args.max_tokens
    messages = sum(r["messages"] for r in reports)
    span = max(r["ended"] for r in reports) - min(r["started"] for r in reports)
    ages = [a for r in reports for a in r["ages_s"]]
    return {
        "api": api,
        "gateway_workers": workers,
        "streams": args.streams,
        "failed_streams": failed,
        "failures": [f for r in reports for f in r["failures"]][:5],
        "tokens": tokens,
        "tokens_per_s": round(tokens / span, 1) if span > 0 else None,
        "steady_tokens_per_s": steady_tokens_per_s(reports),
        # gRPC messages or SSE chunks the clients got: the gateway's cost is per message.
        "messages": messages,
        "tokens_per_message": round(tokens / messages, 2) if messages else None,
        "added_latency_p50_ms": as_ms(percentile(ages, 50)),
        "added_latency_p99_ms": as_ms(percentile(ages, 99)),
        "gateway_cpu_s": round(cpu, 2),
        # Gateway CPU seconds per wall second: how many cores its processes kept busy.
        "cores_used": round(cpu / span, 2) if span > 0 else None,
        "gateway_cpu_s_per_1k_tokens": round(cpu / tokens * 1000, 4) if tokens else None,
        "gateway_cpu_us_per_message": round(cpu / messages * 1e6, 1) if messages else None,
        # Whether something else set the pace: the pools' and the busiest client's CPU
        # share, and pool steps that overran --token-delay (a paced pool fell behind).
        "pool_cores_used": round(pool_cpu / span, 2) if span > 0 else None,
        "pool_late_steps": pooled["late_steps"],
        "pool_steps": pooled["steps"],
        "client_max_cpu_share": round(max(r["cpu_s"] for r in reports) / span, 2)
        if span > 0
        else None,
        "seconds": round(span, 2),
    }


def as_ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def run(args) -> Path:
    from tandem.bench.results import write_result

    apis = [a for a in args.apis.split(",") if a]
    workers = [int(w) for w in args.gateway_workers.split(",") if w]
    with tempfile.TemporaryDirectory(prefix="tandem-gateway-bench-") as tmp:
        runs = []
        for api in apis:
            for n in workers:
                runs.append(measure(args, api, n, Path(tmp)))
                print(json.dumps(runs[-1]), flush=True)
    params = {
        "streams": args.streams,
        "max_tokens": args.max_tokens,
        "token_delay_s": args.token_delay,
        "offered_tokens_per_s": round(args.streams / args.token_delay)
        if args.token_delay
        else None,
        "pool_processes": args.pool_processes,
        "client_processes": args.client_processes,
        "cpu_count": os.cpu_count(),
        "commit": git_commit(),
    }
    return write_result(
        "gateway", MODEL, params, {"runs": runs}, args.out_dir,
        label=f"{args.streams}streams", card=f"cpu x{os.cpu_count()}",
    )  # fmt: skip
