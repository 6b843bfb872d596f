"""Frame validation and reply matching shared by every transport backend.

Backends differ in how bytes move; what a frame must look like, which replies a sender
accepts and which it drops are decided here once, so the fake and zmq backends cannot
drift apart.
"""

from __future__ import annotations

import abc
import logging
import math
import queue
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Union, cast

import torch

from tandem.core.kv_layout import KV_PLANES
from tandem.core.protocol import (
    MAX_CONTROL_FRAME_BYTES,
    ControlMessage,
    ExportReply,
    ExportRequest,
    Handoff,
    KVGroupInvite,
    KVGroupReply,
    KVTransfer,
    LeasesRenewed,
    Release,
    RenewLeases,
    ReserveReply,
    ReserveRequest,
    TransferAck,
    decode,
    encode,
)
from tandem.kvtransfer.base import Inbound, KVSender, TransferError
from tandem.kvtransfer.pack import (
    BufferLike,
    dtype_from_name,
    dtype_name,
    tensor_from_frame,
    tensor_to_frame,
)

log = logging.getLogger(__name__)

# A large-context request on a large model can carry gigabytes of KV; the cap only stops
# a peer from making the receiver allocate without bound.
MAX_KV_PAYLOAD_BYTES = 16 << 30

# What every receiver accepts; a backend with more to answer (cuda_ipc: ExportRequest)
# passes its own tuple to parse_inbound.
RECEIVABLE: tuple[type, ...] = (ReserveRequest, KVTransfer, Handoff, Release, RenewLeases)
_REPLIES = (ReserveReply, TransferAck, KVGroupReply, ExportReply, LeasesRenewed)
_PACKED_RANK = 6  # KVLayout.cache_shape(n): [layers, planes, n, block_size, heads, dim]

Reply = Union[ReserveReply, TransferAck, KVGroupReply, ExportReply, LeasesRenewed]
ReplyKey = tuple[type, str]


class RejectedFrame(ValueError):
    """An inbound message the receiver drops; `refusal` is the reply owed, if any."""

    def __init__(self, reason: str, refusal: ControlMessage | None = None):
        super().__init__(reason)
        self.refusal = refusal


def kv_header(request_id: str, block_ids: Sequence[int], packed: torch.Tensor) -> KVTransfer:
    if packed.dim() != _PACKED_RANK or packed.shape[2] != len(block_ids):
        raise ValueError(
            f"packed KV {tuple(packed.shape)} does not hold {len(block_ids)} blocks "
            "as KVLayout.cache_shape(n)"
        )
    return KVTransfer(
        request_id=request_id,
        block_ids=list(block_ids),
        dtype=dtype_name(packed.dtype),
        shape=list(packed.shape),
    )


def parse_inbound(
    peer: bytes,
    frames: Sequence[BufferLike],
    max_header_bytes: int = MAX_CONTROL_FRAME_BYTES,
    max_payload_bytes: int = MAX_KV_PAYLOAD_BYTES,
    accepts: tuple[type, ...] = RECEIVABLE,
) -> Inbound:
    """Turn `[header, (payload)]` buffers from `peer` into an Inbound; RejectedFrame if bad.

    Messages outside `accepts` are rejected, with a refusal when the sender awaits one.
    """
    msg = parse_header(frames, max_header_bytes)
    return inbound_from(peer, msg, frames, max_payload_bytes, accepts)


def parse_header(
    frames: Sequence[BufferLike], max_header_bytes: int = MAX_CONTROL_FRAME_BYTES
) -> ControlMessage:
    """The control message in `frames[0]`; RejectedFrame if there is none or it is malformed.

    Split from inbound_from so a backend can take some messages itself (nccl: group
    invites, KV headers whose bytes come another way) and pass the rest on.
    """
    if not frames:
        raise RejectedFrame("empty message")
    header = memoryview(frames[0]).cast("B")
    try:
        return decode(header, ControlMessage, max_bytes=max_header_bytes)
    except ValueError as exc:
        raise RejectedFrame(str(exc)) from None


def inbound_from(
    peer: bytes,
    msg: ControlMessage,
    frames: Sequence[BufferLike],
    max_payload_bytes: int = MAX_KV_PAYLOAD_BYTES,
    accepts: tuple[type, ...] = RECEIVABLE,
) -> Inbound:
    """The Inbound for `msg` (parsed from `frames[0]`) with its payload frame, if any."""
    if not isinstance(msg, accepts):
        name = type(msg).__name__
        raise RejectedFrame(
            f"a receiver does not accept {name}", refusal(msg, f"receiver does not accept {name}")
        )
    extra = len(frames) - 1
    if not isinstance(msg, KVTransfer) or msg.in_place:
        if extra:
            raise RejectedFrame(
                f"{type(msg).__name__} carries {extra} unexpected frame(s)", refusal(msg)
            )
        return Inbound(peer=peer, msg=msg)
    if extra != 1:
        raise RejectedFrame(
            f"KVTransfer needs exactly one payload frame, got {extra}", refusal(msg)
        )
    payload = memoryview(frames[1]).cast("B")
    try:
        tensor = _payload_tensor(msg, payload, max_payload_bytes)
    except ValueError as exc:
        raise RejectedFrame(str(exc), refusal(msg)) from None
    return Inbound(peer=peer, msg=msg, payload=tensor)


def kv_payload_nbytes(header: KVTransfer, max_bytes: int = MAX_KV_PAYLOAD_BYTES) -> int:
    """How many bytes the payload of `header` holds; ValueError if its shape or dtype is
    bad or the payload would exceed `max_bytes`. Checked before any buffer is allocated."""
    shape = header.shape
    n = len(header.block_ids)
    if len(shape) != _PACKED_RANK or shape[1] not in KV_PLANES or shape[2] != n:
        raise ValueError(f"KV shape {shape} is not [layers, planes, {n}, block_size, heads, dim]")
    if any(d < 0 for d in shape):
        raise ValueError(f"invalid tensor shape {shape}")
    nbytes = math.prod(shape) * dtype_from_name(header.dtype).itemsize
    if nbytes > max_bytes:
        raise ValueError(f"KV payload of {nbytes} bytes exceeds the {max_bytes}-byte cap")
    return nbytes


def _payload_tensor(header: KVTransfer, payload: memoryview, max_bytes: int) -> torch.Tensor:
    if payload.nbytes > max_bytes:
        raise ValueError(f"KV payload of {payload.nbytes} bytes exceeds the {max_bytes}-byte cap")
    kv_payload_nbytes(header, max_bytes)
    return tensor_from_frame(payload, header.dtype, header.shape)


def refusal(msg: ControlMessage, reason: str = "") -> ControlMessage | None:
    """The negative reply that lets a sender fail fast instead of waiting out its timeout."""
    reason = reason or f"receiver rejected malformed {type(msg).__name__}"
    if isinstance(msg, ReserveRequest):
        return ReserveReply(request_id=msg.request_id, ok=False, reason=reason)
    if isinstance(msg, KVTransfer):
        return TransferAck(request_id=msg.request_id, ok=False, reason=reason)
    if isinstance(msg, Handoff):
        return TransferAck(request_id=msg.task.request_id, ok=False, reason=reason)
    if isinstance(msg, KVGroupInvite):
        return KVGroupReply(group_id=msg.group_id, ok=False, reason=reason)
    if isinstance(msg, RenewLeases):
        return LeasesRenewed(renewal_id=msg.renewal_id, ok=False, reason=reason)
    if isinstance(msg, ExportRequest):
        return ExportReply(
            request_id=msg.request_id,
            ok=False,
            reason="this receiver exports no KV cache (not a cuda_ipc receiver)",
        )
    return None


def parse_reply(data: BufferLike, max_bytes: int = MAX_CONTROL_FRAME_BYTES) -> Reply:
    """Decode a receiver's reply; ValueError for anything but a reply type."""
    msg = decode(memoryview(data).cast("B"), ControlMessage, max_bytes=max_bytes)
    if not isinstance(msg, _REPLIES):
        raise ValueError(f"a sender does not accept {type(msg).__name__}")
    return msg


def reply_key(msg: Reply) -> ReplyKey:
    if isinstance(msg, KVGroupReply):
        return (KVGroupReply, msg.group_id)
    if isinstance(msg, LeasesRenewed):
        return (LeasesRenewed, msg.renewal_id)
    return (type(msg), msg.request_id)


class AbandonedReplies:
    """Replies owed to calls that timed out, so they are dropped when they turn up late.

    Matching on (type, request_id) alone is ambiguous when a call is retried for the
    same request: the first attempt's late reply would answer the retry. Counting
    abandoned calls per key drops exactly that many late replies; if one never comes,
    a later call's genuine reply is dropped instead and that call times out, which is
    a safe failure rather than a wrong answer.
    """

    def __init__(self, max_keys: int = 4096):
        self._owed: Counter[ReplyKey] = Counter()
        self._max_keys = max_keys

    def abandon(self, key: ReplyKey) -> None:
        self._owed[key] += 1
        if len(self._owed) > self._max_keys:
            # Oldest first (insertion order): those replies are the least likely to come.
            del self._owed[next(iter(self._owed))]

    def is_stale(self, msg: Reply) -> bool:
        """True (and forget one debt) if `msg` answers an abandoned call."""
        key = reply_key(msg)
        if self._owed.get(key, 0) <= 0:
            return False
        self._owed[key] -= 1
        if not self._owed[key]:
            del self._owed[key]
        return True


def drain(inbox: queue.Queue[Inbound], timeout_s: float) -> list[Inbound]:
    """Everything in `inbox`, waiting at most `timeout_s` for the first item."""
    try:
        first = inbox.get(timeout=timeout_s) if timeout_s > 0 else inbox.get_nowait()
    except queue.Empty:
        return []
    items = [first]
    while True:
        try:
            items.append(inbox.get_nowait())
        except queue.Empty:
            return items


def await_reply(
    receive: Callable[[float], Sequence[BufferLike] | None],
    abandoned: AbandonedReplies,
    want: ReplyKey,
    address: str,
    timeout_s: float,
) -> Reply:
    """Wait for the reply keyed `want`, dropping late replies to abandoned calls.

    `receive(remaining_s)` returns one reply's frames, or None when nothing came in
    time. On timeout or a malformed reply the call is abandoned and TransferError raised.
    """
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        frames = receive(max(0.0, deadline - time.monotonic()))
        if frames is None:
            abandoned.abandon(want)
            raise TransferError(
                f"no {want[0].__name__} for {want[1]} from {address} within {timeout_s:.3g}s"
            )
        try:
            if len(frames) != 1:
                raise ValueError(f"reply of {len(frames)} frames")
            reply = parse_reply(frames[0])
        except ValueError as exc:
            abandoned.abandon(want)
            raise TransferError(f"malformed reply from {address}: {exc}") from exc
        if abandoned.is_stale(reply):
            log.debug("dropped a late %s from %s", type(reply).__name__, address)
        elif (key := reply_key(reply)) == want:
            return reply
        else:
            log.warning("unexpected %s for %s from %s", key[0].__name__, key[1], address)


class FramedKVSender(KVSender):
    """A KVSender whose backend only moves frames: a request that awaits one reply,
    and a one-way post. Message building and reply typing live here once."""

    @abc.abstractmethod
    def _request(self, address: str, frames: list, want: ReplyKey, timeout_s: float) -> Reply:
        """Send `frames`, return the reply keyed `want` (see await_reply)."""

    @abc.abstractmethod
    def _post(self, address: str, frames: list) -> None:
        """Send `frames` expecting no reply; TransferError if they cannot be queued."""

    def reserve(self, address: str, req: ReserveRequest, timeout_s: float) -> ReserveReply:
        want = (ReserveReply, req.request_id)
        # await_reply returns only the type it was asked for.
        return cast(ReserveReply, self._request(address, [encode(req)], want, timeout_s))

    def send_kv(
        self,
        address: str,
        request_id: str,
        block_ids: Sequence[int],
        packed: torch.Tensor,
        timeout_s: float,
    ) -> TransferAck:
        header = kv_header(request_id, block_ids, packed)
        if packed.device.type != "cpu":
            packed = packed.cpu()  # host-staged; pack into a pinned buffer to skip this copy
        frames = [encode(header), tensor_to_frame(packed)]
        want = (TransferAck, request_id)
        return cast(TransferAck, self._request(address, frames, want, timeout_s))

    def handoff(self, address: str, msg: Handoff, timeout_s: float) -> TransferAck:
        want = (TransferAck, msg.task.request_id)
        return cast(TransferAck, self._request(address, [encode(msg)], want, timeout_s))

    def renew(self, address: str, msg: RenewLeases, timeout_s: float) -> LeasesRenewed:
        want = (LeasesRenewed, msg.renewal_id)
        return cast(LeasesRenewed, self._request(address, [encode(msg)], want, timeout_s))

    def release(self, address: str, request_id: str) -> None:
        try:
            self._post(address, [encode(Release(request_id=request_id))])
        except TransferError as exc:
            # The receiver's lease expires the reservation anyway.
            log.warning("release of %s to %s not sent: %s", request_id, address, exc)
