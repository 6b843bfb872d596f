"""A zmq receiver bounds what a peer can make it hold: payloads no larger than the KV
cache it serves, and a bounded inbox whose overflow is refused, not queued."""

from __future__ import annotations

import torch

from tandem.core.protocol import KVTransfer, Release, ReserveReply, ReserveRequest, encode
from tandem.kvtransfer import zmq_backend
from tandem.kvtransfer.transport import ZmqKVReceiver, layout_of
from tests.kvtransfer.conftest import BLOCK_SIZE, Transport, make_caches, wait_until

LAYOUT = layout_of(make_caches(torch.float32), "tiny", BLOCK_SIZE)


def test_payloads_are_capped_at_the_cache_size(tmp_path):
    transport = Transport("zmq", tmp_path)
    try:
        receiver = transport.receiver()
        caches = make_caches(torch.float32)
        receiver.attach_kv_caches(caches)
        cache_bytes = sum(c.numel() * c.element_size() for c in caches)
        receiver.start()
        raw = transport.raw_peer(receiver)
        # One block more than the whole cache holds: no real transfer is this large.
        per_layer = list(caches[0].shape)  # [2, blocks, block_size, kv_heads, head_dim]
        shape = [len(caches), 2, per_layer[1] + 1, *per_layer[2:]]
        header = KVTransfer(request_id="big", block_ids=list(range(shape[2])), dtype="float32",
                            shape=shape)  # fmt: skip
        payload = bytes(4 * torch.Size(shape).numel())
        assert len(payload) > cache_bytes
        raw.send([encode(header), payload])
        refusal = raw.recv_reply()
        assert refusal is not None and not refusal.ok
        assert wait_until(lambda: receiver.rejected == 1, 5.0)
        assert receiver.poll(0) == []
    finally:
        transport.close()


def test_an_overflowing_inbox_is_refused_and_drains(tmp_path, monkeypatch):
    monkeypatch.setattr(zmq_backend, "MAX_INBOX", 4)
    transport = Transport("zmq", tmp_path)
    try:
        receiver = transport.receiver()
        assert isinstance(receiver, ZmqKVReceiver)
        receiver.start()
        raw = transport.raw_peer(receiver)
        for i in range(6):
            req = ReserveRequest(request_id=f"r{i}", num_tokens=1, layout=LAYOUT, lease_s=1.0)
            raw.send([encode(req)])
        refusals = [raw.recv_reply(2.0) for _ in range(2)]
        assert all(isinstance(r, ReserveReply) and not r.ok and "busy" in r.reason
                   for r in refusals), refusals  # fmt: skip
        assert wait_until(lambda: receiver.rejected == 2)
        assert len(receiver.poll(0.5)) == 4
        raw.send([encode(Release(request_id="r0"))])  # room again: taken in
        assert len(receiver.poll(2.0)) == 1
    finally:
        transport.close()
