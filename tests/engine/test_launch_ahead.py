"""Launching step N+1 before step N's tokens are read (the CUDA default, forced on here
on CPU) must not change a single token, and must not hand out a block that a launched
step may still write."""

from __future__ import annotations

import random
import threading
import time

from tandem.core.config import CacheConfig, SchedulerConfig
from tandem.core.sampling_params import SamplingParams
from tandem.core.sequence import Sequence
from tandem.engine.engine import LAUNCH_AHEAD_MARGIN_S, EngineConfig
from tandem.engine.llm import LLM


def _llm(path, num_blocks=256, launch_ahead=True, budget=64):
    return LLM(
        config=EngineConfig(
            model=str(path),
            device="cpu",
            cache=CacheConfig(block_size=4, num_blocks=num_blocks),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=budget, max_num_seqs=16, max_model_len=512
            ),
            launch_ahead=launch_ahead,
        )
    )


def _params(rng: random.Random, i: int, eos: int) -> SamplingParams:
    kind = i % 4
    if kind == 0:  # greedy to max_tokens
        return SamplingParams(max_tokens=rng.randrange(1, 30), temperature=0.0, ignore_eos=True)
    if kind == 1:  # may stop early on a stop token: the launched-ahead token is dropped
        return SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[eos])
    if kind == 2:  # reads the token history: never launched ahead
        return SamplingParams(
            max_tokens=20, temperature=0.0, repetition_penalty=1.3, ignore_eos=True
        )
    return SamplingParams(max_tokens=20, temperature=0.7, seed=i, ignore_eos=True)


def test_launch_ahead_gives_the_same_tokens(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen2"]
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 320) for _ in range(rng.randrange(1, 30))] for _ in range(12)]
    reference = _llm(path, launch_ahead=False)
    # A stop token that greedy decoding of these prompts really produces mid-answer.
    probe = reference.generate(
        prompts[1:2], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    )[0].token_ids
    params = [_params(rng, i, probe[len(probe) // 2]) for i in range(12)]
    expected = [reference.generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]

    for arrivals in ([0] * 12, [i * 5 for i in range(12)]):
        ahead = _llm(path)
        outs = ahead.generate(prompts, params, arrival_steps=arrivals)
        assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
        assert [o.finish_reason for o in outs] == [e.finish_reason for e in expected]
        assert ahead.engine.kv.num_used_blocks == 0
        assert ahead.engine.num_launched_ahead > 0
    assert reference.engine.num_launched_ahead == 0
    assert any(e.finish_reason == "stop" for e in expected)


def test_launch_ahead_under_preemption_equals_solo_runs(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen2"]
    rng = random.Random(2)
    prompts = [[rng.randrange(2, 320) for _ in range(rng.randrange(8, 40))] for _ in range(10)]
    sp = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    solo = _llm(path, launch_ahead=False)
    expected = [solo.generate([p], sp)[0].token_ids for p in prompts]
    small = _llm(path, num_blocks=40, budget=32)
    outs = small.generate(prompts, sp, arrival_steps=[i * 2 for i in range(10)])
    assert [o.token_ids for o in outs] == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.num_launched_ahead > 0
    assert small.engine.kv.num_used_blocks == 0


def test_blocks_freed_under_a_launched_step_wait_for_it(tiny_checkpoints):
    """An abort between steps frees the sequence while the step launched ahead still
    holds its row: its blocks stay out of the pool until that step is done."""
    path, _ = tiny_checkpoints["qwen2"]
    engine = _llm(path).engine
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add(Sequence("a", list(range(10, 17)), sp))
    engine.add(Sequence("b", list(range(20, 25)), sp))
    engine.step()  # prefill of both
    engine.step()  # a decode; the next one is launched ahead
    assert engine.has_work and engine._ahead is not None
    held = len(engine.kv.block_table("a"))
    free_before = engine.kv.num_free_blocks
    engine.scheduler.abort("a")
    assert not engine.kv.owns("a")
    assert engine.kv.num_parked_blocks == held
    assert engine.kv.num_free_blocks == free_before
    _, got = engine.step()  # the launched-ahead step completes; "a" gets nothing
    assert [s.request_id for s in got] == ["b"]
    assert engine.kv.num_parked_blocks == 0
    assert engine.kv.num_free_blocks >= free_before + held - 1  # b may have grown a block
    engine.scheduler.abort("b")
    while engine.has_work:
        engine.step()
    assert engine.kv.num_used_blocks == 0


def test_a_waiting_arrival_holds_the_launch_ahead_back(tiny_checkpoints):
    """A worker's pending arrival (Engine.arrivals_pending) keeps the next step from
    being launched ahead, so the arrival joins it; the tokens do not change."""
    path, _ = tiny_checkpoints["qwen2"]
    prompts = [[3 + i, 7, 11 + i] for i in range(4)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    runs = {}
    for waiting in (False, True):
        llm = _llm(path)
        llm.engine.arrivals_pending = lambda waiting=waiting: waiting
        runs[waiting] = [o.token_ids for o in llm.generate(prompts, sp)]
        assert (llm.engine.num_launched_ahead > 0) is not waiting
    assert runs[True] == runs[False]


class _DeviceStep:
    """A PendingStep stand-in that the device finishes at `end`."""

    def __init__(self, end: float) -> None:
        self.end = end

    def done(self) -> bool:
        return time.perf_counter() >= self.end


def test_the_launch_ahead_waits_until_the_step_nearly_ends(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen2"]
    engine = _llm(path).engine
    arrived = threading.Event()
    engine.arrivals_pending = arrived.is_set
    engine._decode_step_s = 0.2
    # No arrival: launched LAUNCH_AHEAD_MARGIN_S before the expected end, not at once.
    start = time.perf_counter()
    assert engine._wait_to_launch_ahead(_DeviceStep(start + 1.0), start)
    waited = time.perf_counter() - start
    assert 0.2 - LAUNCH_AHEAD_MARGIN_S - 0.01 < waited < 0.5
    # A step the device already finished: launched at once.
    start = time.perf_counter()
    assert engine._wait_to_launch_ahead(_DeviceStep(start), start - 0.5)
    # An arrival while waiting: not launched ahead, and no longer waiting.
    engine._decode_step_s = 5.0
    threading.Timer(0.05, arrived.set).start()
    start = time.perf_counter()
    assert not engine._wait_to_launch_ahead(_DeviceStep(start + 10), start)
    assert time.perf_counter() - start < 1.0
