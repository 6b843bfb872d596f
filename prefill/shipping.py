"""The prefill worker's SHIPPING state on a thread of its own.

Shipping a step's finished requests (the KV transfer, then the Handoff round trip) took
the prefill loop ~16 ms per 2048-token request on an H200 while the GPU sat idle: one
GPU prefilled 15.2 such requests a second inside the service against 19.9 offline. Now
the main loop hands the step's flights to this thread and starts the next step at once;
the transfer's copy queues on the device behind (or beside) that step, so the GPU stays
busy while the KV moves and the handoffs wait for their acknowledgements.

The thread owns nothing of the engine: the flights' blocks stay allocated until the main
loop collects their outcome and frees them (and acknowledges or fails their tasks), so
no block is reused while its bytes may still be read. It ships through a sender of its
own, so the main loop's reservations never queue behind a transfer's acknowledgement on
a shared per-peer socket. At most `max_batches` steps' flights are in hand at once; the
main loop waits for the oldest beyond that, which bounds the blocks held and keeps the
decode workers' reservation leases from running out in a queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

F = TypeVar("F")
# A step's flights -> each flight with why it failed ("" when handed off, or when there
# was nothing left to do for it).
ShipBatch = Callable[[list[F]], list[tuple[F, str]]]


class Shipper(Generic[F]):
    def __init__(self, ship_batch: ShipBatch, max_batches: int = 2) -> None:
        if max_batches < 1:
            raise ValueError("max_batches must be >= 1")
        self._ship_batch = ship_batch
        self.max_batches = max_batches
        self._jobs: queue.Queue[list[F] | None] = queue.Queue()
        self._done: queue.Queue[list[tuple[F, str]]] = queue.Queue()
        self.batches = 0  # submitted and not yet collected
        self.flights = 0  # their flights, for the worker's reservation count
        self._thread = threading.Thread(target=self._run, name="prefill-shipper", daemon=True)
        self._thread.start()

    @property
    def full(self) -> bool:
        return self.batches >= self.max_batches

    def submit(self, flights: list[F]) -> None:
        self.batches += 1
        self.flights += len(flights)
        self._jobs.put(flights)

    def collect(self, timeout_s: float = 0.0) -> list[tuple[F, str]]:
        """Outcomes of every batch finished so far; with a timeout, first wait up to it
        for one batch to finish (when one is in hand)."""
        results: list[tuple[F, str]] = []
        if timeout_s > 0 and self.batches:
            try:
                results += self._take(self._done.get(timeout=timeout_s))
            except queue.Empty:
                return results
        while True:
            try:
                results += self._take(self._done.get_nowait())
            except queue.Empty:
                return results

    def close(self, timeout_s: float) -> None:
        """Finish what was submitted (each transfer has its own timeout), then stop."""
        self._jobs.put(None)
        self._thread.join(timeout_s)

    def _take(self, batch: list[tuple[F, str]]) -> list[tuple[F, str]]:
        self.batches -= 1
        self.flights -= len(batch)
        return batch

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                results = self._ship_batch(job)
            except Exception as exc:  # a bug, not a transfer failure: fail the batch
                log.exception("shipping failed")
                results = [(flight, f"shipping failed: {exc}") for flight in job]
            self._done.put(results)
