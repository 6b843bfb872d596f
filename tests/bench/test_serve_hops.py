"""The hop trace's reading side: per-rate slices of the file and the medians between hops."""

from __future__ import annotations

import pytest

from tandem.bench.serve_hops import HopLog, hop_figures
from tandem.core.hop_trace import HOPS


def _lines(rid: str, start: float, gaps_ms: list[float], hops=HOPS) -> list[str]:
    t, out = start, []
    for hop, gap in zip(hops, [0.0, *gaps_ms], strict=True):
        t += gap / 1e3
        out.append(f"{t:.6f} {rid} {hop}")
    return out


def test_medians_between_consecutive_hops_and_end_to_end():
    gaps = [1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 2.0, 0.5]
    lines = _lines("a", 100.0, gaps) + _lines("b", 200.0, [2 * g for g in gaps])
    lines += _lines("c", 300.0, [3 * g for g in gaps])
    lines.append("300.5 c routed")  # a later delta of the same hop: the first one counts
    figures = hop_figures(lines)
    assert figures["requests"] == 3 and figures["hops"] == list(HOPS)
    assert figures["queued->read"] == {"p50": pytest.approx(2.0), "mean": pytest.approx(2.0)}
    assert figures["routed->answered"]["p50"] == pytest.approx(1.0)
    assert figures["queued->answered"]["p50"] == pytest.approx(2 * sum(gaps))


def test_a_hop_most_requests_skip_is_left_out_and_incomplete_requests_are_not_counted():
    skip = [h for h in HOPS if h != "read"]  # e.g. handed over, never read from the stream
    lines = _lines("a", 1.0, [1.0] * 7, skip) + _lines("b", 2.0, [1.0] * 7, skip)
    lines += _lines("c", 3.0, [1.0] * 8)
    lines += ["4.0 d queued", "4.001 d admitted"]  # still on its way: not counted
    figures = hop_figures(lines)
    assert figures["hops"] == skip and figures["requests"] == 3
    assert figures["queued->admitted"]["p50"] == pytest.approx(1.0)
    assert hop_figures([])["requests"] == 0


def test_hop_log_hands_out_each_whole_line_once(tmp_path):
    log = HopLog(tmp_path / "hops.log")
    assert log.take() == []  # no service has written yet
    with (tmp_path / "hops.log").open("a") as f:
        f.write("1.0 a queued\n2.0 a rea")
        f.flush()
        assert log.take() == ["1.0 a queued"]
        f.write("d\n")
    assert log.take() == ["2.0 a read"]
    assert log.take() == []
