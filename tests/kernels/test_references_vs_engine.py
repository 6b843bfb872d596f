"""The `_ref` functions against the engine's own torch path (engine/attention.py,
engine/ops.TorchOps, engine/rope.py, kvtransfer/pack.py), and the engine's kernel path
(engine/ops.TritonOps) against TorchOps: kernel == reference == engine."""

from __future__ import annotations

import pytest
import torch

from tandem.engine.attention import AttentionMetadata, paged_attention_torch
from tandem.engine.attention import store_kv as engine_store_kv
from tandem.engine.ops import TorchOps, TritonOps
from tandem.engine.rope import rope_inv_freq
from tandem.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from tandem.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from tandem.kernels.rmsnorm import fused_add_rms_norm_ref, rms_norm_ref
from tandem.kernels.rotary import apply_rotary_ref, build_cos_sin_cache
from tandem.kernels.rotary_store_kv import store_kv_ref
from tandem.kernels.silu_mul import silu_and_mul_ref
from tests.kernels.helpers import PagedBatch, assert_close, make_paged_batch

LLAMA3_SCALING = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


def _meta(batch: PagedBatch, block_size: int) -> AttentionMetadata:
    slots = []
    for q_len, ctx, table in zip(batch.query_lens, batch.ctx_lens, batch.tables, strict=True):
        slots += [
            table[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx)
        ]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=batch.cache.device),
        block_tables=batch.block_tables,
        context_lens=batch.context_lens,
        query_start_loc=batch.query_start_loc,
        query_lens_host=batch.query_lens,
        context_lens_host=batch.ctx_lens,
        block_tables_host=[list(t) for t in batch.block_tables.tolist()],
    )


def test_prefill_reference_and_kernel_match_engine(device, seed):
    # Whole prompt, chunk after cached tokens, decode row: all three engine branches.
    query_lens, ctx_lens = [24, 10, 1], [24, 45, 30]
    batch = make_paged_batch(ctx_lens, query_lens, 2, 64, 16, torch.float32, device)
    q = torch.randn(sum(query_lens), 8, 64, device=device)
    engine = paged_attention_torch(q, batch.cache, _meta(batch, 16), 0.125)
    args = (batch.block_tables, batch.query_start_loc, batch.context_lens, 0.125, 24)
    assert_close(paged_prefill_attention_ref(q, batch.cache, *args), engine, seed, "ref")
    assert_close(paged_prefill_attention(q, batch.cache, *args), engine, seed, "kernel")


def test_decode_reference_and_kernel_match_engine(device, seed):
    ctx_lens = [1, 31, 77]
    batch = make_paged_batch(ctx_lens, [1, 1, 1], 2, 64, 16, torch.float32, device)
    q = torch.randn(3, 8, 64, device=device)
    engine = paged_attention_torch(q, batch.cache, _meta(batch, 16), 0.125)
    args = (batch.block_tables, batch.context_lens, 0.125)
    assert_close(paged_decode_attention_ref(q, batch.cache, *args), engine, seed, "ref")
    assert_close(
        paged_decode_attention(q, batch.cache, *args, num_splits=2), engine, seed, "kernel"
    )


def test_store_kv_reference_matches_engine(seed):
    cache = torch.randn(2, 6, 16, 2, 64)
    key, value = torch.randn(20, 2, 64), torch.randn(20, 2, 64)
    slots = torch.randperm(6 * 16)[:20]
    want, got = cache.clone(), cache.clone()
    engine_store_kv(want, key, value, slots)
    store_kv_ref(got, key, value, slots)
    assert torch.equal(got, want), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_references_match_engine(seed, dtype):
    ops = TorchOps()
    weight = torch.randn(96).to(dtype)
    x, residual = torch.randn(7, 96).to(dtype), torch.randn(7, 96).to(dtype)
    assert torch.equal(rms_norm_ref(x, weight, 1e-6), ops.rms_norm(x, weight, 1e-6)), seed
    out, new_res = fused_add_rms_norm_ref(x, residual, weight, 1e-6)
    want_out, want_res = ops.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(new_res, want_res), f"seed={seed}"
    assert torch.equal(out, want_out), f"seed={seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
def test_rotary_reference_matches_engine(seed, dtype, scaling):
    ops = TorchOps()
    inv_freq = rope_inv_freq(64, 500000.0, scaling)
    table = build_cos_sin_cache(inv_freq, 1024)
    positions = torch.randint(0, 1024, (13,))
    cos, sin = ops.rope_tables(positions, inv_freq, None, torch.float32)
    # The kernel's table holds exactly the engine's float32 cos/sin values.
    assert torch.equal(table[positions], torch.cat((cos[:, 0, :32], sin[:, 0, :32]), -1)), seed
    q, k = torch.randn(13, 4, 64).to(dtype), torch.randn(13, 2, 64).to(dtype)
    want_q, want_k = ops.rotary(q, k, ops.rope_tables(positions, inv_freq, None, dtype))
    got_q, got_k = apply_rotary_ref(q, k, positions, table)
    # bf16: the engine rounds cos/sin and each product to bf16; the reference does the
    # math in fp32 and rounds once, hence the bf16 tolerance, not equality.
    assert_close(got_q, want_q, seed, "q")
    assert_close(got_k, want_k, seed, "k")


def test_silu_and_mul_reference_matches_engine(seed):
    x = torch.randn(5, 2 * 48) * 3
    assert torch.equal(silu_and_mul_ref(x), TorchOps.silu_and_mul(x)), f"seed={seed}"


def test_triton_ops_match_torch_ops(device, seed):
    """The engine's kernel path, op by op, on the same inputs as its torch path."""
    with torch.device(device):  # every tensor below is created on the kernels' device
        _compare_ops(device, seed)


def _compare_ops(device: str, seed: int) -> None:
    torch_ops, triton_ops = TorchOps(), TritonOps()
    x, residual, weight = torch.randn(6, 64), torch.randn(6, 64), torch.randn(64)
    assert_close(
        triton_ops.rms_norm(x, weight, 1e-6), torch_ops.rms_norm(x, weight, 1e-6), seed, "rms_norm"
    )
    for got, want in zip(
        triton_ops.add_rms_norm(x, residual, weight, 1e-6),
        torch_ops.add_rms_norm(x, residual, weight, 1e-6),
        strict=True,
    ):
        assert_close(got, want, seed, "add_rms_norm")
    gate_up = torch.randn(6, 2 * 40)
    assert_close(triton_ops.silu_and_mul(gate_up), torch_ops.silu_and_mul(gate_up), seed, "silu")

    inv_freq = rope_inv_freq(64, 10000.0, None)
    positions = torch.randint(0, 256, (6,))
    q, k = torch.randn(6, 4, 64), torch.randn(6, 2, 64)
    want = torch_ops.rotary(q, k, torch_ops.rope_tables(positions, inv_freq, None, q.dtype))
    tables = triton_ops.rope_tables(
        positions, inv_freq, build_cos_sin_cache(inv_freq, 256), q.dtype
    )
    got = apply_rotary_ref(q, k, *tables)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, seed, "rotary")

    cases = (
        ([5, 1], [5, 20], 0),  # prefill
        ([1, 1], [9, 40], 2),  # decode
        # Mixed: two decodes (the decode kernel), then a chunk after cached tokens, a
        # whole prompt and a one-token chunk (the prefill kernel).
        ([1, 1, 6, 9, 1], [30, 9, 26, 9, 17], 2),
    )
    for query_lens, ctx_lens, decode_rows in cases:
        batch = make_paged_batch(ctx_lens, query_lens, 2, 64, 16, torch.float32, device)
        meta = _meta(batch, 16)
        meta.max_query_len = max(query_lens)
        assert meta.num_decode_rows == decode_rows
        n = sum(query_lens)
        q = torch.randn(n, 4, 64)
        k, v = torch.randn(n, 2, 64), torch.randn(n, 2, 64)
        positions = torch.tensor(
            [
                c - q_len + i
                for q_len, c in zip(query_lens, ctx_lens, strict=True)
                for i in range(q_len)
            ]
        )
        cache = batch.cache.clone()
        want = torch_ops.rotary_attention(
            q.clone(),
            k.clone(),
            v,
            torch_ops.rope_tables(positions, inv_freq, None, q.dtype),
            cache,
            meta,
            0.125,
        )
        got = triton_ops.rotary_attention(
            q.clone(),
            k.clone(),
            v,
            triton_ops.rope_tables(
                positions, inv_freq, build_cos_sin_cache(inv_freq, 256), q.dtype
            ),
            batch.cache,
            meta,
            0.125,
        )
        assert_close(batch.cache, cache, seed, "KV store")
        assert_close(got, want, seed, f"attention q_lens={query_lens}")
