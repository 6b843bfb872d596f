"""The bounds a request must meet before any of it reaches an engine, in one place.

The gateway checks a client's request against them (gateway.validation); every worker
checks each task again as it takes it in (prefill, colocated and a decode worker's
local prefill through `check_task`; a decode worker's reservations, their renewals
and handoffs through `check_reserve`, `check_renewal` and `check_handoff`): the prefill stream and the control
sockets are written by other processes, maybe of another version, and one
out-of-range field must fail its own request, never the worker that reads it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from tandem.core.protocol import Handoff, PrefillTask, RenewLeases, ReserveRequest
from tandem.core.redis_keys import REPLY_PREFIX
from tandem.core.sampling_params import SamplingParams

MAX_REQUEST_ID_CHARS = 128
MAX_REPLY_STREAM_CHARS = 256
# The longest lease a decode worker grants (prefill workers ask --reservation-lease,
# 10 s by default): a longer one would pin blocks for a transfer that is not coming.
MAX_LEASE_S = 600.0
# Reservations one RenewLeases may name: more than a decode worker runs sequences
# (--max-num-seqs, 256 by default) is never legitimate; a sender splits beyond it.
MAX_RENEWAL_IDS = 1024


@dataclass(frozen=True)
class ModelLimits:
    """What the checks need to know of the model: context length and vocabulary size."""

    max_model_len: int
    vocab_size: int


def check_token_ids(name: str, token_ids: Iterable[int], vocab_size: int) -> None:
    for i, tid in enumerate(token_ids):
        if not (0 <= tid < vocab_size):
            raise ValueError(f"{name}[{i}] = {tid} is outside the vocabulary [0, {vocab_size})")


def check_sampling(sampling: SamplingParams, limits: ModelLimits) -> None:
    """Field bounds alone (no prompt yet): a bad temperature is reported even when the
    prompt is long."""
    sampling.validate()
    sampling.validate_vocab(limits.vocab_size)


def check_tokens(
    prompt_ids: list[int], output_ids: list[int], sampling: SamplingParams, limits: ModelLimits
) -> None:
    """A sequence's tokens and sampling: prompt + max_tokens within the context, every id
    in the vocabulary, tokens already generated (a preempted or migrated request) short
    of max_tokens."""
    if not prompt_ids:
        raise ValueError("a prompt is required: set prompt or prompt_token_ids")
    # Length first, so a huge prompt is refused before its ids are walked.
    sampling.validate(max_model_len=limits.max_model_len, prompt_len=len(prompt_ids))
    sampling.validate_vocab(limits.vocab_size)
    if len(output_ids) >= sampling.max_tokens:
        raise ValueError("output_token_ids already reach max_tokens")
    check_token_ids("prompt_token_ids", prompt_ids, limits.vocab_size)
    check_token_ids("output_token_ids", output_ids, limits.vocab_size)


def _check_request_id(request_id: str) -> None:
    if not (0 < len(request_id) <= MAX_REQUEST_ID_CHARS):
        raise ValueError(f"request_id must be 1..{MAX_REQUEST_ID_CHARS} characters")


def _check_header(task: PrefillTask) -> None:
    _check_request_id(task.request_id)
    stream = task.reply_stream
    if not stream.startswith(REPLY_PREFIX) or len(stream) > MAX_REPLY_STREAM_CHARS:
        raise ValueError(f"reply_stream must be a gateway's reply stream ({REPLY_PREFIX}ID)")
    if not math.isfinite(task.deadline):
        raise ValueError("deadline must be a finite unix time")


def check_task(task: PrefillTask, limits: ModelLimits) -> None:
    """ValueError (with a message for the client) unless a task from the prefill stream
    can run: its ids and reply stream are sane, its deadline a number, its tokens and
    sampling within the model's limits."""
    _check_header(task)
    check_tokens(task.prompt_token_ids, task.output_token_ids, task.sampling, limits)


def check_handoff(msg: Handoff, limits: ModelLimits) -> None:
    """A handed-off request: its task as above with the tokens generated so far, the
    last of them sampled by prefill, and KV computed for every token but that last one
    (the one decode runs next)."""
    task = msg.task
    _check_header(task)
    if not msg.output_token_ids:
        raise ValueError("a handoff carries the token prefill sampled")
    *before, last = msg.output_token_ids
    check_tokens(task.prompt_token_ids, before, task.sampling, limits)
    check_token_ids("output_token_ids", [last], limits.vocab_size)
    expected = len(task.prompt_token_ids) + len(before)
    if msg.num_computed_tokens != expected:
        raise ValueError(f"num_computed_tokens must be {expected}, got {msg.num_computed_tokens}")


def check_reserve(req: ReserveRequest, limits: ModelLimits) -> None:
    """A reservation a decode worker may grant: a sane id, a token count within the
    context, and a finite lease (NaN once pinned its blocks forever)."""
    _check_request_id(req.request_id)
    if not (1 <= req.num_tokens <= limits.max_model_len):
        raise ValueError(f"num_tokens must be in [1, {limits.max_model_len}]")
    _check_lease(req.lease_s)


def check_renewal(msg: RenewLeases) -> None:
    """A lease renewal: sane ids, at most MAX_RENEWAL_IDS of them, a lease as above."""
    _check_request_id(msg.renewal_id)
    if not (1 <= len(msg.request_ids) <= MAX_RENEWAL_IDS):
        raise ValueError(f"a renewal names 1..{MAX_RENEWAL_IDS} reservations")
    for request_id in msg.request_ids:
        _check_request_id(request_id)
    _check_lease(msg.lease_s)


def _check_lease(lease_s: float) -> None:
    if not (0.0 < lease_s <= MAX_LEASE_S):
        raise ValueError(f"lease_s must be in (0, {MAX_LEASE_S:g}]")
