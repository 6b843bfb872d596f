"""A decode worker cut down to its transport duties, answering on a thread."""

from __future__ import annotations

import threading

import torch

from tandem.core.protocol import (
    Handoff,
    KVLayout,
    KVTransfer,
    Release,
    ReserveReply,
    ReserveRequest,
    TransferAck,
)
from tandem.kvtransfer.transport import Inbound, KVReceiver, unpack_blocks


class DecodeStub:
    def __init__(
        self,
        receiver: KVReceiver,
        kv_caches: list[torch.Tensor],
        layout: KVLayout,
        free_blocks: list[int],
    ):
        self.receiver = receiver
        self.kv_caches = kv_caches
        self.layout = layout
        self.free_blocks = list(free_blocks)
        self.reserved: dict[str, list[int]] = {}
        self.filled: set[str] = set()
        self.handoffs: list[Handoff] = []
        self.releases: list[str] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decode-stub", daemon=True)

    def __enter__(self) -> DecodeStub:
        self.receiver.start()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self.errors, self.errors

    def _run(self) -> None:
        while not self._stop.is_set():
            for item in self.receiver.poll(0.02):
                try:
                    self._handle(item)
                except Exception as exc:  # surfaced by __exit__ in the test's thread
                    self.errors.append(exc)

    def _handle(self, item: Inbound) -> None:
        msg = item.msg
        if isinstance(msg, ReserveRequest):
            self.receiver.reply(item.peer, self._reserve(msg))
        elif isinstance(msg, KVTransfer):
            if msg.block_ids != self.reserved.get(msg.request_id):
                ack = TransferAck(request_id=msg.request_id, ok=False, reason="not reserved")
            elif msg.in_place and not self.receiver.in_place:
                ack = TransferAck(request_id=msg.request_id, ok=False, reason="carries KV")
            else:
                if not msg.in_place:  # in_place: the sender already wrote the blocks
                    assert item.payload is not None
                    unpack_blocks(self.kv_caches, msg.block_ids, item.payload)
                self.filled.add(msg.request_id)
                ack = TransferAck(request_id=msg.request_id, ok=True)
            self.receiver.reply(item.peer, ack)
        elif isinstance(msg, Handoff):
            self.handoffs.append(msg)
            request_id = msg.task.request_id
            ok = request_id in self.filled
            self.receiver.reply(item.peer, TransferAck(request_id=request_id, ok=ok))
        elif isinstance(msg, Release):
            self.releases.append(msg.request_id)
            self.free_blocks.extend(self.reserved.pop(msg.request_id, []))

    def _reserve(self, req: ReserveRequest) -> ReserveReply:
        reason = self.layout.mismatch(req.layout)
        needed = -(-req.num_tokens // self.layout.block_size)
        if reason is None and needed > len(self.free_blocks):
            reason = f"{needed} blocks wanted, {len(self.free_blocks)} free"
        if reason is not None:
            return ReserveReply(request_id=req.request_id, ok=False, reason=reason)
        blocks, self.free_blocks = self.free_blocks[:needed], self.free_blocks[needed:]
        self.reserved[req.request_id] = blocks
        return ReserveReply(request_id=req.request_id, ok=True, block_ids=blocks)
