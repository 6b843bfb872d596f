"""The gateway as shipped: current stubs, no torch, a process that starts and stops cleanly."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tandem.gateway.proto import generate as proto_generate
from tandem.local_redis import LocalRedis

REPO = Path(__file__).resolve().parents[2]


def test_committed_stubs_are_current(tmp_path: Path) -> None:
    for fresh in proto_generate.generate(tmp_path):
        committed = proto_generate.OUT_DIR / fresh.name
        assert committed.read_text() == fresh.read_text(), (
            f"{committed} is stale: run .venv/bin/python -m tandem.gateway.proto.generate"
        )


def test_gateway_imports_no_torch() -> None:
    code = (
        "import sys, tandem.gateway.server, tandem.gateway.main, tandem.gateway.app, tandem.gateway.client, "
        "tandem.gateway.http_api, tandem.gateway.http_server, tandem.gateway.metrics, tandem.gateway.execution; "
        "bad = [m for m in ('torch', 'transformers', 'tandem.engine') if m in sys.modules]; "
        "assert not bad, bad"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def test_process_serves_and_exits_on_sigterm(model_dir: Path, redis_server: LocalRedis) -> None:
    args = [
        sys.executable,
        "-m",
        "tandem.gateway.main",
        "--model",
        "smollm2",
        "--model-dir",
        str(model_dir),
        "--redis-url",
        redis_server.url,
        "--grpc-port",
        "0",
        "--http-port",
        "0",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        line = read_line(proc, timeout=10)
        assert line.startswith("gateway ready grpc=127.0.0.1:"), (line, proc.stderr)
        fields = dict(kv.split("=", 1) for kv in line.split()[2:])
        port = int(fields["grpc"].rsplit(":", 1)[1])
        http_port = int(fields["http"].rsplit(":", 1)[1])
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - start < 8
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)  # reaps it and closes the pipes
