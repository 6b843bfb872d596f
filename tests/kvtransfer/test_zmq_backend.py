"""What only the zmq backend has: real sockets, address binding, frame size caps."""

from __future__ import annotations

import re

import pytest
import torch

from tandem.core.protocol import ReserveRequest
from tandem.kvtransfer.transport import TransferState, ZmqKVReceiver, ZmqKVSender, layout_of, ship
from tests.kvtransfer.conftest import Transport, bits, wait_until
from tests.kvtransfer.decode_stub import DecodeStub


@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:0", "tcp://127.0.0.1", "tcp://127.0.0.1:*"])
def test_ephemeral_tcp_port_is_resolved(bind):
    receiver = ZmqKVReceiver(bind)
    try:
        assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", receiver.address)
        assert not receiver.address.endswith(":0")
    finally:
        receiver.close()


def test_ipc_address_is_kept(tmp_path):
    address = f"ipc://{tmp_path}/decode.sock"
    receiver = ZmqKVReceiver(address)
    try:
        assert receiver.address == address
    finally:
        receiver.close()


def test_close_stops_the_io_thread():
    receiver = ZmqKVReceiver()
    receiver.start()
    assert receiver.running
    receiver.close()
    assert not receiver.running


@pytest.fixture(params=["zmq-tcp", "zmq-ipc"])
def zmq_transport(request, tmp_path):
    built = Transport(request.param, tmp_path)
    yield built
    built.close()


def test_frame_over_the_socket_cap_disconnects_the_peer_only(zmq_transport: Transport):
    # The cap is max(header, payload) limits; libzmq drops the peer before buffering it.
    receiver = zmq_transport.receiver(max_header_bytes=1024, max_payload_bytes=4096)
    receiver.start()
    raw = zmq_transport.raw_peer(receiver)
    raw.send([bytes(1 << 16)])
    assert raw.recv_reply(0.2) is None
    assert receiver.poll(0) == []
    assert receiver.rejected == 0  # libzmq dropped it; Python never buffered the frame

    sender = zmq_transport.sender()
    layout = layout_of([torch.zeros(2, 4, 4, 1, 1)], "tiny", 4)
    request = ReserveRequest(request_id="good", num_tokens=4, layout=layout, lease_s=5)
    with DecodeStub(receiver, [torch.zeros(2, 4, 4, 1, 1)], layout, free_blocks=[3]):
        assert sender.reserve(receiver.address, request, 5.0).block_ids == [3]
    assert receiver.running


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_multi_megabyte_transfer_is_bit_exact(zmq_transport: Transport, dtype):
    # Large enough for pyzmq's zero-copy path (frames over 64 KiB are not copied).
    shape = (2, 16, 16, 8, 64)  # 256 KiB..512 KiB per layer
    src = [torch.randn(shape).to(dtype) for _ in range(8)]
    dst = [torch.zeros(shape, dtype=dtype) for _ in range(8)]
    layout = layout_of(src, "big", 16)
    receiver, sender = zmq_transport.receiver(), zmq_transport.sender()
    src_blocks = list(range(15, -1, -2))
    with DecodeStub(receiver, dst, layout, free_blocks=list(range(16))):
        request = ReserveRequest(request_id="big", num_tokens=8 * 16, layout=layout, lease_s=5)
        reply = sender.reserve(receiver.address, request, 5.0)
        transfer = ship(sender, receiver.address, "big", src, src_blocks, reply.block_ids, 5.0)
        assert transfer.state is TransferState.DONE, transfer.reason
    for layer in range(8):
        assert torch.equal(bits(dst[layer][:, reply.block_ids]), bits(src[layer][:, src_blocks]))


def test_two_senders_are_answered_separately(zmq_transport: Transport):
    receiver = zmq_transport.receiver()
    senders = [zmq_transport.sender(f"prefill-{i}") for i in range(2)]
    caches = [torch.zeros(2, 4, 4, 1, 1)]
    layout = layout_of(caches, "tiny", 4)
    with DecodeStub(receiver, caches, layout, free_blocks=[0, 1]) as stub:
        for i, sender in enumerate(senders):
            request = ReserveRequest(request_id=f"r{i}", num_tokens=1, layout=layout, lease_s=5)
            assert sender.reserve(receiver.address, request, 5.0).block_ids == [i]
        senders[1].release(receiver.address, "r1")
        assert wait_until(lambda: stub.releases == ["r1"])


def test_sender_identity_reaches_the_receiver():
    receiver, sender = ZmqKVReceiver(), ZmqKVSender("prefill-7")
    receiver.start()
    try:
        sender.release(receiver.address, "r1")
        [item] = receiver.poll(5.0)
        assert item.peer == b"prefill-7" and item.msg.request_id == "r1"
    finally:
        sender.close()
        receiver.close()
