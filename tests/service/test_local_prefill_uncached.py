"""Conditional disaggregation by uncached length through `tandem serve` (1 prefill + 1
decode worker on SmolLM2, CPU, P/D over zmq): with --local-prefill-uncached-tokens the
decode worker that holds a conversation's previous turn prefills a next turn that adds
few tokens itself (no prefill worker, no transfer), and a next turn that adds many
still goes through the prefill worker, which ships only the blocks the decode worker
lacks. Every answer is token-exact with an engine whose prefix caching is off."""

from __future__ import annotations

import time

import pytest

from tandem.core.protocol import WorkerInfo
from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.core.sampling_params import SamplingParams
from tests.service.conftest import assert_every_worker_clean, generate, start_service, stop_service

UNCACHED = 32  # --local-prefill-uncached-tokens: two blocks of 16


@pytest.fixture(scope="module")
def svc():
    # A prefill worker leaves a task for the decode worker as long as the decode worker
    # will take it (no time bound in this test: a turn it does not take hangs and fails
    # the test instead of passing through the prefill worker by the clock).
    service = start_service(
        "--local-prefill-uncached-tokens",
        str(UNCACHED),
        "--prefix-route-wait-ms",
        "600000",
    )
    yield service
    if service.proc.poll() is None:
        stop_service(service)


def _workers(svc) -> dict[str, WorkerInfo]:
    """The prefill and decode workers' registry entries, written after now (every
    request asked about has ended, and a worker settles a request before the entry that
    follows: the figures count it)."""
    redis = connect(svc.redis_url)
    now = time.time()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        workers = {w.role: w for w in list_workers(redis)}
        if len(workers) == 2 and all(w.heartbeat > now for w in workers.values()):
            return workers
        time.sleep(0.1)
    raise AssertionError("the workers' registry entries were not refreshed")


def _turn(svc, uncached, ids: list[int], max_tokens: int) -> tuple[list[int], int]:
    """A greedy turn through gRPC, checked against the uncached engine; (its answer,
    the prompt tokens usage reports as cached)."""
    tokens, _, messages = generate(
        svc.stub(), ids=ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
    )
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    assert tokens == uncached.generate([ids], greedy)[0].token_ids
    return tokens, max(m.usage.cached_tokens for m in messages)


def _new_tokens(n: int, seed: int) -> list[int]:
    return [(seed * 131 + 7 * i) % 900 + 10 for i in range(n)]


def test_a_short_next_turn_is_prefilled_on_the_decode_worker_a_long_one_is_shipped(svc, uncached):
    layout = uncached.engine.kv_cache.layout
    bs = layout.block_size
    start = _workers(svc)
    assert start["decode"].local_prefill_uncached_tokens == UNCACHED
    assert start["decode"].max_local_prefills == 1

    # Turn 1: 40 tokens, none cached anywhere: more than UNCACHED, so the prefill worker.
    first = _new_tokens(40, seed=1)
    answer, _ = _turn(svc, uncached, first, max_tokens=20)
    after_first = _workers(svc)
    assert after_first["prefill"].admitted == start["prefill"].admitted + 1
    assert after_first["decode"].local_prefills == start["decode"].local_prefills

    # Turn 2 adds 6 tokens. The decode worker holds turn 1's prompt and answer (all but
    # the answer's last token) in full blocks; what it lacks is at most UNCACHED tokens.
    second = first + answer + _new_tokens(6, seed=2)
    held = (len(first) + len(answer) - 1) // bs * bs
    assert 0 < len(second) - held <= UNCACHED
    answer2, cached2 = _turn(svc, uncached, second, max_tokens=6)
    after_second = _workers(svc)
    prefill, decode = after_second["prefill"], after_second["decode"]
    assert decode.local_prefills == after_first["decode"].local_prefills + 1
    assert decode.admitted == after_first["decode"].admitted  # no handoff
    # The prefill worker neither took nor prefilled it, and shipped nothing.
    assert prefill.admitted == after_first["prefill"].admitted
    assert prefill.prefix_queried_tokens == after_first["prefill"].prefix_queried_tokens
    assert prefill.kv_bytes_sent == after_first["prefill"].kv_bytes_sent
    assert prefill.routed_to_peers == after_first["prefill"].routed_to_peers + 1
    assert cached2 == held  # served from the decode worker's cache

    # Turn 3 adds 40 tokens: more than UNCACHED beyond what the decode worker holds, so
    # the prefill worker computes it and ships only the blocks the decode worker lacks.
    third = second + answer2 + _new_tokens(40, seed=3)
    held3 = (len(second) + len(answer2) - 1) // bs
    assert len(third) - held3 * bs > UNCACHED
    _turn(svc, uncached, third, max_tokens=5)
    after_third = _workers(svc)
    prefill = after_third["prefill"]
    assert prefill.admitted == after_second["prefill"].admitted + 1
    assert after_third["decode"].local_prefills == decode.local_prefills
    shipped = prefill.kv_bytes_sent - after_second["prefill"].kv_bytes_sent
    whole = -(-len(third) // bs)
    assert shipped == (whole - held3) * layout.bytes_per_block
    assert_every_worker_clean(svc, time.time())
