"""Many concurrent streams through one gateway: none may fail below its admission limit.

The in-process tests run the gateway and the fake pool on the fixtures' event loop; the
`load` ones (selected with -m load; CI runs them) run the gateway as `tandem gateway`
and the fake pool as a process of its own, and clients on the test's own event loop.
"""

from __future__ import annotations

import asyncio

from tandem.bench.gateway_clients import run_streams
from tandem.core.tokenizer import Tokenizer
from tests.gateway.conftest import Gateway
from tests.gateway.fake_worker import FakeWorker, expected_output


def prompts(count: int) -> list[list[int]]:
    """A distinct prompt per stream, so that crossed streams show."""
    return [[1000 + i % 3000, 2000 + i // 3000, 300] for i in range(count)]


def check_streams(results, prompts_sent, max_tokens: int, tokenizer: Tokenizer, api: str) -> None:
    failed = [(r.status, r.error) for r in results if not r.ok]
    assert not failed, f"{len(failed)} of {len(results)} streams failed, e.g. {failed[:3]}"
    for result, prompt in zip(results, prompts_sent, strict=True):
        want = expected_output(prompt, max_tokens)
        if api == "grpc":
            assert result.token_ids == want
        assert result.text == tokenizer.decode(want)
        assert result.finish_reason == "length"


def test_200_concurrent_http_streams_all_complete(
    gateway: Gateway, fake_worker: FakeWorker, tokenizer: Tokenizer
) -> None:
    """Issue 16: past ~100 concurrent requests redis-py's pool raised "Too many
    connections" and half the streams got HTTP 503."""
    fake_worker.token_delay_s = 0.01
    sent = prompts(200)
    target = f"127.0.0.1:{gateway.app.http_port}"
    results = asyncio.run(run_streams("http", target, sent, 32))
    check_streams(results, sent, 32, tokenizer, "http")
