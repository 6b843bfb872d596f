"""Piecewise prefill graphs (engine/prefill_graphs.py) on the GPU: `pytest -m gpu`.

Steps that are not plain decodes replay the captured pieces with attention launched
between them; the tokens must equal the eager forward's and transformers'."""

from __future__ import annotations

import pytest
import torch

from tandem.core.config import CacheConfig, SchedulerConfig
from tandem.core.sampling_params import SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.llm import LLM
from tandem.engine.warmup import synthetic_step
from tests.engine.conftest import hf_greedy

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _llm(path, prefill_graph_tokens: int, budget: int = 256, **cache) -> LLM:
    return LLM(
        config=EngineConfig(
            model=str(path),
            device="cuda",
            dtype="float32",
            cache=CacheConfig(num_blocks=512, **cache),
            scheduler=SchedulerConfig(
                max_num_seqs=16, max_model_len=1024, max_num_batched_tokens=budget
            ),
            prefill_graph_tokens=prefill_graph_tokens,
        )
    )


def test_short_prompts_through_the_graphs_match_transformers(checkpoint):
    path, hf = checkpoint
    llm = _llm(path, 256)
    graphs = llm.engine.runner.prefill_graphs
    assert graphs is not None and graphs.buckets == [16, 32, 64, 128, 256]
    # Lengths off the buckets (padding rows) and on them.
    prompts = [
        [(11 * i + 5 * j) % 2000 + 2 for j in range(n)] for i, n in enumerate((3, 16, 45, 200))
    ]
    for prompt in prompts:  # one at a time: each first step is a pure prefill
        out = llm.generate([prompt], GREEDY)[0]
        assert out.token_ids == hf_greedy(hf, prompt, GREEDY.max_tokens)
    assert graphs.num_replays >= len(prompts)


def test_mixed_steps_and_cached_prefixes_equal_eager(checkpoint):
    """Staggered arrivals make steps that mix prefill chunks (some behind a cached
    prefix, some split by the token budget) with running decodes."""
    path, _ = checkpoint
    shared = [(3 * j) % 2000 + 2 for j in range(150)]
    prompts = [shared + [(7 * i + j) % 2000 + 2 for j in range(10 + 9 * i)] for i in range(8)]
    prompts += [[(13 * i + j) % 2000 + 2 for j in range(300 + i)] for i in range(2)]
    arrivals = [0, 1, 2, 3, 5, 8, 9, 12, 4, 6]
    runs = {}
    for tokens in (0, 256):
        llm = _llm(path, tokens, budget=128)
        outs = llm.generate(prompts, GREEDY, arrival_steps=arrivals)
        runs[tokens] = [o.token_ids for o in outs]
        assert llm.engine.kv.num_used_blocks == 0
        if tokens:
            assert llm.engine.runner.prefill_graphs.num_replays > 10
        else:
            assert llm.engine.runner.prefill_graphs is None
    assert runs[256] == runs[0]


def test_bfloat16_llama_shape_graphs_match_the_eager_forward():
    """The real shape's kernels (bf16, head_dim 128, GQA 4:1) in the graphs: a prefill
    step and a mixed step give the eager forward's hidden states, up to bf16 rounding:
    cuBLAS tiles the padded row count differently, and 32 layers of random weights
    grow that to ~2.4% of the norm (measured on an H100); a wrong buffer or a stale
    attention output is off by the norm itself. The float32 tests above are exact."""
    llm = LLM(
        config=EngineConfig(
            model="llama-3.1-8b",
            device="cuda",
            load_format="dummy",
            scheduler=SchedulerConfig(max_num_seqs=32, max_model_len=2048),
        )
    )
    runner = llm.engine.runner
    layers = runner.kv_cache.layers
    # First a whole prompt (fills the blocks the mixed step's decode rows read), then
    # two decode rows over it beside a 100-token chunk: 102 tokens, the 128 bucket.
    for decodes, chunk, context in ((0, 300, 0), (2, 100, 300)):
        meta, positions = synthetic_step(decodes, chunk, context, runner.block_size, "cuda")
        ids = torch.randint(0, 1000, (positions.shape[0],), device="cuda")
        with torch.inference_mode():
            eager = runner.model(ids, positions, layers, meta).float()
            graphs = runner.prefill_graphs.run(ids, positions, meta).float()
        assert graphs.shape == eager.shape
        assert ((graphs - eager).norm() / eager.norm()).item() < 5e-2
    assert runner.prefill_graphs.num_replays == 2
    runner.release_gpu_memory()
