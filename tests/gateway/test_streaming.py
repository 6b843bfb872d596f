"""End to end through gRPC and Redis: tokens stream back as the workers produce them."""

from __future__ import annotations

import grpc
import pytest

from tandem.core.tokenizer import Tokenizer
from tandem.gateway.proto import tandem_pb2 as pb
from tests.gateway.conftest import Gateway, wait_for
from tests.gateway.fake_worker import FakeWorker, expected_output

# Multi-byte characters that the byte-level tokenizer splits over several tokens.
PROMPT = "Tandem streams 世界 and 🙂🚀 to clients, naïvely."


def generate(gateway: Gateway, **kwargs) -> list[pb.GenerateResponse]:
    return list(gateway.stub.Generate(pb.GenerateRequest(**kwargs), timeout=10))


def test_tokens_stream_in_several_messages(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    fake_worker.token_delay_s = 0.02
    prompt_ids = tokenizer.encode(PROMPT)
    max_tokens = 2 * len(prompt_ids)
    responses = generate(gateway, prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=max_tokens))

    assert len(responses) >= max_tokens // 2  # streamed, not all at the end
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert not any(r.HasField("usage") for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.completion_tokens == max_tokens

    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == expected_output(prompt_ids, max_tokens)
    text = "".join(r.text for r in responses)
    assert text == tokenizer.decode(tokens)
    assert "\ufffd" not in text
    assert {r.request_id for r in responses} == {responses[0].request_id}
    # The gateway tokenized the prompt exactly as the tokenizer does, special tokens on.
    task = fake_worker.tasks[-1]
    assert task.prompt_token_ids == prompt_ids
    assert task.request_id == responses[0].request_id
    assert task.sampling.max_tokens == max_tokens


def test_tokens_that_queued_together_go_out_in_one_message(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    """A step that brings a stream several deltas at once (a client or gateway that fell
    behind) costs one gRPC message, not one per token: the per-message write is most of
    a gateway's work."""
    fake_worker.tokens_per_step = 4  # four one-token deltas per request in each batch
    fake_worker.token_delay_s = 0.01
    prompt_ids = tokenizer.encode(PROMPT)
    max_tokens = 24
    responses = generate(gateway, prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=max_tokens))

    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == expected_output(prompt_ids, max_tokens)
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)
    assert len(responses) <= max_tokens // 4
    assert all(len(r.token_ids) % 4 == 0 for r in responses)
    assert responses[-1].usage.completion_tokens == max_tokens


def test_token_id_prompt_and_defaults(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    prompt_ids = tokenizer.encode("Hello there, general Kenobi")
    responses = generate(gateway, prompt_token_ids=prompt_ids)

    tokens = [t for r in responses for t in r.token_ids]
    default = gateway.config.default_max_tokens
    assert tokens == expected_output(prompt_ids, default)
    task = fake_worker.tasks[-1]
    # proto3 zeros mean: default max_tokens, greedy, top_p off.
    assert task.sampling.max_tokens == default
    assert task.sampling.temperature == 0.0
    assert task.sampling.top_p == 1.0
    assert task.sampling.seed is None
    assert task.reply_stream == f"tandem:reply:{gateway.config.gateway_id}"


def test_sampling_fields_reach_the_worker(gateway: Gateway, fake_worker: FakeWorker) -> None:
    sampling = pb.SamplingParams(
        max_tokens=3,
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        seed=7,
        stop_token_ids=[5],
        ignore_eos=True,
        min_p=0.05,
        repetition_penalty=1.1,
        logprobs=2,
    )
    responses = generate(gateway, prompt="abc", sampling=sampling)
    logprobs = [dict(lp.logprobs) for r in responses for lp in r.logprobs]
    tokens = [t for r in responses for t in r.token_ids]
    assert logprobs == [{t: -0.5, t + 1: -1.5} for t in tokens]
    got = fake_worker.tasks[-1].sampling
    assert (got.temperature, got.top_k, got.seed, got.ignore_eos) == (
        pytest.approx(0.7),
        40,
        7,
        True,
    )
    assert got.top_p == pytest.approx(0.9)
    assert got.stop_token_ids == (5,)
    assert got.min_p == pytest.approx(0.05)
    assert got.repetition_penalty == pytest.approx(1.1)
    assert got.logprobs == 2


def test_retried_prefill_duplicates_are_dropped(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    fake_worker.replay_after = 4
    prompt_ids = tokenizer.encode(PROMPT)
    responses = generate(gateway, prompt=PROMPT, sampling=pb.SamplingParams(max_tokens=10))
    tokens = [t for r in responses for t in r.token_ids]
    assert tokens == expected_output(prompt_ids, 10)
    assert "".join(r.text for r in responses) == tokenizer.decode(tokens)
    assert responses[-1].usage.completion_tokens == 10


def test_stop_string_ends_request_and_aborts(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    fake_worker.token_delay_s = 0.02
    prompt = "one two three four five six seven eight nine ten"
    responses = generate(
        gateway, prompt=prompt, sampling=pb.SamplingParams(max_tokens=200, stop=["four f"])
    )
    text = "".join(r.text for r in responses)
    assert text == "one two three "  # cut right before the stop string
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_STOP
    assert last.usage.completion_tokens < 200
    # The workers did not know: the gateway told them to free the request.
    rid = last.request_id
    assert wait_for(lambda: rid in fake_worker.aborted)
    assert fake_worker.sent[rid] < 200


@pytest.mark.parametrize(
    ("error_code", "status"),
    [
        ("unavailable", grpc.StatusCode.UNAVAILABLE),
        ("deadline", grpc.StatusCode.DEADLINE_EXCEEDED),
        ("resource_exhausted", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ("invalid_argument", grpc.StatusCode.INVALID_ARGUMENT),
        ("internal", grpc.StatusCode.INTERNAL),
        ("something new", grpc.StatusCode.INTERNAL),
    ],
)
def test_worker_error_becomes_grpc_status(
    gateway: Gateway, fake_worker: FakeWorker, error_code: str, status: grpc.StatusCode
) -> None:
    fake_worker.error = (error_code, f"worker says {error_code}")
    with pytest.raises(grpc.RpcError) as info:
        generate(gateway, prompt="hello")
    assert info.value.code() == status
    assert info.value.details() == f"worker says {error_code}"
