"""Faults inside the workers of `tandem serve` itself (the command users run), injected
from outside the service: serve starts with tests/faults/serve_hooks first on its
PYTHONPATH, whose sitecustomize installs tests.faults.engine_hooks in the worker
processes TANDEM_TEST_HOOKS names. Each scenario ends with no worker exited or
restarted (same processes, no restart in serve's log) and no block, sequence or
reservation left on any role.

- A step that raises for one request (as the sampler did for a top_k of 2**63): that
  request ends with INTERNAL, the requests batched with it finish token-exact.
- A prefill held past the decode worker's reservation lease (`--reservation-lease`):
  the prefill worker renews the reservation, the request completes token-exact.
- A gRPC client that stops reading: cut after `--stream-write-timeout`
  (DEADLINE_EXCEEDED), its request aborted on the workers, another stream untouched.

Token-exact: equal to the same greedy requests through the same service undisturbed
(the in-process engine's answers equal those: tests/service/test_end_to_end.py; the
engine is not loaded here, where it took a minute of CPU beside the service's workers).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest

from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.gateway.proto import tandem_pb2, tandem_pb2_grpc
from tests.service.conftest import (
    RunningService,
    assert_every_worker_clean,
    start_service,
    stop_service,
    wait_for,
)

HOOKS_DIR = Path(__file__).resolve().parents[1] / "faults" / "serve_hooks"
MARK = 4242  # the hooked sampler raises for a prompt starting with this token
PROMPTS = [[1780, 314, 260, 3458], [504, 2143, 314, 906, 253], [30, 5104, 28, 2019]]
TOKENS = 48  # per stream: the marked request joins their batch well before they end
LEASE_S = 2.0
WRITE_TIMEOUT_S = 1.0
STALLED_TOKENS = 4000  # minutes of CPU decoding: the abort, not the end, frees it


def start_hooked(hooks: dict[str, dict[str, list]], *flags: str) -> RunningService:
    """`tandem serve` whose workers get `hooks` (role subcommand -> hook -> args)."""
    path = [str(HOOKS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "TANDEM_TEST_HOOKS": json.dumps(hooks),
    }
    return start_service(*flags, env=env)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("hooks")
    return {"record": base / "failed-batches", "hold": base / "hold"}


@pytest.fixture(scope="module")
def disaggregated(files):
    """One prefill and one decode worker: the decode worker's sampler fails the marked
    request; the prefill worker's steps wait while the hold file exists."""
    hooks = {
        "decode": {"fail_token": [MARK, str(files["record"])]},
        "prefill": {"hold_steps": [str(files["hold"])]},
    }
    svc = start_hooked(
        hooks,
        "--reservation-lease", str(LEASE_S),
        "--stream-write-timeout", str(WRITE_TIMEOUT_S),
    )  # fmt: skip
    try:
        yield svc
    finally:
        stop_service(svc)


@pytest.fixture(scope="module")
def colocated(files):
    hooks = {"worker": {"fail_token": [MARK, str(files["record"])]}}
    svc = start_hooked(hooks, "--colocated-workers", "1")
    try:
        yield svc
    finally:
        stop_service(svc)


def processes(svc: RunningService) -> dict[int, str]:
    """pid -> command line of everything serve runs (workers, gateway, redis-server)."""
    return {
        p.pid: " ".join(p.cmdline()) for p in psutil.Process(svc.proc.pid).children(recursive=True)
    }


def worker_pids(svc: RunningService) -> set[int]:
    return {w.pid for w in list_workers(connect(svc.redis_url))}


class Unchanged:
    """The same processes and registered workers at the end as at the start, and no
    restart in serve's log."""

    def __init__(self, svc: RunningService) -> None:
        self.svc = svc
        self.procs, self.workers = processes(svc), worker_pids(svc)
        self.log_at = len(svc.log)

    def check(self) -> None:
        assert processes(self.svc) == self.procs
        assert worker_pids(self.svc) == self.workers
        assert not [line for line in self.svc.log[self.log_at :] if "restarting it" in line]


def stream(stub, prompt: str | list[int], max_tokens: int, result: dict) -> None:
    """Run one greedy stream into `result`: tokens, then "error" (a status) or "done"."""
    req = tandem_pb2.GenerateRequest(
        prompt=prompt if isinstance(prompt, str) else "",
        prompt_token_ids=prompt if isinstance(prompt, list) else [],
        sampling=tandem_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    try:
        for msg in stub.Generate(req, timeout=300):
            result["tokens"] += list(msg.token_ids)
        result["done"] = True
    except grpc.RpcError as exc:
        result["error"] = exc.code()


def in_background(stub, prompt: str | list[int], max_tokens: int):
    result: dict = {"tokens": []}
    thread = threading.Thread(target=stream, args=(stub, prompt, max_tokens, result), daemon=True)
    thread.start()
    return result, thread


def joined(thread: threading.Thread) -> None:
    thread.join(300)
    assert not thread.is_alive(), "a stream hangs"


def greedy(svc: RunningService, prompts: list, max_tokens: int) -> list[list[int]]:
    """The service's undisturbed answers to `prompts`, streamed at once."""
    runs = [in_background(svc.stub(), p, max_tokens) for p in prompts]
    for result, thread in runs:
        joined(thread)
        assert result.get("done") and len(result["tokens"]) == max_tokens, result
    return [result["tokens"] for result, _ in runs]


@pytest.mark.parametrize("layout", ["disaggregated", "colocated"])
def test_a_request_whose_step_raises_fails_alone_and_its_batch_finishes(layout, request, files):
    svc = request.getfixturevalue(layout)
    files["record"].unlink(missing_ok=True)
    unchanged = Unchanged(svc)
    expected = greedy(svc, PROMPTS, TOKENS)
    assert not files["record"].exists()
    stub = svc.stub()
    others = [in_background(stub, p, TOKENS) for p in PROMPTS]
    wait_for(lambda: all(r["tokens"] for r, _ in others), "every stream to decode", svc)
    bad, bad_thread = in_background(stub, [MARK, 314, 260], TOKENS)
    joined(bad_thread)
    for _, thread in others:
        joined(thread)
    finished_at = time.time()

    assert bad.get("error") == grpc.StatusCode.INTERNAL, bad
    assert [r.get("error") for r, _ in others] == [None] * len(PROMPTS)
    assert [r["tokens"] for r, _ in others] == expected, "token-exact"
    # The failing step held the marked request beside others; halving found it alone.
    batches = files["record"].read_text().split()
    assert int(batches[0]) > 1 and batches[-1] == "1", batches
    assert_every_worker_clean(svc, finished_at)
    unchanged.check()
    assert greedy(svc, PROMPTS, TOKENS) == expected  # and the worker serves on


def test_a_prefill_longer_than_the_lease_keeps_its_reservation_and_completes(disaggregated, files):
    svc, hold = disaggregated, files["hold"]
    prompt = "A reservation outlives its lease while the prefill worker still wants it:"
    unchanged = Unchanged(svc)
    [expected] = greedy(svc, [prompt], 12)
    redis = connect(svc.redis_url)

    def decode_worker():
        (worker,) = list_workers(redis, role="decode")
        return worker

    hold.touch()
    try:
        result, thread = in_background(svc.stub(), prompt, 12)
        wait_for(lambda: decode_worker().reservations == 1, "the decode worker to reserve", svc)
        seen_at = decode_worker().heartbeat
        # The prefill is held well past the lease: three leases of decode heartbeats.
        wait_for(
            lambda: decode_worker().heartbeat > seen_at + 3 * LEASE_S,
            "decode heartbeats three leases later",
            svc,
        )
        held = decode_worker()
        assert held.reservations == 1, "the decode worker freed a reservation still wanted"
        assert held.used_blocks > 0
        assert not result["tokens"], "the prefill was held: no first token yet"
    finally:
        hold.unlink(missing_ok=True)
    joined(thread)
    finished_at = time.time()

    assert result.get("done"), result
    assert result["tokens"] == expected, "token-exact"
    assert not [line for line in svc.log[unchanged.log_at :] if "handoff of" in line]
    assert_every_worker_clean(svc, finished_at)
    unchanged.check()


def test_a_grpc_client_that_stops_reading_is_cut_and_its_request_aborted(disaggregated):
    svc = disaggregated
    unchanged = Unchanged(svc)
    [expected] = greedy(svc, ["List three fruits:"], 24)
    # A flow-control window of 1 KiB that never grows (no BDP probing): a reader that
    # stops taking messages stops the gateway's writes within a few messages (~240
    # bytes each with top logprobs). With the default 64 KiB window it took ~400
    # tokens, 40 s of CPU decoding.
    options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    channel = grpc.insecure_channel(svc.target, options=options)
    req = tandem_pb2.GenerateRequest(
        prompt="Write a very long story about a lighthouse keeper.",
        sampling=tandem_pb2.SamplingParams(
            max_tokens=STALLED_TOKENS, temperature=0.0, ignore_eos=True, logprobs=20
        ),
    )
    stalled = tandem_pb2_grpc.GenerationStub(channel).Generate(req, timeout=300)
    try:
        first = next(stalled)  # the stream started; now read nothing more
        other, thread = in_background(svc.stub(), "List three fruits:", 24)
        joined(thread)
        assert other.get("done") and other["tokens"] == expected
        # The cut aborts the request on the workers: nothing held, long before its end.
        assert_every_worker_clean(svc, time.time(), timeout=120)
        # The client, reading again, finds its stream ended with an explicit status.
        received = len(first.token_ids)
        with pytest.raises(grpc.RpcError) as failed:
            for msg in stalled:
                received += len(msg.token_ids)
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, failed.value
        assert received < STALLED_TOKENS
    finally:
        stalled.cancel()
        channel.close()
    unchanged.check()
