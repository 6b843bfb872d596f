"""The engine on the Triton kernels (the GPU fast path) gives the same greedy tokens as
the torch reference path: runs under the Triton interpreter on CPU in CI."""

from __future__ import annotations

import random

from core.config import CacheConfig, SchedulerConfig
from core.sampling_params import SamplingParams
from engine.engine import EngineConfig
from engine.llm import LLM


def test_triton_ops_generate_like_torch_ops(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen3"]  # GQA, q/k norm, tied embeddings
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in (3, 17, 33)]
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(config=EngineConfig(
            model=str(path), device="cpu", attention_backend=backend,
            cache=CacheConfig(block_size=16, num_blocks=64),
            # A 20-token budget chunks the 33-token prompt: prefill over cached tokens.
            scheduler=SchedulerConfig(max_num_batched_tokens=20, max_model_len=512)))
        assert llm.engine.runner.ops.name == backend
        results[backend] = [o.token_ids for o in llm.generate(prompts, sp)]
    assert results["triton"] == results["torch"]
