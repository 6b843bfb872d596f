"""The fake worker pool the gateway tests run against; it lives in bench/ (the gateway
bench runs it too)."""

from tandem.bench.fake_pool import FakeWorker, expected_output

__all__ = ["FakeWorker", "expected_output"]
