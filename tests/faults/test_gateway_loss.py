"""A gateway killed (SIGKILL) mid-stream stops owning its requests: once its heartbeat key
(`tandem:reply:{id}:alive`, 3 s TTL) is gone, the workers abort them and free their
blocks, instead of generating for nobody until the 300 s deadline.

The proof that they were aborted, not finished: the last delta the workers wrote to the
dead gateway's reply stream has no finish reason and is far from the last token."""

from __future__ import annotations

import pytest

from tandem.core import redis_keys
from tandem.core.protocol import TokenBatch, decode
from tests.faults.cluster import Cluster, request, stream_in_background

MAX_TOKENS = 3000  # minutes of CPU decoding: far longer than the bound below
GATEWAY_ID = "gw-doomed"


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
