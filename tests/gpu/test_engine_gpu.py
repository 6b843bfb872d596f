"""The CUDA fast path (Triton kernels, CUDA graphs) on the GPU machine: `pytest -m gpu`."""

from __future__ import annotations

import pytest

from tandem.core.config import CacheConfig, SchedulerConfig
from tandem.core.sampling_params import SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.llm import LLM
from tests.engine.conftest import hf_greedy, make_tiny_checkpoint
from tests.gpu.conftest import SHAPE

pytestmark = pytest.mark.gpu

PROMPTS = [
    [(7 * i + 3 * j) % 2000 + 2 for j in range(n)] for i, n in enumerate((1, 15, 16, 17, 90))
]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _llm(path, **kw) -> LLM:
    return LLM(
        config=EngineConfig(
            model=str(path),
            device="cuda",
            dtype="float32",
            cache=CacheConfig(num_blocks=512),
            scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=512),
            **kw,
        )
    )


def test_triton_and_graphs_match_transformers_float32(checkpoint):
    path, hf = checkpoint
    llm = _llm(path)
    assert llm.engine.runner.graphs is not None and llm.engine.runner.ops.name == "triton"
    for out in llm.generate(PROMPTS, GREEDY):
        assert out.token_ids == hf_greedy(hf, out.prompt_token_ids, 24)


def test_graphs_equal_eager(checkpoint):
    path, _ = checkpoint
    a = [o.token_ids for o in _llm(path).generate(PROMPTS, GREEDY)]
    eager = _llm(path, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    assert a == [o.token_ids for o in eager.generate(PROMPTS, GREEDY)]


def test_bfloat16_dummy_llama_shape_runs_batched():
    llm = LLM(
        config=EngineConfig(
            model="llama-3.1-8b",
            device="cuda",
            load_format="dummy",
            scheduler=SchedulerConfig(max_num_seqs=64, max_model_len=2048),
        )
    )
    prompts = [[(i * 7 + j) % 1000 for j in range(100 + i)] for i in range(40)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))
    assert all(len(o.token_ids) == 20 for o in outs)
    assert llm.engine.kv.num_used_blocks == 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_contexts_crossing_the_short_graph_limit_equal_eager(family, tmp_path):
    """Small batches replay a short-context graph up to SHORT_CONTEXT tokens and the
    long one past it; a sequence crossing the limit mid-answer must not notice."""
    from tandem.engine.cuda_graphs import SHORT_CONTEXT

    make_tiny_checkpoint(tmp_path, family, **SHAPE, max_position_embeddings=2048)
    prompts = [[(5 * i + j) % 2000 + 2 for j in range(SHORT_CONTEXT - 10 + i)] for i in range(3)]

    def llm(**kw) -> LLM:
        return LLM(
            config=EngineConfig(
                model=str(tmp_path),
                device="cuda",
                dtype="float32",
                cache=CacheConfig(num_blocks=512),
                scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=2048),
                **kw,
            )
        )

    graphs, eager = llm(), llm(enforce_eager=True)
    assert {short for _, short in graphs.engine.runner.graphs.graphs} == {False, True}
    want = [o.token_ids for o in eager.generate(prompts, GREEDY)]
    assert [o.token_ids for o in graphs.generate(prompts, GREEDY)] == want


def test_launch_ahead_equals_waiting_for_each_step(checkpoint):
    path, _ = checkpoint
    ahead = _llm(path)
    stop = SamplingParams(
        max_tokens=24,
        temperature=0.0,
        stop_token_ids=[ahead.generate(PROMPTS[:1], GREEDY)[0].token_ids[9]],
    )
    params = [GREEDY, stop, GREEDY, stop, GREEDY]
    a = [(o.token_ids, o.finish_reason) for o in ahead.generate(PROMPTS, params)]
    assert ahead.engine.num_launched_ahead > 0
    plain = _llm(path, launch_ahead=False)
    assert a == [(o.token_ids, o.finish_reason) for o in plain.generate(PROMPTS, params)]
    assert plain.engine.num_launched_ahead == 0
    assert ahead.engine.kv.num_used_blocks == 0
