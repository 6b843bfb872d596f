"""A gateway killed (SIGKILL) mid-stream stops owning its requests: once its heartbeat key
(`tandem:reply:{id}:alive`, 3 s TTL) is gone, the workers abort them and free their
blocks, instead of generating for nobody until the 300 s deadline.

The proof that they were aborted, not finished: the last delta the workers wrote to the
dead gateway's reply stream has no finish reason and is far from the last token."""

from __future__ import annotations

import time

import pytest

from tandem.core import redis_keys
from tandem.core.protocol import AbortNotice, PrefillTask, TokenBatch, decode, encode
from tandem.core.redis_client import add_task
from tandem.core.redis_keys import MESSAGE_FIELD, prefill_stream
from tandem.core.sampling_params import SamplingParams
from tests.faults.cluster import Cluster, request, stream_in_background

MAX_TOKENS = 3000  # minutes of CPU decoding: far longer than the bound below
GATEWAY_ID = "gw-doomed"
BY_HAND = "tandem:reply:by-hand"  # a reply stream no gateway ever read


def _last_delta_offset(cluster: Cluster) -> tuple[int, str | None]:
    stream = redis_keys.reply_stream(GATEWAY_ID)
    [(_id, fields)] = cluster.client.xrevrange(stream, count=1)
    last = decode(fields[redis_keys.MESSAGE_FIELD], TokenBatch).deltas[-1]
    return last.offset, last.finish_reason


@pytest.mark.parametrize("topology", ["disaggregated", "colocated"])
def test_a_killed_gateways_requests_are_aborted_and_their_blocks_freed(topology: str) -> None:
    cluster = Cluster()
    try:
        if topology == "colocated":
            cluster.start_worker("colocated-0", "worker")
        else:
            cluster.start_worker("prefill-0", "prefill")
            cluster.start_worker("decode-0", "decode")
        cluster.start_gateway("--gateway-id", GATEWAY_ID)
        alive = redis_keys.gateway_alive_key(redis_keys.reply_stream(GATEWAY_ID))
        assert cluster.client.exists(alive)
        result, started = stream_in_background(
            cluster, request("The history of Rome", MAX_TOKENS), 5
        )
        assert started.wait(120) and "error" not in result, cluster.tail()
        cluster.wait_for(lambda: any(w.used_blocks for w in cluster.workers()), "blocks in use")
        cluster.kill("gateway")
        result["thread"].join(30)
        # Key TTL (3 s) + the workers' grace (2 s) + a check (1 s) + a heartbeat of the
        # registry entry that shows it: generous on a loaded machine.
        cluster.assert_no_blocks_in_use(timeout=45)
        assert not cluster.client.exists(alive)
        offset, finish = _last_delta_offset(cluster)
        assert finish is None and offset < MAX_TOKENS - 1, (offset, finish)
    finally:
        cluster.close()


def _by_hand(request_id: str, max_tokens: int) -> PrefillTask:
    return PrefillTask(
        request_id=request_id,
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        reply_stream=BY_HAND,
        deadline=time.time() + 600,
    )


def _entry_for(cluster: Cluster, reply: str) -> bytes | None:
    """The stream entry id of the task answering to `reply`, once queued."""
    for entry_id, f in cluster.client.xrange(prefill_stream("smollm2")):
        if decode(f[MESSAGE_FIELD], PrefillTask).reply_stream == reply:
            return entry_id
    return None


def _delivered(cluster: Cluster, entry_id: bytes) -> bool:
    [group] = cluster.client.xinfo_groups(prefill_stream("smollm2"))
    last = tuple(map(int, group["last-delivered-id"].split(b"-")))
    return last >= tuple(map(int, entry_id.split(b"-")))


def _abort(cluster: Cluster, request_id: str) -> None:
    notice = encode(AbortNotice(request_id=request_id, reason="test"))
    cluster.client.set(redis_keys.abort_marker(request_id), notice, ex=60)
    cluster.client.publish(redis_keys.ABORT_CHANNEL, notice)


def test_a_dead_gateways_queued_task_is_aborted_when_taken_and_hand_written_tasks_run() -> None:
    """The only seat is held by a task written by hand (no gateway) while the gateway's
    task waits in the stream; the gateway dies; once the seat frees, the worker takes the
    dead gateway's task, whose heartbeat key it never saw, and aborts it (its `:known`
    key says the stream had a gateway) instead of generating 3000 tokens for nobody."""
    cluster = Cluster()
    try:
        cluster.start_worker("colocated-0", "worker", "--max-num-seqs", "1")
        add_task(cluster.client, prefill_stream("smollm2"), _by_hand("by-hand", MAX_TOKENS))
        cluster.wait_for(lambda: cluster.client.xlen(BY_HAND) > 0, "the hand-written task runs")
        cluster.start_gateway("--gateway-id", GATEWAY_ID)
        reply = redis_keys.reply_stream(GATEWAY_ID)
        result, _ = stream_in_background(cluster, request("The history of Rome", MAX_TOKENS), 1)
        cluster.wait_for(lambda: _entry_for(cluster, reply), "the gateway's task queued")
        entry_id = _entry_for(cluster, reply)
        assert entry_id is not None and not _delivered(cluster, entry_id)  # the seat is taken
        cluster.kill("gateway")
        result["thread"].join(30)
        alive = redis_keys.gateway_alive_key(reply)
        cluster.wait_for(lambda: not cluster.client.exists(alive), "the heartbeat key gone")
        # Not judged: its stream never had a gateway. Still generating, not finished.
        grown = cluster.client.xlen(BY_HAND)
        cluster.wait_for(lambda: cluster.client.xlen(BY_HAND) > grown + 2, "by-hand tokens")
        _abort(cluster, "by-hand")  # frees the seat for the dead gateway's task
        cluster.wait_for(lambda: _delivered(cluster, entry_id), "the queued task taken")
        cluster.assert_no_blocks_in_use(timeout=45)
        if cluster.client.xlen(reply):
            offset, finish = _last_delta_offset(cluster)
            assert finish is None and offset < MAX_TOKENS - 1, (offset, finish)
        # A later hand-written task still runs to its end.
        add_task(cluster.client, prefill_stream("smollm2"), _by_hand("by-hand-2", 4))
        cluster.wait_for(lambda: _finish(cluster, "by-hand-2") == "length", "by-hand-2 done")
    finally:
        cluster.close()


def _finish(cluster: Cluster, request_id: str) -> str | None:
    for _id, fields in cluster.client.xrange(BY_HAND):
        for delta in decode(fields[MESSAGE_FIELD], TokenBatch).deltas:
            if delta.request_id == request_id and delta.finish_reason:
                return delta.finish_reason
    return None
