"""A service assembled role by role, so tests can kill, freeze and restart each piece
with real signals: private redis-server, `tandem prefill|decode|gateway` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import grpc

from tandem.core.protocol import WorkerInfo
from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.gateway.proto import tandem_pb2, tandem_pb2_grpc
from tandem.local_redis import LocalRedis, free_port

ENGINE_FLAGS = ["--model", "smollm2", "--device", "cpu", "--num-blocks", "256", "--threads", "1"]


@dataclass
class Cluster:
    redis: LocalRedis = field(default_factory=LocalRedis)
    # Picked when the gateway first starts, not before: workers started in between bind
    # random ports of their own and once took this one (a ZMQ socket answered gRPC).
    grpc_port: int = 0
    http_port: int = 0  # the gateway's OpenAI-style HTTP API, picked with grpc_port
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)
    # What the service's processes are given; "" means the private server's own URL.
    redis_url: str = ""

    def __post_init__(self) -> None:
        self.redis.start()
        self.client = connect(self.redis.url)
        self.redis_url = self.redis_url or self.redis.url

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _spawn(self, name: str, args: list[str], hooks: tuple[str, ...] = ()) -> subprocess.Popen:
        """Start `tandem ARGS`; with `hooks`, through tests.faults.hooked_worker."""
        command = ["-m", "tandem.cli"]
        if hooks:
            command = ["-m", "tests.faults.hooked_worker", *hooks, "--"]
        log_path = f"/tmp/tandem-fault-{os.getpid()}-{name}.log"
        self.logs[name] = log_path
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, *command, "--log-level", "INFO", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[name] = proc
        return proc

    def start_worker(
        self, name: str, role: str, *flags: str, hooks: tuple[str, ...] = ()
    ) -> subprocess.Popen:
        """Start a worker and wait for it to register; `hooks` inject faults into it
        (see tests.faults.hooked_worker)."""
        proc = self._spawn(
            name,
            [role, *ENGINE_FLAGS, "--redis-url", self.redis_url, "--worker-id", name, *flags],
            hooks,
        )
        self.wait_for(
            lambda: any(w.worker_id == name for w in self.workers()),
            f"{name} to register",
            proc=proc,
        )
        return proc

    def start_gateway(self, *flags: str) -> subprocess.Popen:
        self.grpc_port = self.grpc_port or free_port()
        self.http_port = self.http_port or free_port()
        proc = self._spawn(
            "gateway",
            [
                "gateway",
                "--model",
                "smollm2",
                "--redis-url",
                self.redis_url,
                "--grpc-port",
                str(self.grpc_port),
                "--http-port",
                str(self.http_port),
                *flags,
            ],
        )
        self.wait_for(
            lambda: _port_open(self.grpc_port) and _port_open(self.http_port),
            "gateway ports",
            proc=proc,
        )
        return proc

    def workers(self, role: str | None = None) -> list[WorkerInfo]:
        return list_workers(self.client, role=role)

    def worker(self, name: str) -> WorkerInfo | None:
        return next((w for w in self.workers() if w.worker_id == name), None)

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait(10)

    def wait_for(self, cond, what: str, timeout: float = 120.0, proc=None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process died waiting for {what}: {self.tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}: {self.tail()}")

    def tail(self, lines: int = 30) -> str:
        out = []
        for name, path in self.logs.items():
            with open(path, errors="replace") as f:
                out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)

    def stub(self) -> tandem_pb2_grpc.GenerationStub:
        return tandem_pb2_grpc.GenerationStub(grpc.insecure_channel(self.target))

    def assert_no_blocks_in_use(self, timeout: float = 10.0) -> None:
        def clean() -> bool:
            return all(
                w.used_blocks == 0 and w.running == 0 and w.reservations == 0
                for w in self.workers()
            )

        self.wait_for(clean, "every worker to hold no blocks", timeout=timeout)

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        self.redis.stop()


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def request(prompt: str, max_tokens: int, **sampling) -> tandem_pb2.GenerateRequest:
    return tandem_pb2.GenerateRequest(
        prompt=prompt,
        sampling=tandem_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **sampling
        ),
    )


def collect(stub, req, timeout: float = 120.0) -> list[int]:
    tokens: list[int] = []
    for msg in stub.Generate(req, timeout=timeout):
        tokens += list(msg.token_ids)
    return tokens


def stream_in_background(cluster: Cluster, req, first: int) -> tuple[dict, threading.Event]:
    """Run a stream on a thread; return (result dict, event set after `first` tokens).

    The dict gets "tokens", and on failure "error" (the grpc.RpcError) and "ended_at"
    (time.monotonic()); "thread" is the thread, to join.
    """
    result: dict = {"tokens": []}
    started = threading.Event()

    def run() -> None:
        try:
            for msg in cluster.stub().Generate(req, timeout=120):
                result["tokens"] += list(msg.token_ids)
                if len(result["tokens"]) >= first:
                    started.set()
        except grpc.RpcError as err:
            result["error"] = err
            result["ended_at"] = time.monotonic()
        started.set()

    thread = threading.Thread(target=run)
    thread.start()
    result["thread"] = thread
    return result, started
