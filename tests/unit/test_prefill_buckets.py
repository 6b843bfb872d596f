"""Which step sizes the piecewise prefill graphs capture (engine/prefill_graphs.py)."""

from tandem.engine.prefill_graphs import prefill_buckets


def test_buckets_double_from_16_and_end_at_the_limit():
    assert prefill_buckets(512) == [16, 32, 64, 128, 256, 512]
    assert prefill_buckets(200) == [16, 32, 64, 128, 200]
    assert prefill_buckets(16) == [16]
