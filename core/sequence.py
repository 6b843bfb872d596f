"""One request's mutable state inside a scheduler.

`num_computed_tokens` counts tokens whose KV is in the cache. A sequence needs a forward
pass over `all_token_ids[num_computed_tokens:]`; when that reaches the end of the
sequence the step samples a new token. Recompute after preemption is therefore just
`num_computed_tokens = 0`: prompt and generated tokens are prefilled again.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tandem.core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tandem.core.protocol import PrefillTask


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token / string
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"


_arrival_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    finish_reason: FinishReason | None = None
    # Top-n logprobs per output token when requested: list of {token_id: logprob}.
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    num_preemptions: int = 0
    # Prompt tokens the first prefill found in the prefix cache (usage.cached_tokens).
    num_cached_tokens: int = 0
    arrival: int = field(default_factory=lambda: next(_arrival_counter))

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")

    @classmethod
    def of_task(
        cls,
        task: PrefillTask,
        output_token_ids: list[int] | None = None,
        num_computed_tokens: int = 0,
    ) -> Sequence:
        """A worker's sequence for `task`, with the tokens generated so far (the task's
        own, or a handoff's) and how many tokens' KV it already has."""
        generated = task.output_token_ids if output_token_ids is None else output_token_ids
        return cls(
            task.request_id,
            list(task.prompt_token_ids),
            task.sampling,
            output_token_ids=list(generated),
            num_computed_tokens=num_computed_tokens,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, index: int) -> int:
        n_prompt = len(self.prompt_token_ids)
        if index < n_prompt:
            return self.prompt_token_ids[index]
        return self.output_token_ids[index - n_prompt]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprobs: dict[int, float] | None = None) -> None:
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)


def check_stop(seq: Sequence, eos_token_ids: frozenset[int]) -> FinishReason | None:
    """Finish rule applied after each sampled token (max_tokens, EOS, stop token ids)."""
    sp = seq.sampling
    n_out = len(seq.output_token_ids)
    if n_out == 0:
        return None
    last = seq.output_token_ids[-1]
    if n_out >= sp.min_tokens:
        if not sp.ignore_eos and last in eos_token_ids:
            return FinishReason.STOP
        if last in sp.stop_token_ids:
            return FinishReason.STOP
    if n_out >= sp.max_tokens:
        return FinishReason.LENGTH
    return None
