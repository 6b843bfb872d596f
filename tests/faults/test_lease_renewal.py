"""A prefill that takes longer than the decode worker's reservation lease keeps its
reservation: the prefill worker renews it while it prefills and ships, so the decode
worker never frees blocks that KV is still coming into (over cuda_ipc the prefill
worker writes them before the decode worker looks). Real processes; the prefill
worker's step is held (tests.faults.hooked_worker) while everything else in it runs."""

from __future__ import annotations

from tests.faults.cluster import Cluster, collect, request, stream_in_background

LEASE_S = 2.0
PROMPT = "A reservation outlives its lease while the prefill worker still wants it:"


def test_a_prefill_longer_than_the_lease_keeps_its_reservation_and_completes(tmp_path):
    hold = tmp_path / "hold"
    cluster = Cluster()
    try:
        cluster.start_worker("decode-0", "decode")
        cluster.start_worker(
            "prefill-0",
            "prefill",
            "--reservation-lease",
            str(LEASE_S),
            "--reclaim-idle",
            "60",  # the held step keeps the task's entry idle; no reclaim meanwhile
            hooks=("--hold-file", str(hold)),
        )
        cluster.start_gateway()
        expected = collect(cluster.stub(), request(PROMPT, 12))
        assert len(expected) == 12

        hold.touch()
        result, _ = stream_in_background(cluster, request(PROMPT, 12), first=1)
        cluster.wait_for(
            lambda: cluster.worker("decode-0").reservations == 1,
            "the decode worker to reserve blocks",
        )
        seen_at = cluster.worker("decode-0").heartbeat
        # The prefill is held well past the lease: three leases of decode heartbeats.
        cluster.wait_for(
            lambda: cluster.worker("decode-0").heartbeat > seen_at + 3 * LEASE_S,
            "decode heartbeats three leases later",
        )
        decode = cluster.worker("decode-0")
        assert decode.reservations == 1, "the decode worker freed a reservation still wanted"
        assert decode.used_blocks > 0
        assert not result["tokens"], "the prefill was held: no first token yet"

        hold.unlink()
        result["thread"].join(120)
        assert "error" not in result, result
        assert result["tokens"] == expected, "token-exact"
        cluster.assert_no_blocks_in_use(timeout=60)
        with open(cluster.logs["prefill-0"]) as log:
            assert "handoff of" not in log.read(), "the first transfer and handoff went through"
    finally:
        cluster.close()
