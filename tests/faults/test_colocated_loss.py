"""A colocated worker killed with SIGKILL mid-stream: the gateway watches it as the
request's owner, so the stream ends with UNAVAILABLE within 5 s, or, with --migrate,
continues on the other colocated worker with the undisturbed greedy output."""

from __future__ import annotations

import time

import grpc

from tandem.core.redis_keys import prefill_stream
from tests.faults.cluster import Cluster, collect, request, stream_in_background

WORKERS = ("colo-a", "colo-b")


def _start(migrate: bool) -> Cluster:
    cluster = Cluster()
    for name in WORKERS:
        # One sequence each: a busy worker has no room, so the next task goes to the other.
        cluster.start_worker(name, "worker", "--max-num-seqs", "1")
    cluster.start_gateway(*(["--migrate"] if migrate else []))
    return cluster


def _busy_worker(cluster: Cluster) -> str:
    cluster.wait_for(
        lambda: any(w.running for w in cluster.workers("colocated")), "a busy colocated worker"
    )
    return next(w.worker_id for w in cluster.workers("colocated") if w.running)


def test_killed_colocated_worker_fails_its_stream_fast_and_spares_the_other():
    cluster = _start(migrate=False)
    try:
        doomed, started = stream_in_background(cluster, request("The history of Rome", 300), 3)
        assert started.wait(60)
        owner = _busy_worker(cluster)
        other = next(w for w in WORKERS if w != owner)
        spared, spared_started = stream_in_background(cluster, request("A short poem", 40), 1)
        assert spared_started.wait(60)
        cluster.wait_for(lambda: cluster.worker(other).running == 1, "the other worker busy")
        killed_at = time.monotonic()
        cluster.kill(owner)
        doomed["thread"].join(30)
        assert doomed["error"].code() == grpc.StatusCode.UNAVAILABLE
        assert owner in doomed["error"].details()
        assert doomed["ended_at"] - killed_at < 5.0
        spared["thread"].join(60)
        assert "error" not in spared and len(spared["tokens"]) == 40
        cluster.assert_no_blocks_in_use()
        assert cluster.client.xlen(prefill_stream("smollm2")) == 0, "handled tasks are deleted"
    finally:
        cluster.close()


def test_migrate_continues_on_the_other_colocated_worker_with_identical_output():
    cluster = _start(migrate=True)
    try:
        req = request("Write about the mountains and the sea.", 48)
        undisturbed = collect(cluster.stub(), req)
        moved, started = stream_in_background(cluster, req, 6)
        assert started.wait(60)
        cluster.kill(_busy_worker(cluster))
        moved["thread"].join(60)
        assert "error" not in moved, moved.get("error")
        assert moved["tokens"] == undisturbed  # the survivor recomputed prompt + tokens
        cluster.assert_no_blocks_in_use()
    finally:
        cluster.close()
