"""HTTP errors: OpenAI's error shape, the right status codes, and aborts on disconnect."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
from typing import Any

import pytest
import redis

from tandem.core import redis_keys
from tandem.gateway.json_body import MAX_JSON_CONTAINERS, MAX_JSON_VALUES
from tandem.gateway.openai_requests import (
    MAX_CHAT_MESSAGES,
    MAX_CONTENT_PARTS,
    MAX_PROMPT_TOKEN_IDS,
)
from tests.gateway.conftest import MODEL, Gateway, wait_for
from tests.gateway.fake_worker import FakeWorker


def post(
    gateway: Gateway, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.app.http_port, timeout=10)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})})
    res = conn.getresponse()
    payload = json.loads(res.read())
    conn.close()
    return res.status, payload, dict(res.getheaders())


def get(gateway: Gateway, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", gateway.app.http_port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    res = conn.getresponse()
    raw = res.read()
    conn.close()
    is_json = res.getheader("content-type", "").startswith("application/json")
    return res.status, json.loads(raw) if is_json else raw.decode()


def assert_error(status: int, payload: dict, want_status: int, *fragments: str) -> dict:
    assert status == want_status, payload
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and isinstance(error["type"], str)
    for fragment in fragments:
        assert fragment in error["message"], error
    return error


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
BAD_REQUESTS = {
    "no prompt": ({"model": MODEL}, "prompt", "prompt"),
    "empty prompt": ({"prompt": ""}, "prompt must not be empty", "prompt"),
    "empty id prompt": ({"prompt": []}, "prompt must not be empty", "prompt"),
    "id outside vocabulary": ({"prompt": [1, 49152]}, "outside the vocabulary", "prompt"),
    "context exceeded": (
        {"prompt": "hi", "max_tokens": 8192},
        "exceeds the model context",
        "prompt",
    ),  # fmt: skip
    "temperature": (
        {"prompt": "hi", "temperature": -1},
        "temperature must be in [0, 100]",
        "temperature",
    ),  # fmt: skip
    "top_p": ({"prompt": "hi", "top_p": 0}, "top_p must be in (0, 1]", "top_p"),
    "max_tokens zero": (
        {"prompt": "hi", "max_tokens": 0},
        "max_tokens must be at least 1",
        "max_tokens",
    ),  # fmt: skip
    "min_tokens": ({"prompt": "hi", "max_tokens": 2, "min_tokens": 3}, "min_tokens", "min_tokens"),
    "n too big": ({"prompt": "hi", "n": 9}, "n must be in [1, 8]", "n"),
    "batch too big": ({"prompt": ["a"] * 5, "n": 2}, "exceeds the limit of 8 choices", None),
    "too many logprobs": (
        {"prompt": "hi", "logprobs": 21},
        "logprobs must be in [0, 20]",
        "logprobs",
    ),  # fmt: skip
    "stop not a string": ({"prompt": "hi", "stop": 5}, "stop", "stop"),
    "wrong type": ({"prompt": "hi", "max_tokens": "many"}, "max_tokens", "max_tokens"),
    "huge int": ({"prompt": "hi", "top_k": 2**70}, "top_k", "top_k"),
    "echo": ({"prompt": "hi", "echo": True}, "echo is not supported", "echo"),
    "logit_bias": (
        {"prompt": "hi", "logit_bias": {"5": 1}},
        "logit_bias is not supported",
        "logit_bias",
    ),  # fmt: skip
    "NaN": (b'{"prompt": "hi", "temperature": NaN}', "temperature", "temperature"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_completion_requests_are_400(module_gateway: Gateway, case: str) -> None:
    body, fragment, param = BAD_REQUESTS[case]
    status, payload, _ = post(module_gateway, "/v1/completions", body)
    error = assert_error(status, payload, 400, fragment)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": MODEL}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({**CHAT, "top_logprobs": 3}, "top_logprobs needs logprobs"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools are not supported"),
        ({**CHAT, "max_completion_tokens": 0}, "max_tokens must be at least 1"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "content"),
    ],
)
def test_bad_chat_requests_are_400(module_gateway: Gateway, body: dict, fragment: str) -> None:
    status, payload, _ = post(module_gateway, "/v1/chat/completions", body)
    assert_error(status, payload, 400, fragment)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"prompt": "caf\xe9"}',  # Latin-1, not UTF-8
        b'{"prompt": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes
        b'{"prompt": "\\ud800 lone"}',  # a lone surrogate escaped in JSON
        b'{"messages": [{"role": "user", "content": "\\udfff"}]}',
        b'{"prompt": ',  # not JSON at all
        b"[1, 2, 3]",  # JSON, but not an object
    ],
)
def test_undecodable_bodies_are_400(module_gateway: Gateway, raw: bytes) -> None:
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    status, payload, _ = post(module_gateway, path, raw)
    assert_error(status, payload, 400)


def test_oversized_body_is_413(module_gateway: Gateway) -> None:
    big = {"prompt": "x" * (module_gateway.config.max_receive_message_bytes + 10)}
    status, payload, _ = post(module_gateway, "/v1/completions", big)
    assert_error(status, payload, 413, "larger than")


def test_bodies_past_the_structure_bounds_are_413_and_requests_at_the_caps_are_not(
    module_gateway: Gateway,
) -> None:
    """The bounds on a body's arrays, objects and values (gateway/json_body.py) refuse it
    before parsing, yet sit above the largest request the other caps let through."""
    for junk, bound in (
        ([[]] * (MAX_JSON_CONTAINERS + 1), "arrays and objects"),
        ([0] * (MAX_JSON_VALUES + 1), "JSON values"),
    ):
        status, payload, _ = post(module_gateway, "/v1/completions", {"prompt": "x", "junk": junk})
        assert_error(status, payload, 413, bound)
    parts = [{"type": "text", "text": "hi"}] * (MAX_CONTENT_PARTS // MAX_CHAT_MESSAGES)
    chat = {"messages": [{"role": "user", "content": parts}] * MAX_CHAT_MESSAGES}
    status, payload, _ = post(module_gateway, "/v1/chat/completions", chat)
    assert_error(status, payload, 400, "exceeds the model context")  # parsed, validated
    ids = {"prompt": [49151] * MAX_PROMPT_TOKEN_IDS}
    status, payload, _ = post(module_gateway, "/v1/completions", ids)
    assert_error(status, payload, 400, "exceeds the model context")


def test_unknown_model_and_route_are_404(gateway: Gateway, fake_worker: FakeWorker) -> None:
    status, payload, _ = post(gateway, "/v1/completions", {"model": "gpt-9", "prompt": "hi"})
    error = assert_error(status, payload, 404, "'gpt-9' is not served here")
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    status, payload = get(gateway, "/v1/nothing-here")
    assert_error(status, payload, 404)
    status, payload = get(gateway, "/v1/completions")  # wrong method
    assert_error(status, payload, 405)


def test_api_key_is_required_when_set(start_gateway, fake_worker: FakeWorker) -> None:
    gateway = start_gateway(api_key="s3cret")
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        status, payload, _ = post(gateway, "/v1/completions", body, headers)
        error = assert_error(status, payload, 401, "API key")
        assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    # A bad body without a key is refused for the key, not the body.
    status, payload, _ = post(gateway, "/v1/completions", {"prompt": 5})
    assert status == 401
    status, payload, _ = post(gateway, "/v1/completions", body, {"Authorization": "Bearer s3cret"})
    assert status == 200 and payload["usage"]["completion_tokens"] == 2
    assert get(gateway, "/v1/models")[0] == 401
    assert get(gateway, "/v1/models", {"Authorization": "Bearer s3cret"})[0] == 200
    assert get(gateway, "/health")[0] == 200  # probes need no key


def test_no_workers_is_503_and_not_ready(gateway: Gateway) -> None:
    status, payload, _ = post(gateway, "/v1/completions", {"prompt": "hi"})
    assert_error(status, payload, 503, "no live prefill or decode worker")
    status, payload = get(gateway, "/ready")
    assert status == 503 and payload["status"] == "not ready"
    assert get(gateway, "/health") == (200, {"status": "ok"})


def test_ready_with_workers(gateway: Gateway, fake_worker: FakeWorker) -> None:
    assert get(gateway, "/ready") == (200, {"status": "ready", "model": MODEL})


def test_overload_is_429(start_gateway, fake_worker: FakeWorker) -> None:
    gateway = start_gateway(max_active_requests=2)
    fake_worker.stall = True
    started = time.monotonic()
    status, payload, headers = post(gateway, "/v1/completions", {"prompt": "hi", "n": 3})
    error = assert_error(status, payload, 429, "overloaded")
    assert error["type"] == "rate_limit_error"
    assert {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1"
    assert time.monotonic() - started < 0.5, "overload must be refused at once"


def test_full_prefill_queue_is_429_at_once(
    start_gateway, fake_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    gateway = start_gateway(max_queued_tasks=3)
    stream = redis_keys.prefill_stream(MODEL)
    fake_worker.stall = True
    backlog = [redis_client.xadd(stream, {redis_keys.MESSAGE_FIELD: b"waiting"}) for _ in range(3)]
    try:
        started = time.monotonic()
        status, payload, headers = post(gateway, "/v1/completions", {"prompt": "hi"})
        assert_error(status, payload, 429, "prefill queue full")
        assert {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1"
        assert time.monotonic() - started < 0.5
    finally:
        redis_client.xdel(stream, *backlog)


def test_deadline_is_504_and_aborts(
    start_gateway, fake_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    gateway = start_gateway(request_timeout_s=0.5)
    fake_worker.stall = True
    status, payload, _ = post(gateway, "/v1/completions", {"prompt": "hi"})
    assert_error(status, payload, 504, "did not finish within 0.5s")
    rid = fake_worker.tasks[-1].request_id
    assert wait_for(lambda: redis_client.exists(redis_keys.abort_marker(rid)))


@pytest.mark.parametrize(
    ("error_code", "status"),
    [("unavailable", 503), ("resource_exhausted", 429), ("deadline", 504),
     ("invalid_argument", 400), ("internal", 500), ("something new", 500)],
)  # fmt: skip
@pytest.mark.parametrize("stream", [False, True])
def test_worker_errors_become_status_codes(
    gateway: Gateway, fake_worker: FakeWorker, error_code: str, status: int, stream: bool
) -> None:
    fake_worker.error = (error_code, f"worker says {error_code}")
    got, payload, _ = post(gateway, "/v1/completions", {"prompt": "hi", "stream": stream})
    assert_error(got, payload, status, f"worker says {error_code}")


def test_a_failed_request_is_logged_with_its_id_and_reason(
    start_gateway, fake_worker: FakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = start_gateway(request_timeout_s=0.5)
    with caplog.at_level(logging.WARNING, logger="tandem.gateway.execution"):
        fake_worker.error = ("unavailable", "worker decode-7 was lost")
        assert post(gateway, "/v1/completions", {"prompt": "hi"})[0] == 503
        lost = fake_worker.tasks[-1].request_id
        fake_worker.error, fake_worker.stall = None, True
        assert post(gateway, "/v1/completions", {"prompt": "hi"})[0] == 504
        late = fake_worker.tasks[-1].request_id
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(lost in m and "worker decode-7 was lost" in m for m in warnings), warnings
    assert any(late in m and "did not finish within 0.5s" in m for m in warnings), warnings


def test_error_after_streaming_started_is_an_event(start_gateway, fake_worker: FakeWorker) -> None:
    gateway = start_gateway(request_timeout_s=0.6)
    fake_worker.token_delay_s = 0.1
    conn = http.client.HTTPConnection("127.0.0.1", gateway.app.http_port, timeout=10)
    body = {"prompt": "hello", "max_tokens": 100, "stream": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    res = conn.getresponse()
    assert res.status == 200 and res.getheader("content-type").startswith("text/event-stream")
    events = [e for e in res.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][6:])["error"]
    assert "did not finish within" in error["message"] and error["type"] == "timeout_error"
    assert json.loads(events[0][6:])["choices"][0]["text"]  # tokens came first


def raw_request(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_disconnect_publishes_abort(
    gateway: Gateway, fake_worker: FakeWorker, redis_client: redis.Redis, stream: bool, path: str
) -> None:
    fake_worker.token_delay_s = 0.02
    body = {"max_tokens": 500, "stream": stream, "n": 2}
    body.update({"messages": [{"role": "user", "content": "go"}]} if "chat" in path
                else {"prompt": "count with me"})  # fmt: skip
    before = len(fake_worker.tasks)
    sock = raw_request(gateway.app.http_port, path, body)
    assert wait_for(lambda: len(fake_worker.tasks) == before + 2)
    rids = [t.request_id for t in fake_worker.tasks[before:]]
    if stream:
        assert sock.recv(100).startswith(b"HTTP/1.1 200")
    else:
        assert wait_for(lambda: all(fake_worker.sent.get(r, 0) >= 3 for r in rids))
    sock.close()
    for rid in rids:
        assert wait_for(lambda rid=rid: redis_client.exists(redis_keys.abort_marker(rid)))
        assert wait_for(lambda rid=rid: rid in fake_worker.aborted)
        assert fake_worker.sent.get(rid, 0) < 500
    assert wait_for(lambda: gateway.app.executor.router.active == 0)


def test_request_id_header_and_finished_requests_hold_nothing(
    gateway: Gateway, fake_worker: FakeWorker
) -> None:
    started = time.monotonic()
    status, payload, headers = post(gateway, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    assert status == 200 and time.monotonic() - started < 5
    assert headers["x-request-id"] == payload["id"]
    assert gateway.app.executor.router.active == 0


def test_a_bug_is_a_500_in_the_same_shape(start_gateway, fake_worker: FakeWorker) -> None:
    gateway = start_gateway()

    async def broken(prompt: str) -> list[int]:
        raise RuntimeError("tokenizer exploded")

    gateway.app.executor.encode = broken
    status, payload, _ = post(gateway, "/v1/completions", {"prompt": "hi"})
    error = assert_error(status, payload, 500, "internal error")
    assert error["type"] == "server_error" and "exploded" not in error["message"]
