"""The cuda_ipc transport's copy engine: concurrent transfers into one mapped cache
share kernel launches.

One BlockCopier per mapped destination cache (one receiver incarnation). Each
send_blocks call hands it a job, a source cache, its already validated block ids and
what to do once the bytes have landed (post the header), and returns only once that
job's bytes are in the receiver's memory and that is done.

Group commit. A job joins the copier's queue; with no leader in office its thread
becomes the leader, otherwise it sleeps. The leader takes every queued job that can
share a launch (the same source cache, destination blocks disjoint from the batch's),
writes all their ids into a persistent pinned buffer, copies them to the device and
launches the kernel once over the concatenation, on its current stream after the other
callers' streams (where their KV was written). Right after the launch it hands office
to the oldest job still queued, so the next batch is launched while this one copies and
the GPU sees launches back to back. Then it waits for its launch's event (created
blocking: it sleeps rather than spin on the CPU that the next leader needs), runs each
job's follow-up and wakes the job's thread, which only returns. Measured on the GPU
machine, a dozen threads each waking to post its own header queued on the GIL for
milliseconds; one thread posting them all takes tens of microseconds.

Two id buffers are used in turn, and a buffer is rewritten only after the event of the
launch that last read it: that bounds the launches in flight to two. A job whose ids
are bad never gets here (the sender checks them first); a launch that raises fails
every job of its batch with a TransferError, and office still passes on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from tandem.kvtransfer.base import TransferError


@dataclass(frozen=True)
class CopyCounts:
    launches: int = 0
    jobs: int = 0
    host_s: float = 0.0  # leaders' time from staging their batch's ids to the launch returning


class CopyStats:
    """Totals over a sender's copiers, for benchmarks: jobs / launches is the coalescing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = CopyCounts()

    def add(self, jobs: int, host_s: float) -> None:
        with self._lock:
            c = self._counts
            self._counts = CopyCounts(c.launches + 1, c.jobs + jobs, c.host_s + host_s)

    def snapshot(self) -> CopyCounts:
        with self._lock:
            return self._counts


class _Job:
    __slots__ = (
        "src",
        "source",
        "src_ids",
        "dst_ids",
        "stream",
        "then",
        "wake",
        "settled",
        "event",
        "error",
    )

    def __init__(
        self,
        src: torch.Tensor,
        src_ids: np.ndarray,
        dst_ids: np.ndarray,
        stream: torch.cuda.Stream | None,
        then: Callable[[], None] | None,
    ) -> None:
        self.src = src
        # What makes two source tensors one cache to the kernel: equal views of one
        # memory may still be distinct objects (each caller may stack the layers anew).
        self.source = (src.data_ptr(), src.shape, src.stride(), src.dtype)
        self.src_ids = src_ids
        self.dst_ids = dst_ids
        self.stream = stream  # where the caller wrote its KV
        self.then = then  # run by the leader once the bytes are in place
        self.wake = threading.Event()  # set to lead, or once settled
        self.settled = False
        self.error: BaseException | None = None

    def settle(self, error: BaseException | None) -> None:
        self.error, self.settled = error, True
        self.wake.set()

    def finish(self, copy_error: BaseException | None) -> None:
        """Settle after the copy: run `then` if the bytes landed, keep the first error."""
        error = copy_error
        if error is None and self.then is not None:
            try:
                self.then()
            except Exception as exc:
                error = exc
        self.settle(error)

    def result(self) -> None:
        if isinstance(self.error, TransferError):
            raise self.error
        if self.error is not None:
            raise TransferError(f"the KV copy failed: {self.error}") from self.error


class _IdBuffer:
    """A flat int32 buffer of [2, n] ids on the host (pinned for a CUDA destination)
    and its device copy, grown to the next power of two when a batch needs more."""

    def __init__(self) -> None:
        self.host = torch.empty(0, dtype=torch.int32)
        self.host_np = self.host.numpy()
        self.device: torch.Tensor | None = None
        self.last_read: torch.cuda.Event | None = None  # the launch that read it last

    def stage(self, batch: Sequence[_Job], n: int, device: torch.device) -> torch.Tensor:
        """The batch's ids as one contiguous [2, n] int32 tensor on `device`; call it
        only once the launch that read this buffer last has finished."""
        cuda = device.type == "cuda"
        if self.host.numel() < 2 * n:
            size = 1 << (2 * n - 1).bit_length()
            self.host = torch.empty(size, dtype=torch.int32, pin_memory=cuda)
            self.host_np = self.host.numpy()
            # On the current (the copier's) stream, which orders its reuse.
            self.device = torch.empty(size, dtype=torch.int32, device=device) if cuda else None
        rows = self.host_np[: 2 * n].reshape(2, n)
        at = 0
        for job in batch:
            end = at + len(job.src_ids)
            rows[0, at:end] = job.src_ids
            rows[1, at:end] = job.dst_ids
            at = end
        if self.device is None:
            return self.host[: 2 * n].view(2, n)
        ids = self.device[: 2 * n]
        ids.copy_(self.host[: 2 * n], non_blocking=True)
        return ids.view(2, n)


class BlockCopier:
    """Copies blocks of source caches into `dst`, coalescing concurrent jobs."""

    def __init__(self, dst: torch.Tensor, stats: CopyStats) -> None:
        self._dst = dst
        self._stats = stats
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._leading = False  # a leader is in office (then the queue is its to take)
        self._buffers = (_IdBuffer(), _IdBuffer())
        self._turn = 0

    def copy(
        self,
        src: torch.Tensor,
        src_ids: np.ndarray,
        dst_ids: np.ndarray,
        then: Callable[[], None] | None = None,
    ) -> None:
        """Copy `src[:, :, src_ids]` into `dst[:, :, dst_ids]` of every layer and return
        once the bytes are in `dst` and `then` (if given) has run after them, on the
        batch leader's thread; TransferError if the launch carrying them failed, or
        whatever `then` raised.

        The ids must already be checked: integers, distinct destinations, in range of
        both caches (the kernel does not bounds-check). `src` is on dst's device.
        """
        stream = torch.cuda.current_stream(src.device) if src.device.type == "cuda" else None
        job = _Job(src, src_ids, dst_ids, stream, then)
        with self._lock:
            self._queue.append(job)
            leads = not self._leading
            self._leading = True
        if not leads:
            job.wake.wait()
        if not job.settled:
            self._lead(job)
        job.result()

    def _lead(self, own: _Job) -> None:
        batch = [own]  # the oldest queued job: always the first one taken
        event: torch.cuda.Event | None = None
        error: BaseException | None = TransferError("the copy's leader was interrupted")
        try:
            try:
                with self._lock:
                    batch = self._take()
                event, error = self._launch(batch), None
            except Exception as exc:
                error = exc
            finally:
                with self._lock:
                    if self._queue and self._queue[0] is own:
                        del self._queue[0]  # _take failed: settled below, it must not lead
                    if self._queue:
                        self._queue[0].wake.set()  # its thread leads the next batch
                    else:
                        self._leading = False
            if event is not None:
                # Not bounded by the transfer timeout: returning while the copy still
                # runs would let the receiver reuse blocks under it, and the copy's
                # duration does not depend on the peer.
                try:
                    event.synchronize()
                except RuntimeError as exc:
                    error = exc
        finally:
            # The leader finishes its whole batch (their `then`s too: one thread doing
            # that beats a dozen waking up to fight over the GIL for a few microseconds
            # of work each), so followers only wake to return.
            for job in batch:
                job.finish(error)

    def _take(self) -> list[_Job]:
        """The queued jobs that can share one launch with the oldest, oldest first; the
        rest stay queued in order. A destination block written twice in one launch
        would race, so a job overlapping the batch waits for a later launch, which the
        copier's stream orders after this one."""
        first = self._queue[0]
        claimed = np.zeros(self._dst.shape[2], dtype=bool)
        batch, rest = [], []
        for job in self._queue:
            if job.source == first.source and not claimed[job.dst_ids].any():
                claimed[job.dst_ids] = True
                batch.append(job)
            else:
                rest.append(job)
        self._queue = rest
        return batch

    def _launch(self, batch: list[_Job]) -> torch.cuda.Event | None:
        """One kernel launch for the batch; the event that follows it (None on CPU,
        where the copy has finished on return)."""
        from tandem.kernels.kv_block_transfer import kv_block_transfer  # triton: only where used

        buffer = self._buffers[self._turn]
        self._turn ^= 1
        if buffer.last_read is not None:
            buffer.last_read.synchronize()
        start = time.perf_counter()
        n = sum(len(job.src_ids) for job in batch)
        src = batch[0].src
        if src.device.type != "cuda":  # tests map a CPU "export" under Triton's interpreter
            kv_block_transfer(src, self._dst, buffer.stage(batch, n, src.device))
            self._stats.add(len(batch), time.perf_counter() - start)
            return None
        # On the leader's current stream, after every other caller's stream (where their
        # KV was written). No stream or device context managers: at ~50 us each on a
        # busy host they cost more than the ids' copy.
        if torch.cuda.current_device() != src.device.index:
            torch.cuda.set_device(src.device)
        stream = torch.cuda.current_stream(src.device)
        for other in {job.stream for job in batch}:
            if other is not None and other != stream:
                stream.wait_stream(other)
        ids = buffer.stage(batch, n, src.device)
        try:
            kv_block_transfer(src, self._dst, ids)
        finally:
            # Also after a failed launch: its id copy may still be queued.
            done = torch.cuda.Event(blocking=True)
            done.record(stream)
            buffer.last_read = done
        self._stats.add(len(batch), time.perf_counter() - start)
        return done
