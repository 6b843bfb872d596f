"""A real service for tests: `tandem serve` as a subprocess (private redis-server,
worker processes, gateway), reached over real gRPC."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import psutil
import pytest

from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.core.sampling_params import SamplingParams
from tandem.gateway.proto import tandem_pb2, tandem_pb2_grpc
from tandem.local_redis import die_with_parent, free_port

PROMPTS = [
    "The history of the Roman Empire",
    "def add(a, b):",
    "Les fleurs du printemps",
    "量子コンピュータとは",
    "List three fruits:",
]


@dataclass
class RunningService:
    proc: subprocess.Popen
    target: str
    redis_url: str
    log: list[str]
    http: str = ""  # HOST:PORT of the OpenAI-style HTTP API
    state_dir: str = ""  # --state-dir: the bundled Redis's append-only file

    @property
    def http_url(self) -> str:
        return f"http://{self.http}"

    def stub(self) -> tandem_pb2_grpc.GenerationStub:
        channel = grpc.insecure_channel(self.target)
        return tandem_pb2_grpc.GenerationStub(channel)


def start_service(
    *extra: str, ready_timeout: float = 240.0, env: dict[str, str] | None = None
) -> RunningService:
    """`tandem serve` with free ports and a state directory of its own; `extra` flags are
    appended (they may override); `env`: its environment (None: inherited). Whatever
    happens, stop_service() removes it all."""
    port = free_port()
    state = tempfile.mkdtemp(prefix="tandem-state-")
    http = [] if "--http-port" in extra else ["--http-port", str(free_port())]
    cmd = [
        sys.executable,
        "-m",
        "tandem.cli",
        "--log-level",
        "INFO",
        "serve",
        "--model",
        "smollm2",
        "--device",
        "cpu",
        "--grpc-port",
        str(port),
        "--num-blocks",
        "512",
        "--state-dir",
        state,
        *http,
        *extra,
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_parent,  # a killed test run leaves no service behind
        env=env,
    )
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
    svc = RunningService(proc, "", "", log, state_dir=state)
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_service(svc, signal.SIGTERM)
            raise RuntimeError("service did not start:\n" + "".join(log[-60:]))
    svc.target, svc.redis_url, svc.http = info["grpc"], info["redis"], info.get("http", "")
    return svc


def stop_service(svc: RunningService, sig: int = signal.SIGINT) -> int | None:
    """Signal the launcher (it stops its children), SIGKILL it if it hangs (its children
    then die with it), and remove its state directory; its exit status."""
    if svc.proc.poll() is None:
        os.kill(svc.proc.pid, sig)
    try:
        return svc.proc.wait(60)
    except subprocess.TimeoutExpired:
        svc.proc.kill()
        svc.proc.wait()
        return None
    finally:
        shutil.rmtree(svc.state_dir, ignore_errors=True)


def wait_for(cond, what: str, svc: RunningService, timeout: float = 120.0) -> None:
    """Until cond() holds (an exception from a process or socket not there yet is a no);
    the service exiting meanwhile fails at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except (LookupError, OSError, psutil.Error):
            pass
        assert svc.proc.poll() is None, "tandem serve exited:\n" + "".join(svc.log[-40:])
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}:\n" + "".join(svc.log[-40:]))


@pytest.fixture(scope="module")
def uncached():
    """The in-process engine with prefix caching off: the answers a cached path must give."""
    from tandem.core.config import CacheConfig
    from tandem.engine.engine import EngineConfig
    from tandem.engine.llm import LLM

    config = EngineConfig(
        model="smollm2", device="cpu", cache=CacheConfig(enable_prefix_caching=False)
    )
    return LLM(config=config)


@pytest.fixture(scope="module")
def engine():
    from tandem.engine.llm import LLM

    return LLM("smollm2", device="cpu")


@pytest.fixture(scope="module")
def service():
    svc = start_service("--decode-workers", "2")
    try:
        yield svc
    finally:
        stop_service(svc)


def generate(
    stub, *, prompt: str = "", ids: list[int] | None = None, max_tokens: int = 16, **sampling
) -> tuple[list[int], str, list]:
    req = tandem_pb2.GenerateRequest(
        prompt=prompt,
        prompt_token_ids=ids or [],
        sampling=tandem_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
    )
    tokens: list[int] = []
    text = ""
    messages = list(stub.Generate(req, timeout=120))
    for m in messages:
        tokens += list(m.token_ids)
        text += m.text
    return tokens, text, messages


def solo(engine, prompt: str | list[int], max_tokens: int):
    """The in-process engine's greedy answer."""
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([prompt], sp)[0]


def check_concurrent_streams(svc: RunningService, engine, n: int) -> None:
    """`n` concurrent greedy streams of mixed prompts and lengths equal the engine's."""
    rng = random.Random(3)
    jobs = [
        (rng.choice(PROMPTS) + " " * rng.randrange(3) + str(i), rng.randrange(4, 33))
        for i in range(n)
    ]
    stub = svc.stub()
    with ThreadPoolExecutor(n) as pool:
        results = list(
            pool.map(
                lambda j: generate(
                    stub, prompt=j[0], max_tokens=j[1], temperature=0.0, ignore_eos=True
                )[0],
                jobs,
            )
        )
    want = engine.generate(
        [p for p, _ in jobs],
        [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for _, m in jobs],
    )
    assert results == [w.token_ids for w in want]


def check_cancel_frees_every_block(svc: RunningService) -> None:
    """A stream cancelled mid-generation leaves no block or sequence on any worker."""
    req = tandem_pb2.GenerateRequest(
        prompt="Tell me a very long story about dragons.",
        sampling=tandem_pb2.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True),
    )
    call = svc.stub().Generate(req, timeout=120)
    received = 0
    for msg in call:
        received += len(msg.token_ids)
        if received >= 5:
            call.cancel()
            break
    cancelled_at = time.time()
    assert received >= 5
    assert_every_worker_clean(svc, cancelled_at)


def assert_every_worker_clean(svc: RunningService, since: float, timeout: float = 30.0) -> None:
    """Every worker, of every role, holds no block, sequence, waiting request or
    reservation, as its
    registry entries refreshed after `since` show. Older entries prove nothing: a
    worker's last entry may predate its own cleanup by up to a heartbeat, so a test that
    waited on some roles and then asserted on all once read a prefill worker's stale
    entry from while it shipped the request."""
    redis = connect(svc.redis_url)

    def clean(workers) -> bool:
        return bool(workers) and all(
            w.heartbeat > since
            and w.used_blocks == 0
            and w.running == 0
            and w.waiting == 0
            and w.reservations == 0
            for w in workers
        )

    deadline = time.monotonic() + timeout  # generous: CI machines may be loaded
    while time.monotonic() < deadline and not clean(list_workers(redis)):
        time.sleep(0.2)
    workers = list_workers(redis)
    assert clean(workers), workers
