"""What the gateway takes from the worker registry: the context limit the workers
registered (not config.json's), and pool figures for /metrics from a cached scan."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request

import redis

from tandem.core import redis_keys
from tandem.core.protocol import WorkerInfo, encode
from tests.gateway.conftest import MODEL, Gateway, wait_for


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as res:
        return json.loads(res.read())


def post_json(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def scans(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_scan", {}).get("calls", 0))


def test_the_context_limit_is_the_smallest_a_live_worker_registered(
    gateway: Gateway, fake_worker, redis_client: redis.Redis
) -> None:
    assert gateway.app.limits.max_model_len == 8192  # smollm2's config.json
    key = redis_keys.worker_key("decode-short")
    info = WorkerInfo(worker_id="decode-short", role="decode", model=MODEL, pid=os.getpid(),
                      max_model_len=64, heartbeat=time.time())  # fmt: skip
    redis_client.hset(key, "info", encode(info))
    completions = gateway.http_url + "/v1/completions"
    too_long = {"prompt": "Hello", "max_tokens": 64}  # one prompt token + 64 > 64
    try:
        # The registry is read again at most every worker_check_ttl_s.
        assert wait_for(lambda: post_json(completions, too_long)[0] == 400)
        status, body = post_json(completions, too_long)
        assert "context of 64 tokens" in body["error"]["message"]
        assert get_json(gateway.http_url + "/v1/models")["data"][0]["max_model_len"] == 64
        assert post_json(completions, {"prompt": "Hello", "max_tokens": 8})[0] == 200
    finally:
        redis_client.delete(key)


def test_metrics_scrapes_reuse_a_recent_registry_scan(
    gateway: Gateway, redis_client: redis.Redis
) -> None:
    url = gateway.http_url + "/metrics"
    urllib.request.urlopen(url, timeout=5).read()
    before = scans(redis_client)
    for _ in range(20):
        urllib.request.urlopen(url, timeout=5).read()
    assert scans(redis_client) - before <= 1  # at most the one the TTL let through
    time.sleep(gateway.config.worker_check_ttl_s + 0.1)
    urllib.request.urlopen(url, timeout=5).read()
    assert scans(redis_client) > before
