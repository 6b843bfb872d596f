"""The bundled SmolLM2 checkpoint against transformers, and the CLI on top of it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tandem.core.sampling_params import SamplingParams
from tandem.engine.checkpoint_resolver import resolve_model
from tandem.engine.llm import LLM
from tests.engine.conftest import hf_greedy

PROMPTS = [
    "The quick brown fox",
    "def quicksort(arr):\n    if len(arr) <= 1:\n",
    "Ésta es una frase en español con acentos: ",
    "東京タワーの高さは",
    " ".join(f"item{i}" for i in range(60)),  # long: many blocks
]


@pytest.fixture(scope="module")
def smollm2():
    return LLM("smollm2", device="cpu")


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(resolve_model("smollm2")), dtype=torch.float32
    ).eval()


def test_bundled_model_matches_transformers(smollm2, hf_smollm2):
    chat = smollm2.tokenizer.encode_chat([{"role": "user", "content": "Name three colours."}])
    prompts = [*PROMPTS, chat]
    outs = smollm2.generate(
        prompts, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    )
    for prompt, out in zip(prompts, outs, strict=True):
        ids = out.prompt_token_ids
        if isinstance(prompt, str):
            assert ids == smollm2.tokenizer.encode(prompt)
        assert out.token_ids == hf_greedy(hf_smollm2, ids, 16), prompt
        assert out.text == smollm2.tokenizer.decode(out.token_ids)


def test_eos_finishes_a_chat_answer(smollm2):
    chat = smollm2.tokenizer.encode_chat([{"role": "user", "content": "Say hi."}])
    out = smollm2.generate([chat], SamplingParams(max_tokens=200, temperature=0.0))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in smollm2.engine.eos_token_ids


def test_cli_generate_json(smollm2):
    cmd = [
        sys.executable,
        "-m",
        "tandem.cli",
        "generate",
        "--model",
        "smollm2",
        "--json",
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-tokens",
        "8",
        "--device",
        "cpu",
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[3],
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = [json.loads(x) for x in res.stdout.splitlines()]
    expected = smollm2.generate(
        [PROMPTS[0], PROMPTS[3]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    )
    assert [x["token_ids"] for x in lines] == [e.token_ids for e in expected]
    assert [x["finish_reason"] for x in lines] == ["length", "length"]
    assert lines[0]["prompt_token_ids"] == expected[0].prompt_token_ids


def test_cli_rejects_bad_input_with_one_line():
    res = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "generate", "--prompt", "x", "--top-p", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "top_p" in res.stderr and "Traceback" not in res.stderr
