"""Sampler masks against a plain-Python reference, and seeded reproducibility."""

from __future__ import annotations

import math
import random

import pytest
import torch

from tandem.core.sampling_params import SamplingParams
from tandem.engine.sampler import SampleRequest, apply_top_k_top_p_min_p, sample


def reference_keep(logits: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    keep = set(order[:top_k] if top_k else order)
    kth = min(logits[i] for i in keep)
    keep = {i for i in range(len(logits)) if logits[i] >= kth}
    z = sum(math.exp(logits[i]) for i in keep)
    mass, kept_p = 0.0, set()
    for i in order:
        if i not in keep:
            continue
        if mass >= top_p and kept_p:
            break
        kept_p.add(i)
        mass += math.exp(logits[i]) / z
    if min_p:
        z_all = sum(math.exp(logits[i]) for i in kept_p)
        best = max(math.exp(logits[i]) / z_all for i in kept_p)
        kept_p = {i for i in kept_p if math.exp(logits[i]) / z_all >= min_p * best}
    return kept_p


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [
        (0, 1.0, 0.0),
        (5, 1.0, 0.0),
        (0, 0.5, 0.0),
        (7, 0.8, 0.0),
        (0, 1.0, 0.2),
        (10, 0.9, 0.05),
        (1, 1.0, 0.0),
        (0, 0.01, 0.0),
    ],
)
def test_masks_match_reference(top_k, top_p, min_p):
    rng = random.Random(top_k * 100 + int(top_p * 10))
    rows = [[rng.gauss(0, 2) for _ in range(40)] for _ in range(3)]
    logits = torch.tensor(rows)
    masked = apply_top_k_top_p_min_p(
        logits.clone(),
        torch.tensor([top_k] * 3),
        torch.tensor([top_p] * 3),
        torch.tensor([min_p] * 3),
    )
    for r, row in enumerate(rows):
        kept = {i for i in range(40) if masked[r, i] != float("-inf")}
        assert kept == reference_keep(row, top_k, top_p, min_p)


def _rows(params, histories):
    return [SampleRequest(p, [1, 2], h) for p, h in zip(params, histories, strict=True)]


def test_seeded_rows_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    target = torch.randn(1, 50)
    sp = SamplingParams(temperature=1.0, seed=1234)
    alone = sample(target.clone(), _rows([sp], [[3, 4]]))[0]
    others = torch.randn(5, 50)
    batch = torch.cat([others[:2], target, others[2:]])
    params = [SamplingParams(temperature=1.0)] * 2 + [sp] + [SamplingParams(temperature=0.7)] * 3
    mixed = sample(
        batch, _rows(params, [[]] * 2 + [[3, 4]] + [[]] * 3), torch.Generator().manual_seed(99)
    )[0]
    assert mixed[2] == alone[0]


def test_seeded_sampling_varies_with_position_and_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = [0.25, 0.75]
    sp = SamplingParams(temperature=1.0, seed=7)
    draws = [sample(logits.clone(), _rows([sp], [[0] * n]))[0][0] for n in range(2000)]
    assert 0.70 < sum(draws) / len(draws) < 0.80


def test_greedy_penalties_and_logprobs():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    greedy = SamplingParams(temperature=0.0, logprobs=2)
    tokens, lps = sample(logits.clone(), _rows([greedy], [[]]))
    assert tokens == [1]
    assert set(lps[0]) == {1, 2}
    assert lps[0][1] == pytest.approx(float(logits.log_softmax(-1)[0, 1]))
    rep = SamplingParams(temperature=0.0, repetition_penalty=2.0)  # token 1 seen in prompt
    assert sample(logits.clone(), [SampleRequest(rep, [1], [])])[0] == [2]
    freq = SamplingParams(temperature=0.0, frequency_penalty=1.5)
    assert sample(logits.clone(), _rows([freq], [[1]]))[0] == [2]


@pytest.mark.parametrize("vocab", [128256, 151936, 49152, 1000])
def test_argmax_ids_in_chunks_is_argmax_ties_included(vocab, monkeypatch):
    """The chunked argmax (GPU only) run on CPU by standing in the device check."""
    from tandem.engine import sampler

    class FakeCuda:
        type = "cuda"

    logits = torch.randn(5, vocab)
    logits[1, :] = 0.0  # every entry ties: index 0
    logits[2, 7] = logits[2, vocab - 3] = 100.0  # a tie across chunks: the first
    logits[3, vocab - 1] = 100.0  # the very last id
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "device", property(lambda self: FakeCuda()))
        got = sampler.argmax_ids(logits)
    assert got.tolist() == logits.argmax(-1).tolist()
    assert got[1] == 0 and got[2] == 7 and got[3] == vocab - 1
