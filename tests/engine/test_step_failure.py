"""A step that raises fails the sequences it ran (StepFailed names them); once they are
aborted the engine serves on, with every block back in the pool."""

from __future__ import annotations

import msgspec
import pytest

from tandem.core.config import CacheConfig, SchedulerConfig
from tandem.core.sampling_params import SamplingParams
from tandem.core.sequence import Sequence
from tandem.engine.engine import Engine, EngineConfig, StepFailed

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen2"]
    return Engine(
        EngineConfig(
            model=str(path),
            device="cpu",
            cache=CacheConfig(block_size=4, num_blocks=64),
            scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128),
        )
    )


def _run(engine: Engine, seq: Sequence) -> list[int]:
    engine.add(seq)
    while engine.has_work:
        engine.step()
    return seq.output_token_ids


def test_a_failing_step_names_its_sequences_and_the_engine_serves_on(engine, monkeypatch):
    expected = _run(engine, Sequence("solo", [5, 6, 7], GREEDY))
    a, b = Sequence("a", [5, 6, 7], GREEDY), Sequence("b", [9, 10], GREEDY)
    engine.add(a)
    engine.add(b)
    engine.step()
    launch = engine.runner.launch

    def broken(inputs):
        raise RuntimeError("device fault")

    monkeypatch.setattr(engine.runner, "launch", broken)
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert sorted(failed.value.request_ids) == ["a", "b"]
    monkeypatch.setattr(engine.runner, "launch", launch)
    for rid in failed.value.request_ids:
        engine.scheduler.abort(rid)
    assert engine.kv.num_used_blocks == 0
    assert _run(engine, Sequence("after", [5, 6, 7], GREEDY)) == expected
    assert engine.kv.num_used_blocks == 0


def test_a_sequence_the_sampler_cannot_run_fails_alone(engine):
    # Past every check (as a worker of an older version let it through): the sampler's
    # int64 tensor of top_k overflows.
    bad = msgspec.convert({"max_tokens": 4, "top_k": 2**63}, SamplingParams)
    engine.scheduler.add(Sequence("bad", [5, 6, 7], bad))
    with pytest.raises(StepFailed) as failed:
        while engine.has_work:
            engine.step()
    assert failed.value.request_ids == ["bad"]
    engine.scheduler.abort("bad")
    assert len(_run(engine, Sequence("next", [5, 6, 7], GREEDY))) == 6
    assert engine.kv.num_used_blocks == 0
