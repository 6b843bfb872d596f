"""Greedy tokens identical to transformers `generate`, float32 on CPU."""

from __future__ import annotations

import random

import pytest

from tandem.core.config import CacheConfig, SchedulerConfig
from tandem.core.sampling_params import SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.llm import LLM
from tests.engine.conftest import FAMILIES, hf_greedy

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


def _llm(path, block_size=4, budget=2048, num_blocks=256):
    return LLM(
        config=EngineConfig(
            model=str(path),
            device="cpu",
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_model_len=512),
        )
    )


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_matches_transformers(tiny_checkpoints, family):
    path, hf = tiny_checkpoints[family]
    rng = random.Random(family)
    # Lengths straddle block boundaries (block size 4): 1, 3, 4, 5, 17, 33.
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in (1, 3, 4, 5, 17, 33)]
    outs = _llm(path).generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, 20), f"prompt of {len(prompt)} tokens"
        assert out.finish_reason == "length"


def test_chunked_prefill_matches_transformers(tiny_checkpoints):
    path, hf = tiny_checkpoints["llama"]
    prompt = [random.Random(1).randrange(2, 320) for _ in range(45)]
    # A 7-token budget splits the prompt into chunks that attend to cached tokens.
    out = _llm(path, budget=7).generate([prompt], GREEDY)[0]
    assert out.token_ids == hf_greedy(hf, prompt, 20)
