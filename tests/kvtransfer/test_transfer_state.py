from __future__ import annotations

import pytest

from tandem.kvtransfer import transport as kvtransfer
from tandem.kvtransfer.transport import Transfer, TransferState

S = TransferState


def _transfer(state: TransferState = S.SENDING) -> Transfer:
    return Transfer(request_id="r1", peer="tcp://decode:1", state=state)


def test_happy_path_sending_done():
    transfer = _transfer()
    transfer.advance(S.DONE)
    assert transfer.state is S.DONE and transfer.finished


def test_a_transfer_being_sent_can_fail_with_a_reason():
    transfer = _transfer()
    transfer.fail("decode refused")
    assert transfer.state is S.FAILED and transfer.reason == "decode refused"


@pytest.mark.parametrize(
    ("start", "target"),
    [
        (S.SENDING, S.SENDING),
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
