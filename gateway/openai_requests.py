"""OpenAI-style request bodies, and their translation into prompts and SamplingParams.

The models only describe shapes (and so the OpenAPI schema); bounds are enforced by
the same code as on the gRPC path (core.sampling_params, gateway.validation), so both
front ends refuse the same inputs with the same messages. Unknown fields are ignored,
as vLLM does; fields that would change the answer but are not supported are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tandem.core.request_checks import ModelLimits, check_sampling
from tandem.core.sampling_params import MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams
from tandem.gateway.config import GatewayConfig
from tandem.gateway.validation import Encode, validate_prompt

# Bounds that only keep numbers representable; the real bounds are checked later.
Int64 = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
TokenId = Annotated[int, Field(ge=-(2**31), le=2**32)]

SEED_MODULUS = 2**64
# Counts checked on the parsed JSON before any field is validated: validating (and, for
# a chat, templating) is linear in them, and runs before the request is admitted.
MAX_CHAT_MESSAGES = 2048
MAX_PROMPT_TOKEN_IDS = 1 << 18  # every prompt of a request together; above any context


MAX_CONTENT_PARTS = 4 * MAX_CHAT_MESSAGES  # every message's together
# Lists with a small bound checked later (core.sampling_params): refused here if far over
# it, before a long list is validated item by item.
SHORT_LISTS = {"stop": MAX_STOP_STRINGS, "stop_token_ids": MAX_STOP_TOKEN_IDS, "tools": 1024}


def _check_counts(data: Any) -> None:
    if not isinstance(data, dict):
        return
    messages = data.get("messages")
    if isinstance(messages, list):
        if len(messages) > MAX_CHAT_MESSAGES:
            raise ValueError(f"messages: at most {MAX_CHAT_MESSAGES} messages")
        parts = sum(len(m["content"]) for m in messages
                    if isinstance(m, dict) and isinstance(m.get("content"), list))  # fmt: skip
        if parts > MAX_CONTENT_PARTS:
            raise ValueError(f"messages: at most {MAX_CONTENT_PARTS} content parts in all")
    for name, bound in SHORT_LISTS.items():
        items = data.get(name)
        if isinstance(items, list) and len(items) > bound:
            raise ValueError(f"{name}: at most {bound} items")
    prompt = data.get("prompt")
    if isinstance(prompt, list):
        ids = len(prompt)
        if ids <= MAX_PROMPT_TOKEN_IDS:
            ids += sum(len(p) for p in prompt if isinstance(p, list))
        if ids > MAX_PROMPT_TOKEN_IDS:
            raise ValueError(f"prompt: at most {MAX_PROMPT_TOKEN_IDS} token ids in all")


def check_unicode(data: Any) -> Any:
    """JSON may escape lone surrogates (\\ud800); such text is not valid Unicode. (Run by
    gateway.json_body on the bodies that may hold one.)"""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("strings must be valid UTF-8 (no lone surrogates)") from None
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return data


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, description="the served model (default: it)")
    max_tokens: Int64 | None = None
    temperature: float | None = Field(None, description="0: greedy (default 1)")
    top_p: float | None = None
    top_k: Int64 | None = Field(None, description="0 or -1: off")
    min_p: float | None = None
    seed: Int64 | None = Field(None, description="choice i of n uses seed + i")
    stop: str | list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    n: Int64 = 1
    best_of: Int64 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    min_tokens: Int64 = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Prefix caching: only requests with equal salts share cached KV (vLLM's field).
    cache_salt: str | None = Field(None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def check_counts(cls, data: Any) -> Any:
        _check_counts(data)
        return data

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_GenerationRequest):
    prompt: str | list[TokenId] | list[str] | list[list[TokenId]] = Field(
        description="text, token ids, or a batch of either"
    )
    logprobs: Int64 | None = Field(None, description="top alternatives per token")
    echo: bool = False
    suffix: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    tools: list[Any] | None = None  # refused when given: not validated item by item
    response_format: dict[str, Any] | None = None


@dataclass(frozen=True)
class ChoiceSpec:
    """One request to the workers: choice `index` of the answer."""

    index: int
    prompt_index: int
    prompt_ids: list[int]
    sampling: SamplingParams


PARAM_ALIASES = {
    "completion": {"prompt_token_ids": "prompt"},
    "chat": {"logprobs": "top_logprobs", "prompt": "messages",
             "prompt_token_ids": "messages", "max_tokens": "max_completion_tokens"},
}  # fmt: skip


def param_of(message: str, request: BaseModel) -> str | None:
    """The request field a validation message is about (messages start with its name)."""
    first = message.split(" ", 1)[0].split("[", 1)[0]
    kind = "chat" if isinstance(request, ChatCompletionRequest) else "completion"
    if kind == "chat" and first == "max_tokens" and "max_tokens" in request.model_fields_set:
        return "max_tokens"
    first = PARAM_ALIASES[kind].get(first, first)
    return first if first in type(request).model_fields else None


def _refuse_unsupported(req: _GenerationRequest, config: GatewayConfig) -> None:
    if req.logit_bias:
        raise ValueError("logit_bias is not supported")
    if not (1 <= req.n <= config.max_choices):
        raise ValueError(f"n must be in [1, {config.max_choices}]")
    if req.best_of is not None and req.best_of != req.n:
        raise ValueError("best_of is not supported (leave it unset or equal to n)")


def _sampling(req: _GenerationRequest, max_tokens: int, logprobs: int | None) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    top_k = req.top_k if req.top_k is not None else 0
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if top_k == -1 else top_k,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        stop=stop,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        cache_salt=req.cache_salt or "",
    )


def _choices(prompts: list[list[int]], sampling: SamplingParams, n: int) -> list[ChoiceSpec]:
    specs = []
    for p, ids in enumerate(prompts):
        for j in range(n):
            sp = sampling
            if sampling.seed is not None and j:
                # Each choice is its own request: the same seed would repeat one answer.
                sp = _replace(sampling, seed=(sampling.seed + j) % SEED_MODULUS)
            specs.append(ChoiceSpec(index=p * n + j, prompt_index=p, prompt_ids=ids, sampling=sp))
    return specs


def _replace(sampling: SamplingParams, **changes: Any) -> SamplingParams:
    return msgspec.structs.replace(sampling, **changes)


async def completion_choices(
    req: CompletionRequest, config: GatewayConfig, limits: ModelLimits, encode: Encode
) -> tuple[list[ChoiceSpec], list[int]]:
    """(one spec per choice, prompt lengths) or ValueError with a client-facing message."""
    _refuse_unsupported(req, config)
    if req.echo:
        raise ValueError("echo is not supported")
    if req.suffix:
        raise ValueError("suffix is not supported")
    prompt = req.prompt
    batch: list[str | list[int]]
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        batch = [prompt]  # type: ignore[list-item]
    else:
        batch = list(prompt)  # type: ignore[arg-type]
    if not batch:
        raise ValueError("prompt must not be empty")
    if len(batch) * req.n > config.max_choices:
        raise ValueError(
            f"prompts ({len(batch)}) x n ({req.n}) exceeds the limit of {config.max_choices} choices"
        )
    max_tokens = config.default_max_tokens if req.max_tokens is None else req.max_tokens
    sampling = _sampling(req, max_tokens, req.logprobs)
    check_sampling(sampling, limits)
    prompts = []
    for item in batch:
        text, ids = (item, []) if isinstance(item, str) else (None, item)
        if text is not None and len(text.encode("utf-8")) > config.max_prompt_bytes:
            raise ValueError(f"prompt is longer than the limit of {config.max_prompt_bytes} bytes")
        if text == "":
            raise ValueError("prompt must not be empty")
        prompts.append(await validate_prompt(text, ids, sampling, limits, encode))
    return _choices(prompts, sampling, req.n), [len(p) for p in prompts]


def chat_messages(req: ChatCompletionRequest, config: GatewayConfig) -> list[dict[str, str]]:
    """Messages as the chat template takes them: role and text content."""
    messages = []
    size = 0
    for m in req.messages:
        if isinstance(m.content, list):
            content = "".join(part.text for part in m.content)
        else:
            content = m.content or ""
        size += len(content.encode("utf-8"))
        role = "system" if m.role == "developer" else m.role
        message = {"role": role, "content": content}
        if m.name:
            message["name"] = m.name
        messages.append(message)
    if size > config.max_prompt_bytes:
        raise ValueError(f"messages are longer than the limit of {config.max_prompt_bytes} bytes")
    return messages


async def chat_choices(
    req: ChatCompletionRequest,
    config: GatewayConfig,
    limits: ModelLimits,
    encode_chat,
) -> tuple[list[ChoiceSpec], list[int]]:
    _refuse_unsupported(req, config)
    if req.tools:
        raise ValueError("tools are not supported")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise ValueError("response_format other than text is not supported")
    logprobs = None
    if req.logprobs:
        logprobs = req.top_logprobs or 0
    elif req.top_logprobs:
        raise ValueError("top_logprobs needs logprobs: true")
    requested = (
        req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    )
    # Field bounds first, with a stand-in max_tokens when none was given.
    stand_in = requested if requested is not None else max(1, req.min_tokens)
    check_sampling(_sampling(req, stand_in, logprobs), limits)
    ids = await encode_chat(chat_messages(req, config))
    if requested is None:  # as vLLM: whatever context is left
        requested = max(1, limits.max_model_len - len(ids))
    sampling = _sampling(req, requested, logprobs)
    prompt_ids = await validate_prompt(None, ids, sampling, limits, encode_chat)
    return _choices([prompt_ids], sampling, req.n), [len(prompt_ids)]
