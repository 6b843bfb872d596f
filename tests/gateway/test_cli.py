"""The gateway's command line: documented defaults, one-line errors, structured logs."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tandem.cli import build_parser
from tandem.local_redis import LocalRedis
from tests.gateway.fake_worker import FakeWorker
from tests.gateway.test_packaging import read_line

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(module: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("gateway", ["--http-port HTTP_PORT", "(default: 8000)", "(default: 50051)",
                     "redis://127.0.0.1:6379/0", "--api-key-file", "(default: text)"]),
        ("serve", ["--http-port HTTP_PORT", "(default: 8000)", "(default: 127.0.0.1)"]),
    ],
)  # fmt: skip
def test_help_shows_defaults(
    command: str, expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([command, "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for fragment in expected:
        assert fragment in text, fragment


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


@pytest.mark.parametrize("which", ["http", "grpc"])
def test_port_in_use_is_a_one_line_error(
    which: str, busy_port: int, model_dir: Path, redis_server: LocalRedis
) -> None:
    ports = {"http": "0", "grpc": "0", which: str(busy_port)}
    # The `tandem gateway` command and the module it runs report the same way.
    module = "tandem.cli" if which == "http" else "tandem.gateway.main"
    command = ("gateway",) if module == "tandem.cli" else ()
    result = run(
        module, *command, "--model-dir", str(model_dir), "--redis-url", redis_server.url,
        "--grpc-port", ports["grpc"], "--http-port", ports["http"],
    )  # fmt: skip
    assert result.returncode == 2
    name = "HTTP" if which == "http" else "gRPC"
    assert result.stderr.strip() == (
        f"tandem gateway: error: {name} port {busy_port} on 127.0.0.1 is already in use"
    )


@pytest.mark.parametrize("model", ["no-such-model", "/nonexistent/checkpoint"])
def test_unknown_model_is_a_one_line_error(model: str) -> None:
    result = run("tandem.gateway.main", "--model", model, "--http-port", "0", "--grpc-port", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "model" in lines[0] and "not found" in lines[0], lines


def test_json_logs_carry_request_ids(
    model_dir: Path, redis_server: LocalRedis, fake_worker: FakeWorker
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.gateway.main", "--model-dir", str(model_dir), "--redis-url", redis_server.url, "--grpc-port", "0",
         "--http-port", "0", "--log-format", "json"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        line = read_line(proc, timeout=20)
        http = dict(kv.split("=", 1) for kv in line.split()[2:])["http"]
        body = json.dumps({"prompt": "hello", "max_tokens": 3}).encode()
        req = urllib.request.Request(f"http://{http}/v1/completions", body,
                                     {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as res:
            answer = json.loads(res.read())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    records = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    rid = fake_worker.tasks[-1].request_id
    mine = [r for r in records if r.get("request_id") == rid]
    assert any("queued" in r["message"] for r in mine), records
    assert any("finished (length)" in r["message"] for r in mine), records
    assert any(r.get("request_id") == answer["id"] for r in records)


def _readme_tables() -> dict[str, set[str]]:
    """Flags listed in the README's configuration reference, by table heading."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    tables: dict[str, set[str]] = {}
    heading = ""
    for line in section.splitlines():
        if line.startswith("**"):
            heading = line
            tables[heading] = set()
        elif line.startswith("| `--") and heading:
            tables[heading].add(line.split("`")[1])
    return tables


def _flags(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {o for a in sub.choices[command]._actions for o in a.option_strings if o != "-h"
            and o != "--help"}  # fmt: skip


def test_readme_configuration_reference_is_accurate() -> None:
    tables = _readme_tables()
    by_command = {"serve": [], "gateway": [], "prefill": [], "decode": []}
    for heading, flags in tables.items():
        for command in by_command:
            if f"`tandem {command}`" in heading or (
                "Engine flags" in heading and command != "gateway"
            ):
                by_command[command].append(flags)
    for command, tables_of in by_command.items():
        assert tables_of, command
        documented = set().union(*tables_of)
        real = _flags(command)
        assert documented <= real, (command, documented - real)
        if command == "gateway":  # the gateway's own reference is complete
            assert real <= documented, real - documented
