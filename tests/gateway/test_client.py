"""gateway.client: the sync and asyncio clients and `python -m tandem.gateway.client`."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from tandem.core import redis_keys
from tandem.core.tokenizer import Tokenizer
from tandem.gateway.client import AsyncTandemClient, TandemClient, TandemError
from tests.gateway.conftest import Gateway, wait_for
from tests.gateway.fake_worker import FakeWorker, expected_output

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Rivers run to 🌊 the sea"


def test_generate_streams_chunks(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode(PROMPT)
    with TandemClient(gateway.target, timeout=10) as client:
        chunks = list(client.generate(PROMPT, max_tokens=10, seed=3, top_k=5, stop_token_ids=[1]))
    assert len(chunks) > 2
    assert [t for c in chunks for t in c.token_ids] == expected_output(ids, 10)
    assert "".join(c.text for c in chunks) == tokenizer.decode(expected_output(ids, 10))
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), 10)
    sp = fake_worker.tasks[-1].sampling
    assert (sp.seed, sp.top_k, sp.stop_token_ids, sp.temperature) == (3, 5, (1,), 0.0)


def test_complete_with_token_ids_and_logprobs(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    ids = tokenizer.encode("Hello there")
    with TandemClient(gateway.target) as client:
        result = client.complete(ids, max_tokens=5, logprobs=1, temperature=0.5)
    assert result.token_ids == expected_output(ids, 5)
    assert result.text == tokenizer.decode(result.token_ids)
    assert result.finish_reason == "length" and result.usage.completion_tokens == 5
    assert result.logprobs == [{t: -0.5, t + 1: -1.5} for t in result.token_ids]
    assert result.request_id == fake_worker.tasks[-1].request_id


def test_errors_and_early_exit(
    gateway: Gateway, fake_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    with TandemClient(gateway.target, timeout=10) as client:
        with pytest.raises(TandemError) as info:
            client.complete("", max_tokens=3)
        assert info.value.code == "INVALID_ARGUMENT" and "prompt is required" in info.value.details
        with pytest.raises(TypeError, match="unknown sampling arguments: temprature"):
            client.complete("hi", temprature=0.3)
        fake_worker.token_delay_s = 0.02
        for chunk in client.generate("a long one", max_tokens=500):
            rid = chunk.request_id
            break  # leaving the loop cancels the request: the gateway aborts it
    assert wait_for(lambda: redis_client.exists(redis_keys.abort_marker(rid)))
    assert wait_for(lambda: rid in fake_worker.aborted)


def test_api_key(start_gateway, fake_worker: FakeWorker) -> None:
    gateway = start_gateway(api_key="k1")
    with TandemClient(gateway.target) as client, pytest.raises(TandemError) as info:
        client.complete("hi", max_tokens=2)
    assert info.value.code == "UNAUTHENTICATED"
    with TandemClient(gateway.target, api_key="k1") as client:
        assert client.complete("hi", max_tokens=2).usage.completion_tokens == 2


def test_async_client(gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer) -> None:
    async def main() -> tuple[list, object, list]:
        async with AsyncTandemClient(gateway.target, timeout=10) as client:
            chunks = [c async for c in client.generate(PROMPT, max_tokens=8)]
            whole, many = await asyncio.gather(
                client.complete(PROMPT, max_tokens=8),
                asyncio.gather(*(client.complete(f"prompt {i}", max_tokens=3) for i in range(4))),
            )
            with pytest.raises(TandemError) as info:
                await client.complete("hi", max_tokens=9000)
            assert info.value.code == "INVALID_ARGUMENT"
            return chunks, whole, many

    chunks, whole, many = asyncio.run(main())
    want = expected_output(tokenizer.encode(PROMPT), 8)
    assert [t for c in chunks for t in c.token_ids] == want
    assert whole.token_ids == want and whole.text == "".join(c.text for c in chunks)
    assert [m.token_ids for m in many] == [
        expected_output(tokenizer.encode(f"prompt {i}"), 3) for i in range(4)
    ]


def test_command_line_prints_the_stream(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tandem.gateway.client", "--target", gateway.target, "--max-tokens", "7",
         "--usage", PROMPT],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    want = tokenizer.decode(expected_output(tokenizer.encode(PROMPT), 7))
    assert result.stdout == want + "\n"
    assert "finish=length" in result.stderr and "completion_tokens=7" in result.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "tandem.gateway.client", "--target", gateway.target, "--max-tokens",
         "99999", "hi"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
