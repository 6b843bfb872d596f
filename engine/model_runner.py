"""The only code that touches the device: loads the model, owns the KV cache tensors,
turns a SchedulerOutput into tensors, runs the forward pass and samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from core.kv_cache_manager import KVCacheManager
from core.scheduler import SchedulerOutput
from engine.attention import AttentionMetadata
from engine.model_config import ModelConfig
from engine.models import build_model
from engine.sampler import SampleRequest, sample
from engine.weights import init_dummy, load_safetensors

log = logging.getLogger(__name__)

@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: list[int]  # rows of the flat batch whose logits are sampled


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
    ) -> None:
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = build_model(cfg)
        model = model.to_empty(device="cpu")
        model.rotary.inv_freq.copy_(type(model.rotary)(  # buffers are lost on meta
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).inv_freq)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        if load_format == "dummy":
            init_dummy(model, seed)
        elif load_format in ("auto", "safetensors"):
            load_safetensors(model, model_dir)
        else:
            raise ValueError(f"unknown load format {load_format!r} (auto, safetensors, dummy)")
        # inv_freq stays float32 whatever the weights' dtype (as in transformers).
        self.model = model.to(self.device, dtype).eval()
        self.model.rotary.inv_freq = self.model.rotary.inv_freq.float()
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.kv_caches: list[torch.Tensor] = []
        self.block_size = 16

    # -- KV cache ----------------------------------------------------------------------
    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.cfg
        per_token = 2 * c.num_layers * c.num_kv_heads * c.head_dim
        return per_token * block_size * torch.tensor([], dtype=self.dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        c = self.cfg
        shape = (2, num_blocks, block_size, c.num_kv_heads, c.head_dim)
        self.block_size = block_size
        self.kv_caches = [torch.zeros(shape, dtype=self.dtype, device=self.device)
                          for _ in range(c.num_layers)]

    # -- one step ----------------------------------------------------------------------
    def prepare(self, out: SchedulerOutput, kv: KVCacheManager) -> StepInputs:
        """Everything the step needs from the scheduler and block tables, as tensors."""
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens, context_lens, tables, sample_idx = [], [], [], []
        bs = self.block_size
        for chunk in out.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            table = kv.block_table(seq.request_id)
            all_ids = seq.all_token_ids
            tokens.extend(all_ids[start : start + n])
            positions.extend(range(start, start + n))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + n))
            query_lens.append(n)
            context_lens.append(start + n)
            tables.append(table)
            if chunk.samples:
                sample_idx.append(len(tokens) - 1)
        dev = self.device
        width = max(len(t) for t in tables)
        padded = [t + [0] * (width - len(t)) for t in tables]
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            query_lens_host=query_lens,
            context_lens_host=context_lens,
            block_tables_host=tables,
        )
        ids = torch.tensor(tokens, dtype=torch.long, device=dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return StepInputs(ids, pos, meta, sample_idx)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, inputs: StepInputs
    ) -> tuple[dict[str, int], dict[str, dict[int, float]]]:
        """Run one step; return sampled tokens (and logprobs) for chunks that sample."""
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta)
        samplers = [c.seq for c in out.chunks if c.samples]
        if not samplers:
            return {}, {}
        idx = torch.tensor(inputs.sample_indices, device=self.device)
        logits = self.model.compute_logits(hidden[idx])
        rows = [SampleRequest(s.sampling, s.prompt_token_ids, s.output_token_ids)
                for s in samplers]
        tokens, logprobs = sample(logits, rows, self.generator)
        sampled = {s.request_id: t for s, t in zip(samplers, tokens, strict=True)}
        lp = {s.request_id: x for s, x in zip(samplers, logprobs, strict=True) if x is not None}
        return sampled, lp
