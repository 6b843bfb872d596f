"""Figures of `tandem bench serve` from what the client saw: per-request TTFT, TPOT,
inter-token latencies and end-to-end latency; their mean and percentiles per run;
throughput and goodput under SLOs; and the printed table.

Definitions (the ones vLLM's `bench serve` uses, so numbers compare):
- TTFT: request sent to the first chunk carrying a token.
- TPOT, per request: (e2e - TTFT) / (output tokens - 1); none for one-token outputs.
- ITL: the gap before each chunk after the first, split evenly over the tokens of that
  chunk (a chunk of k tokens after a gap g counts k gaps of g / k), pooled over requests.
- e2e: request sent to the end of its stream.
A request failed when it raised an error or returned a token count other than asked.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

SLO_KEYS = ("ttft", "tpot", "e2e")


@dataclass
class RequestResult:
    """What the client saw of one request; times are `time.perf_counter()` seconds."""

    prompt_len: int
    expected_output_len: int
    start: float = 0.0
    end: float = 0.0
    # (arrival time, tokens in it) of every chunk that carried tokens. Over HTTP a chunk
    # is one SSE event with text, counted as one token: the event does not say how many.
    chunks: list[tuple[float, int]] = field(default_factory=list)
    output_tokens: int = 0
    error: str = ""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile of sorted values, linearly interpolated (numpy's default)."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize_ms(values_s: Iterable[float]) -> dict[str, float] | None:
    """Mean, p50, p90 and p99 in milliseconds of values in seconds; None when empty."""
    values = sorted(values_s)
    if not values:
        return None
    out = {"mean": sum(values) / len(values) * 1e3}
    out.update({f"p{q}": percentile(values, q) * 1e3 for q in (50, 90, 99)})
    return {k: round(v, 3) for k, v in out.items()}


@dataclass(frozen=True)
class RequestTimes:
    """Derived seconds of one completed request."""

    ttft: float
    tpot: float | None
    e2e: float
    itls: list[float]


def failure(result: RequestResult) -> str | None:
    """Why a request counts as failed, or None when it completed as asked."""
    if result.error:
        return result.error
    if result.output_tokens != result.expected_output_len:
        return f"returned {result.output_tokens} tokens of {result.expected_output_len} asked"
    if not result.chunks:
        return "no token arrived"
    return None


def request_times(result: RequestResult) -> RequestTimes:
    first_at = result.chunks[0][0]
    ttft = first_at - result.start
    e2e = result.end - result.start
    tpot = (e2e - ttft) / (result.output_tokens - 1) if result.output_tokens > 1 else None
    itls: list[float] = []
    previous = first_at
    # The first chunk's extra tokens arrived with the first one: no gap to count.
    for at, n in result.chunks[1:]:
        itls.extend([(at - previous) / n] * n)
        previous = at
    return RequestTimes(ttft, tpot, e2e, itls)


def meets_slos(times: RequestTimes, slos_ms: dict[str, float]) -> bool:
    values = {"ttft": times.ttft, "tpot": times.tpot or 0.0, "e2e": times.e2e}
    return all(values[key] * 1e3 <= limit for key, limit in slos_ms.items())


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(
                f"--goodput takes KEY:MS with KEY in {', '.join(SLO_KEYS)}, not {item!r}"
            )
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number") from None
        if slos[key] <= 0:
            raise ValueError(f"--goodput {item!r}: the limit must be positive")
    return slos


def parse_slo_sets(items: Sequence[str]) -> dict[str, dict[str, float]]:
    """`["tpot15=ttft:2000,tpot:15"]` -> {"tpot15": {"ttft": 2000.0, "tpot": 15.0}}: named
    SLOs read off one sweep, each for DistServe's attainment goodput."""
    sets: dict[str, dict[str, float]] = {}
    for item in items:
        name, sep, body = item.partition("=")
        if not sep or not name or name in sets:
            raise ValueError(f"--slo-sets takes distinct NAME=KEY:MS,KEY:MS, not {item!r}")
        sets[name] = parse_slos(body.split(","))
    return sets


def slo_attainment(results: Sequence[RequestResult], slos_ms: dict[str, float]) -> float:
    """Share of all requests sent that completed within every limit (failures miss)."""
    met = sum(meets_slos(request_times(r), slos_ms) for r in results if failure(r) is None)
    return met / max(len(results), 1)


def attainment_goodput(rows: dict, name: str, attainment: float) -> float:
    """DistServe's goodput: the highest request rate served with at least `attainment`
    of requests within SLO set `name`; 0.0 when no rate qualifies."""
    ok = [
        row["request_throughput"]
        for row in rows.values()
        if row.get("slo_attainment", {}).get(name, 0.0) >= attainment
    ]
    return max(ok, default=0.0)


def summarize_run(
    results: Sequence[RequestResult],
    duration_s: float,
    slos_ms: dict[str, float],
    slo_sets: dict[str, dict[str, float]] | None = None,
) -> dict:
    """One (mode, rate) row of the results: counts, throughput, goodput, latencies."""
    done = [r for r in results if failure(r) is None]
    errors = Counter(why for r in results if (why := failure(r)) is not None)
    times = [request_times(r) for r in done]
    duration_s = max(duration_s, 1e-9)
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_len for r in done)
    good = sum(meets_slos(t, slos_ms) for t in times) if slos_ms else None
    return {
        "num_prompts": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": dict(errors.most_common(5)),
        "duration_s": round(duration_s, 3),
        "request_throughput": round(len(done) / duration_s, 3),
        "output_throughput": round(out_tokens / duration_s, 1),
        "total_token_throughput": round((in_tokens + out_tokens) / duration_s, 1),
        "goodput": None if good is None else round(good / duration_s, 3),
        "goodput_requests": good,
        "slo_attainment": {
            name: round(slo_attainment(results, limits), 4)
            for name, limits in (slo_sets or {}).items()
        },
        "ttft_ms": summarize_ms(t.ttft for t in times),
        "tpot_ms": summarize_ms(t.tpot for t in times if t.tpot is not None),
        "itl_ms": summarize_ms(x for t in times for x in t.itls),
        "e2e_ms": summarize_ms(t.e2e for t in times),
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _stat(row: dict, key: str, stat: str) -> str:
    values = row.get(key)
    return f"{values[stat]:.1f}" if values else "-"


COLUMNS = ("mode", "rate", "ok", "fail", "req/s", "out tok/s", "tot tok/s", "goodput",
           "TTFT mean", "TTFT p50", "TTFT p99", "TPOT mean", "TPOT p99", "ITL p50", "ITL p99",
           "E2E p50", "E2E p99")  # fmt: skip


def format_table(rows: Sequence[tuple[str, str, dict]]) -> str:
    """(mode, rate label, summarize_run row) as aligned text; latencies in ms."""
    lines = [COLUMNS]
    for mode, rate, row in rows:
        goodput = "-" if row["goodput"] is None else f"{row['goodput']:.2f}"
        lines.append((
            mode, rate, str(row["completed"]), str(row["failed"]),
            f"{row['request_throughput']:.2f}", f"{row['output_throughput']:.0f}",
            f"{row['total_token_throughput']:.0f}", goodput,
            _stat(row, "ttft_ms", "mean"), _stat(row, "ttft_ms", "p50"),
            _stat(row, "ttft_ms", "p99"), _stat(row, "tpot_ms", "mean"),
            _stat(row, "tpot_ms", "p99"), _stat(row, "itl_ms", "p50"),
            _stat(row, "itl_ms", "p99"), _stat(row, "e2e_ms", "p50"),
            _stat(row, "e2e_ms", "p99"),
        ))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    )


# The gateway's per-worker gauge that counts the prompts a role prefilled.
PREFILL_COUNTERS = {
    "prefill": "tandem_worker_admitted",
    "colocated": "tandem_worker_admitted",
    "decode": "tandem_worker_local_prefills",
}


# Pool-wide sums of per-worker counters (prefix cache and KV transfer).
POOL_COUNTERS = {
    "prefix_hit_tokens": "tandem_worker_prefix_hit_tokens",
    "prefix_queried_tokens": "tandem_worker_prefix_queried_tokens",
    "kv_bytes_sent": "tandem_worker_kv_bytes_sent",
}


def prompts_prefilled(metrics_text: str) -> dict[str, int]:
    """Prompts each role prefilled since its workers started, summed over workers, and
    the POOL_COUNTERS summed over every worker, from the gateway's /metrics text
    (heartbeat counters: up to a heartbeat old)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = dict.fromkeys([*PREFILL_COUNTERS, *POOL_COUNTERS], 0)
    pool = {metric: key for key, metric in POOL_COUNTERS.items()}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            role = sample.labels.get("role", "")
            if PREFILL_COUNTERS.get(role) == sample.name:
                totals[role] += int(sample.value)
            if sample.name in pool:
                totals[pool[sample.name]] += int(sample.value)
    return totals


def prefix_figures(before: dict[str, int], after: dict[str, int], completed: int) -> dict:
    """A run's prefix cache hit rate (tokens) and KV bytes shipped per completed request,
    from the counters before and after it."""
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in POOL_COUNTERS}
    queried = delta["prefix_queried_tokens"]
    return {
        "prefix_hit_rate": round(delta["prefix_hit_tokens"] / queried, 4) if queried else None,
        "kv_bytes_per_request": round(delta["kv_bytes_sent"] / completed) if completed else None,
    }
