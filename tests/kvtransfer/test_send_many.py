"""KVSender.send_blocks_many's default (one send_blocks per move) and ship_many."""

from __future__ import annotations

import pytest
import torch

from tandem.core.protocol import TransferAck
from tandem.kvtransfer.transport import BlockMove, KVSender, TransferError, TransferState, ship_many


class _Sender(KVSender):
    """Records send_blocks calls; refuses "refused" and fails "lost"."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[int], list[int]]] = []

    def reserve(self, address, req, timeout_s):  # pragma: no cover - unused
        raise NotImplementedError

    def send_kv(self, address, request_id, block_ids, packed, timeout_s):  # pragma: no cover
        raise NotImplementedError

    def send_blocks(self, address, request_id, kv_caches, src, dst, timeout_s, staging=None):
        self.sent.append((request_id, list(src), list(dst)))
        if request_id == "lost":
            raise TransferError("peer gone (test)")
        return TransferAck(
            request_id=request_id, ok=request_id != "refused", reason="no room (test)"
        )

    def handoff(self, address, msg, timeout_s):  # pragma: no cover - unused
        raise NotImplementedError

    def release(self, address, request_id):  # pragma: no cover - unused
        pass

    def close(self):  # pragma: no cover - unused
        pass


def test_default_sends_each_move_and_fails_only_its_own():
    sender = _Sender()
    moves = [
        BlockMove("a", [0, 1], [5, 6]),
        BlockMove("lost", [2], [7]),
        BlockMove("refused", [3], [8]),
        BlockMove("b", [4], [9]),
    ]
    done = ship_many(sender, "tcp://x", moves, [torch.zeros(1)], 1.0)
    assert [m[0] for m in sender.sent] == ["a", "lost", "refused", "b"]
    assert [t.state for t in done] == [
        TransferState.DONE,
        TransferState.FAILED,
        TransferState.FAILED,
        TransferState.DONE,
    ]
    assert "peer gone" in done[1].reason and "no room" in done[2].reason


def test_mismatched_block_lists_are_a_caller_bug():
    with pytest.raises(ValueError):
        ship_many(_Sender(), "tcp://x", [BlockMove("a", [0, 1], [5])], [torch.zeros(1)], 1.0)
