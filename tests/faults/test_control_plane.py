"""The internal plane trusts nothing: a real decode worker refuses control messages whose
fields are out of bounds, and random or malformed frames on its socket never stop it."""

from __future__ import annotations

import math
import time
import uuid

import msgspec
import pytest
import torch
import zmq
import zmq.auth
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.core.protocol import (
    ControlMessage,
    Handoff,
    KVGroupInvite,
    KVGroupReply,
    KVTransfer,
    PrefillTask,
    Release,
    RenewLeases,
    ReserveRequest,
    WorkerInfo,
    decode,
    encode,
)
from tandem.core.registry import publish_worker
from tandem.core.sampling_params import SamplingParams
from tandem.kvtransfer.transport import TransferError, make_sender
from tests.faults.cluster import Cluster, collect, request

FUZZ_IDS = [f"fuzz-{i}" for i in range(4)]


@pytest.fixture(scope="module")
def decode_worker():
    c = Cluster()
    try:
        c.start_worker("decode-0", "decode")
        yield c, c.worker("decode-0")
    finally:
        c.close()


@pytest.fixture
def sender():
    s = make_sender("zmq", "probe")
    yield s
    s.close()


def _reserve(info, rid: str, num_tokens: int = 3, lease_s: float = 10.0) -> ReserveRequest:
    return ReserveRequest(
        request_id=rid, num_tokens=num_tokens, layout=info.layout, lease_s=lease_s
    )


def _task(rid: str, prompt: list[int]) -> PrefillTask:
    return PrefillTask(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_tokens=4, temperature=0.0),
        reply_stream="tandem:reply:probe",
        deadline=time.time() + 60,
    )


def _fill(sender, info, rid: str, block_ids: list[int]) -> None:
    lay = info.layout
    packed = torch.zeros(
        lay.num_layers, 2, len(block_ids), lay.block_size, lay.num_kv_heads, lay.head_dim,
        dtype=getattr(torch, lay.dtype),
    )  # fmt: skip
    assert sender.send_kv(info.control_address, rid, block_ids, packed, 10.0).ok


def _assert_serving(cluster: Cluster, info, sender) -> None:
    """The control loop answers a fresh reservation, and nothing stays reserved."""
    reply = sender.reserve(info.control_address, _reserve(info, "alive"), 10.0)
    assert reply.ok, reply.reason
    sender.release(info.control_address, "alive")
    assert cluster.procs["decode-0"].poll() is None, cluster.tail()
    cluster.assert_no_blocks_in_use()


@pytest.mark.parametrize("lease_s", [math.nan, math.inf, -1.0, 0.0, 1e9])
def test_a_reservation_with_a_bad_lease_is_refused(decode_worker, sender, lease_s):
    cluster, info = decode_worker
    reply = sender.reserve(info.control_address, _reserve(info, "lease", lease_s=lease_s), 10.0)
    assert not reply.ok
    assert "lease_s" in reply.reason
    _assert_serving(cluster, info, sender)


@pytest.mark.parametrize("num_tokens", [0, -5, 10**12])
def test_a_reservation_with_a_bad_token_count_is_refused(decode_worker, sender, num_tokens):
    cluster, info = decode_worker
    req = _reserve(info, "tokens", num_tokens=num_tokens)
    reply = sender.reserve(info.control_address, req, 10.0)
    assert not reply.ok
    assert "num_tokens" in reply.reason
    _assert_serving(cluster, info, sender)


def _renewal(rids: list[str], lease_s: float = 30.0) -> RenewLeases:
    return RenewLeases(renewal_id=uuid.uuid4().hex, request_ids=rids, lease_s=lease_s)


def test_a_renewal_keeps_its_senders_reservations_and_reports_the_rest(decode_worker, sender):
    cluster, info = decode_worker
    address = info.control_address
    reply = sender.renew(address, _renewal(["never-reserved"]), 10.0)
    assert not reply.ok and reply.lost == ["never-reserved"]

    assert sender.reserve(address, _reserve(info, "renewed", lease_s=1.0), 10.0).ok
    other = make_sender("zmq", "another-prefill")
    try:
        reply = other.renew(address, _renewal(["renewed"]), 10.0)
        assert reply.lost == ["renewed"], "only the worker that reserved may renew"
    finally:
        other.close()
    reply = sender.renew(address, _renewal(["renewed", "never-reserved"]), 10.0)
    assert not reply.ok and reply.lost == ["never-reserved"]
    reserved_at = cluster.worker("decode-0").heartbeat
    cluster.wait_for(
        lambda: cluster.worker("decode-0").heartbeat > reserved_at + 3.0,
        "decode heartbeats past the 1 s lease",
    )
    assert cluster.worker("decode-0").reservations == 1, "renewed past its first lease"
    sender.release(address, "renewed")
    _assert_serving(cluster, info, sender)


@pytest.mark.parametrize(
    "rids,lease_s,why",
    [
        ([], 10.0, "renewal names"),
        (["x"] * 1025, 10.0, "renewal names"),
        ([""], 10.0, "request_id"),
        (["x" * 129], 10.0, "request_id"),
        (["x"], math.nan, "lease_s"),
        (["x"], math.inf, "lease_s"),
        (["x"], 0.0, "lease_s"),
        (["x"], 1e9, "lease_s"),
    ],
)
def test_a_malformed_renewal_is_refused_and_the_loop_lives(
    decode_worker, sender, rids, lease_s, why
):
    cluster, info = decode_worker
    reply = sender.renew(info.control_address, _renewal(rids, lease_s), 10.0)
    assert not reply.ok and reply.lost == []
    assert why in reply.reason
    _assert_serving(cluster, info, sender)


@pytest.mark.parametrize(
    "prompt,output,computed,why",
    [
        ([], [5], 0, "prompt"),
        ([1, 2, 3], [], 3, "sampled"),
        ([1, 2, 3], [10**9], 3, "output_token_ids"),
        ([1, 2, 3], [5], 2, "num_computed_tokens"),
        ([1] * 20, [5], 20, "reserved"),
    ],
)
def test_a_bad_handoff_is_refused_its_blocks_freed_and_the_loop_lives(
    decode_worker, sender, prompt, output, computed, why
):
    cluster, info = decode_worker
    reply = sender.reserve(info.control_address, _reserve(info, "handoff"), 10.0)
    assert reply.ok, reply.reason
    _fill(sender, info, "handoff", reply.block_ids)
    msg = Handoff(
        task=_task("handoff", prompt), output_token_ids=output, num_computed_tokens=computed
    )
    ack = sender.handoff(info.control_address, msg, 10.0)
    assert not ack.ok
    assert why in ack.reason
    _assert_serving(cluster, info, sender)


def _near_valid_messages(info) -> list[dict]:
    """One valid message of each kind the decode worker answers, as plain data."""
    task = _task(FUZZ_IDS[0], [1, 2, 3])
    kinds = [
        _reserve(info, FUZZ_IDS[0]),
        KVTransfer(
            request_id=FUZZ_IDS[0], block_ids=[0], dtype="float32", shape=[1, 2, 1, 16, 1, 8]
        ),
        Handoff(task=task, output_token_ids=[4], num_computed_tokens=3),
        Release(request_id=FUZZ_IDS[0]),
    ]
    return [{"type": type(m).__name__, **msgspec.to_builtins(m)} for m in kinds]


ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.lists(st.integers(min_value=-(2**40), max_value=2**40), max_size=40),
    st.sampled_from(FUZZ_IDS),
)


@st.composite
def frames(draw, bases: list[dict]) -> list[bytes]:
    """Raw garbage, or a valid message with some fields (nested ones too) replaced."""
    if draw(st.booleans()):
        return draw(st.lists(st.binary(max_size=512), min_size=1, max_size=3))
    msg = dict(draw(st.sampled_from(bases)))
    for key in draw(st.lists(st.sampled_from(sorted(msg)), max_size=3)):
        if isinstance(msg[key], dict) and draw(st.booleans()):
            inner = dict(msg[key])
            inner[draw(st.sampled_from(sorted(inner)))] = draw(ANY_VALUE)
            msg[key] = inner
        elif key != "type" or draw(st.booleans()):
            msg[key] = draw(ANY_VALUE)
    extra = draw(st.lists(st.binary(max_size=256), max_size=2))
    return [msgspec.msgpack.encode(msg), *extra]


def _request_ids(frame: bytes) -> set[str]:
    """Every request id a fuzzed frame names, at the top level or in its task."""
    try:
        msg = msgspec.msgpack.decode(frame)
    except (msgspec.DecodeError, TypeError, ValueError):
        return set()
    if not isinstance(msg, dict):
        return set()
    found = [msg.get("request_id")]
    if isinstance(msg.get("task"), dict):
        found.append(msg["task"].get("request_id"))
    return {rid for rid in found if isinstance(rid, str) and rid}


def test_random_and_malformed_frames_never_stop_the_decode_worker(decode_worker, sender):
    cluster, info = decode_worker
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(info.control_address)
    sent_ids = set(FUZZ_IDS)

    @settings(
        max_examples=300,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(frames(_near_valid_messages(info)))
    def send(message: list[bytes]) -> None:
        sent_ids.update(_request_ids(message[0]))
        sock.send_multipart(message)
        while sock.poll(5):
            sock.recv_multipart()

    try:
        send()
        # Reservations the fuzzing made, if valid by chance: their ids may be any text the
        # fuzzer drew, and a lease left to expire would outlast the check below.
        for rid in sent_ids:
            sock.send(encode(Release(request_id=rid)))
        _assert_serving(cluster, info, sender)
    finally:
        sock.close()
        ctx.term()


def test_only_registered_prefill_workers_may_open_a_kv_group():
    c = Cluster()
    ctx = zmq.Context()
    try:
        c.start_worker("decode-0", "decode", "--kv-transport", "nccl")
        address = c.worker("decode-0").control_address

        def invite(identity: bytes) -> KVGroupReply:
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IDENTITY, identity)
            sock.connect(address)
            try:
                # A store nobody serves: an admitted invite is answered, then not joined.
                sock.send(encode(KVGroupInvite(group_id=identity.hex(), store_host="127.0.0.1",
                                               store_port=9, backend="gloo", timeout_s=1.0)))  # fmt: skip
                assert sock.poll(10_000)
                return decode(sock.recv(), ControlMessage)
            finally:
                sock.close()

        refused = invite(b"stranger")
        assert not refused.ok and "not a registered prefill worker" in refused.reason
        info = WorkerInfo(worker_id="prefill-x", role="prefill", model="smollm2", pid=1)
        publish_worker(c.client, info, ttl_s=30)
        time.sleep(0.6)  # the registry is read again on a miss at most every 0.5 s
        admitted = invite(b"prefill-x/ship")
        assert admitted.ok, admitted.reason
        assert c.procs["decode-0"].poll() is None, c.tail()
    finally:
        ctx.term()
        c.close()


def test_a_service_with_curve_keys_serves_and_refuses_unkeyed_peers(tmp_path, sender):
    keys = tmp_path / "keys"
    keys.mkdir()
    for role in ("decode", "prefill"):
        zmq.auth.create_certificates(str(keys), role)
    c = Cluster()
    try:
        c.start_worker("decode-0", "decode", "--kv-curve-dir", str(keys))
        c.start_worker("prefill-0", "prefill", "--kv-curve-dir", str(keys))
        c.start_gateway()
        assert len(collect(c.stub(), request("Hello over CURVE", 4))) == 4
        info = c.worker("decode-0")
        with pytest.raises(TransferError):  # `sender` holds no key
            sender.reserve(info.control_address, _reserve(info, "unkeyed"), 2.0)
        assert c.procs["decode-0"].poll() is None, c.tail()
    finally:
        c.close()
