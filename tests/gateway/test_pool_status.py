"""A degraded pool, as a supervising `tandem serve` reports it (core.pool_status): /ready
still answers 200 (the rest serves) but says "degraded" and what was given up, and
/metrics has it; without a report nothing changes."""

from __future__ import annotations

import json
import urllib.request

import redis

from tandem.core.pool_status import PoolStatus, encode_status
from tandem.core.redis_keys import pool_status_key
from tests.gateway.conftest import MODEL, Gateway
from tests.gateway.fake_worker import FakeWorker


def get(gateway: Gateway, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(gateway.http_url + path, timeout=10) as res:
        return res.status, res.read()


def test_ready_and_metrics_show_a_degraded_pool(
    gateway: Gateway, fake_worker: FakeWorker, redis_client: redis.Redis
) -> None:
    key = pool_status_key(MODEL)
    try:
        redis_client.set(
            key, encode_status(PoolStatus(expected={"decode": 2, "prefill": 1}, given_up={}))
        )
        status, body = get(gateway, "/ready")
        assert (status, json.loads(body)) == (200, {"status": "ready", "model": MODEL})

        report = PoolStatus(expected={"decode": 2, "prefill": 1}, given_up={"decode": 1})
        redis_client.set(key, encode_status(report))
        status, body = get(gateway, "/ready")
        assert status == 200
        assert json.loads(body) == {"status": "degraded", "model": MODEL, "given_up": {"decode": 1}}
        _, metrics = get(gateway, "/metrics")
        assert f'tandem_given_up_processes{{model="{MODEL}",role="decode"}} 1.0' in metrics.decode()

        redis_client.set(key, b"not msgpack of a PoolStatus")  # unreadable: nothing known
        assert json.loads(get(gateway, "/ready")[1])["status"] == "ready"
        _, metrics = get(gateway, "/metrics")
        assert "tandem_given_up_processes{" not in metrics.decode()
    finally:
        redis_client.delete(key)
