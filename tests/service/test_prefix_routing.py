"""KV-aware routing through the real service (`tandem serve` on SmolLM2, CPU) with two
prefill workers, and with two colocated workers: a repeated prefix goes to the worker
that holds it, so the pool's hit rate stays that of one worker."""

from __future__ import annotations

import time

import pytest

from tandem.core.config import CacheConfig
from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.core.sampling_params import SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.llm import LLM
from tandem.gateway.proto import tandem_pb2
from tests.service.conftest import generate, start_service, stop_service

SYSTEMS = [
    "You are a patient tutor for chemistry. Explain every step and check the units. " * 3,
    "You write short poems about the sea, always in four lines, never rhyming twice. " * 3,
]
GREEDY = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
QUESTIONS = ["What is salt?", "Why does ice float?", "Describe a wave.", "Name a gas."]


def _cached_and_prompt_tokens(svc) -> tuple[int, int, list[int]]:
    """Send every (system, question) pair in turn, systems interleaved; return the
    cached and prompt tokens summed over the answers, and each answer's cached tokens."""
    stub = svc.stub()
    cached, prompt, each = 0, 0, []
    for question in QUESTIONS:
        for system in SYSTEMS:
            req = tandem_pb2.GenerateRequest(
                prompt=system + question,
                sampling=tandem_pb2.SamplingParams(max_tokens=2, temperature=0.0),
            )
            last = list(stub.Generate(req, timeout=120))[-1]
            each.append(last.usage.cached_tokens)
            cached += last.usage.cached_tokens
            prompt += last.usage.prompt_tokens
    return cached, prompt, each


def _run(*flags: str) -> tuple[float, list[int], list]:
    svc = start_service(*flags)
    try:
        cached, prompt, each = _cached_and_prompt_tokens(svc)
        workers = list_workers(connect(svc.redis_url))
    finally:
        stop_service(svc)
    return cached / prompt, each, workers


def test_two_prefill_workers_route_a_repeated_prefix_to_its_holder():
    one_rate, _, _ = _run("--prefill-workers", "1")
    # A generous wait: on a loaded CPU a holder may not look at the stream for a while.
    two_rate, each, workers = _run("--prefill-workers", "2", "--prefix-route-wait-ms", "3000")
    # The first question of each system misses; every later one finds its system
    # prompt, wherever the first one was prefilled.
    assert each[:2] == [0, 0] and all(c > 0 for c in each[2:]), str(each)
    assert abs(two_rate - one_rate) <= 0.05, (one_rate, two_rate)
    prefill = [w for w in workers if w.role == "prefill"]
    assert len(prefill) == 2


@pytest.fixture(scope="module")
def uncached():
    config = EngineConfig(
        model="smollm2", device="cpu", cache=CacheConfig(enable_prefix_caching=False)
    )
    return LLM(config=config)


def _queried_by_worker(redis) -> dict[str, int]:
    """Each colocated worker's prompt tokens looked up in its cache since start, from
    registry entries written after now (every request asked about has ended, and a
    worker counts a request when it schedules it)."""
    now = time.time()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = [w for w in list_workers(redis) if w.role == "colocated"]
        if len(workers) == 2 and all(w.heartbeat > now for w in workers):
            return {w.worker_id: w.prefix_queried_tokens for w in workers}
        time.sleep(0.1)
    raise AssertionError("the colocated workers' registry entries were not refreshed")


def test_two_colocated_workers_route_a_repeated_prefix_to_its_holder(uncached):
    one_rate, _, _ = _run("--colocated-workers", "1", "--threads", "1")
    svc = start_service(
        "--colocated-workers", "2", "--threads", "1", "--prefix-route-wait-ms", "3000"
    )
    try:
        redis = connect(svc.redis_url)
        stub = svc.stub()
        queried = _queried_by_worker(redis)
        served_by: dict[str, list[str]] = {system: [] for system in SYSTEMS}
        cached, prompt, each = 0, 0, []
        for question in QUESTIONS:
            for system in SYSTEMS:
                tokens, _, messages = generate(
                    stub, prompt=system + question, max_tokens=3, temperature=0.0, ignore_eos=True
                )
                greedy = uncached.generate([system + question], GREEDY)[0]
                assert tokens == greedy.token_ids  # token-exact with caching off
                usage = messages[-1].usage
                each.append(usage.cached_tokens)
                cached += usage.cached_tokens
                prompt += usage.prompt_tokens
                # The worker that served it: the one whose looked-up tokens grew by it.
                now = _queried_by_worker(redis)
                (server,) = [w for w in now if now[w] - queried.get(w, 0) == usage.prompt_tokens]
                served_by[system].append(server)
                queried = now
        workers = list_workers(redis)
    finally:
        stop_service(svc)
    # The first question of each system misses; every later one goes to the worker that
    # prefilled its system prompt first, and finds it there.
    assert each[:2] == [0, 0] and all(c > 0 for c in each[2:]), str(each)
    for system, servers in served_by.items():
        assert servers == [servers[0]] * len(QUESTIONS), (system[:20], servers)
    two_rate = cached / prompt
    assert abs(two_rate - one_rate) <= 0.05, (one_rate, two_rate)
    colocated = [w for w in workers if w.role == "colocated"]
    assert len(colocated) == 2
    assert sum(w.prefix_hit_tokens for w in colocated) == cached
