"""A prefill worker keeps the decode reservations it still means to fill.

A decode worker frees a reservation at the end of its lease (`--reservation-lease`),
which is how the blocks of a prefill worker that died come back. A live prefill worker
may hold one longer: a long prompt prefilled in chunks behind others, a transfer that
waits, a batch queued for the shipping thread. Freed then, its blocks go to another
request while the prefill worker still ships into them: a refused transfer and a second
reservation and transfer over zmq or nccl, and over cuda_ipc (which writes the blocks
before the decode worker looks) another request's KV overwritten.

So every reservation the worker holds is renewed, every third of the lease, with one
RenewLeases per decode worker, on a thread of its own (a long engine step must not let
a lease run out) through a sender of its own (zmq sockets have one owner each). The
decode worker answers with the reservations it no longer holds; those are marked lost,
and the shipping thread reserves again instead of writing them.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid

from tandem.core.protocol import RenewLeases
from tandem.core.request_checks import MAX_RENEWAL_IDS
from tandem.kvtransfer.base import TransferError
from tandem.kvtransfer.wire import FramedKVSender

log = logging.getLogger(__name__)


class LeaseRenewer:
    def __init__(self, sender: FramedKVSender, lease_s: float, timeout_s: float) -> None:
        self.sender = sender
        self.lease_s = lease_s
        self.every_s = lease_s / 3
        # One call's wait, short enough that a hung decode worker cannot make the
        # others' leases run out before their turn.
        self.timeout_s = min(timeout_s, self.every_s)
        self._lock = threading.Lock()
        # Request id -> (decode address, the hold it was renewed for): a reply about an
        # older hold of the same request id (released, then reserved again) is ignored.
        self._held: dict[str, tuple[str, int]] = {}
        self._lost: set[str] = set()
        self._holds = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-renewal", daemon=True)
        self._thread.start()

    def hold(self, request_id: str, address: str) -> None:
        """Renew from now on the reservation just made for `request_id` at `address`."""
        with self._lock:
            self._held[request_id] = (address, next(self._holds))
            self._lost.discard(request_id)

    def drop(self, request_id: str) -> None:
        """The reservation was handed off, released or given up: renew it no more."""
        with self._lock:
            self._held.pop(request_id, None)
            self._lost.discard(request_id)

    def lost(self, request_id: str) -> bool:
        """Whether the decode worker said it no longer holds this reservation."""
        with self._lock:
            return request_id in self._lost

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.timeout_s + 1.0)
        self.sender.close()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.renew()
            except Exception:  # a bug must not stop the renewals of every later lease
                log.exception("lease renewal failed")

    def renew(self) -> None:
        """One round: every reservation held, one message per decode worker."""
        with self._lock:
            by_address: dict[str, dict[str, int]] = {}
            for rid, (address, hold) in self._held.items():
                by_address.setdefault(address, {})[rid] = hold
        for address, holds in by_address.items():
            rids = list(holds)
            for start in range(0, len(rids), MAX_RENEWAL_IDS):
                batch = rids[start : start + MAX_RENEWAL_IDS]
                msg = RenewLeases(
                    renewal_id=uuid.uuid4().hex, request_ids=batch, lease_s=self.lease_s
                )
                try:
                    reply = self.sender.renew(address, msg, self.timeout_s)
                except TransferError as exc:
                    log.warning("lease renewal at %s failed: %s", address, exc)
                    continue
                if reply.lost:
                    self._mark_lost(
                        address, {rid: holds[rid] for rid in reply.lost if rid in holds}
                    )
                elif not reply.ok:
                    log.warning("lease renewal refused by %s: %s", address, reply.reason)

    def _mark_lost(self, address: str, holds: dict[str, int]) -> None:
        with self._lock:
            for rid, hold in holds.items():
                if self._held.get(rid) == (address, hold):
                    self._lost.add(rid)
                    log.info("reservation for %s at %s was lost", rid, address)
