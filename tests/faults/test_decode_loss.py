"""A decode worker killed with SIGKILL: its streams end with UNAVAILABLE within 5 s, or,
with --migrate, continue on another decode worker with the undisturbed greedy output."""

from __future__ import annotations

import time

import grpc

from tests.faults.cluster import Cluster, collect, request, stream_in_background


def _start(migrate: bool) -> Cluster:
    cluster = Cluster()
    cluster.start_worker("prefill-0", "prefill")
    cluster.start_worker("decode-a", "decode")
    cluster.start_worker("decode-b", "decode")
    cluster.start_gateway(*(["--migrate"] if migrate else []))
    return cluster


def _busy_decoder(cluster: Cluster) -> str:
    cluster.wait_for(lambda: any(w.running for w in cluster.workers("decode")), "a busy decoder")
    return next(w.worker_id for w in cluster.workers("decode") if w.running)


def test_killed_decoder_fails_its_streams_fast_and_spares_the_others():
    cluster = _start(migrate=False)
    try:
        doomed, started = stream_in_background(cluster, request("The history of Rome", 300), 3)
        assert started.wait(60)
        owner = _busy_decoder(cluster)
        other = "decode-b" if owner == "decode-a" else "decode-a"
        # The registry refreshes every second: wait until it shows the owner busier, so
        # the next request goes to the other decoder.
        cluster.wait_for(lambda: cluster.worker(owner).used_blocks > 0, "owner's blocks")
        spared, spared_started = stream_in_background(cluster, request("A short poem", 40), 1)
        assert spared_started.wait(60)
        cluster.wait_for(lambda: cluster.worker(other).running == 1, "the other decoder busy")
        killed_at = time.monotonic()
        cluster.kill(owner)
        doomed["thread"].join(30)
        assert doomed["error"].code() == grpc.StatusCode.UNAVAILABLE
        assert owner in doomed["error"].details()
        assert doomed["ended_at"] - killed_at < 5.0
        spared["thread"].join(60)
        assert "error" not in spared and len(spared["tokens"]) == 40
        cluster.assert_no_blocks_in_use()
    finally:
        cluster.close()


def test_migrate_continues_on_another_decoder_with_identical_output():
    cluster = _start(migrate=True)
    try:
        req = request("Write about the mountains and the sea.", 48)
        undisturbed = collect(cluster.stub(), req)
        moved, started = stream_in_background(cluster, req, 6)
        assert started.wait(60)
        cluster.kill(_busy_decoder(cluster))
        moved["thread"].join(60)
        assert "error" not in moved, moved.get("error")
        assert moved["tokens"] == undisturbed
        cluster.assert_no_blocks_in_use()
    finally:
        cluster.close()
