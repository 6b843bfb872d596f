"""Compile the kernel variants a served step may need, before the first request.

Triton compiles a kernel variant the first time it meets a new set of compile-time
values: the prefill kernel's query tile (16 to 128 rows, from the longest chunk), the
split-KV decode kernel a mixed step uses for its decode rows (split count 1, a multiple
of 16 or another; the merge pass's tile from the split count). CUDA graphs cover pure
decode steps only, so without this the first mixed steps of a server each stalled for a
compile (up to ~0.7 s between two tokens of every running request, measured on an H200).

The forward passes run on synthetic batches over the (still empty) KV cache: every
decode row reads one shared context, the prompt chunk has blocks of its own. Nothing is
sampled and no scheduler state changes.
"""

from __future__ import annotations

import logging
import time

import torch

from tandem.engine.attention import AttentionMetadata

log = logging.getLogger(__name__)

CHUNK_LENGTHS = (9, 17, 33, 129)  # one per prefill query tile: 16, 32, 64, 128 rows


def warm_up_batches(
    max_num_seqs: int, max_tokens: int, max_context: int, num_blocks: int, block_size: int
) -> list[tuple[int, int, int]]:
    """(decode rows, prompt chunk length, decode context) of each warm-up pass: every
    query tile with and without decode rows, and decode rows from 1 to max_num_seqs by
    powers of two over a short and a long context (split counts differ with both)."""

    def fits(decodes: int, chunk: int, context: int) -> bool:
        blocks = -(-context // block_size) + -(-chunk // block_size)
        return decodes + chunk <= max_tokens and blocks <= num_blocks

    long_context = min(max_context, 4096)
    batches = []
    for chunk in CHUNK_LENGTHS:
        for decodes in (0, 1):
            if fits(decodes, chunk, long_context):
                batches.append((decodes, chunk, long_context))
    decodes = 2
    while decodes <= max_num_seqs:
        for context in (min(64, long_context), long_context):
            if fits(decodes, 2, context):
                batches.append((decodes, 2, context))
        decodes *= 2
    return batches


@torch.inference_mode()
def warm_up_kernels(runner, max_num_seqs: int, max_tokens: int, max_context: int) -> int:
    """Run one forward pass per warm_up_batches() entry; returns how many ran."""
    num_blocks = runner.kv_cache.num_blocks
    bs = runner.block_size
    batches = warm_up_batches(max_num_seqs, max_tokens, max_context, num_blocks, bs)
    start = time.perf_counter()
    for decodes, chunk, context in batches:
        meta, positions = synthetic_step(decodes, chunk, context, bs, runner.device)
        ids = torch.zeros(positions.shape[0], dtype=torch.long, device=runner.device)
        runner.model(ids, positions, runner.kv_cache.layers, meta)
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    log.info(
        "warmed %d kernel variants' batches in %.1fs", len(batches), time.perf_counter() - start
    )
    return len(batches)


def synthetic_step(
    decodes: int, chunk: int, context: int, block_size: int, device: torch.device
) -> tuple[AttentionMetadata, torch.Tensor]:
    """(metadata, positions) of `decodes` one-token rows at the end of a shared
    `context`, then one whole prompt of `chunk` tokens in the blocks after that
    context's (with no decodes and no context: blocks 0.. in order)."""
    shared = list(range(-(-context // block_size)))
    own = list(range(len(shared), len(shared) + -(-chunk // block_size)))
    last = context - 1
    positions = [last] * decodes + list(range(chunk))
    slots = []
    if decodes:
        slots = [shared[last // block_size] * block_size + last % block_size] * decodes
    slots += [own[p // block_size] * block_size + p % block_size for p in range(chunk)]
    tables = [shared] * decodes + [own]
    width = max(len(t) for t in tables)
    query_lens = [1] * decodes + [chunk]
    context_lens = [context] * decodes + [chunk]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)

    def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)

    meta = AttentionMetadata(
        slot_mapping=tensor(slots, torch.long),
        block_tables=tensor([t + [0] * (width - len(t)) for t in tables], torch.int32),
        context_lens=tensor(context_lens, torch.int32),
        query_start_loc=tensor(starts, torch.int32),
        query_lens_host=query_lens,
        context_lens_host=context_lens,
        block_tables_host=tables,
        max_query_len=max(query_lens),
    )
    return meta, tensor(positions, torch.long)
