"""Colocated workers (`tandem serve --colocated-workers N`) pass the service's correctness
tests: alone, two of them sharing the task stream, and beside a prefill + decode pair."""

from __future__ import annotations

import pytest

from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.gateway.proto import tandem_pb2
from tests.service.conftest import (
    PROMPTS,
    check_cancel_frees_every_block,
    check_concurrent_streams,
    generate,
    solo,
    start_service,
    stop_service,
)

DEPLOYMENTS = {
    "colocated-1": ["--colocated-workers", "1"],
    "colocated-2": ["--colocated-workers", "2"],
    "mixed": ["--colocated-workers", "1", "--prefill-workers", "1", "--decode-workers", "1"],
}
ROLES = {
    "colocated-1": ["colocated"],
    "colocated-2": ["colocated", "colocated"],
    "mixed": ["colocated", "decode", "prefill"],
}


@pytest.fixture(scope="module", params=list(DEPLOYMENTS))
def deployment(request):
    # One torch thread per worker: workers, gateway and this test share CI's few cores.
    svc = start_service(*DEPLOYMENTS[request.param], "--threads", "1")
    try:
        yield request.param, svc
    finally:
        assert stop_service(svc) == 0


def test_greedy_equals_in_process_engine(deployment, engine):
    _, svc = deployment
    stub = svc.stub()
    want = solo(engine, PROMPTS[0], 20)
    tokens, text, messages = generate(
        stub, prompt=PROMPTS[0], max_tokens=20, temperature=0.0, ignore_eos=True
    )
    assert (tokens, text) == (want.token_ids, want.text)
    assert len(messages) > 2, "tokens must stream, not arrive at the end"
    assert messages[-1].finish_reason == tandem_pb2.FINISH_REASON_LENGTH
    assert messages[-1].usage.completion_tokens == 20
    ids = engine.encode(PROMPTS[3])
    tokens, _, _ = generate(stub, ids=ids, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert tokens == solo(engine, ids, 12).token_ids


def test_concurrent_streams_equal_solo_and_every_worker_serves(deployment, engine):
    name, svc = deployment
    check_concurrent_streams(svc, engine, 16)
    workers = list_workers(connect(svc.redis_url))
    assert sorted(w.role for w in workers) == ROLES[name]
    # Tasks are shared: no worker, colocated or the prefill/decode pair, is left idle.
    assert all(w.admitted > 0 for w in workers), [(w.worker_id, w.admitted) for w in workers]


def test_cancel_frees_every_block(deployment):
    check_cancel_frees_every_block(deployment[1])
