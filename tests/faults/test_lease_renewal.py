"""A prefill that takes longer than the decode worker's reservation lease keeps its
reservation: the prefill worker renews it while it prefills and ships, so the decode
worker never frees blocks that KV is still coming into (over cuda_ipc the prefill
worker writes them before the decode worker looks). A reservation lost anyway is
reserved again, never written. Real processes; the prefill worker's step is held
(tests.faults.hooked_worker) while everything else in it runs."""

from __future__ import annotations

import time
from pathlib import Path

from tandem.core.protocol import PrefillTask, TokenBatch, decode
from tandem.core.redis_client import add_task
from tandem.core.redis_keys import MESSAGE_FIELD, prefill_stream
from tandem.core.sampling_params import SamplingParams
from tandem.kvtransfer.transport import make_sender
from tests.faults.cluster import Cluster, collect, request, stream_in_background

LEASE_S = 2.0
PROMPT = "A reservation outlives its lease while the prefill worker still wants it:"
REPLY = "tandem:reply:test-leases"


def _start(hold: Path) -> Cluster:
    cluster = Cluster()
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
    return cluster


def _prefill_log(cluster: Cluster) -> str:
    with open(cluster.logs["prefill-0"]) as log:
        return log.read()


def test_a_prefill_longer_than_the_lease_keeps_its_reservation_and_completes(tmp_path):
    hold = tmp_path / "hold"
    cluster = _start(hold)
    try:
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
        decode_worker = cluster.worker("decode-0")
        assert decode_worker.reservations == 1, "the decode worker freed a reservation still wanted"
        assert decode_worker.used_blocks > 0
        assert not result["tokens"], "the prefill was held: no first token yet"

        hold.unlink()
        result["thread"].join(120)
        assert "error" not in result, result
        assert result["tokens"] == expected, "token-exact"
        cluster.assert_no_blocks_in_use(timeout=60)
        assert "handoff of" not in _prefill_log(cluster), "the first transfer went through"
    finally:
        cluster.close()


def _tokens(cluster: Cluster, rid: str) -> list[int]:
    """`rid`'s tokens on REPLY once its last delta came (an error fails the test)."""
    deltas = [
        d
        for _, fields in cluster.client.xrange(REPLY)
        for d in decode(fields[MESSAGE_FIELD], TokenBatch).deltas
        if d.request_id == rid
    ]
    assert not any(d.error_code for d in deltas), deltas
    if not any(d.finish_reason for d in deltas):
        return []
    return [t for d in sorted(deltas, key=lambda d: d.offset) for t in d.token_ids]


def test_a_reservation_lost_while_prefilling_is_reserved_again_not_written(tmp_path):
    hold = tmp_path / "hold"
    cluster = _start(hold)
    stream = prefill_stream("smollm2")

    def task(rid: str) -> PrefillTask:
        return PrefillTask(
            request_id=rid,
            prompt_token_ids=[(11 * i) % 20000 + 100 for i in range(40)],
            sampling=SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
            reply_stream=REPLY,
            deadline=time.time() + 120,
        )

    try:
        add_task(cluster.client, stream, task("reference"))
        cluster.wait_for(lambda: _tokens(cluster, "reference"), "the reference answer")
        hold.touch()
        add_task(cluster.client, stream, task("lost-once"))
        cluster.wait_for(
            lambda: cluster.worker("decode-0").reservations == 1,
            "the decode worker to reserve blocks",
        )
        # The decode worker lets the reservation go (as a lease that ran out would).
        prober = make_sender("zmq", "probe")
        try:
            address = cluster.worker("decode-0").control_address
            resend_at = [0.0]

            def released() -> bool:
                # A release is fire-and-forget (a lost one is made good by the lease):
                # sent again every few seconds until the registry shows it landed.
                if cluster.worker("decode-0").reservations == 0:
                    return True
                if time.monotonic() >= resend_at[0]:
                    prober.release(address, "lost-once")
                    resend_at[0] = time.monotonic() + 5
                return False

            # Closed only once it was delivered: closing drops what is still queued.
            cluster.wait_for(released, "the release to land")
        finally:
            prober.close()
        cluster.wait_for(
            lambda: "reservation for lost-once" in _prefill_log(cluster),
            "a renewal to report the reservation lost",
        )
        hold.unlink()
        cluster.wait_for(lambda: _tokens(cluster, "lost-once"), "the answer")
        assert _tokens(cluster, "lost-once") == _tokens(cluster, "reference"), "token-exact"
        assert "the reservation was lost" in _prefill_log(cluster), "not shipped to lost blocks"
        cluster.assert_no_blocks_in_use(timeout=60)
    finally:
        cluster.close()
