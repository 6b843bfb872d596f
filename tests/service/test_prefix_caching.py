"""Prefix caching through the real service (`tandem serve` on SmolLM2, CPU): gRPC and
HTTP answers stay token-exact, usage reports the cached prompt tokens, a salt keeps
tenants apart, and `--no-prefix-caching` turns it off."""

from __future__ import annotations

import time

import openai
import pytest

from tandem.core.redis_client import connect
from tandem.core.registry import list_workers
from tandem.core.sampling_params import SamplingParams
from tandem.gateway.proto import tandem_pb2
from tests.service.conftest import start_service, stop_service

SYSTEM = (
    "You are a careful assistant. Answer in one short paragraph, cite no sources, and "
    "never use lists. Keep a friendly tone and explain any technical term you use. "
) * 3


@pytest.fixture(scope="module")
def svc():
    service = start_service()  # one prefill and one decode worker: P/D over zmq
    yield service
    if service.proc.poll() is None:
        stop_service(service)


def _grpc(svc, prompt: str, max_tokens: int = 12, salt: str = "") -> tuple[list[int], int]:
    req = tandem_pb2.GenerateRequest(
        prompt=prompt,
        sampling=tandem_pb2.SamplingParams(
            max_tokens=max_tokens, temperature=0.0, ignore_eos=True, cache_salt=salt
        ),
    )
    tokens, cached = [], 0
    for msg in svc.stub().Generate(req, timeout=120):
        tokens += list(msg.token_ids)
        cached = max(cached, msg.usage.cached_tokens)
    return tokens, cached


def test_grpc_reuses_the_shared_prefix_token_exact_and_salts_separate(svc, uncached):
    prompts = [SYSTEM + q for q in ("What is rain?", "Why is the sky blue?")]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in uncached.generate(prompts, greedy)]
    first, cached_first = _grpc(svc, prompts[0])
    second, cached_second = _grpc(svc, prompts[1])
    assert [first, second] == want
    shared = len(uncached.encode(SYSTEM)) // 16 * 16
    assert cached_first == 0 and cached_second >= shared - 16
    salted, cached_salted = _grpc(svc, prompts[1], salt="tenant-b")
    assert salted == want[1] and cached_salted == 0


def test_http_usage_reports_cached_tokens(svc, uncached):
    prompt = SYSTEM + "Name a planet."
    want = uncached.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0))[0]
    with openai.OpenAI(base_url=svc.http_url + "/v1", api_key="none", max_retries=0,
                       timeout=120) as client:  # fmt: skip
        answers = [
            client.completions.create(
                model="smollm2", prompt=prompt, max_tokens=10, temperature=0
            )  # fmt: skip
            for _ in range(2)
        ]
        salted = client.completions.create(model="smollm2", prompt=prompt, max_tokens=10,
                                           temperature=0, extra_body={"cache_salt": "b"})  # fmt: skip
    assert [a.choices[0].text for a in (*answers, salted)] == [want.text] * 3
    second = answers[1].usage.prompt_tokens_details.cached_tokens
    assert second == (len(want.prompt_token_ids) - 1) // 16 * 16 > 0
    assert salted.usage.prompt_tokens_details.cached_tokens == 0


def test_no_prefix_caching_flag_turns_it_off(uncached):
    service = start_service("--no-prefix-caching")
    try:
        prompt = SYSTEM + "What is rain?"
        want = uncached.generate(
            [prompt], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        )
        for _ in range(2):
            tokens, cached = _grpc(service, prompt, max_tokens=8)
            assert tokens == want[0].token_ids and cached == 0
    finally:
        stop_service(service)


def _prefill_bytes_sent(svc) -> int:
    """The prefill worker's KV bytes shipped, from a registry entry written after now
    (the entry is refreshed every heartbeat; a handoff is settled before its decode
    worker streams the answer, so a finished request is counted)."""
    redis = connect(svc.redis_url)
    now = time.time()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        (prefill,) = [w for w in list_workers(redis) if w.role == "prefill"]
        if prefill.heartbeat > now:
            return prefill.kv_bytes_sent
        time.sleep(0.1)
    raise AssertionError("the prefill worker's registry entry was not refreshed")


def test_decode_worker_holding_the_previous_turn_receives_only_the_new_blocks(svc, uncached):
    layout = uncached.engine.kv_cache.layout
    bs = layout.block_size
    first_turn = [(7 * i + 3) % 900 + 10 for i in range(40)]
    answer, _ = _grpc_ids(svc, first_turn, max_tokens=20)
    before = _prefill_bytes_sent(svc)
    second_turn = first_turn + answer + [(11 * i + 5) % 900 + 10 for i in range(20)]
    tokens, _ = _grpc_ids(svc, second_turn, max_tokens=6)
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    assert tokens == uncached.generate([second_turn], greedy)[0].token_ids
    sent = _prefill_bytes_sent(svc) - before
    # The decode worker kept the KV of the first turn's prompt and answer (all but the
    # last answer token) in full blocks; only the rest of the new prompt is shipped.
    held = (len(first_turn) + len(answer) - 1) // bs
    whole = -(-len(second_turn) // bs)
    assert sent == (whole - held) * layout.bytes_per_block < whole * layout.bytes_per_block


def _grpc_ids(svc, ids: list[int], max_tokens: int) -> tuple[list[int], int]:
    req = tandem_pb2.GenerateRequest(
        prompt_token_ids=ids,
        sampling=tandem_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    tokens, cached = [], 0
    for msg in svc.stub().Generate(req, timeout=120):
        tokens += list(msg.token_ids)
        cached = max(cached, msg.usage.cached_tokens)
    return tokens, cached
