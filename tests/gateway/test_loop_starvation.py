"""The gateway's event loop does no unbounded work before admission: while chats of
100,000 messages, and prompts of 300,000 (HTTP) or 3,000,000 (gRPC) token ids arrive, a
concurrent stream's tokens keep flowing. A correctness bound on starvation (the largest
gap between two of its messages), not a benchmark: before, one such chat froze every
stream for seconds.

JSON parsing and validation stay on the loop (they hold the GIL: a thread would not
help), so their work is bounded by the body's structure (gateway/json_body.py): the flood
also sends the costliest bodies that pass those bounds (arrays and objects, or values,
just under them; strings that force the lone-surrogate walk; the most token ids a
request may carry), each parsed and validated in full before it is refused. Before the
bounds, a 4 MiB body of small objects held the loop for about two seconds."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc

from tandem.gateway.proto import tandem_pb2 as pb
from tests.gateway.conftest import Gateway
from tests.gateway.fake_worker import FakeWorker

MAX_GAP_S = 0.2
# The flood comes from another process: building and sending it here would hold this
# process's GIL, which the in-process gateway's loop shares, and measure the client.
FLOOD = """
import http.client, json, sys, time
import grpc
from tandem.gateway.proto import tandem_pb2 as pb, tandem_pb2_grpc as pb_grpc

from tandem.gateway.json_body import MAX_JSON_CONTAINERS, MAX_JSON_VALUES
from tandem.gateway.openai_requests import MAX_PROMPT_TOKEN_IDS

http_port, target = int(sys.argv[1]), sys.argv[2]
def body(**fields):
    return json.dumps(fields, separators=(",", ":")).encode()
chat = body(messages=[{"role": "user"}] * 100_000, max_tokens=4)
ids = body(prompt=[1] * 300_000, max_tokens=4)
# 3.6 MB of small objects, within the byte limit: two seconds of parsing and validating
# on the loop before the structure bounds.
objects = body(messages=[{"role": "user", "content": "x"}], tools=[{"a": []}] * 400_000)
# Parsed and validated in full, then refused (max_tokens -1; context; surrogates).
at_the_caps = [
    body(prompt="x", max_tokens=-1, junk=[[]] * (MAX_JSON_CONTAINERS - 8)),
    body(prompt="x", max_tokens=-1, junk=[{}] * (MAX_JSON_CONTAINERS - 8)),
    body(prompt="x", max_tokens=-1, junk=[1] * (MAX_JSON_VALUES - 16)),
    body(prompt="x", max_tokens=4, junk=["\\ud800"] * (MAX_JSON_VALUES - 16)),
    body(prompt=[49151] * MAX_PROMPT_TOKEN_IDS, max_tokens=4),
]
stub = pb_grpc.GenerationStub(grpc.insecure_channel(target))
grpc_ids = pb.GenerateRequest(prompt_token_ids=[1] * 3_000_000)
outcomes, start = [], time.monotonic()  # one clock for every process
for _ in range(2):
    posts = [("/v1/chat/completions", chat), ("/v1/completions", ids),
             ("/v1/chat/completions", objects)]
    for data in at_the_caps:
        posts.append(("/v1/completions", data))
    for path, data in posts:
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
        conn.request("POST", path, data, {"Content-Type": "application/json"})
        outcomes.append(str(conn.getresponse().status))
        conn.close()
    try:
        list(stub.Generate(grpc_ids, timeout=60))
        outcomes.append("OK")
    except grpc.RpcError as err:
        outcomes.append(err.code().name)
print(json.dumps([start, time.monotonic(), outcomes]))
"""


def test_huge_requests_do_not_starve_a_running_stream(
    gateway: Gateway, fake_worker: FakeWorker
) -> None:
    # Long enough to outlast the flood (a token every 5 ms); cancelled after it.
    stream_request = pb.GenerateRequest(
        prompt="a stream that must keep flowing", sampling=pb.SamplingParams(max_tokens=6000)
    )
    arrivals: list[float] = []
    first = threading.Event()
    responses = gateway.stub.Generate(stream_request, timeout=60)

    def stream() -> None:
        try:
            for _ in responses:
                arrivals.append(time.monotonic())
                first.set()
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.CANCELLED

    outcomes: list[str] = []
    windows: list[tuple[float, float]] = []

    def flood() -> None:
        args = [str(gateway.app.http_port), gateway.target]
        done = subprocess.run(
            [sys.executable, "-c", FLOOD, *args], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        start, end, got = json.loads(done.stdout)
        windows.append((start, end))
        outcomes.extend(got)

    streamer = threading.Thread(target=stream)
    streamer.start()
    assert first.wait(30)
    flooders = [threading.Thread(target=flood)]
    for t in flooders:
        t.start()
    for t in flooders:
        t.join(120)
    responses.cancel()
    streamer.join(30)
    # While the huge requests came, the stream's tokens kept coming...
    start, end = min(w[0] for w in windows), max(w[1] for w in windows)
    during = [t for t in arrivals if start <= t <= end + MAX_GAP_S]
    assert len(during) > 10
    gaps = [b - a for a, b in zip(during, during[1:], strict=False)]
    assert max(gaps) < MAX_GAP_S, sorted(gaps)[-5:]
    # ...and every huge request was refused with a clear status: over the structure bounds
    # before parsing (413), the rest once parsed and validated (400).
    expected = ["413"] * 6 + ["400"] * 10 + ["INVALID_ARGUMENT"] * 2
    assert sorted(outcomes) == sorted(expected), outcomes
