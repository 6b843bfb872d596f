"""A real compose stack for tests: the images from compose/offline_build.py, brought up
by docker-compose (v1, the only one installable here) from compose/docker-compose.yml on
CPU, and reached only through the gateway's ports published on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from tandem.gateway.proto import tandem_pb2_grpc
from tandem.local_redis import free_port

REPO = Path(__file__).resolve().parents[2]
COMPOSE_DIR = REPO / "compose"
DOCKER = os.environ.get("DOCKER", "docker")
DOCKER_COMPOSE = os.environ.get("DOCKER_COMPOSE", "docker-compose")
IMAGE_TAG = "compose-test"
# The test session's stack, for tests/compose/conftest.py to attach its logs to a failure.
STACK_KEY = pytest.StashKey["Stack"]()
WORKERS = {"prefill": 2, "decode": 2}
# No proxy between the test and 127.0.0.1, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def docker(*args: str, check: bool = True, timeout: float = 120) -> str:
    done = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def engine_unavailable_reason() -> str | None:
    try:
        done = subprocess.run([DOCKER, "info", "--format", "{{.ServerVersion}}"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no Docker client or engine ({DOCKER}): {exc}"
    if done.returncode != 0:
        return f"no Docker engine answers ({DOCKER} info): {done.stderr.strip()[-300:]}"
    try:
        subprocess.run([DOCKER_COMPOSE, "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no docker-compose ({DOCKER_COMPOSE}): {exc}"
    return None


def build_images() -> dict[str, str]:
    """The base, gateway and worker images (cached base and wheelhouse, layer cache)."""
    out = subprocess.run([sys.executable, str(COMPOSE_DIR / "offline_build.py"), "--tag", IMAGE_TAG],
                         capture_output=True, text=True, timeout=3600)  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(
            f"compose/offline_build.py failed:\n{out.stdout[-3000:]}{out.stderr[-6000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_variant(target: Path) -> Path:
    """compose/docker-compose.yml without the workers' GPU reservations (docker-compose
    v1 overrides can add to a service, never remove); every other line is the real file."""
    spec = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    for role in WORKERS:
        del spec["services"][role]["deploy"]
    target.write_text(yaml.safe_dump(spec, sort_keys=False))
    return target


@dataclass
class Stack:
    project: str
    file: Path
    env: dict[str, str]
    http_port: int
    grpc_port: int
    log_file: Path  # the services' logs, saved before the stack goes down

    def compose(self, *args: str, timeout: float = 600) -> str:
        cmd = [DOCKER_COMPOSE, "--project-name", self.project, "--project-directory",
               str(COMPOSE_DIR), "--file", str(self.file), *args]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[1:])}: {done.stderr[-3000:]}")
        return done.stdout

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def stub(self) -> tandem_pb2_grpc.GenerationStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.grpc_port}",
                                        options=[("grpc.enable_http_proxy", 0)])  # fmt: skip
        return tandem_pb2_grpc.GenerationStub(channel)

    def get(self, path: str) -> tuple[int, str]:
        try:
            with _OPENER.open(self.http_url + path, timeout=10) as res:
                return res.status, res.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()
        except OSError as err:  # not listening yet, reset while it restarts
            return 0, str(err)

    def post(self, path: str, body: dict) -> str:
        req = urllib.request.Request(self.http_url + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})  # fmt: skip
        with _OPENER.open(req, timeout=120) as res:
            return res.read().decode()

    def containers(self, service: str) -> list[str]:
        """Ids of the service's containers, running or not."""
        return docker("ps", "--all", "--quiet", "--no-trunc", "--filter",
                      f"label=com.docker.compose.project={self.project}", "--filter",
                      f"label=com.docker.compose.service={service}").split()  # fmt: skip

    def state(self, container: str) -> dict:
        return json.loads(docker("inspect", "--format", "{{json .State}}", container)) | {
            "RestartCount": int(docker("inspect", "--format", "{{.RestartCount}}", container))
        }

    def crash(self, container: str) -> None:
        """SIGKILL the container's process from the host, as a crash or the OOM killer
        would. (`docker kill` is a deliberate stop to Docker: no restart policy undoes it.)"""
        os.kill(self.state(container)["Pid"], signal.SIGKILL)

    def workers(self) -> dict[str, dict[str, float]]:
        """worker_id -> its figures, from the gateway's /metrics (the registry's view)."""
        status, text = self.get("/metrics")
        found: dict[str, dict[str, float]] = {}
        if status != 200:
            return found
        for name, labels, value in re.findall(
            r"^tandem_worker_(\w+)\{([^}]*)\} (\S+)$", text, re.M
        ):
            label = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            found.setdefault(label["worker_id"], {"role": label["role"]})[name] = float(value)
        return found

    def fresh_decoders(self, since: float) -> dict[str, dict[str, float]] | None:
        """The decode workers' figures, or None unless there are exactly WORKERS["decode"]
        of them and each one's last heartbeat was sent after `since` (time.time()): the
        registry is refreshed once a second, so older figures may describe an earlier
        moment (a finished request still running, a new one not yet there)."""
        asked_at = time.time()
        decoders = {w: f for w, f in self.workers().items() if f["role"] == "decode"}
        # The gateway computes each age on the host's clock after asked_at, so a
        # heartbeat was sent no earlier than asked_at - age.
        if len(decoders) != WORKERS["decode"] or any(
            asked_at - f.get("heartbeat_age_seconds", asked_at) <= since for f in decoders.values()
        ):
            return None
        return decoders

    def wait_for_decoders(self, since: float, cond, what: str, timeout: float = 120) -> dict:
        """The first fresh_decoders(since) that satisfies `cond`."""
        seen: list[dict] = []

        def check() -> bool:
            decoders = self.fresh_decoders(since)
            if decoders is not None and cond(decoders):
                seen.append(decoders)
                return True
            return False

        self.wait_for(check, what, timeout)
        return seen[-1]

    def wait_for(self, cond, what: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {timeout:.0f} s")
            time.sleep(1)

    def ready(self) -> bool:
        live = [
            w["role"] for w in self.workers().values() if w.get("heartbeat_age_seconds", 99) < 5
        ]
        return self.get("/ready")[0] == 200 and all(
            live.count(role) == n for role, n in WORKERS.items()
        )

    def steady(self, seconds: float = 5) -> bool:
        """Ready, and still ready with every heartbeat fresh `seconds` later."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.ready():
                return False
            time.sleep(1)
        return True

    def logs(self, lines: int = 100) -> str:
        """Each container's last `lines` log lines, stdout and stderr in order, earlier
        runs of a restarted container included."""
        parts = []
        for service in ("redis", "gateway", *WORKERS):
            for container in self.containers(service):
                cmd = [DOCKER, "logs", "--timestamps", "--tail", str(lines), container]
                try:
                    text = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, timeout=60).stdout  # fmt: skip
                except (OSError, subprocess.TimeoutExpired) as exc:
                    text = f"(no logs: {exc})"
                parts.append(f"----- {service} {container[:12]} -----\n{text}")
        return "\n".join(parts)

    def saved_logs(self) -> str:
        """The containers' logs now, or those saved when the stack went down."""
        try:
            if self.containers("gateway"):
                return self.logs()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            return f"(no logs: {exc})"
        if self.log_file.exists():
            return self.log_file.read_text()
        return "(the stack is down and left no logs)"

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        return [*docker("ps", "--all", "--quiet", "--filter", label).split(),
                *docker("volume", "ls", "--quiet", "--filter", label).split(),
                *docker("network", "ls", "--quiet", "--filter", label).split()]  # fmt: skip


def start_stack(images: dict[str, str], workdir: Path) -> Stack:
    """`docker-compose up -d --scale prefill=2 --scale decode=2` on CPU, no build."""
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "TANDEM_IMAGE_TAG": IMAGE_TAG,
        "TANDEM_REDIS_IMAGE": images["base"],  # Debian's redis-server: no Docker Hub
        "TANDEM_DEVICE": "cpu",
        "TANDEM_NUM_BLOCKS": "256",
        "TANDEM_THREADS": "1",
        "TANDEM_PUBLISH_HOST": "127.0.0.1",
        "TANDEM_HTTP_PORT": str(http_port),
        "TANDEM_GRPC_PORT": str(grpc_port),
    }
    stack = Stack(f"tandemtest{os.getpid()}", cpu_variant(workdir / "docker-compose.cpu.yml"),
                  env, http_port, grpc_port, workdir / "compose-stack.log")  # fmt: skip
    scale = [a for role, n in WORKERS.items() for a in ("--scale", f"{role}={n}")]
    stack.compose("up", "--detach", "--no-build", *scale)
    return stack


def stop_stack(stack: Stack) -> None:
    """`docker-compose down -v`, the services' logs kept in `stack.log_file` first."""
    if stack.containers("gateway"):
        stack.log_file.write_text(stack.logs(400))
        print(f"the stack's logs: {stack.log_file}")
    stack.compose("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=300)
