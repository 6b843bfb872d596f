"""Continuous batching must not change results: staggered arrivals, chunked prefill and
preemption give each prompt exactly its solo output, and leave the pool empty."""

from __future__ import annotations

import random

from tandem.core.config import CacheConfig, SchedulerConfig
from tandem.core.sampling_params import SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.llm import LLM


def _llm(path, num_blocks, budget=64, overlap=True):
    return LLM(
        config=EngineConfig(
            model=str(path),
            device="cpu",
            cache=CacheConfig(block_size=4, num_blocks=num_blocks),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=budget, max_num_seqs=16, max_model_len=512
            ),
            overlap_scheduling=overlap,
        )
    )


def test_staggered_batch_with_preemption_equals_solo_runs(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen2"]
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 320) for _ in range(rng.randrange(1, 40))] for _ in range(16)]
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    seeded = [
        SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True)
        for i in range(16)
    ]
    params = [greedy if i % 2 else seeded[i] for i in range(16)]

    solo_llm = _llm(path, num_blocks=512, overlap=False)
    solo = [solo_llm.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params, strict=True)]

    # 40 blocks of 4 tokens cannot hold 16 sequences of up to 63 tokens: forces preemption.
    small = _llm(path, num_blocks=40, budget=32)
    outs = small.generate(prompts, params, arrival_steps=[i * 3 for i in range(16)])
    assert [o.token_ids for o in outs] == solo
    assert small.engine.scheduler.num_preemptions > 0
    # Most decode steps ran on inputs built while the previous step ran.
    assert small.engine.num_planned_steps > 0
    assert small.engine.kv.num_used_blocks == 0
    assert small.engine.kv.num_free_blocks == 40


def test_step_built_ahead_skips_a_sequence_aborted_while_the_step_ran(tiny_checkpoints):
    """A decode worker's control thread may abort a running sequence between a step's
    launch and the building of the next step's inputs: nothing may be allocated for it."""
    from tandem.core.sequence import Sequence

    path, _ = tiny_checkpoints["qwen2"]
    engine = _llm(path, num_blocks=64).engine
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for rid, n in (("a", 4), ("b", 7)):  # "a" enters a new 4-token block next step
        engine.add(Sequence(rid, list(range(10, 10 + n)), sp))
    engine.step()  # both prompts in one prefill step
    out = engine.scheduler.schedule()
    inputs = engine.runner.prepare(out, engine.kv)
    pending = engine.runner.launch(inputs)
    engine.scheduler.abort("a")
    assert engine.runner.prepare_next(out, inputs, pending, engine.kv) is None
    assert not engine.kv.owns("a")
    engine.scheduler.update(out, *pending.result())
    while engine.scheduler.has_work:
        engine.step()
    assert engine.kv.num_used_blocks == 0


def test_prefill_cap_changes_chunking_not_tokens_and_survives_the_model_len_clamp(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen2"]  # max_position_embeddings 512 < max_model_len
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in (3, 29, 41, 17)]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = _llm(path, num_blocks=256).generate(prompts, greedy)
    capped = LLM(
        config=EngineConfig(
            model=str(path),
            device="cpu",
            cache=CacheConfig(block_size=4, num_blocks=256),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=64, max_num_seqs=16, max_prefill_tokens=5
            ),
        )
    )
    config = capped.engine.scheduler.config
    assert (config.max_model_len, config.prefill_budget) == (512, 5)
    outs = capped.generate(prompts, greedy, arrival_steps=[0, 0, 2, 4])
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
