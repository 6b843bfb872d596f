"""A receiver drops bad input, answers what it can, and keeps serving afterwards."""

from __future__ import annotations

import msgspec
import pytest
import torch

from tandem.core.protocol import KVTransfer, ReserveReply, ReserveRequest, TransferAck, encode
from tandem.kvtransfer.transport import TransferState, layout_of, ship
from tests.kvtransfer.conftest import BLOCK_SIZE, Transport, make_caches, wait_until
from tests.kvtransfer.decode_stub import DecodeStub

LAYOUT = layout_of(make_caches(torch.float32), "tiny", BLOCK_SIZE)
PACKED_SHAPE = [1, 2, 1, 4, 1, 4]  # 32 float32 values, 128 bytes


def _kv_header(
    block_ids: list[int] | None = None, dtype: str = "float32", shape: list[int] = PACKED_SHAPE
) -> bytes:
    header = KVTransfer(request_id="bad", block_ids=block_ids or [1], dtype=dtype, shape=shape)
    return encode(header)


def _reserve(request_id: str = "bad") -> bytes:
    return encode(ReserveRequest(request_id=request_id, num_tokens=1, layout=LAYOUT, lease_s=1))


# (frames, receiver limits, refusal the sender gets back: None = silently dropped)
CASES = {
    "empty header": ([b""], {}, None),
    "not msgpack": ([b"\xc1\xc1 not msgpack"], {}, None),
    "unknown message type": ([msgspec.msgpack.encode({"type": "Exec", "code": "rm"})], {}, None),
    "reply sent to a receiver": ([encode(TransferAck(request_id="bad", ok=True))], {}, None),
    "oversized header": ([_reserve("x" * 1000)], {"max_header_bytes": 256}, None),
    "extra frame on reserve": ([_reserve(), b"junk"], {}, ReserveReply),
    "kv without payload": ([_kv_header()], {}, TransferAck),
    "kv payload one byte short": ([_kv_header(), bytes(127)], {}, TransferAck),
    "kv payload one byte long": ([_kv_header(), bytes(129)], {}, TransferAck),
    # 8 KiB against a 4 KiB cap; the good transfer afterwards is 3 KiB.
    "kv payload over the cap": (
        [_kv_header(shape=[1, 2, 1, 4, 1, 256]), bytes(8192)],
        {"max_payload_bytes": 4096},
        TransferAck,
    ),
    "kv shape disagrees with block ids": ([_kv_header([1, 2]), bytes(128)], {}, TransferAck),
    "kv with unknown dtype": ([_kv_header(dtype="object"), bytes(128)], {}, TransferAck),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_message_is_rejected_and_the_receiver_keeps_working(transport: Transport, case):
    frames, limits, refusal_type = CASES[case]
    receiver = transport.receiver(**limits)
    receiver.start()
    raw = transport.raw_peer(receiver)
    raw.send(frames)

    if refusal_type is None:
        assert raw.recv_reply(0.1) is None
    else:
        refusal = raw.recv_reply()
        assert isinstance(refusal, refusal_type)
        assert not refusal.ok and refusal.request_id == "bad" and "rejected" in refusal.reason
    assert wait_until(lambda: receiver.rejected == 1)
    assert receiver.poll(0) == []  # nothing bad reached the worker

    # The same receiver still serves a well-formed transfer end to end.
    sender = transport.sender()
    src, dst = make_caches(torch.float32, seed=3), make_caches(torch.float32, fill=0.0)
    with DecodeStub(receiver, dst, LAYOUT, free_blocks=[5, 2]):
        reply = sender.reserve(
            receiver.address,
            ReserveRequest(request_id="good", num_tokens=2 * BLOCK_SIZE, layout=LAYOUT, lease_s=5),
            5.0,
        )
        assert reply.ok
        transfer = ship(sender, receiver.address, "good", src, [1, 0], reply.block_ids, 5.0)
        assert transfer.state is TransferState.DONE, transfer.reason
    assert torch.equal(dst[0][:, [5, 2]], src[0][:, [1, 0]])
    assert receiver.rejected == 1
