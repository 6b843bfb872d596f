"""`tandem bench serve --trace-hops`: where each rate's time to first token went.

The launched service writes core.hop_trace's lines to one file; per rate the bench takes
the lines written during that rate's run and reports, between each pair of consecutive
hops, the median and mean over its requests. All processes share one machine's clock.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from itertools import pairwise
from pathlib import Path

from tandem.core.hop_trace import HOPS


class HopLog:
    """The trace file, read on from where the last take() stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def take(self) -> list[str]:
        """Whole lines written since the last call (a line being written stays)."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        self._offset += len(whole)
        return whole.decode().splitlines()


def hop_figures(lines: Iterable[str]) -> dict:
    """Milliseconds between consecutive hops (median and mean) over the requests that
    passed every hop most requests passed (a mode skips some: e.g. none is read from the
    stream by a decode worker's handoff), and from the first hop to the last."""
    first: dict[str, dict[str, float]] = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 3:
            first.setdefault(parts[1], {}).setdefault(parts[2], float(parts[0]))
    hops = [h for h in HOPS if 2 * sum(h in seen for seen in first.values()) > len(first)]
    complete = [seen for seen in first.values() if all(h in seen for h in hops)]
    figures: dict = {"requests": len(complete), "hops": hops}
    if not complete or len(hops) < 2:
        return figures
    for a, b in [*pairwise(hops), (hops[0], hops[-1])]:
        ms = [1e3 * (seen[b] - seen[a]) for seen in complete]
        figures[f"{a}->{b}"] = {
            "p50": round(statistics.median(ms), 3),
            "mean": round(statistics.fmean(ms), 3),
        }
    return figures
