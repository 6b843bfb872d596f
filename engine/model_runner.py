"""The only code that touches the device: loads the model, runs the forward pass over
the engine's KV cache (engine/kv_cache.py), turns a SchedulerOutput into tensors and
samples."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tandem.core.kv_cache_manager import KVCacheManager
from tandem.core.kv_layout import KVLayout
from tandem.core.scheduler import SchedulerOutput
from tandem.core.sequence import Sequence
from tandem.engine.attention import AttentionMetadata
from tandem.engine.cuda_graphs import DecodeGraphs
from tandem.engine.kv_cache import KVCache
from tandem.engine.model_config import ModelConfig
from tandem.engine.models import build_model
from tandem.engine.ops import make_ops
from tandem.engine.prefill_graphs import PrefillGraphs
from tandem.engine.rope import rope_inv_freq
from tandem.engine.sampler import SampleRequest, sample_tokens, top_logprobs
from tandem.engine.warmup import synthetic_step
from tandem.engine.weights import init_dummy, load_safetensors
from tandem.kvtransfer.pack import dtype_name

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: list[int]  # rows of the flat batch whose logits are sampled
    samplers: list[Sequence]  # the sequences of those rows, in order
    # Set on inputs built ahead by prepare_next: the step they were built for, by
    # request id and first position, so the engine can check the schedule matches.
    planned: list[tuple[str, int]] | None = None


class PendingStep:
    """A launched step: its sampled ids stay on the device (the next step's input ids)
    while one non-blocking copy brings them to the host; result() waits for that copy."""

    def __init__(
        self,
        samplers: list,
        tokens: torch.Tensor | None,
        raw_logprobs: torch.Tensor | None,
        rows: list[SampleRequest],
    ) -> None:
        self.samplers, self.tokens, self.rows = samplers, tokens, rows
        self._raw_logprobs = raw_logprobs
        self._host: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        self.step = 0  # the KV cache manager's number for it (set by the engine)
        self.inputs: StepInputs | None = None  # what it ran, for building the next step
        self.launched_at = time.perf_counter()
        if tokens is not None and tokens.device.type == "cuda":
            self._host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host.copy_(tokens, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()

    def done(self) -> bool:
        """Whether the device has finished the step (a CPU step finishes in its launch)."""
        return self._ready is None or self._ready.query()

    def result(self) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
        if self.tokens is None:
            return {}, {}
        if self._ready is not None:
            self._ready.synchronize()
            token_list = self._host.tolist()
        else:
            token_list = self.tokens.tolist()
        logprobs = top_logprobs(self._raw_logprobs, self.rows, token_list)
        sampled = {s.request_id: t for s, t in zip(self.samplers, token_list, strict=True)}
        lp = {
            s.request_id: x for s, x in zip(self.samplers, logprobs, strict=True) if x is not None
        }
        return sampled, lp


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Host list -> device tensor through pinned memory, without blocking the host."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _slot(table: list[int], position: int, block_size: int) -> int:
    """The KV cache slot of `position` in a sequence whose blocks are `table`."""
    return table[position // block_size] * block_size + position % block_size


def _slot_range(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The slots of positions [start, end): one range per block, not one sum per token."""
    slots: list[int] = []
    for block in range(start // block_size, (end - 1) // block_size + 1):
        base = table[block] * block_size
        lo = max(start, block * block_size) - block * block_size
        hi = min(end, (block + 1) * block_size) - block * block_size
        slots.extend(range(base + lo, base + hi))
    return slots


def _padded_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    """[seqs, longest table] int32 on `device`, short tables padded with block 0."""
    width = max(len(t) for t in tables)
    return _to_device([t + [0] * (width - len(t)) for t in tables], torch.int32, device)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str | None, device: str) -> torch.dtype:
    if name in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


class ModelRunner:
    def __init__(
        self,
        cfg: ModelConfig,
        model_dir: Path,
        device: str,
        dtype: torch.dtype,
        load_format: str = "auto",
        seed: int = 0,
        attention_backend: str = "auto",
        max_model_len: int | None = None,
    ) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        torch.manual_seed(seed)
        self.ops = make_ops(attention_backend, self.device)
        with torch.device("meta"):
            model = build_model(cfg, self.ops)
        # Parameters are created straight on the device in their final dtype.
        model = model.to(dtype=dtype).to_empty(device=self.device)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        if load_format == "dummy":
            init_dummy(model, seed)
        elif load_format in ("auto", "safetensors"):
            load_safetensors(model, model_dir)
        else:
            raise ValueError(f"unknown load format {load_format!r} (auto, safetensors, dummy)")
        self.model = model.eval()
        # Rotary frequencies stay float32 whatever the weights' dtype (as in transformers).
        model.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(
            self.device
        )
        if self.ops.name == "triton":
            from tandem.kernels.rotary import build_cos_sin_cache

            positions = min(
                max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings
            )
            model.cos_sin_cache = build_cos_sin_cache(model.inv_freq, positions, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.kv_cache: KVCache | None = None  # the engine's, once attached
        self.block_size = 16
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None

    # -- KV cache ----------------------------------------------------------------------
    def kv_layout(self, block_size: int) -> KVLayout:
        """The cache the model declares, in the dtype it runs in."""
        return self.cfg.kv_layout(dtype_name(self.dtype), block_size)

    def attach_kv_cache(self, kv_cache: KVCache) -> None:
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size

    @torch.inference_mode()
    def profile_num_blocks(self, block_size: int, max_tokens: int, utilization: float) -> int:
        """KV blocks that fit in `utilization` of the GPU after weights and the peak
        activations of a forward pass over `max_tokens` tokens."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        layout = self.kv_layout(block_size)
        scratch = KVCache(layout, -(-max_tokens // block_size), self.device)
        meta, pos = synthetic_step(0, max_tokens, 0, block_size, self.device)
        ids = torch.zeros(max_tokens, dtype=torch.long, device=self.device)
        hidden = self.model(ids, pos, scratch.layers, meta)
        self.model.compute_logits(hidden[-256:])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device)
        scratch.release()
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = int(total * utilization) - peak
        per_block = layout.bytes_per_block
        if budget < per_block:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (peak {peak / 2**30:.1f} "
                f"GiB of {total / 2**30:.1f}); raise --gpu-memory-utilization"
            )
        log.info(
            "profiled peak %.2f GiB of %.2f; KV cache gets %.2f GiB",
            peak / 2**30,
            total / 2**30,
            budget / 2**30,
        )
        return budget // per_block

    def capture_graphs(self, max_batch: int, max_model_len: int, prefill_tokens: int) -> None:
        """Decode graphs up to `max_batch` sequences; piecewise graphs for other steps of
        up to `prefill_tokens` tokens (0: none)."""
        max_blocks = -(-max_model_len // self.block_size)
        self.graphs = DecodeGraphs(
            self.model, self.kv_cache.layers, max_batch, max_blocks, self.block_size, self.device
        )
        self.graphs.capture()
        if prefill_tokens:
            self.prefill_graphs = PrefillGraphs(
                self.model, self.kv_cache.layers, prefill_tokens, self.device
            )
            self.prefill_graphs.capture()

    def release_gpu_memory(self) -> None:
        """Drop the KV cache, graphs and weights (the runner is unusable afterwards)."""
        self.graphs = self.prefill_graphs = None
        if self.kv_cache is not None:
            self.kv_cache.release()
        self.kv_cache = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- one step ----------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput, kv: KVCacheManager) -> StepInputs:
        """Everything the step needs from the scheduler and block tables, as tensors:
        built as two host tensors and moved in two copies (this runs every step)."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens, tables, sample_idx = [], [], [], []
        bs = self.block_size
        for chunk in out.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            table = kv.block_table(seq.request_id)
            if n == 1:  # decode: no need to materialize the whole token list
                tokens.append(seq.token_at(start))
                positions.append(start)
                slots.append(_slot(table, start, bs))
            else:
                tokens.extend(seq.all_token_ids[start : start + n])
                positions.extend(range(start, start + n))
                slots.extend(_slot_range(table, start, start + n, bs))
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(table)
            if chunk.samples:
                sample_idx.append(len(tokens) - 1)
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        t, s = len(tokens), len(query_lens)
        flat = _to_device(tokens + positions + slots + context_lens + qsl, torch.long, self.device)
        ids, pos, slot_mapping, ctx, starts = flat.split([t, t, t, s, s + 1])
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=_padded_tables(tables, self.device),
            context_lens=ctx.to(torch.int32),
            query_start_loc=starts.to(torch.int32),
            query_lens_host=query_lens,
            context_lens_host=context_lens,
            block_tables_host=tables,
            max_query_len=max(query_lens),
        )
        samplers = [c.seq for c in out.chunks if c.samples]
        return StepInputs(ids, pos, meta, sample_idx, samplers)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, inputs: StepInputs
    ) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
        """Run one step; return sampled tokens (and logprobs) for chunks that sample."""
        return self.launch(inputs).result()

    @torch.inference_mode()
    def launch(self, inputs: StepInputs) -> PendingStep:
        """Queue one step's forward pass and sampling on the device; return at once."""
        samplers = inputs.samplers
        meta = inputs.meta
        graphs = self.graphs
        if graphs is not None and meta.max_query_len == 1 and meta.num_seqs <= graphs.max_batch:
            logits = graphs.run(inputs.input_ids, inputs.positions, meta)
            if len(samplers) != meta.num_seqs:  # a 1-token prefill chunk mid-prompt
                logits = logits[_to_device(inputs.sample_indices, torch.long, self.device)]
        else:
            prefill_graphs = self.prefill_graphs
            if prefill_graphs is not None and len(inputs.input_ids) <= prefill_graphs.max_tokens:
                hidden = prefill_graphs.run(inputs.input_ids, inputs.positions, meta)
            else:
                hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache.layers, meta)
            if samplers:
                idx = _to_device(inputs.sample_indices, torch.long, self.device)
                logits = self.model.compute_logits(hidden[idx])
        if not samplers:
            return PendingStep([], None, None, [])
        rows = [SampleRequest(s.sampling, s.prompt_token_ids, s.output_token_ids) for s in samplers]
        tokens, raw_logprobs = sample_tokens(logits, rows, self.generator)
        return PendingStep(samplers, tokens, raw_logprobs, rows)

    def prepare_next(
        self, out: SchedulerOutput, inputs: StepInputs, pending: PendingStep, kv: KVCacheManager
    ) -> StepInputs | None:
        """Inputs for the step after `out`, built while the device still runs `out`.

        Only for the steady state: every chunk a decode that samples. A sequence whose
        next token starts a new block gets that block now, as the next schedule would
        give it (it goes back to the pool with the sequence if it finishes instead).
        The input ids are `out`'s sampled ids, still on the device, so nothing waits
        for them. None when this cannot be done; the engine also discards the result
        when the next schedule differs (a sequence finished, arrived or was preempted).
        """
        meta = inputs.meta
        if (
            pending.tokens is None
            or meta.max_query_len != 1
            or len(pending.samplers) != len(out.chunks)
        ):
            return None
        bs = self.block_size
        positions, slots, planned, tables = [], [], [], []
        grew = False
        for chunk in out.chunks:
            rid, pos = chunk.seq.request_id, chunk.start + 1
            if not kv.owns(rid):
                return None  # aborted while the step ran: its blocks are gone already
            table = kv.block_table(rid)
            if pos // bs >= len(table):
                if not kv.allocate_slots(rid, pos + 1):
                    return None  # out of blocks: the scheduler decides who is preempted
                grew = True
                table = kv.block_table(rid)
            positions.append(pos)
            slots.append(_slot(table, pos, bs))
            planned.append((rid, pos))
            tables.append(table)
        n = len(positions)
        context_lens = [p + 1 for p in positions]
        flat = _to_device(positions + slots + context_lens, torch.long, self.device)
        pos_t, slot_t, ctx_t = flat.split([n, n, n])
        block_tables = _padded_tables(tables, self.device) if grew else meta.block_tables
        next_meta = AttentionMetadata(
            slot_mapping=slot_t,
            block_tables=block_tables,
            context_lens=ctx_t.to(torch.int32),
            query_start_loc=meta.query_start_loc,
            query_lens_host=meta.query_lens_host,
            context_lens_host=context_lens,
            block_tables_host=tables,
            max_query_len=1,
        )
        return StepInputs(
            pending.tokens,
            pos_t,
            next_meta,
            inputs.sample_indices,
            [c.seq for c in out.chunks],
            planned,
        )
