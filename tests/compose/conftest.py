"""A failed compose check carries every container's logs in its report, so that what the
stack did (a worker's traceback, the gateway's warning naming the failed request) can
be read from the CI output alone."""

from __future__ import annotations

import pytest

from tests.compose.stack import STACK_KEY


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    stack = item.config.stash.get(STACK_KEY, None)
    if report.failed and stack is not None and "stack" in getattr(item, "fixturenames", ()):
        report.sections.append(("the compose stack's logs", stack.saved_logs()))
