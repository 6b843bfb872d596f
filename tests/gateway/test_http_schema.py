"""Schemathesis against the gateway's own OpenAPI schema: no input gets a 5xx.

Cases are generated from the schema FastAPI derives from the request models, valid
(positive) and invalid (negative) alike, and sent to the real HTTP server of an
in-process gateway with the fake worker behind it. The context is kept small so that
generated max_tokens stay cheap.
"""

from __future__ import annotations

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.gateway.fake_worker import FakeWorker

MAX_EXAMPLES = 150


def test_generated_requests_never_get_a_5xx(start_gateway, fake_worker: FakeWorker) -> None:
    gateway = start_gateway(max_model_len=96, request_timeout_s=20)
    fake_worker.token_delay_s = 0
    raw = requests.get(gateway.http_url + "/openapi.json", timeout=5).json()
    paths = set(raw["paths"])
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready",
            "/metrics"} <= paths  # fmt: skip
    schema = schemathesis.openapi.from_dict(raw)
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE), schema.as_strategy(GenerationMode.NEGATIVE)
    )
    seen: dict[int, int] = {}
    session = requests.Session()

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=cases)
    def check(case) -> None:
        response = case.call(base_url=gateway.http_url, session=session, timeout=30)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} {case.body!r} -> "
            f"{response.status_code} {response.text[:500]}"
        )
        if response.status_code >= 400 and case.path.startswith("/v1"):
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}

    check()
    session.close()
    # Both kinds of answer were exercised: accepted requests and refused ones.
    assert seen.get(200, 0) > 10 and sum(n for s, n in seen.items() if s >= 400) > 10, seen
