"""Turn a gRPC GenerateRequest into prompt token ids and core SamplingParams.

Every failure is a ValueError whose message is shown to the client as INVALID_ARGUMENT
(HTTP 400), so messages name the field and the bound. The bounds themselves live in
core.request_checks, where the workers check each task again; `validate_prompt` is
shared with the HTTP front end (gateway.openai_requests).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from google.protobuf.message import DecodeError

from tandem.core.request_checks import ModelLimits, check_sampling, check_tokens
from tandem.core.sampling_params import SamplingParams
from tandem.gateway.config import GatewayConfig
from tandem.gateway.proto import tandem_pb2 as pb

Encode = Callable[[str], Awaitable[list[int]]]


class MalformedRequest:
    """Stands in for a request that did not parse, so the handler can say why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def parse_request(data: bytes) -> pb.GenerateRequest | MalformedRequest:
    # grpc reports a deserializer exception as UNKNOWN; a bad request is the client's
    # error (most often a prompt that is not UTF-8), so it becomes INVALID_ARGUMENT.
    try:
        return pb.GenerateRequest.FromString(data)
    except DecodeError as exc:
        return MalformedRequest(f"malformed GenerateRequest (strings must be UTF-8): {exc}")


def check_prompt_shape(
    request: pb.GenerateRequest, config: GatewayConfig, limits: ModelLimits
) -> None:
    """Cheap checks done before tokenizing or copying ids, so a huge prompt costs no
    tokenizer time and millions of ids are not walked."""
    has_text = bool(request.prompt)
    num_ids = len(request.prompt_token_ids)
    has_ids = num_ids > 0
    if num_ids > limits.max_model_len:
        raise ValueError(
            f"prompt_token_ids has {num_ids} ids; the model context is {limits.max_model_len}"
        )
    if has_text and has_ids:
        raise ValueError("set exactly one of prompt and prompt_token_ids, not both")
    if not has_text and not has_ids:
        raise ValueError("a prompt is required: set prompt or prompt_token_ids")
    if has_text:
        size = len(request.prompt.encode("utf-8"))
        if size > config.max_prompt_bytes:
            raise ValueError(
                f"prompt is {size} bytes; the limit is {config.max_prompt_bytes} bytes"
            )


def sampling_from_proto(sp: pb.SamplingParams, config: GatewayConfig) -> SamplingParams:
    """Map proto3 zero values onto their documented defaults, then build the struct."""
    return SamplingParams(
        max_tokens=sp.max_tokens or config.default_max_tokens,
        min_tokens=sp.min_tokens,
        temperature=float(sp.temperature),
        top_p=float(sp.top_p) if sp.top_p != 0 else 1.0,
        top_k=sp.top_k,
        min_p=float(sp.min_p) if sp.HasField("min_p") else 0.0,
        seed=sp.seed if sp.HasField("seed") else None,
        repetition_penalty=(
            float(sp.repetition_penalty) if sp.HasField("repetition_penalty") else 1.0
        ),
        presence_penalty=float(sp.presence_penalty) if sp.HasField("presence_penalty") else 0.0,
        frequency_penalty=(
            float(sp.frequency_penalty) if sp.HasField("frequency_penalty") else 0.0
        ),
        stop=tuple(sp.stop),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=sp.ignore_eos,
        logprobs=sp.logprobs if sp.HasField("logprobs") else None,
        cache_salt=sp.cache_salt,
    )


async def validate_request(
    request: pb.GenerateRequest,
    config: GatewayConfig,
    limits: ModelLimits,
    encode: Encode,
) -> tuple[list[int], SamplingParams]:
    """Return (prompt_token_ids, sampling) or raise ValueError with a client-facing message.

    `encode` tokenizes a text prompt (with the tokenizer's special tokens, as transformers
    does); it is awaited only once the cheap checks pass, so that a long prompt can be
    tokenized off the event loop.
    """
    check_prompt_shape(request, config, limits)
    sampling = sampling_from_proto(request.sampling, config)
    token_ids = await validate_prompt(
        request.prompt or None, list(request.prompt_token_ids), sampling, limits, encode
    )
    return token_ids, sampling


async def validate_prompt(
    prompt: str | None,
    prompt_token_ids: Sequence[int],
    sampling: SamplingParams,
    limits: ModelLimits,
    encode: Encode,
) -> list[int]:
    """Sampling bounds, then the prompt (text, tokenized by `encode`, or token ids), then
    prompt + max_tokens against the context; the prompt's token ids, or ValueError.

    Shared by the gRPC and HTTP front ends so that both refuse the same inputs.
    """
    check_sampling(sampling, limits)
    if prompt:
        token_ids = await encode(prompt)
        if not token_ids:
            raise ValueError("prompt encodes to no tokens")
    else:
        token_ids = list(prompt_token_ids)
    check_tokens(token_ids, [], sampling, limits)
    return token_ids
