"""Every bad request is refused with INVALID_ARGUMENT and a message naming the problem.

No worker is registered here: validation happens before anything is queued.
"""

from __future__ import annotations

import grpc
import pytest

from tandem.gateway.proto import tandem_pb2 as pb
from tests.gateway.conftest import Gateway

SP = pb.SamplingParams

BAD_REQUESTS = {
    "no prompt": (pb.GenerateRequest(), "a prompt is required"),
    "empty prompt": (pb.GenerateRequest(prompt=""), "a prompt is required"),
    "both prompt and ids": (
        pb.GenerateRequest(prompt="hi", prompt_token_ids=[1, 2]),
        "exactly one of prompt and prompt_token_ids",
    ),
    "token id outside vocabulary": (
        pb.GenerateRequest(prompt_token_ids=[1, 49152]),
        "prompt_token_ids[1] = 49152 is outside the vocabulary [0, 49152)",
    ),
    "prompt + max_tokens over context": (
        pb.GenerateRequest(prompt="hello world", sampling=SP(max_tokens=8191)),
        "exceeds the model context of 8192 tokens",
    ),
    "long id prompt over context": (
        pb.GenerateRequest(prompt_token_ids=[5] * 8190, sampling=SP(max_tokens=3)),
        "prompt (8190 tokens) + max_tokens (3)",
    ),
    "negative temperature": (
        pb.GenerateRequest(prompt="hi", sampling=SP(temperature=-0.5)),
        "temperature must be in [0, 100]",
    ),
    "top_p above 1": (
        pb.GenerateRequest(prompt="hi", sampling=SP(top_p=1.5)),
        "top_p must be in (0, 1]",
    ),
    "too many stop strings": (
        pb.GenerateRequest(prompt="hi", sampling=SP(stop=[f"s{i}" for i in range(17)])),
        "at most 16 stop strings",
    ),
    "too long stop string": (
        pb.GenerateRequest(prompt="hi", sampling=SP(stop=["x" * 257])),
        "stop strings must be 1..256 characters",
    ),
    "empty stop string": (
        pb.GenerateRequest(prompt="hi", sampling=SP(stop=["ok", ""])),
        "stop strings must be 1..256 characters",
    ),
    "stop token id outside vocabulary": (
        pb.GenerateRequest(prompt="hi", sampling=SP(stop_token_ids=[60000])),
        "stop_token_ids must be in [0, 49152)",
    ),
    "explicit zero repetition penalty": (
        pb.GenerateRequest(prompt="hi", sampling=SP(repetition_penalty=0.0)),
        "repetition_penalty must be in (0, 10]",
    ),
    "min_tokens above max_tokens": (
        pb.GenerateRequest(prompt="hi", sampling=SP(max_tokens=4, min_tokens=5)),
        "min_tokens must be between 0 and max_tokens",
    ),
    "oversized prompt text": (
        pb.GenerateRequest(prompt="a" * (1024 * 1024 + 1)),
        "prompt is 1048577 bytes; the limit is 1048576 bytes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_invalid_argument(gateway: Gateway, case: str) -> None:
    request, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        list(gateway.stub.Generate(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_unknown_model_is_not_found(gateway: Gateway) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(gateway.stub.Generate(pb.GenerateRequest(prompt="hi", model="gpt-9"), timeout=10))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'gpt-9' is not served here" in info.value.details()


def test_message_over_receive_limit_is_refused(gateway: Gateway) -> None:
    request = pb.GenerateRequest(prompt="a" * (5 * 1024 * 1024))
    with pytest.raises(grpc.RpcError) as info:
        list(gateway.stub.Generate(request, timeout=10))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_prompt_that_is_not_utf8_is_invalid_argument(gateway: Gateway) -> None:
    # Field 1 (prompt) holding bytes that are not UTF-8; a normal client cannot send it.
    call = gateway.channel.unary_stream(
        "/tandem.v1.Generation/Generate",
        request_serializer=lambda raw: raw,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    with pytest.raises(grpc.RpcError) as info:
        list(call(b"\x0a\x02\xff\xfe", timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UTF-8" in info.value.details()
