"""A real service for tests: `tandem serve` as a subprocess (private redis-server,
worker processes, gateway), reached over real gRPC."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import grpc
import pytest

from gateway.proto import tandem_pb2, tandem_pb2_grpc
from tandem.local_redis import free_port


@dataclass
class RunningService:
    proc: subprocess.Popen
    target: str
    redis_url: str
    log: list[str]
    http: str = ""  # HOST:PORT of the OpenAI-style HTTP API

    @property
    def http_url(self) -> str:
        return f"http://{self.http}"

    def stub(self) -> tandem_pb2_grpc.GenerationStub:
        channel = grpc.insecure_channel(self.target)
        return tandem_pb2_grpc.GenerationStub(channel)


def start_service(*extra: str, ready_timeout: float = 240.0) -> RunningService:
    """`tandem serve` with free ports; `extra` flags are appended (they may override)."""
    port = free_port()
    http = [] if "--http-port" in extra else ["--http-port", str(free_port())]
    cmd = [sys.executable, "-m", "tandem.cli", "--log-level", "INFO", "serve", "--model",
           "smollm2", "--device", "cpu", "--grpc-port", str(port), "--num-blocks", "512",
           *http, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log: list[str] = []
    ready = threading.Event()
    info: dict[str, str] = {}

    def pump() -> None:
        for line in proc.stdout:
            log.append(line)
            if line.startswith("tandem ready:"):
                info.update(kv.split("=", 1) for kv in line.split()[2:] if "=" in kv)
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + ready_timeout
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("service did not start:\n" + "".join(log[-60:]))
    return RunningService(proc, info["grpc"], info["redis"], log, info.get("http", ""))


def stop_service(svc: RunningService, sig: int = signal.SIGINT) -> int:
    os.kill(svc.proc.pid, sig)
    return svc.proc.wait(60)


@pytest.fixture(scope="module")
def service():
    svc = start_service("--decode-workers", "2")
    yield svc
    if svc.proc.poll() is None:
        stop_service(svc)


def generate(stub, *, prompt: str = "", ids: list[int] | None = None, max_tokens: int = 16,
             **sampling) -> tuple[list[int], str, list]:
    req = tandem_pb2.GenerateRequest(
        prompt=prompt, prompt_token_ids=ids or [],
        sampling=tandem_pb2.SamplingParams(max_tokens=max_tokens, **sampling))
    tokens: list[int] = []
    text = ""
    messages = list(stub.Generate(req, timeout=120))
    for m in messages:
        tokens += list(m.token_ids)
        text += m.text
    return tokens, text, messages
