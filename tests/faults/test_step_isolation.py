"""One request that makes its batch's step raise fails alone, through real processes: a
decode (or colocated) worker whose sampler raises for one marked request (as it did for
a top_k of 2**63 before the checks caught it) fails that request with INTERNAL, while
the requests batched with it finish token-exact and the worker serves on."""

from __future__ import annotations

import grpc
import pytest

from tandem.gateway.proto import tandem_pb2
from tests.faults.cluster import Cluster, stream_in_background

MARK = 4242  # the hooked worker's sampler raises for a prompt starting with this token
PROMPTS = [[1780, 314, 260, 3458], [504, 2143, 314, 906, 253], [30, 5104, 28, 2019]]


def _req(prompt: list[int], max_tokens: int) -> tandem_pb2.GenerateRequest:
    return tandem_pb2.GenerateRequest(
        prompt_token_ids=prompt,
        sampling=tandem_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )


def _run(cluster: Cluster, marked: list[int] | None) -> tuple[list[dict], dict | None]:
    """PROMPTS streamed at once (40 tokens each), then `marked` once they all decode."""
    streams = [stream_in_background(cluster, _req(p, 40), first=1) for p in PROMPTS]
    for _, started in streams:
        assert started.wait(120)
    bad = None
    if marked is not None:
        bad, _ = stream_in_background(cluster, _req(marked, 40), first=1)
        bad["thread"].join(180)
    for result, _ in streams:
        result["thread"].join(180)
    return [result for result, _ in streams], bad


@pytest.mark.parametrize("role", ["decode", "colocated"])
def test_a_request_that_raises_fails_alone_and_its_batch_finishes(role, tmp_path):
    record = tmp_path / "failed-batches"
    hooks = ("--fail-token", str(MARK), "--record", str(record))
    cluster = Cluster()
    try:
        cluster.start_worker(f"{role}-0", "decode" if role == "decode" else "worker", hooks=hooks)
        if role == "decode":
            cluster.start_worker("prefill-0", "prefill")
        cluster.start_gateway()
        clean, _ = _run(cluster, None)
        assert all("error" not in r and len(r["tokens"]) == 40 for r in clean), clean
        assert not record.exists()

        others, bad = _run(cluster, [MARK, 314, 260])
        assert bad["error"].code() == grpc.StatusCode.INTERNAL, bad
        assert [r.get("error") for r in others] == [None] * len(PROMPTS)
        assert [r["tokens"] for r in others] == [r["tokens"] for r in clean], "token-exact"
        # The step ran all four; halving found the marked one alone (4 -> 2 -> 1).
        assert record.read_text().split() == ["4", "2", "1"]
        assert cluster.procs[f"{role}-0"].poll() is None, cluster.tail()
        cluster.assert_no_blocks_in_use(timeout=60)
        again, _ = _run(cluster, None)
        assert [r["tokens"] for r in again] == [r["tokens"] for r in clean]
    finally:
        cluster.close()
