"""What prefill and decode workers see of a KV transport, whatever carries the bytes.

Decode owns a KVReceiver: it reserves blocks, scatters received KV into them and adopts
handed-off requests. Prefill owns a KVSender: every call blocks until the receiver's
reply or the timeout, so the worker's control flow reads top to bottom and each failure
surfaces as one TransferError.
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tandem.core.protocol import ControlMessage, Handoff, ReserveReply, ReserveRequest, TransferAck
from tandem.kvtransfer.pack import pack_blocks


class TransferError(Exception):
    """A transport call failed: timeout, unreachable peer or malformed reply."""


class TransferState(enum.Enum):
    """A Transfer starts SENDING: it exists only once the reservation has succeeded."""

    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


_NEXT_STATES: dict[TransferState, frozenset[TransferState]] = {
    TransferState.SENDING: frozenset({TransferState.DONE, TransferState.FAILED}),
    TransferState.DONE: frozenset(),
    TransferState.FAILED: frozenset(),
}


@dataclass
class Transfer:
    """One request's KV on its way to a decode worker."""

    request_id: str
    peer: str  # the receiver's address
    state: TransferState = TransferState.SENDING
    reason: str = ""  # why it failed

    @property
    def finished(self) -> bool:
        return not _NEXT_STATES[self.state]

    def advance(self, new_state: TransferState, reason: str = "") -> None:
        """Move to `new_state`; ValueError for a transition the protocol never makes."""
        if new_state not in _NEXT_STATES[self.state]:
            raise ValueError(
                f"transfer {self.request_id}: illegal transition "
                f"{self.state.name} -> {new_state.name}"
            )
        self.state = new_state
        if reason:
            self.reason = reason

    def fail(self, reason: str) -> None:
        self.advance(TransferState.FAILED, reason)


@dataclass
class Inbound:
    """One message that reached a receiver."""

    peer: bytes  # opaque sender identity; pass it back to KVReceiver.reply
    msg: ControlMessage
    # For a KVTransfer: the packed blocks, already typed and shaped from the header.
    # It may alias the transport's receive buffer and keep it alive: scatter it promptly.
    payload: torch.Tensor | None = None


class KVReceiver(abc.ABC):
    """Decode side: receives reservations, KV payloads, handoffs and releases.

    A KVTransfer arrives either with a payload to scatter (zmq, nccl) or, when its
    header says `in_place`, with none: the sender already wrote the reserved blocks
    (cuda_ipc) and the receiver only marks them filled.
    """

    # Inbound messages dropped as malformed, oversized or unexpected (a health metric).
    rejected: int = 0
    # Whether senders write this receiver's cache directly (in_place KVTransfers).
    in_place: bool = False
    # Who may open a path into the worker's memory (a cuda_ipc export, an nccl group),
    # by sender identity; None: anyone. Called on the receiver's I/O thread.
    admits_peer: Callable[[bytes], bool] | None = None

    def attach_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        """Called once, before start(), with the worker's KV cache tensors.

        Backends that move bytes without the worker's help (cuda_ipc exports them,
        nccl learns the device) keep what they need; the default needs nothing.
        """
        return None

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """Where senders connect; published in the worker registry."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def poll(self, timeout_s: float) -> list[Inbound]:
        """What arrived, waiting at most `timeout_s` for the first item; [] on timeout."""

    @abc.abstractmethod
    def reply(self, peer: bytes, msg: ControlMessage) -> None:
        """Queue `msg` for `peer`; never blocks on the network."""


@dataclass(frozen=True)
class BlockMove:
    """One request's blocks: where they are here, and the blocks reserved for them."""

    request_id: str
    src_block_ids: Sequence[int]
    dst_block_ids: Sequence[int]


class KVSender(abc.ABC):
    """Prefill side. Every call raises TransferError on timeout or a bad reply."""

    @abc.abstractmethod
    def reserve(self, address: str, req: ReserveRequest, timeout_s: float) -> ReserveReply: ...

    @abc.abstractmethod
    def send_kv(
        self,
        address: str,
        request_id: str,
        block_ids: Sequence[int],
        packed: torch.Tensor,
        timeout_s: float,
    ) -> TransferAck:
        """Ship `packed` into the receiver's `block_ids`; returns the receiver's ack.

        Once this returns (even with ok=False) the receiver is done with `packed`'s
        bytes; after a TransferError it may not be, so a reused staging buffer must be
        given time or replaced.
        """

    def send_blocks(
        self,
        address: str,
        request_id: str,
        kv_caches: Sequence[torch.Tensor],
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        timeout_s: float,
        staging: torch.Tensor | None = None,
    ) -> TransferAck:
        """Move `src_block_ids` of `kv_caches` into the receiver's `dst_block_ids`.

        The default packs them into one tensor and calls send_kv; a backend that can
        write the receiver's cache directly (cuda_ipc) overrides this.
        """
        packed = pack_blocks(kv_caches, src_block_ids, out=staging)
        return self.send_kv(address, request_id, dst_block_ids, packed, timeout_s)

    def send_blocks_many(
        self,
        address: str,
        moves: Sequence[BlockMove],
        kv_caches: Sequence[torch.Tensor],
        timeout_s: float,
    ) -> list[TransferAck | TransferError]:
        """Several requests' blocks to one receiver (what one prefill step finished):
        one result per move, an ack or the TransferError that failed it. The default
        sends them one by one; cuda_ipc copies them all in one launch."""
        deadline = time.monotonic() + timeout_s
        results: list[TransferAck | TransferError] = []
        for move in moves:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                results.append(
                    self.send_blocks(
                        address,
                        move.request_id,
                        kv_caches,
                        move.src_block_ids,
                        move.dst_block_ids,
                        remaining,
                    )
                )
            except TransferError as exc:
                results.append(exc)
        return results

    @abc.abstractmethod
    def handoff(self, address: str, msg: Handoff, timeout_s: float) -> TransferAck: ...

    @abc.abstractmethod
    def release(self, address: str, request_id: str) -> None:
        """Give back a reservation; fire and forget, never raises for transport errors."""

    @abc.abstractmethod
    def close(self) -> None: ...


def ship(
    sender: KVSender,
    address: str,
    request_id: str,
    kv_caches: Sequence[torch.Tensor],
    src_block_ids: Sequence[int],
    dst_block_ids: Sequence[int],
    timeout_s: float,
    staging: torch.Tensor | None = None,
) -> Transfer:
    """Send `src_block_ids` into the reserved `dst_block_ids` and wait for the ack.

    Returns the Transfer as DONE or FAILED (with the reason); transport failures and
    refusals never raise, so the caller has one place to release the reservation.
    Bad arguments (mismatched block lists) are caller bugs and do raise ValueError.
    """
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(
            f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} destination blocks"
        )
    transfer = Transfer(request_id=request_id, peer=address)
    try:
        ack = sender.send_blocks(
            address, request_id, kv_caches, src_block_ids, dst_block_ids, timeout_s, staging
        )
    except TransferError as exc:
        transfer.fail(str(exc) or type(exc).__name__)
        return transfer
    if ack.ok:
        transfer.advance(TransferState.DONE)
    else:
        transfer.fail(ack.reason or "receiver refused the KV transfer")
    return transfer


def ship_many(
    sender: KVSender,
    address: str,
    moves: Sequence[BlockMove],
    kv_caches: Sequence[torch.Tensor],
    timeout_s: float,
) -> list[Transfer]:
    """`ship` for several requests to one receiver: one Transfer per move, DONE or FAILED.
    Mismatched block lists are caller bugs and raise ValueError."""
    for move in moves:
        if len(move.src_block_ids) != len(move.dst_block_ids):
            raise ValueError(
                f"{move.request_id}: {len(move.src_block_ids)} source blocks for "
                f"{len(move.dst_block_ids)} destination blocks"
            )
    transfers = [Transfer(request_id=m.request_id, peer=address) for m in moves]
    try:
        results = sender.send_blocks_many(address, moves, kv_caches, timeout_s)
    except TransferError as exc:
        results = [exc] * len(moves)
    for transfer, result in zip(transfers, results, strict=True):
        if isinstance(result, TransferError):
            transfer.fail(str(result) or type(result).__name__)
        elif result.ok:
            transfer.advance(TransferState.DONE)
        else:
            transfer.fail(result.reason or "receiver refused the KV transfer")
    return transfers
