"""The cuda_ipc transport without a GPU: messages, layout checks, clear errors, and the
whole protocol over real zmq sockets with the two CUDA calls (export a storage, map it)
replaced by an in-process stand-in, so the copy kernel runs under Triton's interpreter
straight into the receiver's cache. tests/gpu/test_cuda_ipc_gpu.py runs the real thing."""

from __future__ import annotations

import re
import time

import pytest
import torch
import zmq

from tandem.core.protocol import (
    ControlMessage,
    ExportReply,
    ExportRequest,
    KVTransfer,
    ReserveReply,
    decode,
    encode,
)
from tandem.kvtransfer import cuda_ipc_backend as ipc
from tandem.kvtransfer.cuda_ipc_backend import (
    CudaIpcKVReceiver,
    CudaIpcKVSender,
    export_mismatch,
    stacked_cache,
)
from tandem.kvtransfer.transport import TransferError, TransferState, ZmqKVReceiver, layout_of, ship
from tandem.kvtransfer.wire import RejectedFrame, parse_inbound, parse_reply
from tests.kvtransfer.conftest import bits
from tests.kvtransfer.cuda_ipc_fakes import (
    BLOCK,
    DIM,
    DST_BLOCKS,
    HEADS,
    LAYERS,
    SRC_BLOCKS,
    Decode,
    fake_export,
    handoff,
    kv_cache,
    reserve,
    untouched,
)
from tests.kvtransfer.decode_stub import DecodeStub


# -- messages ------------------------------------------------------------------------------
def test_export_messages_round_trip_typed():
    cache = kv_cache(2, torch.bfloat16)
    reply = ExportReply(request_id="t", ok=True, export=fake_export(cache, handle=b"\x00\xff" * 40))
    assert decode(encode(reply), ControlMessage) == reply
    assert decode(encode(ExportRequest(request_id="t")), ControlMessage) == ExportRequest(
        request_id="t"
    )
    header = KVTransfer(
        request_id="r",
        block_ids=[1],
        dtype="bfloat16",
        shape=[1, 2, 1, 1, 1, 1],
        in_place=True,
        export_id="e1",
    )
    assert decode(encode(header), ControlMessage) == header
    assert decode(encode(ReserveReply(request_id="r", ok=True)), ControlMessage).export_id == ""


def test_only_a_cuda_ipc_receiver_accepts_export_requests():
    frame = encode(ExportRequest(request_id="t"))
    with pytest.raises(RejectedFrame) as refused:
        parse_inbound(b"p", [frame])
    assert isinstance(refused.value.refusal, ExportReply) and not refused.value.refusal.ok
    accepted = parse_inbound(b"p", [frame], accepts=CudaIpcKVReceiver.accepts)
    assert accepted.msg == ExportRequest(request_id="t")
    assert isinstance(parse_reply(encode(refused.value.refusal)), ExportReply)


# -- the cache tensor and its layout -------------------------------------------------------
def test_stacked_cache_recovers_the_engines_single_tensor():
    base = kv_cache(SRC_BLOCKS, torch.float32)
    stacked = stacked_cache(list(base.unbind(0)))
    assert stacked.data_ptr() == base.data_ptr() and torch.equal(stacked, base)
    window = torch.zeros(5, 2, 3, 4, 2, 8)[1:4]  # views of a bigger tensor, offset by one layer
    assert stacked_cache(list(window.unbind(0))).data_ptr() == window.data_ptr()


@pytest.mark.parametrize(
    "views",
    [
        [torch.zeros(2, 3, 4, 2, 8) for _ in range(3)],  # separate allocations
        list(torch.zeros(3, 2, 3, 4, 2, 8).unbind(0))[::-1],  # out of order
        [v[:, :2] for v in torch.zeros(3, 2, 3, 4, 2, 8).unbind(0)],  # not contiguous
        [],
    ],
    ids=["separate", "reversed", "sliced", "empty"],
)
def test_stacked_cache_refuses_anything_else(views):
    with pytest.raises(ValueError):
        stacked_cache(views)


def test_export_layout_may_differ_in_blocks_only():
    local = kv_cache(SRC_BLOCKS, torch.bfloat16)
    assert export_mismatch(fake_export(kv_cache(DST_BLOCKS, torch.bfloat16)), local) is None
    cases = {
        "float32": fake_export(kv_cache(4, torch.float32)),
        "layers": fake_export(kv_cache(4, torch.bfloat16, layers=2)),
        "kv_heads": fake_export(kv_cache(4, torch.bfloat16, heads=1)),
        "head_dim": fake_export(kv_cache(4, torch.bfloat16, dim=16)),
        "block_size": fake_export(kv_cache(4, torch.bfloat16, block=8)),
        "not contiguous": fake_export(kv_cache(4, torch.bfloat16), stride=[1, 1, 1, 1, 1, 1]),
        "past its storage": fake_export(kv_cache(4, torch.bfloat16), offset=1),
        "unsupported": fake_export(kv_cache(4, torch.bfloat16), dtype="object"),
        "not \\[layers": fake_export(kv_cache(4, torch.bfloat16), shape=[3, 2, 4, 4, 16]),
    }
    for why, export in cases.items():
        reason = export_mismatch(export, local)
        assert reason is not None and re.search(why, reason), (why, reason)


# -- without CUDA: clear errors ------------------------------------------------------------
def test_receiver_without_cuda_says_to_use_zmq():
    receiver = CudaIpcKVReceiver()
    try:
        with pytest.raises(ValueError, match="zmq"):
            receiver.attach_kv_caches(list(kv_cache(2, torch.float32).unbind(0)))
    finally:
        receiver.close()


def test_mapping_without_cuda_is_a_transfer_error():
    with pytest.raises(ipc.TransferError, match="zmq"):
        ipc.open_export(fake_export(kv_cache(2, torch.float32)), torch.device("cpu"))


# -- the protocol, end to end --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_blocks_land_bit_exact_and_the_mapping_is_reused(fake_ipc, ipc_sender, ipc_address, dtype):
    decode_ = Decode(ipc_address, dtype)
    src = kv_cache(SRC_BLOCKS, dtype)
    try:
        written: list[int] = []
        for rid, src_ids in (("a", [7, 2, 9]), ("b", [0, 5])):
            dst_ids = reserve(ipc_sender, ipc_address, rid, len(src_ids), dtype).block_ids
            assert all(isinstance(b, int) for b in dst_ids)
            t = ship(ipc_sender, ipc_address, rid, list(src.unbind(0)), src_ids, dst_ids, 5.0)
            assert t.state is TransferState.DONE, t.reason
            assert torch.equal(bits(decode_.cache[:, :, dst_ids]), bits(src[:, :, src_ids]))
            # The header went one way; the handoff behind it finds the blocks filled.
            assert handoff(ipc_sender, ipc_address, rid).ok
            written += dst_ids
        assert untouched(decode_.cache, written)
        assert decode_.stub.filled == {"a", "b"}
        assert fake_ipc.opened == [decode_.receiver.export_id]  # mapped once
    finally:
        decode_.close()


def test_restarted_receiver_is_mapped_afresh(fake_ipc, ipc_sender, ipc_address):
    src = kv_cache(SRC_BLOCKS, torch.float32)
    first = Decode(ipc_address, torch.float32)
    dst = reserve(ipc_sender, ipc_address, "a", 2).block_ids
    assert (
        ship(ipc_sender, ipc_address, "a", list(src.unbind(0)), [1, 2], dst, 5).state.name == "DONE"
    )
    first.close()
    second = Decode(ipc_address, torch.float32)  # same address, new cache, new export
    try:
        dst = reserve(ipc_sender, ipc_address, "b", 2).block_ids
        t = ship(ipc_sender, ipc_address, "b", list(src.unbind(0)), [3, 4], dst, 5.0)
        assert t.state is TransferState.DONE, t.reason
        assert torch.equal(second.cache[:, :, dst], src[:, :, [3, 4]])
        assert fake_ipc.opened == [first.receiver.export_id, second.receiver.export_id]
    finally:
        second.close()


@pytest.mark.parametrize("mapped_before", [False, True])
def test_reservation_of_a_previous_incarnation_never_writes_the_new_cache(
    fake_ipc, ipc_sender, ipc_address, mapped_before
):
    src = kv_cache(SRC_BLOCKS, torch.float32)
    first = Decode(ipc_address, torch.float32)
    if mapped_before:
        dst = reserve(ipc_sender, ipc_address, "warm", 1).block_ids
        ship(ipc_sender, ipc_address, "warm", list(src.unbind(0)), [0], dst, 5.0)
    stale = reserve(ipc_sender, ipc_address, "stale", 3).block_ids
    first.close()
    second = Decode(ipc_address, torch.float32)
    try:
        t = ship(ipc_sender, ipc_address, "stale", list(src.unbind(0)), [1, 2, 3], stale, 5.0)
        if mapped_before:
            # Written into the old export only; the new receiver refuses the one-way
            # header, so the handoff behind it is refused.
            assert t.state is TransferState.DONE
            assert not handoff(ipc_sender, ipc_address, "stale").ok
        else:
            assert t.state is TransferState.FAILED and "restarted" in t.reason  # no write
        assert untouched(second.cache, [])
        assert second.stub.filled == set()
    finally:
        second.close()


def test_receiver_gone_fails_within_the_timeout(fake_ipc, ipc_address):
    decode_ = Decode(ipc_address, torch.float32)
    fresh = CudaIpcKVSender("prefill-1")  # never mapped: the export request times out
    mapped = CudaIpcKVSender("prefill-2")  # mapped: the handoff after the header times out
    src = list(kv_cache(SRC_BLOCKS, torch.float32).unbind(0))
    try:
        dst = reserve(mapped, ipc_address, "warm", 1).block_ids
        assert ship(mapped, ipc_address, "warm", src, [0], dst, 5.0).state.name == "DONE"
        fresh_dst = reserve(fresh, ipc_address, "x", 1).block_ids
        mapped_dst = reserve(mapped, ipc_address, "y", 1).block_ids
        decode_.close()
        failed = ship(fresh, ipc_address, "x", src, [1], fresh_dst, 0.3)
        assert failed.state is TransferState.FAILED and "ExportReply" in failed.reason
        ship(mapped, ipc_address, "y", src, [1], mapped_dst, 0.3)  # one way: nothing to wait on
        t0 = time.monotonic()
        with pytest.raises(TransferError, match="TransferAck"):
            handoff(mapped, ipc_address, "y", timeout_s=0.3)
        assert time.monotonic() - t0 < 5
        assert mapped._mappings == {}  # dropped: the next transfer asks again
    finally:
        fresh.close()
        mapped.close()


def test_plain_zmq_receiver_is_refused_before_any_copy(ipc_sender, tmp_path):
    receiver = ZmqKVReceiver(f"ipc://{tmp_path}/zmq.sock")
    cache = kv_cache(DST_BLOCKS, torch.float32, float("nan"))
    layout = layout_of(list(cache.unbind(0)), "tiny", BLOCK)
    try:
        with DecodeStub(receiver, list(cache.unbind(0)), layout, list(range(DST_BLOCKS))):
            dst = reserve(ipc_sender, receiver.address, "r", 2).block_ids
            src = list(kv_cache(SRC_BLOCKS, torch.float32).unbind(0))
            t = ship(ipc_sender, receiver.address, "r", src, [0, 1], dst, 5.0)
            assert t.state is TransferState.FAILED and "not a cuda_ipc receiver" in t.reason
            with pytest.raises(ipc.TransferError, match="not a cuda_ipc receiver"):
                ipc_sender._fetch_export(receiver.address, time.monotonic() + 5.0)
    finally:
        receiver.close()


@pytest.mark.parametrize(
    "shape,free,why",
    [
        (dict(dim=16), None, "head_dim"),
        ({}, [DST_BLOCKS + 3, 0], "out of range"),
        ({}, [4, 4], "repeat"),
    ],
    ids=["layout", "ids-past-the-cache", "repeated-ids"],
)
def test_bad_export_or_blocks_fail_without_writing(
    fake_ipc, ipc_sender, ipc_address, shape, free, why
):
    decode_ = Decode(ipc_address, torch.float32, free=free, **shape)
    try:
        dst = reserve(ipc_sender, ipc_address, "r", 2).block_ids
        src = list(kv_cache(SRC_BLOCKS, torch.float32).unbind(0))
        t = ship(ipc_sender, ipc_address, "r", src, [0, 1], dst, 5.0)
        assert t.state is TransferState.FAILED and why in t.reason
        assert untouched(decode_.cache, [])
    finally:
        decode_.close()


def test_in_place_header_naming_another_export_is_refused_by_the_receiver(fake_ipc, ipc_address):
    decode_ = Decode(ipc_address, torch.float32)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(ipc_address)
        header = KVTransfer(
            request_id="r",
            block_ids=[0],
            dtype="float32",
            shape=[LAYERS, 2, 1, BLOCK, HEADS, DIM],
            in_place=True,
            export_id="not-this-one",
        )
        sock.send(encode(header))
        assert sock.poll(5000)
        ack = parse_reply(sock.recv())
        assert not ack.ok and "another cache export" in ack.reason
        assert decode_.receiver.rejected == 1 and decode_.stub.filled == set()
    finally:
        sock.close()
        ctx.term()
        decode_.close()


def test_an_export_is_refused_to_a_sender_the_receiver_does_not_admit(fake_ipc, ipc_address):
    decode_ = Decode(ipc_address, torch.float32)
    decode_.receiver.admits_peer = lambda peer: peer == b"prefill-0"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"stranger")
    try:
        sock.connect(ipc_address)
        sock.send(encode(ExportRequest(request_id="t")))
        assert sock.poll(5000)
        reply = parse_reply(sock.recv())
        assert not reply.ok and reply.export is None
        assert "not a registered prefill worker" in reply.reason
    finally:
        sock.close()
        ctx.term()
        decode_.close()
