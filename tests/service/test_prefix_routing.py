"""KV-aware routing through the real service (`tandem serve` on SmolLM2, CPU) with two
prefill workers: a repeated prefix goes to the worker that holds it, so the pool's hit
rate stays that of one worker."""

from __future__ import annotations

from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.gateway.proto import tandem_pb2
from tests.service.conftest import start_service, stop_service

SYSTEMS = [
    "You are a patient tutor for chemistry. Explain every step and check the units. " * 3,
    "You write short poems about the sea, always in four lines, never rhyming twice. " * 3,
]
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
    assert each[:2] == [0, 0] and all(c > 0 for c in each[2:]), each
    assert abs(two_rate - one_rate) <= 0.05, (one_rate, two_rate)
    prefill = [w for w in workers if w.role == "prefill"]
    assert len(prefill) == 2
