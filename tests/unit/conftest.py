"""Shared fixtures of the unit tests."""

from __future__ import annotations

import pytest

from tandem.core.redis_client import connect
from tandem.local_redis import LocalRedis


@pytest.fixture(scope="module")
def client():
    """A client of a private redis-server, one per test module."""
    with LocalRedis() as server:
        c = connect(server.url)
        yield c
        c.close()
