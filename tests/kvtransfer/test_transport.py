"""Behaviour every CPU transport must share: zmq over tcp:// and ipc://, and the fake."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tandem.core.protocol import (
    Handoff,
    KVLayout,
    PrefillTask,
    ReserveReply,
    ReserveRequest,
    TransferAck,
)
from tandem.core.sampling_params import SamplingParams
from tandem.kvtransfer.transport import TransferError, TransferState, layout_of, ship
from tests.kvtransfer.conftest import (
    BLOCK_SIZE,
    FLOAT_DTYPES,
    NUM_BLOCKS,
    NUM_LAYERS,
    Transport,
    bits,
    make_caches,
    wait_until,
)
from tests.kvtransfer.decode_stub import DecodeStub

TIMEOUT_S = 5.0
SHORT_TIMEOUT_S = 0.3


def _layout(dtype: torch.dtype = torch.float32) -> KVLayout:
    return layout_of(make_caches(dtype), "tiny", BLOCK_SIZE)


def _reserve(request_id: str, blocks: int, layout: KVLayout) -> ReserveRequest:
    # One token short of full blocks: a partly filled last block still needs a block.
    num_tokens = blocks * BLOCK_SIZE - 1
    return ReserveRequest(request_id=request_id, num_tokens=num_tokens, layout=layout, lease_s=5)


def _handoff(request_id: str) -> Handoff:
    task = PrefillTask(
        request_id=request_id,
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(max_tokens=4),
        reply_stream="gateway-0",
        deadline=time.time() + 60,
    )
    return Handoff(task=task, output_token_ids=[42], num_computed_tokens=3)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_reserve_ship_handoff_release_moves_blocks_bit_exactly(transport: Transport, dtype):
    receiver, sender = transport.receiver(), transport.sender()
    layout = _layout(dtype)
    src = make_caches(dtype, seed=1)
    dst = make_caches(dtype, fill=float("nan"))
    src_blocks = [6, 0, 9]
    with DecodeStub(receiver, dst, layout, free_blocks=[10, 3, 7, 1, 8]) as stub:
        reply = sender.reserve(receiver.address, _reserve("r1", 3, layout), TIMEOUT_S)
        assert reply.ok and reply.block_ids == [10, 3, 7]

        transfer = ship(sender, receiver.address, "r1", src, src_blocks, reply.block_ids, TIMEOUT_S)
        assert transfer.state is TransferState.DONE, transfer.reason

        handoff = _handoff("r1")
        assert sender.handoff(receiver.address, handoff, TIMEOUT_S).ok
        assert stub.handoffs == [handoff]

        sender.release(receiver.address, "r1")
        assert wait_until(lambda: stub.releases == ["r1"])

    sentinel = bits(torch.full((), float("nan"), dtype=dtype))
    untouched = [b for b in range(NUM_BLOCKS) if b not in reply.block_ids]
    for layer in range(NUM_LAYERS):
        for src_block, dst_block in zip(src_blocks, reply.block_ids, strict=True):
            assert torch.equal(bits(dst[layer][:, dst_block]), bits(src[layer][:, src_block]))
        assert bool((bits(dst[layer][:, untouched]) == sentinel).all())


def test_receiver_refusals_reach_the_sender(transport: Transport):
    receiver, sender = transport.receiver(), transport.sender()
    layout = _layout(torch.float32)
    caches = make_caches(torch.float32)
    with DecodeStub(receiver, caches, layout, free_blocks=[1, 2]):
        other = _layout(torch.bfloat16)
        reply = sender.reserve(receiver.address, _reserve("r1", 1, other), TIMEOUT_S)
        assert not reply.ok and "dtype" in reply.reason

        transfer = ship(sender, receiver.address, "r2", caches, [0], [1], TIMEOUT_S)
        assert transfer.state is TransferState.FAILED and transfer.reason == "not reserved"


def test_silent_receiver_times_out_within_the_timeout(transport: Transport):
    receiver, sender = transport.receiver(), transport.sender()
    receiver.start()  # receives, but nobody answers
    started = time.monotonic()
    with pytest.raises(TransferError, match="no ReserveReply"):
        sender.reserve(receiver.address, _reserve("r1", 1, _layout()), SHORT_TIMEOUT_S)
    assert SHORT_TIMEOUT_S * 0.9 <= time.monotonic() - started < SHORT_TIMEOUT_S + 1.0

    caches = make_caches(torch.float32)
    started = time.monotonic()
    transfer = ship(sender, receiver.address, "r1", caches, [0, 1], [2, 3], SHORT_TIMEOUT_S)
    assert time.monotonic() - started < SHORT_TIMEOUT_S + 1.0
    assert transfer.state is TransferState.FAILED and "no TransferAck for r1" in transfer.reason

    with pytest.raises(TransferError):
        sender.handoff(receiver.address, _handoff("r1"), SHORT_TIMEOUT_S)


def test_unreachable_receiver_fails_within_the_timeout(transport: Transport):
    sender = transport.sender()
    address = transport.unreachable_address()
    started = time.monotonic()
    with pytest.raises(TransferError):
        sender.reserve(address, _reserve("r1", 1, _layout()), SHORT_TIMEOUT_S)
    transfer = ship(sender, address, "r1", make_caches(torch.float32), [0], [0], SHORT_TIMEOUT_S)
    assert transfer.state is TransferState.FAILED and transfer.reason
    sender.release(address, "r1")  # fire and forget: never raises
    assert time.monotonic() - started < 2 * SHORT_TIMEOUT_S + 1.0


def test_late_reply_to_a_timed_out_call_is_not_taken_for_the_next_one(transport: Transport):
    receiver, sender = transport.receiver(), transport.sender()
    receiver.start()
    layout = _layout()
    with pytest.raises(TransferError):
        sender.reserve(receiver.address, _reserve("r1", 1, layout), SHORT_TIMEOUT_S)
    [late] = receiver.poll(TIMEOUT_S)

    def answer_late_then_current(request_id: str) -> ReserveReply:
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(
                sender.reserve, receiver.address, _reserve(request_id, 1, layout), TIMEOUT_S
            )
            [current] = receiver.poll(TIMEOUT_S)
            assert current.msg.request_id == request_id
            receiver.reply(late.peer, ReserveReply(request_id="r1", ok=True, block_ids=[1]))
            receiver.reply(
                current.peer, ReserveReply(request_id=request_id, ok=True, block_ids=[2])
            )
            return call.result(TIMEOUT_S)

    # A different request: matched by request id.
    assert answer_late_then_current("r2").block_ids == [2]
    # A retry of the same request: the abandoned call's reply must not answer it either.
    with pytest.raises(TransferError):
        sender.reserve(receiver.address, _reserve("r1", 1, layout), SHORT_TIMEOUT_S)
    [late] = receiver.poll(TIMEOUT_S)
    assert answer_late_then_current("r1").block_ids == [2]


def test_calls_after_close_fail_cleanly(transport: Transport):
    receiver, sender = transport.receiver(), transport.sender()
    with pytest.raises(RuntimeError, match="start"):
        receiver.poll(0)
    receiver.start()
    receiver.close()
    receiver.close()  # idempotent
    receiver.reply(b"prefill-0", TransferAck(request_id="r1", ok=True))  # dropped, no error
    sender.close()
    with pytest.raises(TransferError, match="closed"):
        sender.reserve(receiver.address, _reserve("r1", 1, _layout()), SHORT_TIMEOUT_S)
