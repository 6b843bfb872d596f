"""No pickle anywhere, internal sockets on loopback, Redis with a password or TLS."""

from __future__ import annotations

import re
from pathlib import Path

import psutil

from tandem.local_redis import LocalRedis
from tests.faults.cluster import Cluster, collect, request
from tests.faults.tls_proxy import TlsProxy

ROOT = Path(__file__).resolve().parents[2]
PICKLE = re.compile(r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|joblib)\b", re.M)


def test_no_pickle_in_the_source_tree():
    offenders = [
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if ".venv" not in p.parts and PICKLE.search(p.read_text(errors="ignore"))
    ]
    assert offenders == []


def test_password_protected_redis_and_loopback_only_sockets():
    cluster = Cluster(redis=LocalRedis(password="s3cret-pw"))
    try:
        assert ":s3cret-pw@" in cluster.redis.url
        decode = cluster.start_worker("decode-0", "decode")
        prefill = cluster.start_worker("prefill-0", "prefill")
        cluster.start_gateway()
        assert len(collect(cluster.stub(), request("Hello there", 4))) == 4
        info = cluster.worker("decode-0")
        assert info.control_address.startswith("tcp://127.0.0.1:")
        for proc in (decode, prefill):
            listening = [
                c.laddr.ip
                for c in psutil.Process(proc.pid).net_connections("inet")
                if c.status == psutil.CONN_LISTEN
            ]
            assert all(ip == "127.0.0.1" for ip in listening), listening
    finally:
        cluster.close()


def test_redis_over_tls(tmp_path):
    redis = LocalRedis()  # its port is fixed now; Cluster starts it
    proxy = TlsProxy(redis.port, tmp_path)
    proxy.start()
    cluster = Cluster(redis=redis, redis_url=proxy.url)
    try:
        assert cluster.redis_url.startswith("rediss://")
        cluster.start_worker("decode-0", "decode")
        cluster.start_worker("prefill-0", "prefill")
        cluster.start_gateway()
        assert len(collect(cluster.stub(), request("Hello over TLS", 4))) == 4
        # Gateway (sync + async clients) and both workers went through the TLS front.
        assert proxy.connections >= 4
    finally:
        cluster.close()
        proxy.stop()
