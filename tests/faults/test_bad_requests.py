"""No request can crash a worker: out-of-range sampling fields are refused at the gateway
(HTTP 400 / INVALID_ARGUMENT) and again by each worker's intake, against real processes."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import msgspec
import pytest

from tandem.core.protocol import PrefillTask, TokenBatch, TokenDelta, decode
from tandem.core.redis_client import add_task
from tandem.core.redis_keys import MESSAGE_FIELD, prefill_stream
from tandem.core.sampling_params import SamplingParams
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
