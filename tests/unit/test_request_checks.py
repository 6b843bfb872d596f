"""The checks every worker applies to each task and handoff it takes in."""

from __future__ import annotations

import msgspec
import pytest

from tandem.core.protocol import Handoff, PrefillTask
from tandem.core.request_checks import ModelLimits, check_handoff, check_task
from tandem.core.sampling_params import SamplingParams

LIMITS = ModelLimits(max_model_len=64, vocab_size=100)


def _task(**kw) -> PrefillTask:
    fields = dict(
        request_id="r1",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=8),
        reply_stream="tandem:reply:gw",
        deadline=1e10,
    )
    fields.update(kw)
    return PrefillTask(**fields)


def _sampling(**kw) -> SamplingParams:
    # As decoded off the wire: no constructor checks.
    return msgspec.convert({"max_tokens": 8, **kw}, SamplingParams)


def test_a_sane_task_and_handoff_pass():
    check_task(_task(), LIMITS)
    check_task(_task(output_token_ids=[4, 5]), LIMITS)
    check_handoff(Handoff(task=_task(), output_token_ids=[7], num_computed_tokens=3), LIMITS)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(request_id=""), "request_id"),
        (dict(request_id="x" * 129), "request_id"),
        (dict(reply_stream="tandem:smollm2:prefill"), "reply_stream"),
        (dict(deadline=float("nan")), "deadline"),
        (dict(prompt_token_ids=[]), "prompt"),
        (dict(prompt_token_ids=[1, 100]), r"prompt_token_ids\[1\]"),
        (dict(prompt_token_ids=[1] * 60), "context"),
        (dict(output_token_ids=[-1]), r"output_token_ids\[0\]"),
        (dict(output_token_ids=[1] * 8), "max_tokens"),
        (dict(sampling=_sampling(top_k=2**63)), "top_k"),
        (dict(sampling=_sampling(top_k=101)), "top_k"),
        (dict(sampling=_sampling(temperature=float("inf"))), "temperature"),
        (dict(sampling=_sampling(top_p=float("nan"))), "top_p"),
        (dict(sampling=_sampling(presence_penalty=float("-inf"))), "presence_penalty"),
        (dict(sampling=_sampling(repetition_penalty=float("nan"))), "repetition_penalty"),
        (dict(sampling=_sampling(logprobs=21)), "logprobs"),
        (dict(sampling=_sampling(seed=2**64)), "seed"),
        (dict(sampling=_sampling(stop_token_ids=[100])), "stop_token_ids"),
        (dict(sampling=_sampling(stop=["x"] * 17)), "stop"),
        (dict(sampling=_sampling(max_tokens=2**63)), "context"),
    ],
)
def test_a_task_out_of_bounds_is_refused_with_the_field_named(kw, message):
    with pytest.raises(ValueError, match=message):
        check_task(_task(**kw), LIMITS)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(output_token_ids=[]), "sampled"),
        (dict(output_token_ids=[100]), "output_token_ids"),
        (dict(num_computed_tokens=0), "num_computed_tokens"),
        (dict(num_computed_tokens=2**40), "num_computed_tokens"),
        (dict(task=_task(prompt_token_ids=[])), "prompt"),
    ],
)
def test_a_handoff_out_of_bounds_is_refused(kw, message):
    fields = dict(task=_task(), output_token_ids=[7], num_computed_tokens=3)
    fields.update(kw)
    with pytest.raises(ValueError, match=message):
        check_handoff(Handoff(**fields), LIMITS)
