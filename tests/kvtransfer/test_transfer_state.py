from __future__ import annotations

import pytest

from tandem.kvtransfer import transport as kvtransfer
from tandem.kvtransfer.transport import Transfer, TransferState

S = TransferState


def _transfer(state: TransferState = S.RESERVING, deadline: float = 100.0) -> Transfer:
    return Transfer(request_id="r1", peer="tcp://decode:1", deadline=deadline, state=state)


def test_happy_path_reserving_sending_done():
    transfer = _transfer()
    transfer.advance(S.SENDING)
    transfer.advance(S.DONE)
    assert transfer.state is S.DONE and transfer.finished


@pytest.mark.parametrize("state", [S.RESERVING, S.SENDING])
def test_any_unfinished_state_can_fail_with_a_reason(state):
    transfer = _transfer(state)
    transfer.fail("decode refused")
    assert transfer.state is S.FAILED and transfer.reason == "decode refused"


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (S.RESERVING, S.DONE),
        (S.RESERVING, S.RESERVING),
        (S.SENDING, S.RESERVING),
        (S.DONE, S.FAILED),
        (S.DONE, S.SENDING),
        (S.FAILED, S.DONE),
        (S.FAILED, S.FAILED),
    ],
)
def test_illegal_transitions_are_rejected_and_leave_the_state_alone(start, target):
    transfer = _transfer(start)
    with pytest.raises(ValueError, match=f"{start.name} -> {target.name}"):
        transfer.advance(target)
    assert transfer.state is start


def test_expired_only_while_unfinished():
    transfer = _transfer(deadline=10.0)
    assert not transfer.expired(now=9.9)
    assert transfer.expired(now=10.0)
    transfer.advance(S.SENDING)
    transfer.advance(S.DONE)
    assert not transfer.expired(now=11.0)


@pytest.mark.parametrize("backend", ["tcp", "", "ipc"])
def test_factories_reject_backends_they_do_not_have(backend):
    with pytest.raises(ValueError, match="zmq"):
        kvtransfer.make_receiver(backend, "tcp://127.0.0.1:0")
    with pytest.raises(ValueError, match="zmq"):
        kvtransfer.make_sender(backend, "prefill-0")


@pytest.mark.parametrize("backend", kvtransfer.BACKENDS)
def test_factories_build_each_backend(backend):
    receiver = kvtransfer.make_receiver(backend, "tcp://127.0.0.1:0")
    sender = kvtransfer.make_sender(backend, "prefill-0")
    try:
        assert isinstance(receiver, kvtransfer.KVReceiver)
        assert isinstance(sender, kvtransfer.KVSender)
        assert not receiver.address.endswith(":0")  # an ephemeral address is resolved
    finally:
        sender.close()
        receiver.close()
