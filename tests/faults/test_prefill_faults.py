"""Prefill worker loss and poison tasks: reclaimed, completed, or dead-lettered."""

from __future__ import annotations

import threading
import time

from tandem.core.protocol import PrefillTask, TokenBatch, decode
from tandem.core.redis_client import add_task, ensure_group
from tandem.core.redis_keys import MESSAGE_FIELD, PREFILL_GROUP, dead_letter_stream, prefill_stream
from tandem.core.sampling_params import SamplingParams
from tests.faults.cluster import Cluster, collect, request

STREAM = prefill_stream("smollm2")
PROMPTS = [f"Chapter {i}. " + "The river ran past the old mill and " * 6 for i in range(4)]


def _pending_for(cluster: Cluster, consumer: str) -> int:
    for c in cluster.client.xinfo_consumers(STREAM, PREFILL_GROUP):
        if c["name"] == consumer.encode() or c["name"] == consumer:
            return c["pending"]
    return 0


def test_tasks_of_a_killed_prefill_worker_are_reclaimed_and_complete():
    cluster = Cluster()
    try:
        cluster.start_worker("decode-0", "decode")
        cluster.start_gateway()
        # A slow prefill worker (4 tokens a step) that will die holding a task.
        cluster.start_worker(
            "prefill-a", "prefill", "--max-num-batched-tokens", "4", "--reservation-lease", "3"
        )
        stub = cluster.stub()
        results: dict[int, list[int]] = {}

        def run(i: int) -> None:
            results[i] = collect(stub, request(PROMPTS[i], 12))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        # It takes a task at a time (about what one step prefills), so it dies holding
        # one; the others are still in the stream for prefill-b.
        cluster.wait_for(
            lambda: _pending_for(cluster, "prefill-a") >= 1, "prefill-a to take a task"
        )
        cluster.kill("prefill-a")
        cluster.start_worker(
            "prefill-b", "prefill", "--reclaim-idle", "2", "--transfer-timeout", "0.9"
        )
        for t in threads:
            t.join(120)
        assert sorted(results) == list(range(len(PROMPTS)))
        undisturbed = [collect(stub, request(p, 12)) for p in PROMPTS]
        assert [results[i] for i in range(len(PROMPTS))] == undisturbed
        # prefill-a's reservations on decode-0 were never filled: their leases expire.
        cluster.assert_no_blocks_in_use(timeout=15)
        assert cluster.client.xlen(STREAM) == 0, "handled tasks are deleted"
    finally:
        cluster.close()


def test_task_failing_too_often_goes_to_dead_letter_and_client_gets_error():
    cluster = Cluster()
    try:
        cluster.start_worker("decode-0", "decode")
        ensure_group(cluster.client, STREAM)  # the decode worker may have made it already
        reply = "tandem:reply:test-dead-letter"
        task = PrefillTask(
            request_id="poison-1",
            prompt_token_ids=[1, 2, 3],
            sampling=SamplingParams(max_tokens=4),
            reply_stream=reply,
            deadline=time.time() + 120,
        )
        entry = add_task(cluster.client, STREAM, task)
        # Three consumers take it in turn and "die" with it: three failed deliveries.
        cluster.client.xreadgroup(PREFILL_GROUP, "ghost-1", {STREAM: ">"}, count=1)
        for ghost in ("ghost-2", "ghost-3"):
            cluster.client.xautoclaim(
                STREAM, PREFILL_GROUP, ghost, min_idle_time=0, start_id="0-0", count=1
            )
        cluster.start_worker(
            "prefill-0", "prefill", "--reclaim-idle", "1", "--transfer-timeout", "0.45"
        )
        cluster.wait_for(
            lambda: cluster.client.xlen(dead_letter_stream("smollm2")) == 1,
            "the task to be dead-lettered",
            timeout=30,
        )
        dead = cluster.client.xrange(dead_letter_stream("smollm2"))[0][1]
        assert decode(dead[MESSAGE_FIELD], PrefillTask).request_id == "poison-1"
        assert dead[b"entry"] == entry
        cluster.wait_for(lambda: cluster.client.xlen(reply) == 1, "the client's error")
        delta = decode(cluster.client.xrange(reply)[0][1][MESSAGE_FIELD], TokenBatch).deltas[0]
        assert delta.request_id == "poison-1" and delta.error_code == "internal"
        assert cluster.client.xlen(STREAM) == 0
        pending = cluster.client.xpending(STREAM, PREFILL_GROUP)
        assert pending["pending"] == 0
    finally:
        cluster.close()


def test_requests_wait_for_a_full_decode_worker_instead_of_failing():
    """A decode worker with room for one answer at a time: the prefill worker holds the
    other tasks until blocks come back (before, they failed UNAVAILABLE at once), and
    every stream completes with its solo output."""
    cluster = Cluster()
    try:
        # ~60-token prompts + 24 new tokens: 6 blocks of 16 each; 8 blocks hold one.
        cluster.start_worker("decode-0", "decode", "--num-blocks", "8")
        cluster.start_worker("prefill-0", "prefill")
        cluster.start_gateway()
        stub = cluster.stub()
        solo = [collect(stub, request(p, 24)) for p in PROMPTS]
        results: dict[int, list[int]] = {}
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                results[i] = collect(stub, request(PROMPTS[i], 24))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert [results[i] for i in range(len(PROMPTS))] == solo
        cluster.assert_no_blocks_in_use(timeout=15)
    finally:
        cluster.close()
