"""The whole service on CPU: real processes, real redis-server, real gRPC."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from core.redis_client import connect
from core.registry import list_workers
from core.sampling_params import SamplingParams
from engine.llm import LLM
from gateway.proto import tandem_pb2
from tests.service.conftest import generate, start_service, stop_service

PROMPTS = [
    "The history of the Roman Empire",
    "def add(a, b):",
    "Les fleurs du printemps",
    "量子コンピュータとは",
    "List three fruits:",
]


@pytest.fixture(scope="module")
def engine():
    return LLM("smollm2", device="cpu")


def _solo(engine, prompt, max_tokens):
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return engine.generate([prompt], sp)[0]


def test_grpc_greedy_equals_in_process_engine(service, engine):
    stub = service.stub()
    for prompt in PROMPTS[:3]:
        want = _solo(engine, prompt, 24)
        tokens, text, messages = generate(stub, prompt=prompt, max_tokens=24, temperature=0.0,
                                          ignore_eos=True)
        assert tokens == want.token_ids
        assert text == want.text
        assert len(messages) > 2, "tokens must stream, not arrive at the end"
        last = messages[-1]
        assert last.finish_reason == tandem_pb2.FINISH_REASON_LENGTH
        assert last.usage.prompt_tokens == len(want.prompt_token_ids)
        assert last.usage.completion_tokens == 24
    ids = engine.encode(PROMPTS[3])
    tokens, _, _ = generate(stub, ids=ids, max_tokens=12, temperature=0.0, ignore_eos=True)
    assert tokens == _solo(engine, ids, 12).token_ids


@pytest.fixture
def nccl_service():
    svc = start_service("--kv-transport", "nccl")
    yield svc
    if svc.proc.poll() is None:
        stop_service(svc)


def test_nccl_transport_greedy_equals_in_process_engine(nccl_service, engine):
    # On CPU the nccl transport moves KV over gloo: same groups, same control flow.
    stub = nccl_service.stub()
    for prompt in PROMPTS[:2]:
        tokens, text, _ = generate(
            stub, prompt=prompt, max_tokens=12, temperature=0.0, ignore_eos=True
        )
        want = _solo(engine, prompt, 12)
        assert (tokens, text) == (want.token_ids, want.text)
    ids = engine.encode(PROMPTS[4])[:1]  # a single prompt token: one partly filled block
    tokens, _, _ = generate(stub, ids=ids, max_tokens=8, temperature=0.0, ignore_eos=True)
    assert tokens == _solo(engine, ids, 8).token_ids
    assert any("up (gloo)" in line for line in nccl_service.log), "KV went over a group"


def test_concurrent_streams_equal_solo_and_use_both_decoders(service, engine):
    rng = random.Random(3)
    jobs = [(rng.choice(PROMPTS) + " " * rng.randrange(3) + str(i), rng.randrange(4, 33))
            for i in range(32)]
    stub = service.stub()
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda j: generate(stub, prompt=j[0], max_tokens=j[1],
                                                   temperature=0.0, ignore_eos=True)[0], jobs))
    solo = engine.generate([p for p, _ in jobs],
                           [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
                            for _, n in jobs])
    assert results == [s.token_ids for s in solo]
    decoders = list_workers(connect(service.redis_url), role="decode")
    assert len(decoders) == 2
    assert all(w.admitted > 0 for w in decoders), [(w.worker_id, w.admitted) for w in decoders]


def test_cancel_frees_decode_blocks(service):
    stub = service.stub()
    req = tandem_pb2.GenerateRequest(prompt="Tell me a very long story about dragons.",
                                     sampling=tandem_pb2.SamplingParams(
                                         max_tokens=400, temperature=0.0, ignore_eos=True))
    call = stub.Generate(req, timeout=120)
    received = 0
    for msg in call:
        received += len(msg.token_ids)
        if received >= 5:
            call.cancel()
            break
    redis = connect(service.redis_url)
    deadline = time.monotonic() + 30  # generous: CI machines may be loaded
    while time.monotonic() < deadline:
        workers = list_workers(redis, role="decode")
        if workers and all(w.used_blocks == 0 and w.running == 0 for w in workers):
            break
        time.sleep(0.2)
    workers = list_workers(redis)
    assert all(w.used_blocks == 0 and w.running == 0 for w in workers), workers


def test_bad_request_is_invalid_argument(service):
    stub = service.stub()
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, prompt="", max_tokens=4)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
