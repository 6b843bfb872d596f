"""The other process of an nccl-backend test: a sender or a receiver, reporting as JSON lines.

    python -m tests.kvtransfer.nccl_peer send IDENTITY SPEC_JSON
    python -m tests.kvtransfer.nccl_peer receive SPEC_JSON

A sender ships `rounds` transfers to each receiver in SPEC["to"] (source blocks from
`source_blocks`, caches seeded by SPEC["seed"]) and prints one line per transfer. A
receiver prints its address, serves until stdin closes, and prints what it filled.
`die_at` (a 0-based transfer index) makes the process SIGKILL itself in the middle of that
transfer, after its header went out and before its bytes moved.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from tandem.core.protocol import ReserveRequest
from tandem.kvtransfer.nccl_backend import NcclKVReceiver, NcclKVSender
from tandem.kvtransfer.nccl_group import PairGroup
from tandem.kvtransfer.pack import dtype_from_name
from tandem.kvtransfer.transport import TransferState, layout_of, ship
from tests.kvtransfer.conftest import BLOCK_SIZE, make_caches
from tests.kvtransfer.decode_stub import DecodeStub

# Transfer i ships SOURCE_BLOCKS[i % 2]: non-contiguous, and different from one to the next.
SOURCE_BLOCKS = [[6, 0, 9], [2, 11, 4]]
DEVICE = os.environ.get("NCCL_PEER_DEVICE", "cpu")


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def die_in(method: str, at: int) -> None:
    """SIGKILL this process when PairGroup.`method` runs for the `at`-th transfer."""
    original = getattr(PairGroup, method)
    calls = {"n": 0}

    def dying(self: PairGroup, *args: object) -> object:
        if calls["n"] == at:
            time.sleep(0.5)  # the header is out and the peer is waiting for the bytes
            os.kill(os.getpid(), signal.SIGKILL)
        calls["n"] += 1
        return original(self, *args)

    setattr(PairGroup, method, dying)


def send(identity: str, spec: dict) -> None:
    if "die_at" in spec:
        die_in("send", spec["die_at"])
    sender = NcclKVSender(identity)
    timeout_s = spec.get("timeout_s", 10.0)
    for target in spec["to"]:
        dtype = dtype_from_name(target["dtype"])
        caches = [c.to(DEVICE) for c in make_caches(dtype, seed=spec["seed"])]
        layout = layout_of(caches, "tiny", BLOCK_SIZE)
        for i in range(spec.get("rounds", 1)):
            request_id = f"{identity}-{target['dtype']}-{i}"
            src = SOURCE_BLOCKS[i % 2]
            req = ReserveRequest(
                request_id=request_id, num_tokens=len(src) * BLOCK_SIZE, layout=layout, lease_s=30
            )
            reply = sender.reserve(target["address"], req, timeout_s)
            assert reply.ok, reply.reason
            started = time.monotonic()
            transfer = ship(
                sender, target["address"], request_id, caches, src, reply.block_ids, timeout_s
            )
            group = sender._groups.get(target["address"])
            report(
                request_id=request_id,
                address=target["address"],
                ok=transfer.state is TransferState.DONE,
                reason=transfer.reason,
                src=src,
                dst=reply.block_ids,
                group=group.name if group else None,
                elapsed=time.monotonic() - started,
            )
    sender.close()


def receive(spec: dict) -> None:
    if "die_at" in spec:
        die_in("receive", spec["die_at"])
    dtype = dtype_from_name(spec["dtype"])
    caches = [c.to(DEVICE) for c in make_caches(dtype, fill=float("nan"))]
    receiver = NcclKVReceiver()
    receiver.attach_kv_caches(caches)
    layout = layout_of(caches, "tiny", BLOCK_SIZE)
    with DecodeStub(receiver, caches, layout, free_blocks=spec["free_blocks"]) as stub:
        report(address=receiver.address)
        sys.stdin.read()  # until the test closes our stdin
        report(filled=sorted(stub.filled))
    receiver.close()


if __name__ == "__main__":
    if sys.argv[1] == "send":
        send(sys.argv[2], json.loads(sys.argv[3]))
    else:
        receive(json.loads(sys.argv[2]))
