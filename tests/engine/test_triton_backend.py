"""The engine on the Triton kernels (the GPU fast path) gives the same greedy tokens as
the torch reference path: runs under the Triton interpreter on CPU in CI."""

from __future__ import annotations

import random

from tandem.core.config import CacheConfig, SchedulerConfig
from tandem.core.sampling_params import SamplingParams
from tandem.engine.engine import EngineConfig
from tandem.engine.llm import LLM


def test_triton_ops_generate_like_torch_ops(tiny_checkpoints):
    path, _ = tiny_checkpoints["qwen3"]  # GQA, q/k norm, tied embeddings
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 320) for _ in range(n)] for n in (3, 17, 33)]
    sp = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            config=EngineConfig(
                model=str(path),
                device="cpu",
                attention_backend=backend,
                cache=CacheConfig(block_size=16, num_blocks=64),
                # A 20-token budget chunks the 33-token prompt: prefill over cached tokens.
                scheduler=SchedulerConfig(max_num_batched_tokens=20, max_model_len=512),
            )
        )
        assert llm.engine.runner.ops.name == backend
        results[backend] = [o.token_ids for o in llm.generate(prompts, sp)]
    assert results["triton"] == results["torch"]


def test_warm_up_batches_cover_every_prefill_tile_and_decode_batch_that_fits():
    from tandem.engine.warmup import warm_up_batches

    batches = warm_up_batches(
        max_num_seqs=8, max_tokens=2048, max_context=8192, num_blocks=10_000, block_size=16
    )
    tiles = {(d, chunk) for d, chunk, _ in batches if chunk > 2}
    assert tiles == {(d, c) for d in (0, 1) for c in (9, 17, 33, 129)}
    assert {(d, ctx) for d, chunk, ctx in batches if chunk == 2} == {
        (d, ctx) for d in (2, 4, 8) for ctx in (64, 4096)
    }
    # A 40-token budget and 20 blocks of 16: no 129-token chunk, no 4096-token context.
    small = warm_up_batches(
        max_num_seqs=4, max_tokens=40, max_context=256, num_blocks=20, block_size=16
    )
    assert max(chunk for _, chunk, _ in small) == 33
    assert max(ctx for _, _, ctx in small) == 256
    assert all(d + chunk <= 40 for d, chunk, _ in small)


def test_warm_up_passes_run_on_the_kernels_and_leave_generation_unchanged(tiny_checkpoints):
    from tandem.engine.warmup import warm_up_kernels

    path, _ = tiny_checkpoints["llama"]
    prompts = [[5, 6, 7], list(range(2, 40))]
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = []
    for warm in (False, True):
        llm = LLM(
            config=EngineConfig(
                model=str(path),
                device="cpu",
                attention_backend="triton",
                cache=CacheConfig(block_size=16, num_blocks=48),
                scheduler=SchedulerConfig(
                    max_num_seqs=4, max_num_batched_tokens=40, max_model_len=512
                ),
            )
        )
        if warm:  # on CUDA the engine does this itself at start
            assert warm_up_kernels(llm.engine.runner, 4, 40, 512) == 10
        outputs.append([o.token_ids for o in llm.generate(prompts, sp)])
    assert outputs[0] == outputs[1]


def test_synthetic_step_without_decodes_is_one_prompt_in_blocks_in_order():
    # What the CUDA memory profile runs: max_tokens tokens in blocks 0, 1, 2, ...
    import torch

    from tandem.engine.warmup import synthetic_step

    meta, positions = synthetic_step(0, 37, 0, 16, torch.device("cpu"))
    assert positions.tolist() == list(range(37))
    assert meta.slot_mapping.tolist() == list(range(37))
    assert meta.block_tables.tolist() == [[0, 1, 2]]
    assert (meta.context_lens.tolist(), meta.query_start_loc.tolist()) == ([37], [0, 37])
    assert (meta.max_query_len, meta.num_decode_rows) == (37, 0)
