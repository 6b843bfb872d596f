"""KV-aware routing when the worker holding a prefix dies or drains, among prefill
workers and among colocated workers: its published hashes and load expire with its
registry entry (a draining worker is skipped at once), and the next request with that
prefix is prefilled by a live worker, not left waiting for the dead one."""

from __future__ import annotations

import signal

import pytest

from tandem.core.redis_keys import cached_blocks_key, routing_load_key
from tests.faults.cluster import Cluster, collect, request, stream_in_background

PROMPT = "Instructions for the night shift at the lighthouse, read them twice. " * 4
# Far longer than the request's deadline below: only the holder's expiry can free the
# task for the live worker.
ROUTE_WAIT = ["--prefix-route-wait-ms", "600000"]
# Role -> (CLI command, the two workers routing among themselves).
POOLS = {
    "prefill": ("prefill", ("prefill-a", "prefill-b")),
    "colocated": ("worker", ("colo-a", "colo-b")),
}


def _start(role: str) -> tuple[Cluster, tuple[str, str]]:
    command, names = POOLS[role]
    cluster = Cluster()
    if role == "prefill":
        cluster.start_worker("decode-0", "decode")
    cluster.start_gateway()
    for name in names:
        cluster.start_worker(name, command, *ROUTE_WAIT)
    cluster.wait_for(lambda: len(cluster.workers(role)) == 2, f"two {role} workers")
    return cluster, names


def _holder(cluster: Cluster, names: tuple[str, str]) -> str:
    """The one worker whose published set holds the blocks of the request just served."""
    keys = {name: cached_blocks_key("smollm2", name) for name in names}
    cluster.wait_for(
        lambda: any(cluster.client.scard(key) for key in keys.values()), "published hashes"
    )
    (holder,) = [name for name, key in keys.items() if cluster.client.scard(key)]
    return holder


def _assert_computed_in_full(cluster: Cluster, name: str) -> None:
    """`name` prefilled the repeat, with none of it cached (as its registry entry says
    once it has counted the request: entries are up to a heartbeat old)."""
    cluster.wait_for(lambda: cluster.worker(name).prefix_queried_tokens > 0, f"{name}'s count")
    assert cluster.worker(name).prefix_hit_tokens == 0


@pytest.mark.parametrize("role", list(POOLS))
def test_a_dead_holders_hashes_expire_and_its_prefix_is_prefilled_elsewhere(role):
    cluster, names = _start(role)
    try:
        stub = cluster.stub()
        first = collect(stub, request(PROMPT + "First question.", 6))
        holder = _holder(cluster, names)
        cluster.kill(holder)
        again = collect(stub, request(PROMPT + "First question.", 6), timeout=60)
        assert again == first
        dead = (cached_blocks_key("smollm2", holder), routing_load_key("smollm2", holder))
        cluster.wait_for(lambda: not cluster.client.exists(*dead), "the dead worker's keys")
        (other,) = [name for name in names if name != holder]
        _assert_computed_in_full(cluster, other)
        cluster.assert_no_blocks_in_use(timeout=15)
    finally:
        cluster.close()


def test_a_draining_colocated_holder_is_not_waited_for():
    cluster = Cluster()
    try:
        cluster.start_gateway()
        # One sequence at most: with its long answer below the holder has no room, so
        # the next task goes to the other worker, which is then as busy as the holder:
        # only the holder's draining can free the repeat for it.
        cluster.start_worker("colo-a", "worker", "--max-num-seqs", "1", *ROUTE_WAIT)
        stub = cluster.stub()
        first = collect(stub, request(PROMPT + "First question.", 6))
        essay, started = stream_in_background(
            cluster, request(PROMPT + "Write a long essay.", 2000), 1
        )
        assert started.wait(60)
        cluster.start_worker("colo-b", "worker", *ROUTE_WAIT)
        _, other_started = stream_in_background(
            cluster, request("Tell a long story about a fox.", 2000), 1
        )
        assert other_started.wait(60)
        cluster.wait_for(lambda: cluster.worker("colo-b").running == 1, "colo-b busy too")
        cluster.signal("colo-a", signal.SIGTERM)
        cluster.wait_for(lambda: cluster.worker("colo-a").draining, "the holder draining")
        again = collect(stub, request(PROMPT + "First question.", 6), timeout=60)
        assert again == first
        # Served while the holder still drained its essay (for up to 30 s), hashes
        # published: it was skipped for draining, not for being gone.
        still = cluster.worker("colo-a")
        assert still is not None and still.draining and still.running == 1
        assert cluster.client.scard(cached_blocks_key("smollm2", "colo-a"))
        _assert_computed_in_full(cluster, "colo-b")
    finally:
        cluster.close()
