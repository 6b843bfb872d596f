"""Worker settings refused at start. A prefill worker's --reclaim-idle must exceed twice
its --transfer-timeout: it keeps its tasks alive every reclaim_idle / 2 and its loop may
wait one transfer timeout in between, so anything less lets peers take over live work."""

from __future__ import annotations

import pytest

from tandem.core.config import WorkerConfig


def test_defaults_satisfy_the_rule() -> None:
    cfg = WorkerConfig(redis_url="redis://x", role="prefill")
    assert cfg.reclaim_idle_s > 2 * cfg.transfer_timeout_s


@pytest.mark.parametrize(("reclaim", "transfer"), [(5.0, 10.0), (5.0, 2.5), (1.0, 0.5)])
def test_a_prefill_worker_refuses_a_reclaim_idle_within_two_transfers(reclaim, transfer):
    with pytest.raises(ValueError, match="must exceed twice"):
        WorkerConfig(
            redis_url="redis://x",
            role="prefill",
            reclaim_idle_s=reclaim,
            transfer_timeout_s=transfer,
        )
    WorkerConfig(  # a colocated worker ships nothing: no such wait
        redis_url="redis://x", role="colocated", reclaim_idle_s=reclaim, transfer_timeout_s=transfer
    )


@pytest.mark.parametrize("lease", [0.0, -1.0, float("nan"), 601.0])
def test_a_reservation_lease_a_decode_worker_would_refuse_is_refused_at_start(lease):
    # A decode worker refuses a reservation whose lease is not in (0, 600]: a prefill
    # worker started with such a lease would have every reservation refused.
    with pytest.raises(ValueError, match="reservation_lease_s"):
        WorkerConfig(redis_url="redis://x", role="prefill", reservation_lease_s=lease)
