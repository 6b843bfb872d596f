"""Prometheus metrics of one gateway, in a private registry served at GET /metrics.

Request figures (latencies, finish reasons, errors) are measured here, in the gateway,
for every request of both front ends. Worker figures (running, waiting, KV blocks,
preemptions, reservations, admitted, local prefills) are not scraped from the workers: at each scrape
they are read from the workers' registry entries in Redis, which every worker refreshes
about once a second, so one gateway's /metrics shows the whole pool.
"""

from __future__ import annotations

import bisect
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from tandem.core.pool_status import PoolStatus
from tandem.core.protocol import WorkerInfo

__all__ = ["CONTENT_TYPE_LATEST", "ERROR_CODES", "GatewayMetrics"]

# Error codes shared by the gRPC and HTTP front ends (see gateway.execution.RequestError).
ERROR_CODES = (
    "invalid_argument",
    "unauthenticated",
    "not_found",
    "resource_exhausted",
    "unavailable",
    "deadline",
    "internal",
    "client_stalled",  # cut after --stream-write-timeout (gateway/write_timeout.py)
)

LATENCY_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
)  # fmt: skip
TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075,
    0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip

# Gauge name suffix -> WorkerInfo field, one gauge per figure, labelled by worker.
WORKER_FIGURES = {
    "running": ("running", "sequences in the worker's running batch"),
    "waiting": ("waiting", "requests waiting at the worker"),
    "kv_blocks_used": ("used_blocks", "KV cache blocks in use"),
    "kv_blocks_free": ("free_blocks", "free KV cache blocks"),
    "kv_blocks_total": ("total_blocks", "KV cache blocks in all"),
    "kv_blocks_cached": ("cached_blocks", "KV blocks findable by prefix hash"),
    "kv_blocks_evictable": ("evictable_blocks", "cached KV blocks no request references"),
    "kv_evictions": ("evictions", "cached KV blocks evicted since the worker started"),
    "prefix_queried_tokens": (
        "prefix_queried_tokens",
        "tokens of the requests that looked up a cached prefix, since start",
    ),
    "prefix_hit_tokens": (
        "prefix_hit_tokens",
        "tokens found in the prefix cache since start (hit rate: hit / queried)",
    ),
    "kv_bytes_sent": ("kv_bytes_sent", "prefill: KV bytes shipped to decode since start"),
    "routed_to_peers": (
        "routed_to_peers",
        "prefill, colocated: tasks left for a peer holding a longer cached prefix, since start",
    ),
    "decode_by_prefix": (
        "decode_by_prefix",
        "prefill: reservations placed on the decode worker holding the prompt's prefix",
    ),
    "decode_by_load": (
        "decode_by_load",
        "prefill: reservations placed on a decode worker by load (no usable prefix holder)",
    ),
    "preemptions": ("preemptions", "sequences preempted since the worker started"),
    "reservations": ("reservations", "KV block reservations held for incoming transfers"),
    "admitted": ("admitted", "requests taken since the worker started"),
    "local_prefills": (
        "local_prefills",
        "decode: tasks taken from the prefill stream and prefilled locally",
    ),
}


class TokenTally:
    """Output tokens and inter-token gaps, counted in plain ints on the per-message path
    and handed to Prometheus at scrape time (`flush`): its counters take a lock per
    `inc`, ~5 µs a message for the token count and one ITL observation. A message of k
    tokens adds its per-token gap k times, as k `observe` calls would. Histogram has no
    weighted observe, so the flush adds to its buckets and sum (_buckets, _sum,
    _upper_bounds, as Histogram.observe does)."""

    def __init__(self, tokens: Counter, itl: Histogram) -> None:
        self._tokens_counter = tokens
        self._itl = itl
        self._bounds = list(itl._upper_bounds)  # ascending, the last one +Inf
        self._counts = [0] * len(self._bounds)
        self._tokens = 0
        self._gap_sum = 0.0

    def add(self, tokens: int, gap_s: float | None) -> None:
        """`tokens` streamed; each came `gap_s` after the one before (None: the first)."""
        self._tokens += tokens
        if gap_s is not None:
            # Histogram.observe counts a value in the first bucket whose bound is >= it.
            self._counts[bisect.bisect_left(self._bounds, gap_s)] += tokens
            self._gap_sum += gap_s * tokens

    def flush(self) -> None:
        if self._tokens:
            self._tokens_counter.inc(self._tokens)
            self._tokens = 0
        for i, count in enumerate(self._counts):
            if count:
                self._itl._buckets[i].inc(count)
                self._counts[i] = 0
        if self._gap_sum:
            self._itl._sum.inc(self._gap_sum)
            self._gap_sum = 0.0


class GatewayMetrics:
    def __init__(self, model: str) -> None:
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "tandem_time_to_first_token_seconds",
            "From a request's arrival at the gateway to its first output token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "tandem_time_per_output_token_seconds",
            "Per request: (last token time - first token time) / (output tokens - 1)",
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "tandem_inter_token_latency_seconds",
            "Time between two successive outputs of one request, per token they carry",
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "tandem_e2e_request_latency_seconds",
            "From a request's arrival at the gateway to its last token",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "tandem_requests",
            "Requests (one per choice) that ended, by finish reason (abort: the client left)",
            ["finish_reason", "api"], registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "tandem_request_errors",
            "Requests refused or failed, by error code",
            ["code", "api"], registry=r,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "tandem_prompt_tokens", "Prompt tokens of requests that ended", registry=r
        )
        self.generation_tokens = Counter(
            "tandem_generation_tokens", "Output tokens streamed to clients", registry=r
        )
        self.tokens = TokenTally(self.generation_tokens, self.itl)
        self.active = Gauge(
            "tandem_gateway_active_requests", "Requests in flight at this gateway", registry=r
        )
        self.queue_depth = Gauge(
            "tandem_prefill_queue_depth",
            "Tasks in the model's prefill stream: waiting or being prefilled",
            ["model"], registry=r,
        )  # fmt: skip
        self.queue_pending = Gauge(
            "tandem_prefill_queue_pending",
            "Tasks delivered to a prefill worker and not yet acknowledged",
            ["model"], registry=r,
        )  # fmt: skip
        self.workers = Gauge(
            "tandem_workers", "Live workers in the registry", ["model", "role"], registry=r
        )
        self.worker_figures = {
            suffix: Gauge(
                f"tandem_worker_{suffix}",
                f"{help_text} (from the registry)",
                ["worker_id", "role"],
                registry=r,
            )  # fmt: skip
            for suffix, (_field, help_text) in WORKER_FIGURES.items()
        }
        self.worker_heartbeat_age = Gauge(
            "tandem_worker_heartbeat_age_seconds",
            "Seconds since the worker last refreshed its registry entry",
            ["worker_id", "role"], registry=r,
        )  # fmt: skip
        self.worker_draining = Gauge(
            "tandem_worker_draining",
            "1 while the worker drains (takes no new work)",
            ["worker_id", "role"], registry=r,
        )  # fmt: skip
        self.given_up = Gauge(
            "tandem_given_up_processes",
            "Processes `tandem serve` stopped restarting as crash-looping (pool degraded)",
            ["model", "role"], registry=r,
        )  # fmt: skip
        for code in ERROR_CODES:
            for api in ("grpc", "http"):
                self.errors.labels(code=code, api=api)

    # -- per request -----------------------------------------------------------------
    def error(self, code: str, api: str) -> None:
        self.errors.labels(code=code if code in ERROR_CODES else "internal", api=api).inc()

    def finished(self, finish_reason: str, api: str, prompt_tokens: int) -> None:
        self.requests.labels(finish_reason=finish_reason, api=api).inc()
        self.prompt_tokens.inc(prompt_tokens)

    # -- at scrape time --------------------------------------------------------------
    def set_queue(self, depth: int, pending: int) -> None:
        self.queue_depth.labels(model=self.model).set(depth)
        self.queue_pending.labels(model=self.model).set(pending)

    def set_workers(self, workers: list[WorkerInfo]) -> None:
        """Replace every worker gauge with the registry's current entries."""
        now = time.time()
        for gauge in (*self.worker_figures.values(), self.worker_heartbeat_age,
                      self.worker_draining, self.workers):  # fmt: skip
            gauge.clear()
        for role in ("prefill", "decode", "colocated"):
            live = [w for w in workers if w.role == role and not w.draining]
            self.workers.labels(model=self.model, role=role).set(len(live))
        for w in workers:
            labels = {"worker_id": w.worker_id, "role": w.role}
            for suffix, (field, _help) in WORKER_FIGURES.items():
                self.worker_figures[suffix].labels(**labels).set(getattr(w, field))
            if w.heartbeat:
                self.worker_heartbeat_age.labels(**labels).set(max(0.0, now - w.heartbeat))
            self.worker_draining.labels(**labels).set(1 if w.draining else 0)

    def set_pool_status(self, status: PoolStatus | None) -> None:
        """The supervising launcher's given-up processes (none without a launcher)."""
        self.given_up.clear()
        for role, count in (status.given_up if status else {}).items():
            self.given_up.labels(model=self.model, role=role).set(count)

    def render(self) -> bytes:
        self.tokens.flush()
        return generate_latest(self.registry)
