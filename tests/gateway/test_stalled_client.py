"""A client that stops reading is cut after the stream write timeout, and its request is
aborted on the workers (their blocks freed), while other streams go on.

The stalled clients keep their connection open and read nothing more: a raw HTTP socket
with a small receive buffer, and a gRPC channel whose flow-control window stays small
(no BDP probing) once its reader stops taking messages. The fake worker streams far more
bytes than the kernels and transports buffer (Linux lets a loopback send buffer grow to
4 MB): the HTTP client asks for CHOICES choices of TOKENS tokens, ~20 MB of SSE, so the
buffers are full when a fifth of it is made, and without the timeout the request would
run to its end instead of being aborted.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import pytest

from tandem.gateway.proto import tandem_pb2 as pb
from tandem.gateway.proto import tandem_pb2_grpc as pb_grpc
from tests.gateway.conftest import Gateway, wait_for
from tests.gateway.fake_worker import FakeWorker, expected_output

WRITE_TIMEOUT_S = 1.0
TOKENS = 8000  # the most the model's context allows
CHOICES = 8  # the gateway's max_choices
ABORT_BOUND_S = 60.0  # generous: a loaded machine
STALLED_HTTP_PROMPT = [9906, 1917, 3180, 28700, 2001, 4415, 11842, 7560]
STALLED_GRPC_PROMPT = [9906, 1917, 3180, 28700, 2001, 4415, 11842, 7561]
HEALTHY_PROMPT = [11, 12, 13, 14]


@pytest.fixture
def fast_worker(fake_worker: FakeWorker) -> FakeWorker:
    fake_worker.token_delay_s = 0.001
    return fake_worker


@pytest.fixture
def cutting_gateway(start_gateway) -> Gateway:
    return start_gateway(stream_write_timeout_s=WRITE_TIMEOUT_S)


def _stalled_http_client(port: int, prompt: list[int]) -> socket.socket:
    """POST a long streamed completion, read the response's start, then read no more."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    body = json.dumps(
        {"prompt": prompt, "max_tokens": TOKENS, "n": CHOICES, "stream": True, "logprobs": 1}
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    assert sock.recv(64).startswith(b"HTTP/1.1 200"), "the stream did not start"
    return sock


def _task_ids(worker: FakeWorker, prompt: list[int], count: int) -> list[str]:
    def found() -> list[str]:
        return [t.request_id for t in worker.tasks if t.prompt_token_ids == prompt]

    assert wait_for(lambda: len(found()) == count, 30)
    return found()


def _cut_while_another_streams(
    gateway: Gateway, worker: FakeWorker, prompt: list[int], count: int
) -> None:
    """The stalled requests (`count` tasks of `prompt`) are dropped by the workers before
    they ran their course (their blocks freed), and a stream started meanwhile by a
    reading client completes."""
    rids = _task_ids(worker, prompt, count)
    healthy: list[list[int]] = []
    other = _healthy_stream(gateway, healthy)
    other.start()
    assert wait_for(lambda: worker.aborted.issuperset(rids), ABORT_BOUND_S), (
        f"not aborted; tokens sent: {[worker.sent.get(r) for r in rids]} of {TOKENS}"
    )
    assert all(worker.sent[r] < TOKENS for r in rids)
    other.join(120)
    assert healthy == [expected_output(HEALTHY_PROMPT, 300)]


def _connection_cut(sock: socket.socket) -> bool:
    """Read what the kernel still holds; the gateway's abort ends it (EOF or reset)."""
    deadline = time.monotonic() + ABORT_BOUND_S
    try:
        while time.monotonic() < deadline:
            if not sock.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def _healthy_stream(gateway: Gateway, result: list[list[int]]) -> threading.Thread:
    request = pb.GenerateRequest(
        prompt_token_ids=HEALTHY_PROMPT, sampling=pb.SamplingParams(max_tokens=300)
    )

    def run() -> None:
        tokens: list[int] = []
        for msg in gateway.stub.Generate(request, timeout=120):
            tokens.extend(msg.token_ids)
        result.append(tokens)

    return threading.Thread(target=run)


def test_an_http_client_that_stops_reading_is_cut_and_its_request_aborted(
    cutting_gateway: Gateway, fast_worker: FakeWorker
) -> None:
    sock = _stalled_http_client(cutting_gateway.app.http_port, STALLED_HTTP_PROMPT)
    try:
        _cut_while_another_streams(cutting_gateway, fast_worker, STALLED_HTTP_PROMPT, CHOICES)
        assert _connection_cut(sock), "the stalled connection was left open"
    finally:
        sock.close()


def test_a_grpc_client_that_stops_reading_is_cut_and_its_request_aborted(
    cutting_gateway: Gateway, fast_worker: FakeWorker
) -> None:
    # No BDP probing: the stream's flow-control window stays at its initial size, so a
    # reader that stops taking messages stops the gateway's writes soon.
    channel = grpc.insecure_channel(cutting_gateway.target, options=[("grpc.http2.bdp_probe", 0)])
    stub = pb_grpc.GenerationStub(channel)
    request = pb.GenerateRequest(
        prompt_token_ids=STALLED_GRPC_PROMPT,
        sampling=pb.SamplingParams(max_tokens=TOKENS, logprobs=1),
    )
    responses = stub.Generate(request, timeout=120)
    try:
        next(responses)  # the stream started; now read nothing more
        _cut_while_another_streams(cutting_gateway, fast_worker, STALLED_GRPC_PROMPT, 1)
        # The client, reading again, finds its stream ended with an explicit status.
        with pytest.raises(grpc.RpcError) as failed:
            for _ in responses:
                pass
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        responses.cancel()
        channel.close()
