"""GET /metrics: request latencies and counts measured by the gateway, pool figures read
from the workers' registry entries at scrape time."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tandem.core import redis_keys
from tandem.core.protocol import PrefillTask, WorkerInfo, encode
from tandem.core.sampling_params import SamplingParams
from tandem.gateway.proto import tandem_pb2 as pb
from tests.gateway.conftest import MODEL, Gateway

DASHBOARD = Path(__file__).resolve().parents[2] / "compose" / "grafana" / "tandem-dashboard.json"


def metrics_text(gateway: Gateway) -> str:
    with urllib.request.urlopen(gateway.http_url + "/metrics", timeout=5) as res:
        assert res.headers["Content-Type"].startswith("text/plain")
        return res.read().decode()


def scrape(gateway: Gateway) -> dict[tuple[str, tuple], float]:
    samples = {}
    for family in text_string_to_metric_families(metrics_text(gateway)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def post(gateway: Gateway, body: dict) -> int:
    req = urllib.request.Request(
        gateway.http_url + "/v1/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            res.read()  # leaving early would be a client disconnect: an abort
            return res.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_request_metrics(gateway: Gateway, fake_worker) -> None:
    fake_worker.token_delay_s = 0.01
    assert post(gateway, {"prompt": "one two three", "max_tokens": 6}) == 200
    assert post(gateway, {"prompt": "one two three", "max_tokens": 4, "stream": True}) == 200
    assert post(gateway, {"prompt": "one two three four", "stop": " three"}) == 200
    assert post(gateway, {"prompt": "hi", "temperature": -3}) == 400
    assert post(gateway, {"model": "nope", "prompt": "hi"}) == 404
    list(gateway.stub.Generate(pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(
        max_tokens=3)), timeout=10))  # fmt: skip
    with pytest.raises(grpc.RpcError):
        list(gateway.stub.Generate(pb.GenerateRequest(), timeout=10))

    m = scrape(gateway)
    assert value(m, "tandem_requests_total", finish_reason="length", api="http") == 2
    assert value(m, "tandem_requests_total", finish_reason="stop", api="http") == 1
    assert value(m, "tandem_requests_total", finish_reason="length", api="grpc") == 1
    assert value(m, "tandem_request_errors_total", code="invalid_argument", api="http") == 1
    assert value(m, "tandem_request_errors_total", code="not_found", api="http") == 1
    assert value(m, "tandem_request_errors_total", code="invalid_argument", api="grpc") == 1
    assert value(m, "tandem_request_errors_total", code="unavailable", api="http") == 0
    for name in ("tandem_time_to_first_token_seconds", "tandem_e2e_request_latency_seconds"):
        assert value(m, name + "_count") == 4
        assert value(m, name + "_sum") > 0
    assert value(m, "tandem_time_per_output_token_seconds_count") == 4
    # 6 + 4 + 3 tokens after the first of each request (the stopped one took at least 2).
    assert value(m, "tandem_inter_token_latency_seconds_count") >= 5 + 3 + 2 + 1
    assert value(m, "tandem_generation_tokens_total") >= 6 + 4 + 3 + 2
    assert value(m, "tandem_gateway_active_requests") == 0


def test_pool_metrics_come_from_the_registry(gateway: Gateway, redis_client: redis.Redis) -> None:
    info = WorkerInfo(worker_id="decode-a", role="decode", model=MODEL, pid=os.getpid(),
                      total_blocks=100, free_blocks=60, used_blocks=40, running=3, waiting=2,
                      reservations=1, preemptions=7, admitted=42, local_prefills=5)  # fmt: skip
    other = WorkerInfo(worker_id="prefill-b", role="prefill", model=MODEL, pid=1, draining=True)
    elsewhere = WorkerInfo(worker_id="decode-z", role="decode", model="another", pid=1)
    keys = []
    for w in (info, other, elsewhere):
        keys.append(redis_keys.worker_key(w.worker_id))
        redis_client.hset(keys[-1], "info", encode(w))
    stream = redis_keys.prefill_stream(MODEL)
    redis_client.delete(stream)  # earlier tests' tasks (the fake worker keeps them)
    task = PrefillTask(request_id="r", prompt_token_ids=[1], sampling=SamplingParams(),
                       reply_stream="x", deadline=0)  # fmt: skip
    for _ in range(3):
        redis_client.xadd(stream, {redis_keys.MESSAGE_FIELD: encode(task)})
    try:
        m = scrape(gateway)
    finally:
        redis_client.delete(*keys, stream)
    d = {"worker_id": "decode-a", "role": "decode"}
    assert value(m, "tandem_worker_running", **d) == 3
    assert value(m, "tandem_worker_waiting", **d) == 2
    assert value(m, "tandem_worker_kv_blocks_used", **d) == 40
    assert value(m, "tandem_worker_kv_blocks_free", **d) == 60
    assert value(m, "tandem_worker_kv_blocks_total", **d) == 100
    assert value(m, "tandem_worker_preemptions", **d) == 7
    assert value(m, "tandem_worker_reservations", **d) == 1
    assert value(m, "tandem_worker_admitted", **d) == 42
    assert value(m, "tandem_worker_local_prefills", **d) == 5
    assert value(m, "tandem_worker_draining", worker_id="prefill-b", role="prefill") == 1
    assert value(m, "tandem_workers", model=MODEL, role="decode") == 1
    assert value(m, "tandem_workers", model=MODEL, role="prefill") == 0  # draining
    assert not any(labels and ("worker_id", "decode-z") in labels for _, labels in m)
    assert value(m, "tandem_prefill_queue_depth", model=MODEL) == 3
    # The worker left: its figures go with it, once the cached registry scan is renewed.
    time.sleep(gateway.config.worker_check_ttl_s + 0.1)
    m = scrape(gateway)
    assert value(m, "tandem_worker_running", **d) == 0
    assert not any(("worker_id", "decode-a") in labels for _, labels in m)


def test_grafana_dashboard_uses_real_metric_names(gateway: Gateway) -> None:
    families = list(text_string_to_metric_families(metrics_text(gateway)))
    exposed = {f.name for f in families} | {s.name for f in families for s in f.samples}
    exposed |= {f.name + "_total" for f in families if f.type == "counter"}
    assert "tandem_worker_kv_blocks_used" in exposed  # declared even with no worker yet
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 10
    used = {w for e in exprs for w in _metric_words(e)}
    assert used and used <= exposed, used - exposed


def _metric_words(expr: str) -> set[str]:
    words = set()
    token = ""
    for ch in expr + " ":
        if ch.isalnum() or ch == "_":
            token += ch
            continue
        if token.startswith("tandem_"):
            words.add(token)
        token = ""
    return words


@pytest.mark.parametrize("gap", [0.0, 0.0004, 0.005, 0.03, 7.0, 1e9])
def test_token_tally_equals_one_observe_per_token(gap: float) -> None:
    """The per-message tally, flushed at scrape time, reads as one Counter inc and one
    ITL observe per token would: same buckets (bound hits included), sum and count."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    from tandem.gateway.metrics import TOKEN_BUCKETS, TokenTally

    registry = CollectorRegistry()
    tokens = {n: Counter(n, n, registry=registry) for n in ("ta", "tb")}
    itl = {n: Histogram(n, n, buckets=TOKEN_BUCKETS, registry=registry) for n in ("a", "b")}
    tally = TokenTally(tokens["tb"], itl["b"])
    tally.add(3, None)  # a first message: tokens, no gap
    tally.add(5, gap)
    tally.flush()
    tally.add(1, gap)
    tally.flush()
    tokens["ta"].inc(3 + 5 + 1)
    for _ in range(5 + 1):
        itl["a"].observe(gap)

    def samples(name: str) -> dict:
        [family] = [f for f in registry.collect() if f.name == name]
        return {(s.name[len(name):], tuple(s.labels.items())): s.value for s in family.samples
                if not s.name.endswith("_created")}  # fmt: skip

    assert samples("a") == samples("b")
    assert samples("ta") == samples("tb")
    assert samples("b")[("_count", ())] == 6
