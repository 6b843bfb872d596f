"""transformers `generate` on the same workload: the peer in `--peer hf`."""

from __future__ import annotations

import time
from pathlib import Path

import torch


@torch.inference_mode()
def hf_output_tokens_per_s(
    model_dir: Path,
    jobs: list[tuple[list[int], int]],
    dtype: torch.dtype,
    batch_sizes: str,
    max_requests: int,
) -> dict:
    """Best output tokens/s over the batch sizes tried, on the first `max_requests` jobs.
    Same-length jobs in a batch need no padding; mixed lengths are left-padded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    if (model_dir / "model.safetensors").exists() or (
        model_dir / "model.safetensors.index.json"
    ).exists():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    else:  # a shipped config: random weights, like --load-format dummy
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to("cuda").eval()
    jobs = jobs[:max_requests]
    best = {"output_tokens_per_s": 0.0, "batch_size": 0, "requests": len(jobs)}
    for bs in (int(b) for b in batch_sizes.split(",")):
        try:
            tps = _run(model, jobs, bs)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            continue
        print(f"transformers generate, batch {bs}: {tps:.1f} output tokens/s")
        if tps > best["output_tokens_per_s"]:
            best.update(output_tokens_per_s=tps, batch_size=bs)
    del model
    torch.cuda.empty_cache()
    return best


def _run(model, jobs: list[tuple[list[int], int]], bs: int) -> float:
    generated = 0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(0, len(jobs), bs):
        batch = jobs[i : i + bs]
        width = max(len(p) for p, _ in batch)
        new = max(o for _, o in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (p, _) in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.cuda(),
            attention_mask=mask.cuda(),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
        generated += sum(min(o, out.shape[1] - width) for _, o in batch)
    torch.cuda.synchronize()
    return generated / (time.perf_counter() - t0)
