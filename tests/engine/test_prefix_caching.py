"""Prefix caching must not change a single token: shared system prompts, multi-turn
conversations, preemption under memory pressure, caching on vs off."""

from __future__ import annotations

import random

from tandem.core.config import CacheConfig, SchedulerConfig
from tandem.core.sampling_params import SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.llm import LLM


def _llm(path, caching: bool, num_blocks: int = 256, budget: int = 64) -> LLM:
    return LLM(
        config=EngineConfig(
            model=str(path),
            device="cpu",
            cache=CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=caching),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=budget, max_num_seqs=8, max_model_len=512
            ),
        )
    )


def _prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(2, 320) for _ in range(37)]
    return [system + [rng.randrange(2, 320) for _ in range(rng.randrange(1, 12))] for _ in range(8)]


def test_shared_system_prompt_is_token_exact_and_hits(tiny_checkpoints):
    path, _ = tiny_checkpoints["llama"]
    prompts = _prompts()
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    seeded = [
        SamplingParams(max_tokens=12, temperature=0.9, seed=i, ignore_eos=True) for i in range(8)
    ]
    params = [greedy if i % 2 else seeded[i] for i in range(8)]
    off = _llm(path, caching=False)
    expected = [o.token_ids for o in off.generate(prompts, params)]
    on = _llm(path, caching=True)
    # The first request alone fills the cache; the others arrive after it finished.
    first = on.generate(prompts[:1], params[:1])
    rest = on.generate(prompts[1:], params[1:])
    assert [o.token_ids for o in first + rest] == expected
    stats = on.engine.kv.prefix_stats
    assert stats.hit_tokens >= 7 * 36  # every later prompt reuses the system prompt's 9 blocks
    assert on.engine.kv.num_used_blocks == 0
    assert off.engine.kv.prefix_stats.hit_tokens == 0


def test_multi_turn_reuses_the_previous_turn_token_exact(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen2"]
    rng = random.Random(1)
    greedy = SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True)
    engines = {caching: _llm(path, caching) for caching in (False, True)}
    conversations = {caching: [] for caching in engines}
    reusable = 0  # tokens of earlier turns whose KV was computed, in whole blocks
    for caching, llm in engines.items():
        rng = random.Random(1)
        prompt: list[int] = []
        for _ in range(4):
            prompt = prompt + [rng.randrange(2, 320) for _ in range(10)]
            (out,) = llm.generate([prompt], greedy)
            conversations[caching].append(out.token_ids)
            prompt = prompt + out.token_ids
            # All of it but the last sampled token has KV: the next turn's prefix.
            reusable += (len(prompt) - 1) // 4 * 4 if caching else 0
    assert conversations[True] == conversations[False]
    last_turn = (len(prompt) - 1) // 4 * 4  # no fifth turn reads it
    assert engines[True].engine.kv.prefix_stats.hit_tokens == reusable - last_turn


def test_eviction_and_preemption_under_pressure_keep_tokens_exact(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen2"]
    prompts = _prompts(seed=2)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    expected = [o.token_ids for o in _llm(path, caching=False).generate(prompts, greedy)]
    # 40 blocks of 4 tokens cannot hold 8 sequences of ~68 tokens: preemption, and the
    # cached blocks of finished requests are evicted to make room.
    small = _llm(path, caching=True, num_blocks=40, budget=32)
    outs = small.generate(prompts, greedy, arrival_steps=[i * 2 for i in range(8)])
    assert [o.token_ids for o in outs] == expected
    kv = small.engine.kv
    assert small.engine.scheduler.num_preemptions > 0
    assert kv.pool.num_evictions > 0 and kv.prefix_stats.hit_tokens > 0
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 40
