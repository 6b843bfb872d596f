"""No request can crash a worker: out-of-range sampling fields are refused at the gateway
(HTTP 400 / INVALID_ARGUMENT) and again by each worker's intake, against real processes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import grpc
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tandem.core.protocol import PrefillTask, TokenBatch, TokenDelta, decode
from tandem.core.redis_client import add_task
from tandem.core.redis_keys import MESSAGE_FIELD, prefill_stream
from tandem.core.sampling_params import SamplingParams
from tandem.gateway.proto import tandem_pb2
from tests.faults.cluster import Cluster, collect, request


def post_json(cluster: Cluster, path: str, body: dict, timeout: float = 30.0):
    """(status, parsed JSON body) of a POST to the gateway's HTTP API."""
    req = urllib.request.Request(
        f"http://127.0.0.1:{cluster.http_port}{path}",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def assert_all_alive(cluster: Cluster) -> None:
    dead = {name: p.returncode for name, p in cluster.procs.items() if p.poll() is not None}
    assert dead == {}, cluster.tail()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start_worker("decode-0", "decode")
        c.start_worker("prefill-0", "prefill")
        c.start_gateway()
        yield c
    finally:
        c.close()


@pytest.mark.parametrize(
    "field,value",
    [("top_k", 2**63), ("top_k", 10**9), ("seed", 2**64 - 1 + 1), ("logprobs", 10**6)],
)
def test_out_of_range_sampling_over_http_is_refused_and_workers_live(cluster, field, value):
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 1.0, field: value}
    status, payload = post_json(cluster, "/v1/completions", body)
    assert status == 400, payload
    assert payload["error"]["param"] == field
    time.sleep(0.5)  # a task that got through would be taken by now
    assert_all_alive(cluster)
    assert len(collect(cluster.stub(), request("Hello there", 4))) == 4


def test_top_k_up_to_the_vocabulary_is_served(cluster):
    status, payload = post_json(
        cluster,
        "/v1/completions",
        {"prompt": "Hello", "max_tokens": 3, "temperature": 1.0, "top_k": 49152, "seed": 7},
    )
    assert status == 200, payload
    assert payload["choices"][0]["finish_reason"] in ("length", "stop")
    assert_all_alive(cluster)


def _task(reply_stream: str, request_id: str, **sampling) -> PrefillTask:
    # Built without validation, as a gateway of another version (or anyone with access
    # to Redis) could queue it.
    return PrefillTask(
        request_id=request_id,
        prompt_token_ids=[1, 2, 3],
        sampling=msgspec.convert({"max_tokens": 4, **sampling}, SamplingParams),
        reply_stream=reply_stream,
        deadline=time.time() + 60,
    )


def _first_reply(cluster: Cluster, reply_stream: str, request_id: str) -> TokenDelta:
    deadline = time.monotonic() + 60
    last = b"0-0"
    while time.monotonic() < deadline:
        for _, entries in cluster.client.xread({reply_stream: last}, block=500) or []:
            for entry_id, fields in entries:
                last = entry_id
                for delta in decode(fields[MESSAGE_FIELD], TokenBatch).deltas:
                    if delta.request_id == request_id:
                        return delta
    raise TimeoutError(f"no reply for {request_id}: {cluster.tail()}")


@pytest.mark.parametrize(
    "roles",
    [
        [("decode-0", "decode"), ("prefill-0", "prefill")],
        [("worker-0", "worker")],
        [("decode-0", "decode", "--local-prefill-after-ms", "0")],
    ],
    ids=["prefill", "colocated", "decode-local-prefill"],
)
def test_worker_intake_refuses_an_invalid_task_and_lives(roles):
    c = Cluster()
    try:
        for name, role, *flags in roles:
            c.start_worker(name, role, *flags)
        stream, replies = prefill_stream("smollm2"), "tandem:reply:test"
        add_task(c.client, stream, _task(replies, "bad", temperature=1.0, top_k=2**63))
        refused = _first_reply(c, replies, "bad")
        assert refused.error_code == "invalid_argument"
        assert "top_k" in refused.error
        add_task(c.client, stream, _task(replies, "good", temperature=0.0))
        assert len(_first_reply(c, replies, "good").token_ids) == 1
        assert_all_alive(c)
    finally:
        c.close()


FLOATS = st.one_of(st.floats(), st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0]))
BIG_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)
SMALL_INTS = st.integers(min_value=-1, max_value=8)
HTTP_FIELDS = {
    "max_tokens": SMALL_INTS | BIG_INTS,
    "temperature": FLOATS,
    "top_p": FLOATS,
    "top_k": st.integers(min_value=-1, max_value=60000) | BIG_INTS,
    "min_p": FLOATS,
    "seed": BIG_INTS,
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(min_value=-1, max_value=60000), max_size=3),
    "n": st.integers(min_value=-1, max_value=3),
    "presence_penalty": FLOATS,
    "frequency_penalty": FLOATS,
    "repetition_penalty": FLOATS,
    "logprobs": st.integers(min_value=-1, max_value=25),
    "min_tokens": SMALL_INTS,
    "ignore_eos": st.booleans(),
    "stream": st.booleans(),
}
PROMPTS = st.text(max_size=24) | st.lists(
    st.integers(min_value=-1, max_value=60000), min_size=0, max_size=6
)
FUZZ = settings(
    max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def post_raw(cluster: Cluster, path: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{cluster.http_port}{path}",
        data=body,
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_fuzzed_http_completions_end_with_tokens_or_a_4xx(cluster):
    @FUZZ
    @given(st.fixed_dictionaries({"prompt": PROMPTS}, optional=HTTP_FIELDS))
    def run(body: dict) -> None:
        # NaN and infinities go out as JSON's common extension, which the gateway reads.
        status, raw = post_raw(cluster, "/v1/completions", json.dumps(body).encode())
        assert status == 200 or 400 <= status < 500, (status, raw)
        if status != 200:
            assert json.loads(raw)["error"]["message"]
        elif body.get("stream"):
            events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            assert not any('"error"' in e for e in events[:-1]), events
        else:
            reasons = {c["finish_reason"] for c in json.loads(raw)["choices"]}
            assert reasons <= {"stop", "length"}, raw

    run()
    assert_all_alive(cluster)


U32 = st.integers(min_value=0, max_value=2**32 - 1)
F32 = st.floats(width=32)


def test_fuzzed_grpc_requests_end_with_tokens_or_invalid_argument(cluster):
    stub = cluster.stub()

    @FUZZ
    @given(
        prompt=st.text(max_size=24),
        ids=st.lists(st.integers(min_value=0, max_value=60000) | U32, max_size=6),
        sampling=st.fixed_dictionaries(
            {},
            optional={
                "max_tokens": st.integers(min_value=0, max_value=8) | U32,
                "temperature": F32,
                "top_p": F32,
                "top_k": st.integers(min_value=0, max_value=60000) | U32,
                "seed": st.integers(min_value=0, max_value=2**64 - 1),
                "stop": st.lists(st.text(max_size=4), max_size=3),
                "stop_token_ids": st.lists(U32, max_size=3),
                "ignore_eos": st.booleans(),
                "min_p": F32,
                "repetition_penalty": F32,
                "presence_penalty": F32,
                "frequency_penalty": F32,
                "min_tokens": st.integers(min_value=0, max_value=8) | U32,
                "logprobs": st.integers(min_value=0, max_value=25) | U32,
            },
        ),
    )
    def run(prompt: str, ids: list[int], sampling: dict) -> None:
        req = tandem_pb2.GenerateRequest(
            prompt=prompt,
            prompt_token_ids=ids,
            sampling=tandem_pb2.SamplingParams(**sampling),
        )
        try:
            messages = list(stub.Generate(req, timeout=60))
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
            return
        assert messages[-1].finish_reason in (
            tandem_pb2.FINISH_REASON_STOP,
            tandem_pb2.FINISH_REASON_LENGTH,
        ), messages[-1]

    run()
    assert_all_alive(cluster)
