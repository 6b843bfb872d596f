"""A prefill worker's --reclaim-idle must exceed twice its --transfer-timeout: it keeps
its tasks alive every reclaim_idle / 2 and its loop may wait one transfer timeout in
between, so anything less lets peers take over live work."""

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
