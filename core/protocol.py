"""Every message that crosses a process boundary, as msgspec Structs.

Redis entries and ZMQ control frames are MessagePack encodings of these types; tensors
travel as raw frames next to a header that gives their dtype and shape. Decoders are
typed and size-capped, so a malformed or oversized frame is rejected, never executed.
No pickle anywhere.
"""

from __future__ import annotations

from typing import Union

import msgspec

from tandem.core.kv_layout import KVLayout
from tandem.core.sampling_params import SamplingParams

MAX_CONTROL_FRAME_BYTES = 16 * 1024 * 1024


# -- Redis: gateway -> prefill pool --------------------------------------------------------
class PrefillTask(msgspec.Struct, kw_only=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    reply_stream: str  # the gateway's reply stream
    deadline: float  # unix time; past it no GPU work is done
    # Tokens already generated (preempted or migrated requests): recomputed, not re-sent.
    output_token_ids: list[int] = []


# -- Redis: workers -> gateway -----------------------------------------------------------
class TokenDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    request_id: str
    token_ids: list[int] = []
    # Position of token_ids[0] in the output; lets the gateway drop duplicates after
    # a retried prefill and detect gaps.
    offset: int = 0
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    error: str | None = None  # set with error_code when the request failed
    error_code: str | None = None  # "unavailable" | "deadline" | "internal" | ...
    logprobs: list[dict[int, float]] | None = None
    worker_id: str | None = None  # the decode worker that owns the request now
    cached_tokens: int = 0  # on the first token: prompt tokens found in the prefix cache


class TokenBatch(msgspec.Struct):
    deltas: list[TokenDelta]


class AbortNotice(msgspec.Struct):
    request_id: str
    reason: str = "client cancelled"


# -- ZMQ control channel: prefill worker <-> decode worker ---------------------------------
class ReserveRequest(msgspec.Struct, tag=True, kw_only=True):
    request_id: str
    num_tokens: int  # tokens whose KV will be shipped
    layout: KVLayout
    lease_s: float  # released by the decode worker if not filled in time
    # Prefix hashes of the request's full blocks (core/prefix_hash.py): the decode
    # worker shares those it holds instead of receiving them again.
    block_hashes: list[bytes] = []


class ReserveReply(msgspec.Struct, tag=True, kw_only=True):
    request_id: str
    ok: bool
    block_ids: list[int] = []
    # The first cached_blocks of block_ids already hold the request's KV: not sent.
    cached_blocks: int = 0
    reason: str = ""
    # cuda_ipc: the receiver's cache export these block ids index (CudaIpcExport.export_id);
    # a sender writes them only through a mapping of that same export.
    export_id: str = ""


class KVTransfer(msgspec.Struct, tag=True, kw_only=True):
    """Header of a KV transfer; followed by one raw frame of packed blocks (over the
    nccl transport the bytes follow over the pair's process group instead)."""

    request_id: str
    block_ids: list[int]  # destination blocks on the receiver, in order
    dtype: str
    shape: list[int]  # KVLayout.cache_shape(n)
    # True when the sender already wrote the blocks (cuda_ipc): no payload follows.
    in_place: bool = False
    # in_place: the export the sender wrote through; the receiver refuses any other.
    export_id: str = ""


class TransferAck(msgspec.Struct, tag=True, kw_only=True):
    request_id: str
    ok: bool
    reason: str = ""


class Handoff(msgspec.Struct, tag=True, kw_only=True):
    """The request itself, sent after its KV: decode adds it to its running batch."""

    task: PrefillTask
    output_token_ids: list[int]  # includes the token the prefill worker sampled
    num_computed_tokens: int


class Release(msgspec.Struct, tag=True, kw_only=True):
    """Give back a reservation the sender will not fill (abort, failure)."""

    request_id: str


class RenewLeases(msgspec.Struct, tag=True, kw_only=True):
    """Keep reservations the sender still means to fill (a long prefill, a slow
    transfer): each of `request_ids` it holds there gets `lease_s` more from now."""

    renewal_id: str  # fresh per call: keys the reply
    request_ids: list[str]
    lease_s: float


class LeasesRenewed(msgspec.Struct, tag=True, kw_only=True):
    renewal_id: str
    ok: bool  # every reservation renewed
    # Not held here for this sender (expired, released, handed off, never made): the
    # sender must not write their blocks.
    lost: list[str] = []
    reason: str = ""


class CudaIpcExport(msgspec.Struct, frozen=True, kw_only=True):
    """A decode worker's whole KV cache as a CUDA IPC handle (what torch's
    `UntypedStorage._share_cuda_()` returns) plus the tensor view over it."""

    # Random per receiver incarnation: a restarted worker's cache gets a new one.
    export_id: str
    device_uuid: str  # the GPU holding the cache, as torch.cuda.get_device_properties().uuid
    handle: bytes  # the caching allocator's IPC handle of the segment holding the storage
    storage_bytes: int
    storage_offset_bytes: int  # the storage's start inside that segment
    ref_counter: bytes  # torch's shared-memory ref counter file for the handle
    ref_counter_offset: int
    dtype: str
    shape: list[int]  # KVLayout.cache_shape(num_blocks)
    stride: list[int]  # in elements
    offset: int  # the view's first element within the storage


class ExportRequest(msgspec.Struct, tag=True, kw_only=True):
    """cuda_ipc: a sender asks for the receiver's cache export on first contact."""

    request_id: str  # a fresh token per call, so a late reply cannot answer a later call


class ExportReply(msgspec.Struct, tag=True, kw_only=True):
    request_id: str
    ok: bool
    export: CudaIpcExport | None = None
    reason: str = ""


class KVGroupInvite(msgspec.Struct, tag=True, kw_only=True):
    """nccl transport: join a two-rank torch.distributed group as rank 1.

    The sender (rank 0) hosts the group's rendezvous store; the receiver answers with
    KVGroupReply at once and joins on its own thread.
    """

    group_id: str  # fresh per group; prefixes the store's keys and keys the reply
    store_host: str  # a numeric address: the sender's interface that faces the receiver
    store_port: int
    backend: str  # "nccl" (CUDA caches) or "gloo" (CPU caches); both sides must agree
    timeout_s: float  # bound on the rendezvous and on each receive
    gpu_uuid: str = ""  # the sender's GPU: NCCL cannot pair a GPU with itself


class KVGroupReply(msgspec.Struct, tag=True, kw_only=True):
    group_id: str
    ok: bool
    reason: str = ""


ControlMessage = Union[
    ReserveRequest,
    ReserveReply,
    KVTransfer,
    TransferAck,
    Handoff,
    Release,
    RenewLeases,
    LeasesRenewed,
    ExportRequest,
    ExportReply,
    KVGroupInvite,
    KVGroupReply,
]


# -- Redis: worker registry ---------------------------------------------------------------
class WorkerInfo(msgspec.Struct, kw_only=True):
    worker_id: str
    role: str  # "prefill" | "decode" | "colocated"
    model: str
    pid: int
    control_address: str = ""  # decode: where prefill workers connect
    layout: KVLayout | None = None
    max_model_len: int = 0  # the context the worker serves (0: not told, older workers)
    # KVCacheManager.figures(): blocks, and the prefix cache's counters since start.
    total_blocks: int = 0
    free_blocks: int = 0  # free or evictable: what an allocation can take
    used_blocks: int = 0  # referenced by a request
    cached_blocks: int = 0  # findable by prefix hash, referenced or evictable
    evictable_blocks: int = 0
    evictions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    # Prefill, colocated: tasks left for a peer holding a longer cached prefix, or for
    # a decode worker that prefills the rest itself.
    routed_to_peers: int = 0
    kv_bytes_sent: int = 0  # prefill: KV bytes shipped to decode workers since start
    # Prefill: reservations placed on the decode worker holding the longest prefix of
    # the prompt, and by load (prefill.decode_choice), since start.
    decode_by_prefix: int = 0
    decode_by_load: int = 0
    running: int = 0
    waiting: int = 0
    reservations: int = 0
    preemptions: int = 0
    admitted: int = 0  # requests taken since start (decode: handoffs; others: tasks)
    # Decode: tasks it took from the prefill stream and prefilled itself since start
    # (core.local_prefill).
    local_prefills: int = 0
    # Decode: its local prefill settings, for routing (0: it prefills no short
    # remainder itself; it takes at most max_local_prefills at once).
    local_prefill_uncached_tokens: int = 0
    max_local_prefills: int = 0
    heartbeat: float = 0.0
    draining: bool = False


# -- encoders / decoders -----------------------------------------------------------------
_encoder = msgspec.msgpack.Encoder()
_decoders: dict[type, msgspec.msgpack.Decoder] = {}


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes, kind: type, max_bytes: int = MAX_CONTROL_FRAME_BYTES):
    """Decode `data` as `kind` (a Struct or a Union of tagged Structs); ValueError if bad."""
    if len(data) > max_bytes:
        raise ValueError(f"frame of {len(data)} bytes exceeds the {max_bytes}-byte cap")
    dec = _decoders.get(kind)
    if dec is None:
        dec = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    try:
        return dec.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"malformed {getattr(kind, '__name__', 'message')}: {exc}") from exc
