"""ZMQ CURVE on the internal plane: with keys, a decode-side receiver serves prefill
senders holding the prefill key and nobody else; a worker without its key files does
not start."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import zmq.auth

from tandem.core.protocol import ReserveRequest
from tandem.kvtransfer.curve import CurveKeys, curve_dir_for
from tandem.kvtransfer.transport import TransferError, layout_of, make_receiver, make_sender
from tests.kvtransfer.conftest import BLOCK_SIZE, make_caches
from tests.kvtransfer.decode_stub import DecodeStub

LAYOUT = layout_of(make_caches(torch.float32), "tiny", BLOCK_SIZE)
REQUEST = ReserveRequest(request_id="r", num_tokens=BLOCK_SIZE, layout=LAYOUT, lease_s=5.0)


def make_keys(directory: Path) -> Path:
    directory.mkdir()
    zmq.auth.create_certificates(str(directory), "decode")
    zmq.auth.create_certificates(str(directory), "prefill")
    return directory


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return make_keys(tmp_path / "keys")


def test_only_a_sender_with_the_prefill_key_is_served(keys: Path, tmp_path: Path) -> None:
    other = make_keys(tmp_path / "other")  # a prefill pair the receiver does not know
    shutil.copy(keys / "decode.key", other / "decode.key")  # ...trusting the right server
    receiver = make_receiver("zmq", "tcp://127.0.0.1:0", CurveKeys(keys))
    receiver.start()
    senders = {
        "keyed": make_sender("zmq", "prefill-0", CurveKeys(keys)),
        "plain": make_sender("zmq", "prefill-1"),
        "wrong key": make_sender("zmq", "prefill-2", CurveKeys(other)),
    }
    try:
        with DecodeStub(receiver, make_caches(torch.float32), LAYOUT, free_blocks=[3]) as stub:
            assert senders["keyed"].reserve(receiver.address, REQUEST, 5.0).ok
            for name in ("plain", "wrong key"):
                with pytest.raises(TransferError):
                    senders[name].reserve(receiver.address, REQUEST, 1.0)
            assert list(stub.reserved) == ["r"]  # only the keyed sender's
    finally:
        for sender in senders.values():
            sender.close()
        receiver.close()


def test_a_worker_missing_its_secret_key_is_refused_at_startup(keys: Path) -> None:
    assert curve_dir_for("decode", str(keys)) == str(keys)
    (keys / "decode.key_secret").unlink()
    with pytest.raises(ValueError, match="decode.key_secret"):
        curve_dir_for("decode", str(keys))
    assert curve_dir_for("prefill", str(keys)) == str(keys)  # needs decode.key only
    with pytest.raises(ValueError, match="not a directory"):
        curve_dir_for("prefill", str(keys / "nope"))
