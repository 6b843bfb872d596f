"""Which decode worker a prefill worker reserves blocks on.

A decode worker with prefix caching keeps the blocks of the requests it finished (a
conversation's previous turn: its prompt and answer) and publishes their hashes
(core/prefix_routing.HashPublisher: a set under cached_blocks_key, the first
PUBLISHED_HASH_BYTES of each hash, expiring with its registry entry). A reservation on
the worker that holds the leading blocks of a prompt shares them, so only the blocks it
lacks are shipped (the reply's cached_blocks).

The choice, among the decode workers of the model with a compatible layout, not
draining and not yet tried for this request:

- **by prefix**: the one holding the longest leading run of the prompt's blocks, among
  those that hold at least one, have free blocks for the whole request, and hold at most
  `holder_slack(least)` more sequences (running + waiting) than the least busy of the
  candidates: a cached prefix is worth a few more sequences in a decode batch, not a
  worker with no room or a queue;
- **by load** otherwise, as without caching: most free blocks, then fewest running.

The published sets are read with one pipelined round trip per reservation (SMISMEMBER
on each candidate's set); caching off or Redis unreadable: by load. A stale set costs
bytes shipped, never correctness: the decode worker's reply says what it really holds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from tandem.core.kv_layout import KVLayout
from tandem.core.prefix_routing import PUBLISHED_HASH_BYTES, leading_present
from tandem.core.protocol import WorkerInfo
from tandem.core.redis_keys import cached_blocks_key
from tandem.core.registry import list_workers

log = logging.getLogger(__name__)

REGISTRY_VIEW_S = 0.5  # the registry is read at most this often (a burst must not SCAN per task)
HOLDER_SLACK = 8  # sequences a prefix holder may have beyond the least busy candidate...
HOLDER_SLACK_SHARE = 4  # ...or this fraction of the least busy one's, if more


def holder_slack(least_load: int) -> int:
    """How many more sequences than `least_load` a prefix holder may hold and still be
    chosen for its cache."""
    return max(HOLDER_SLACK, least_load // HOLDER_SLACK_SHARE)


def _load(worker: WorkerInfo) -> int:
    return worker.running + worker.waiting


@dataclass
class DecodeChoice:
    worker: WorkerInfo
    by_prefix: bool  # chosen for the prompt blocks it holds (else by load)


def pick_decode_worker(
    candidates: list[WorkerInfo],
    exclude: set[str],
    held: Mapping[str, int] | None = None,
    blocks: int = 0,
) -> DecodeChoice | None:
    """The decode worker to reserve `blocks` blocks on (see the module's docstring);
    `held`: worker id -> leading blocks of the prompt it holds. Only decode workers: a
    colocated worker takes its own tasks and has no place for shipped KV."""
    usable = [
        w
        for w in candidates
        if w.role == "decode" and w.worker_id not in exclude and not w.draining
    ]
    if not usable:
        return None
    held = held or {}
    least = min(_load(w) for w in usable)
    holders = [
        w
        for w in usable
        if held.get(w.worker_id, 0) > 0
        and w.free_blocks >= blocks
        and _load(w) <= least + holder_slack(least)
    ]
    if holders:
        best = max(holders, key=lambda w: (held[w.worker_id], w.free_blocks, -w.running))
        return DecodeChoice(best, by_prefix=True)
    return DecodeChoice(max(usable, key=lambda w: (w.free_blocks, -w.running)), False)


class DecodeWorkers:
    """A prefill worker's view of the decode pool: the compatible workers (registry,
    re-read at most every REGISTRY_VIEW_S), what each holds of a prompt, and how its
    reservations were placed. Used by the main loop and the shipping thread."""

    def __init__(self, client: redis.Redis, model: str, layout: KVLayout) -> None:
        self.client, self.model, self.layout = client, model, layout
        self._workers: list[WorkerInfo] = []
        self._read_at = float("-inf")
        self._lock = threading.Lock()  # the counters, bumped from both threads
        self.num_by_prefix = 0  # reservations placed on a prefix holder
        self.num_by_load = 0  # ...and by load

    def workers(self) -> list[WorkerInfo]:
        """Compatible decode workers; the last view while the registry is unreadable."""
        now = time.monotonic()
        if now - self._read_at > REGISTRY_VIEW_S:
            try:
                workers = list_workers(self.client, "decode", self.model)
            except redis.RedisError as exc:
                log.warning("registry unreadable, using the last view: %s", exc)
                return self._workers
            self._workers = [
                w
                for w in workers
                if w.layout is not None and w.layout.mismatch(self.layout) is None
            ]
            self._read_at = now
        return self._workers

    def held_prefixes(self, workers: list[WorkerInfo], chain: list[bytes]) -> dict[str, int]:
        """Worker id -> how many leading blocks of `chain` its published set holds, in
        one round trip; empty with no chain or Redis unreachable (choose by load)."""
        decoders = [w for w in workers if w.role == "decode" and not w.draining]
        if not chain or not decoders:
            return {}
        short = [h[:PUBLISHED_HASH_BYTES] for h in chain]
        pipe = self.client.pipeline(transaction=False)
        for w in decoders:
            pipe.smismember(cached_blocks_key(self.model, w.worker_id), short)
        try:
            found = pipe.execute()
        except redis.RedisError as exc:
            log.warning("decode workers' cached blocks unreadable; choosing by load: %s", exc)
            return {}
        return {w.worker_id: leading_present(f) for w, f in zip(decoders, found, strict=True)}

    def placed(self, choice: DecodeChoice) -> None:
        with self._lock:
            if choice.by_prefix:
                self.num_by_prefix += 1
            else:
                self.num_by_load += 1
