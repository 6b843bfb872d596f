"""KV-aware routing when the worker holding a prefix dies: its published hashes and
load expire with its registry entry, and the next request with that prefix is
prefilled by a live worker, not left waiting for the dead one."""

from __future__ import annotations

from tandem.core.redis_keys import cached_blocks_key, routing_load_key
from tests.faults.cluster import Cluster, collect, request

PROMPT = "Instructions for the night shift at the lighthouse, read them twice. " * 4
# Far longer than the request's deadline below: only the holder's expiry can free the
# task for the live worker.
ROUTE_WAIT = ["--prefix-route-wait-ms", "600000"]


def test_a_dead_holders_hashes_expire_and_its_prefix_is_prefilled_elsewhere():
    cluster = Cluster()
    try:
        cluster.start_worker("decode-0", "decode")
        cluster.start_gateway()
        for name in ("prefill-a", "prefill-b"):
            cluster.start_worker(name, "prefill", *ROUTE_WAIT)
        cluster.wait_for(lambda: len(cluster.workers("prefill")) == 2, "two prefill workers")
        stub = cluster.stub()
        first = collect(stub, request(PROMPT + "First question.", 6))
        keys = {name: cached_blocks_key("smollm2", name) for name in ("prefill-a", "prefill-b")}
        cluster.wait_for(
            lambda: any(cluster.client.scard(key) for key in keys.values()), "published hashes"
        )
        holder = next(name for name, key in keys.items() if cluster.client.scard(key))
        cluster.kill(holder)
        again = collect(stub, request(PROMPT + "First question.", 6), timeout=60)
        assert again == first
        dead = (keys[holder], routing_load_key("smollm2", holder))
        cluster.wait_for(lambda: not cluster.client.exists(*dead), "the dead worker's keys")
        (live,) = [w for w in cluster.workers("prefill")]
        assert live.worker_id != holder and live.prefix_hit_tokens == 0
        cluster.assert_no_blocks_in_use(timeout=15)
    finally:
        cluster.close()
