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


# Both ways a step starts: scheduled and built on the spot, or launched ahead while the
# step before it ran (as on CUDA).
@pytest.fixture(params=[False, True], ids=["scheduled", "launched-ahead"])
def engine(tiny_checkpoints, request):
    path, _ = tiny_checkpoints["qwen2"]
    return Engine(
        EngineConfig(
            model=str(path),
            device="cpu",
            cache=CacheConfig(block_size=4, num_blocks=64),
            scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8, max_model_len=128),
            launch_ahead=request.param,
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


# -- step isolation: one bad request in a batch ------------------------------------------
MARK = 300  # a prompt starting with this token raises in the sampler once it decodes
PROMPTS = {"p0": [5, 6, 7], "p1": [9, 10], "p2": [11, 12, 13, 14, 15], "p3": [20, 21, 22, 23]}


def _run_all(engine: Engine, seqs: list[Sequence]) -> dict[str, list[int]]:
    for seq in seqs:
        engine.add(seq)
    while engine.has_work:
        engine.step()
    return {seq.request_id: seq.output_token_ids for seq in seqs}


def _run_failing(engine: Engine, seqs: list[Sequence]) -> list[StepFailed]:
    """Run `seqs` to the end as a worker does: the requests a step failed are aborted."""
    for seq in seqs:
        engine.add(seq)
    failures = []
    while engine.has_work:
        try:
            engine.step()
        except StepFailed as failed:
            failures.append(failed)
            for rid in failed.request_ids:
                engine.scheduler.abort(rid)
    return failures


def _raise_for_marked(monkeypatch, where: str, calls: list[int]) -> None:
    """Sampling (inside the launch) or reading the step's results (where a device fault
    surfaces on CUDA) raises for any batch holding the marked request once it decodes."""
    from tandem.engine import model_runner

    real = getattr(model_runner, where)

    def hooked(first, rows, *rest):
        calls.append(len(rows))
        if any(r.prompt_token_ids[0] == MARK and r.output_token_ids for r in rows):
            raise OverflowError("Overflow when unpacking long long")
        return real(first, rows, *rest)

    monkeypatch.setattr(model_runner, where, hooked)


@pytest.mark.parametrize("where", ["sample_tokens", "top_logprobs"])
def test_only_the_request_that_raises_fails_and_its_batch_runs_on(engine, monkeypatch, where):
    free_at_start = engine.kv.num_free_blocks
    clean = _run_all(engine, [Sequence(rid, p, GREEDY) for rid, p in PROMPTS.items()])
    calls: list[int] = []
    _raise_for_marked(monkeypatch, where, calls)
    seqs = [Sequence(rid, p, GREEDY) for rid, p in PROMPTS.items()]
    seqs.insert(2, Sequence("marked", [MARK, 7, 8], GREEDY))
    failures = _run_failing(engine, seqs)
    assert [f.request_ids for f in failures] == [["marked"]]
    assert {s.request_id for s in failures[0].got} == set(PROMPTS), "the rest got tokens"
    assert max(calls) == 5, "the marked request ran batched with the others"
    assert {s.request_id: s.output_token_ids for s in seqs if s.request_id in PROMPTS} == clean
    assert engine.kv.num_free_blocks == free_at_start


def test_a_request_whose_inputs_cannot_be_built_fails_alone(engine, monkeypatch):
    free_at_start = engine.kv.num_free_blocks
    clean = _run_all(engine, [Sequence(rid, p, GREEDY) for rid, p in PROMPTS.items()])
    real = engine.runner.prepare

    def prepare(out, kv):
        if any(c.seq.request_id == "marked" and c.seq.output_token_ids for c in out.chunks):
            raise IndexError("list index out of range")
        return real(out, kv)

    monkeypatch.setattr(engine.runner, "prepare", prepare)
    # Planned inputs skip prepare(); without them every step builds its own.
    monkeypatch.setattr(engine.runner, "prepare_next", lambda *args: None)
    seqs = [Sequence("marked", [MARK, 7, 8], GREEDY)]
    seqs += [Sequence(rid, p, GREEDY) for rid, p in PROMPTS.items()]
    assert [f.request_ids for f in _run_failing(engine, seqs)] == [["marked"]]
    assert {s.request_id: s.output_token_ids for s in seqs[1:]} == clean
    assert engine.kv.num_free_blocks == free_at_start


def test_building_the_next_step_raising_fails_nothing_and_leaks_no_block(engine, monkeypatch):
    free_at_start = engine.kv.num_free_blocks
    clean = _run_all(engine, [Sequence(rid, p, GREEDY) for rid, p in PROMPTS.items()])
    real = engine.runner.prepare_next
    built = []

    def prepare_next(out, inputs, pending, kv):
        nxt = real(out, inputs, pending, kv)  # blocks for the next token are taken here
        if nxt is not None:
            built.append(len(out.chunks))
            raise RuntimeError("building the next step failed")
        return nxt

    monkeypatch.setattr(engine.runner, "prepare_next", prepare_next)
    seqs = [Sequence(rid, p, GREEDY) for rid, p in PROMPTS.items()]
    assert _run_all(engine, seqs) == clean
    assert built, "the next step was built (and raised) at least once"
    assert engine.kv.num_free_blocks == free_at_start


def test_isolation_is_bounded_when_every_run_fails(tiny_checkpoints, monkeypatch):
    path, _ = tiny_checkpoints["qwen2"]
    engine = Engine(
        EngineConfig(
            model=str(path),
            device="cpu",
            cache=CacheConfig(block_size=4, num_blocks=256),
            scheduler=SchedulerConfig(
                max_num_batched_tokens=256, max_num_seqs=64, max_model_len=128
            ),
        )
    )
    seqs = [Sequence(f"s{i}", [5 + i % 50, 6, 7], GREEDY) for i in range(40)]
    for seq in seqs:
        engine.add(seq)
    launches = []

    def broken(inputs):
        launches.append(len(inputs.samplers))
        raise RuntimeError("device fault")

    monkeypatch.setattr(engine.runner, "launch", broken)
    with pytest.raises(StepFailed) as failed:
        engine.step()
    assert sorted(failed.value.request_ids) == sorted(s.request_id for s in seqs)
    assert len(launches) == 1 + 16, "the failed step and at most 16 re-runs"
    for rid in failed.value.request_ids:
        engine.scheduler.abort(rid)
    assert engine.kv.num_used_blocks == 0
