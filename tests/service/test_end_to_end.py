"""The whole service on CPU: real processes, real redis-server, real gRPC."""

from __future__ import annotations

import grpc
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


def test_grpc_greedy_equals_in_process_engine(service, engine):
    stub = service.stub()
    for prompt in PROMPTS[:3]:
        want = solo(engine, prompt, 24)
        tokens, text, messages = generate(
            stub, prompt=prompt, max_tokens=24, temperature=0.0, ignore_eos=True
        )
        assert tokens == want.token_ids
        assert text == want.text
        assert len(messages) > 2, "tokens must stream, not arrive at the end"
        last = messages[-1]
        assert last.finish_reason == tandem_pb2.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(want.prompt_token_ids)
        assert last.usage.completion_tokens == 24
    ids = engine.encode(PROMPTS[3])
    tokens, _, _ = generate(stub, ids=ids, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert tokens == solo(engine, ids, 12).token_ids


@pytest.fixture
def nccl_service():
    svc = start_service("--kv-transport", "nccl")
    try:
        yield svc
    finally:
        stop_service(svc)


def test_nccl_transport_greedy_equals_in_process_engine(nccl_service, engine):
    # On CPU the nccl transport moves KV over gloo: same groups, same control flow.
    stub = nccl_service.stub()
    for prompt in PROMPTS[:2]:
        tokens, text, _ = generate(
            stub, prompt=prompt, max_tokens=12, temperature=0.0, ignore_eos=True
        )
        want = solo(engine, prompt, 12)
        assert (tokens, text) == (want.token_ids, want.text)
    ids = engine.encode(PROMPTS[4])[:1]  # a single prompt token: one partly filled block
    tokens, _, _ = generate(stub, ids=ids, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert tokens == solo(engine, ids, 8).token_ids
    assert any("up (gloo)" in line for line in nccl_service.log), "KV went over a group"


def test_concurrent_streams_equal_solo_and_use_both_decoders(service, engine):
    check_concurrent_streams(service, engine, 32)
    decoders = list_workers(connect(service.redis_url), role="decode")
    assert len(decoders) == 2
    assert all(w.admitted > 0 for w in decoders), [(w.worker_id, w.admitted) for w in decoders]


def test_cancel_frees_decode_blocks(service):
    check_cancel_frees_every_block(service)


def test_bad_request_is_invalid_argument(service):
    stub = service.stub()
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, prompt="", max_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
