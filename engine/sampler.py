"""Token sampling for one step, batched over the rows that sample.

Order: penalties, then greedy rows take the argmax; the others are divided by their
temperature, masked by top-k, top-p and min-p, and drawn by the exponential-race trick
(argmax of p / Exp(1) noise). A seeded row draws its noise from a generator seeded by
(seed, output position), so its tokens do not depend on what else is in the batch, on
preemption, or on which worker samples which position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.core.sampling_params import SamplingParams

_MASK = float("-inf")
_GOLDEN = 0x9E3779B97F4A7C15


@dataclass
class SampleRequest:
    sampling: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]


def position_seed(seed: int, position: int) -> int:
    return (seed ^ ((position + 1) * _GOLDEN)) & 0x7FFF_FFFF_FFFF_FFFF


def apply_penalties(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
    for i, r in enumerate(rows):
        sp = r.sampling
        if sp.repetition_penalty != 1.0:
            seen = torch.tensor(
                sorted(set(r.prompt_token_ids + r.output_token_ids)),
                dtype=torch.long,
                device=logits.device,
            )
            vals = logits[i, seen]
            logits[i, seen] = torch.where(
                vals > 0, vals / sp.repetition_penalty, vals * sp.repetition_penalty
            )
        if (sp.presence_penalty or sp.frequency_penalty) and r.output_token_ids:
            ids = torch.tensor(r.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.zeros(logits.shape[1], device=logits.device).scatter_add_(
                0, ids, torch.ones_like(ids, dtype=torch.float)
            )
            logits[i] -= sp.frequency_penalty * counts + sp.presence_penalty * (counts > 0)
    return logits


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask logits [rows, vocab] in place. top_k 0, top_p 1 and min_p 0 are off."""
    vocab = logits.shape[1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(max=vocab)
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    kth = sorted_logits.gather(1, (k - 1).long()[:, None])
    logits.masked_fill_(logits < kth, _MASK)
    # top-p on what top-k kept: drop tokens whose better-ranked mass already reaches p.
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _MASK)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter_(1, sorted_idx, drop_sorted)
    logits.masked_fill_(drop, _MASK)
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        threshold = min_p[:, None] * probs.max(-1, keepdim=True).values
        logits.masked_fill_(probs < threshold, _MASK)
    return logits


def _chunks_of(vocab: int) -> int:
    """How many equal chunks to split a row of `vocab` logits into for argmax_ids: the
    most, up to 128, that divide it into chunks of at least 512; 1 if none does."""
    for n in range(128, 7, -1):
        if vocab % n == 0 and vocab // n >= 512:
            return n
    return 1


def argmax_ids(logits: torch.Tensor) -> torch.Tensor:
    """logits.argmax(-1), in two passes on a GPU: one reduction over a whole 128k-token
    row keeps few SMs busy (27 us per decode step at batch 1 on an H100, for Llama-3's
    vocabulary); the max of equal chunks first, then the best chunk, takes ~4x less.
    Ties still go to the first index: the first in each chunk, then the first chunk."""
    rows, vocab = logits.shape
    n = _chunks_of(vocab)
    if n == 1 or logits.device.type != "cuda" or rows > 64:
        return logits.argmax(-1)
    values, index = logits.view(rows, n, vocab // n).max(-1)
    best = values.argmax(-1, keepdim=True)
    return index.gather(1, best).squeeze(1).add_(best.squeeze(1), alpha=vocab // n)


def sample_tokens(
    logits: torch.Tensor, rows: list[SampleRequest], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits: [rows, vocab] float32 (modified). Returns the sampled ids as a device tensor,
    without waiting for the device, and the raw log-probs when any row asked for them."""
    device = logits.device
    want_logprobs = any(r.sampling.logprobs is not None for r in rows)
    raw_logprobs = logits.log_softmax(-1) if want_logprobs else None
    if any(
        r.sampling.repetition_penalty != 1.0
        or r.sampling.presence_penalty
        or r.sampling.frequency_penalty
        for r in rows
    ):
        apply_penalties(logits, rows)
    tokens = argmax_ids(logits)
    random_rows = [i for i, r in enumerate(rows) if not r.sampling.greedy]
    if random_rows:
        idx = torch.tensor(random_rows, device=device)
        sub = logits[idx]
        params = [rows[i].sampling for i in random_rows]
        sub.div_(torch.tensor([p.temperature for p in params], device=device)[:, None])
        apply_top_k_top_p_min_p(
            sub,
            torch.tensor([p.top_k for p in params], device=device),
            torch.tensor([p.top_p for p in params], device=device),
            torch.tensor([p.min_p for p in params], device=device),
        )
        probs = sub.softmax(-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(random_rows):
            sp = rows[i].sampling
            if sp.seed is not None:
                g = torch.Generator(device=device)
                g.manual_seed(position_seed(sp.seed, len(rows[i].output_token_ids)))
                noise[j].exponential_(generator=g)
            else:
                noise[j].exponential_(generator=generator)
        tokens[idx] = (probs / noise).argmax(-1)
    return tokens, raw_logprobs


def top_logprobs(
    raw_logprobs: torch.Tensor | None, rows: list[SampleRequest], token_list: list[int]
) -> list[dict[int, float] | None]:
    """Per row, the top-n log-probs it asked for, the sampled token always included."""
    logprob_list: list[dict[int, float] | None] = [None] * len(rows)
    if raw_logprobs is None:
        return logprob_list
    for i, r in enumerate(rows):
        n = r.sampling.logprobs
        if n is None:
            continue
        top = raw_logprobs[i].topk(n) if n else None
        entry = dict(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else {}
        entry[token_list[i]] = float(raw_logprobs[i, token_list[i]])
        logprob_list[i] = entry
    return logprob_list


def sample(
    logits: torch.Tensor, rows: list[SampleRequest], generator: torch.Generator | None = None
) -> tuple[list[int], list[dict[int, float] | None]]:
    """sample_tokens, then wait for the ids and gather the requested log-probs."""
    tokens, raw_logprobs = sample_tokens(logits, rows, generator)
    token_list = tokens.tolist()
    return token_list, top_logprobs(raw_logprobs, rows, token_list)
