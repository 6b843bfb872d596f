"""`tandem serve` as a child of `tandem bench serve`: the command line of each mode, free
ports, readiness, death detection, and a stop that leaves no process behind.

Modes (GPU indices are physical: each worker gets CUDA_VISIBLE_DEVICES from the lists):
- `colocated`: one colocated (prefill + decode) worker per GPU of --gpus.
- `1p1d`: one prefill and one decode worker; on GPUs 0 and 1 with --gpus 2, both on
  GPU 0 with --gpus 1, where each gets half of --gpu-memory-utilization.
- `1p1d-local`: `1p1d` whose decode worker also prefills while the prefill worker is
  backed up (`--local-prefill-after-ms`, `--max-local-prefills`: core.local_prefill),
  with its own prompt tokens per step (`--local-prefill-tokens`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from tandem.bench.serve_stats import prompts_prefilled

MODES = ("colocated", "1p1d", "1p1d-local")
DISAGGREGATED = ("1p1d", "1p1d-local")
REPO_ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1


class ServiceError(RuntimeError):
    """The service did not start, or died under load; the message has its last lines."""


def engine_argv(
    args: argparse.Namespace,
    add_engine_args: Callable[[argparse.ArgumentParser], None],
    **overrides: object,
) -> list[str]:
    """The engine flags of `args` as a command line, read off the parser that defined
    them, so a new engine flag travels to the workers with no change here."""
    parser = argparse.ArgumentParser(add_help=False)
    add_engine_args(parser)
    argv: list[str] = []
    for action in parser._actions:
        value = overrides.get(action.dest, getattr(args, action.dest, None))
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
            if value is not None and value != action.default:
                argv.append(flag)
            continue
        if value is not None:
            argv += [flag, str(value)]
    return argv


def mode_argv(
    mode: str, gpus: int, on_gpu: bool, local_prefill: tuple[float, int, int] | None = None
) -> list[str]:
    """`tandem serve` flags placing the workers of `mode` on GPUs 0..gpus-1;
    `local_prefill`: (after ms, most at once, prompt tokens per step or 0) of the
    `1p1d-local` decode worker."""
    if gpus < 1:
        raise ValueError("--gpus must be at least 1")
    if mode == "colocated":
        flags = ["--colocated-workers", str(gpus)]
        if on_gpu:
            flags += ["--colocated-gpus", ",".join(str(i) for i in range(gpus))]
        return flags
    if mode in DISAGGREGATED:
        flags = ["--prefill-workers", "1", "--decode-workers", "1"]
        if on_gpu:
            flags += ["--prefill-gpus", "0", "--decode-gpus", "1" if gpus >= 2 else "0"]
        if mode == "1p1d-local":
            if local_prefill is None:
                raise ValueError("mode 1p1d-local needs its decode worker's local prefill")
            after_ms, most, tokens = local_prefill
            flags += [
                "--local-prefill-after-ms",
                f"{after_ms:g}",
                "--max-local-prefills",
                str(most),
            ]
            if tokens:
                flags += ["--local-prefill-tokens", str(tokens)]
        return flags
    raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")


def shares_one_gpu(mode: str, gpus: int, on_gpu: bool) -> bool:
    return on_gpu and mode in DISAGGREGATED and gpus == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: the kernel sends SIGTERM if the bench dies, and
    `tandem serve` then stops its own children."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _descendants(root: int) -> dict[int, str]:
    """pid -> start time of every live process below `root` (Linux /proc); the start
    time tells a recycled pid from ours."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat_fields(int(entry))) is not None:
            children[int(stat[1])].append(int(entry))
            starts[int(entry)] = stat[19]
    found: dict[int, str] = {}
    stack = [root]
    while stack:
        for pid in children.get(stack.pop(), ()):
            found[pid] = starts[pid]
            stack.append(pid)
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat fields after the command name (state, ppid, ...), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2 :].split()


class LaunchedService:
    """One `tandem serve` run; its output goes to `log_path`, the last lines are kept
    for error messages."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.host = "127.0.0.1"
        self.grpc_port, self.http_port = free_port(), free_port()
        self.log_path = log_path
        self.cmd = [
            sys.executable,
            "-m",
            "tandem.cli",
            "--log-level",
            "WARNING",
            "serve",
            "--host",
            self.host,
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            *argv,
        ]
        self.env = env or {}  # set for the service's processes, beside this one's
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._ready = threading.Event()
        self._known: dict[int, str] = {}

    def grpc_target(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def http_target(self) -> str:
        return f"{self.host}:{self.http_port}"

    def prompts_prefilled(self) -> dict[str, int]:
        """Prompts each role prefilled since start (serve_stats.prompts_prefilled)."""
        with urllib.request.urlopen(f"http://{self.http_target()}/metrics", timeout=5) as r:
            return prompts_prefilled(r.read().decode())

    def start(self, ready_timeout_s: float) -> None:
        env = {**os.environ, **self.env}
        # The child runs the same code as this bench, whichever checkout that is.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        print(f"starting: {shlex.join(self.cmd)}\n  log: {self.log_path}", flush=True)
        t0 = time.monotonic()
        log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=REPO_ROOT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        threading.Thread(target=self._pump, args=(log,), daemon=True).start()
        deadline = t0 + ready_timeout_s
        while not self._ready.wait(0.5):
            if (why := self._exit_status()) is not None:
                raise ServiceError(f"{why} before it was ready{self._last_lines()}")
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"tandem serve not ready after {ready_timeout_s:.0f}s{self._last_lines()}"
                )
        self.startup_s = time.monotonic() - t0
        self._known.update(_descendants(self.proc.pid))
        print(f"ready in {self.startup_s:.1f}s", flush=True)

    def _pump(self, log) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        with log:
            for line in self.proc.stdout:
                log.write(line)
                log.flush()
                self._tail.append(line)
                if line.startswith("tandem ready:"):
                    self._ready.set()

    def _last_lines(self) -> str:
        return f"; last lines of {self.log_path}:\n" + "".join(self._tail)

    def _exit_status(self) -> str | None:
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"tandem serve exited with status {self.proc.returncode}"

    def dead(self) -> str | None:
        """Why the service is gone, with its last lines; None while it runs."""
        why = self._exit_status()
        return None if why is None else why + self._last_lines()

    def stop(self, timeout_s: float = 90.0) -> None:
        """SIGTERM (it stops its workers, gateway and redis), then SIGKILL to whatever
        of its process tree is still there."""
        if self.proc is None:
            return
        self._known.update(_descendants(self.proc.pid))
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid, started in self._known.items():
            if (stat := _stat_fields(pid)) is not None and stat[19] == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None
