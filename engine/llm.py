"""In-process API: `LLM(...).generate(prompts, sampling)` runs all prompts as one
continuous batch and returns results in input order."""

from __future__ import annotations

import uuid
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from tqdm import tqdm

from tandem.core.sampling_params import SamplingParams
from tandem.core.sequence import Sequence
from tandem.engine.engine import Engine, EngineConfig


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[dict[int, float]] | None = None


class LLM:
    def __init__(self, model: str = "smollm2", **kwargs) -> None:
        config = kwargs.pop("config", None) or EngineConfig(model=model, **kwargs)
        self.engine = Engine(config)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(
        self,
        prompts: Seq[str | list[int]],
        sampling: SamplingParams | Seq[SamplingParams] | None = None,
        arrival_steps: Seq[int] | None = None,
        progress: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion. `arrival_steps[i]` delays prompt i until that
        engine step (staggered arrivals for tests and benchmarks); `progress` shows a bar
        of finished requests on a terminal."""
        n = len(prompts)
        params = (
            [sampling or SamplingParams()] * n if not isinstance(sampling, Seq) else list(sampling)
        )
        if len(params) != n:
            raise ValueError("one SamplingParams per prompt, or one for all")
        arrivals = list(arrival_steps) if arrival_steps is not None else [0] * n
        seqs = [
            Sequence(uuid.uuid4().hex, self.encode(p), sp)
            for p, sp in zip(prompts, params, strict=True)
        ]
        pending = sorted(range(n), key=lambda i: arrivals[i])
        step = 0
        bar = tqdm(total=n, desc="requests", unit="req", disable=None if progress else True)
        while pending or self.engine.has_work:
            while pending and arrivals[pending[0]] <= step:
                self.engine.add(seqs[pending.pop(0)])
            _, got = self.engine.step()
            bar.update(sum(s.is_finished for s in got))
            step += 1
        bar.close()
        return [self._output(s) for s in seqs]

    def _output(self, seq: Sequence) -> RequestOutput:
        text = self.tokenizer.decode(seq.output_token_ids) if self.tokenizer else ""
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.prompt_token_ids,
            token_ids=list(seq.output_token_ids),
            text=text,
            finish_reason=seq.finish_reason.value if seq.finish_reason else "abort",
            logprobs=seq.output_logprobs or None,
        )
