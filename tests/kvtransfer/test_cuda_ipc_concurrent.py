"""Concurrent cuda_ipc transfers share kernel launches (kvtransfer.cuda_ipc_copy), on CPU:
the CUDA export and mapping are stood in (cuda_ipc_fakes) and the kernel entry point is
wrapped to count launches, hold the first one until the other jobs have queued behind
it (which makes the batches deterministic), or fail one."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from tandem.kernels import kv_block_transfer as kernel
from tandem.kvtransfer.cuda_ipc_backend import CudaIpcKVSender
from tandem.kvtransfer.cuda_ipc_copy import BlockCopier, CopyStats
from tandem.kvtransfer.transport import (
    BlockMove,
    Transfer,
    TransferError,
    TransferState,
    ship,
    ship_many,
)
from tests.kvtransfer.conftest import bits, wait_until
from tests.kvtransfer.cuda_ipc_fakes import Decode, handoff, kv_cache, reserve, untouched

PER = 3  # blocks per transfer


class Launches:
    """Wraps the kernel entry point: records every launch's destination ids per
    destination cache, runs `hold(dst)` before the first launch into each cache until
    it is true, and raises in the launches numbered in `fail` (counted from 0)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = kernel.kv_block_transfer
        self.into: dict[int, list[list[int]]] = {}
        self.hold: Callable[[torch.Tensor], bool] | None = None
        self.fail: set[int] = set()
        self._count = 0
        self._lock = threading.Lock()
        # Triton's interpreter is not thread-safe (a GPU launch is): copiers of two
        # receivers run side by side up to here, then take turns in it.
        self._interpreter = threading.Lock()
        monkeypatch.setattr(kernel, "kv_block_transfer", self)

    def __call__(self, src: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor) -> None:
        with self._lock:
            mine = self.into.setdefault(dst.data_ptr(), [])
            mine.append(block_ids[1].tolist())
            number, self._count = self._count, self._count + 1
        if len(mine) == 1 and self.hold is not None:
            assert wait_until(lambda: self.hold(dst), 10.0), "the other jobs never queued"
        if number in self.fail:
            raise RuntimeError("launch failed (test)")
        with self._interpreter:
            self.real(src, dst, block_ids)

    def sizes(self, dst: torch.Tensor) -> list[int]:
        """Blocks carried by each launch into `dst`, in launch order."""
        return [len(ids) for ids in self.into.get(dst.data_ptr(), [])]


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> Launches:
    return Launches(monkeypatch)


def _queued(sender: CudaIpcKVSender, dst: torch.Tensor) -> int:
    [mapping] = [m for m in list(sender._mappings.values()) if m.cache is dst]
    return len(mapping.copier._queue)


def _all_queued(launches: Launches, sender: CudaIpcKVSender, jobs: int) -> Callable:
    """Hold condition: every one of `jobs` transfers into dst is either in the first
    launch or queued behind it."""
    return lambda dst: _queued(sender, dst) + launches.sizes(dst)[0] // PER == jobs


def _ship_all(sender, address: str, rids: list[str], src, dst_ids) -> list[Transfer]:
    views = list(src.unbind(0))

    def one(i: int) -> Transfer:
        src_ids = list(range(i * PER, (i + 1) * PER))
        return ship(sender, address, rids[i], views, src_ids, dst_ids[i], 10.0)

    with ThreadPoolExecutor(len(rids)) as pool:
        return list(pool.map(one, range(len(rids))))


def _landed(decode: Decode, src: torch.Tensor, i: int, dst_ids: list[int]) -> bool:
    want = src[:, :, i * PER : (i + 1) * PER]
    return torch.equal(bits(decode.cache[:, :, dst_ids]), bits(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_concurrent_transfers_share_launches_and_land_bit_exact(
    fake_ipc, ipc_sender, ipc_address, launches, dtype
):
    jobs = 8
    decode = Decode(ipc_address, dtype, blocks=jobs * PER + 4)
    src = kv_cache(jobs * PER, dtype)
    try:
        rids = [f"r{i}" for i in range(jobs)]
        dst = [reserve(ipc_sender, ipc_address, rid, PER, dtype).block_ids for rid in rids]
        launches.hold = _all_queued(launches, ipc_sender, jobs)
        done = _ship_all(ipc_sender, ipc_address, rids, src, dst)
        assert [t.state for t in done] == [TransferState.DONE] * jobs, [t.reason for t in done]
        # Everything that queued behind the first launch went in one more.
        assert len(launches.sizes(decode.cache)) == 2
        assert sum(launches.sizes(decode.cache)) == jobs * PER
        stats = ipc_sender.copy_stats.snapshot()
        assert (stats.launches, stats.jobs) == (2, jobs)
        assert all(_landed(decode, src, i, ids) for i, ids in enumerate(dst))
        assert untouched(decode.cache, [b for ids in dst for b in ids])
        assert all(handoff(ipc_sender, ipc_address, rid).ok for rid in rids)
        assert decode.stub.filled == set(rids)
    finally:
        decode.close()


def test_two_receivers_at_once_each_get_their_own_launches(
    fake_ipc, ipc_sender, tmp_path: Path, launches
):
    jobs = 8
    decodes = [
        Decode(f"ipc://{tmp_path}/decode-{k}.sock", torch.float32, blocks=jobs * PER)
        for k in range(2)
    ]
    src = kv_cache(jobs * PER, torch.float32)
    try:
        to = [decodes[i % 2] for i in range(jobs)]
        rids = [f"r{i}" for i in range(jobs)]
        dst = [
            reserve(ipc_sender, d.receiver.address, r, PER).block_ids
            for d, r in zip(to, rids, strict=True)
        ]
        launches.hold = _all_queued(launches, ipc_sender, jobs // 2)

        def one(i: int) -> Transfer:
            views = list(src.unbind(0))
            src_ids = list(range(i * PER, (i + 1) * PER))
            return ship(ipc_sender, to[i].receiver.address, rids[i], views, src_ids, dst[i], 10.0)

        with ThreadPoolExecutor(jobs) as pool:
            done = list(pool.map(one, range(jobs)))
        assert [t.state for t in done] == [TransferState.DONE] * jobs, [t.reason for t in done]
        for d in decodes:
            assert len(launches.sizes(d.cache)) == 2
            assert sum(launches.sizes(d.cache)) == jobs // 2 * PER
        assert all(_landed(to[i], src, i, ids) for i, ids in enumerate(dst))
        for k, d in enumerate(decodes):
            assert untouched(d.cache, [b for ids in dst[k::2] for b in ids])
    finally:
        for d in decodes:
            d.close()


def test_a_job_with_bad_ids_fails_alone(fake_ipc, ipc_sender, ipc_address, launches):
    jobs = 6
    blocks = jobs * PER + 3
    # The first reservation is granted a repeated block, the second blocks it never
    # writes: blocks 0 to 2 must stay as they are.
    free = [0, 0, *range(1, blocks)]
    decode = Decode(ipc_address, torch.float32, free=free, blocks=blocks)
    src = kv_cache(jobs * PER, torch.float32)
    views = list(src.unbind(0))
    try:
        bad_dst = reserve(ipc_sender, ipc_address, "bad-dst", 2).block_ids
        reserve(ipc_sender, ipc_address, "bad-src", 2)
        rids = [f"r{i}" for i in range(jobs)]
        dst = [reserve(ipc_sender, ipc_address, rid, PER).block_ids for rid in rids]
        bad_done = threading.Barrier(3)
        every_job = _all_queued(launches, ipc_sender, jobs)
        launches.hold = lambda d: bad_done.n_waiting == 2 and every_job(d)

        def bad(rid: str, src_ids: list[int], dst_ids: list[int]) -> Transfer:
            try:
                return ship(ipc_sender, ipc_address, rid, views, src_ids, dst_ids, 10.0)
            finally:
                bad_done.wait()

        with ThreadPoolExecutor(2) as pool:
            failed_dst = pool.submit(bad, "bad-dst", [0, 1], bad_dst)
            failed_src = pool.submit(bad, "bad-src", [0, jobs * PER + 5], [1, 2])
            done = _ship_all(ipc_sender, ipc_address, rids, src, dst)
            bad_done.wait()
        assert failed_dst.result().state is TransferState.FAILED
        assert "repeat" in failed_dst.result().reason
        with pytest.raises(ValueError, match="out of range"):
            failed_src.result()
        assert [t.state for t in done] == [TransferState.DONE] * jobs, [t.reason for t in done]
        assert sum(launches.sizes(decode.cache)) == jobs * PER  # no bad id was launched
        assert all(_landed(decode, src, i, ids) for i, ids in enumerate(dst))
        assert untouched(decode.cache, [b for ids in dst for b in ids])
    finally:
        decode.close()


def test_a_failed_launch_fails_its_batch_and_later_transfers_work(
    fake_ipc, ipc_sender, ipc_address, launches
):
    jobs = 6
    decode = Decode(ipc_address, torch.float32, blocks=(jobs + 1) * PER)
    src = kv_cache((jobs + 1) * PER, torch.float32)
    try:
        rids = [f"r{i}" for i in range(jobs)]
        dst = [reserve(ipc_sender, ipc_address, rid, PER).block_ids for rid in rids]
        launches.hold = _all_queued(launches, ipc_sender, jobs)
        launches.fail = {1}
        done = _ship_all(ipc_sender, ipc_address, rids, src, dst)
        first = launches.sizes(decode.cache)[0] // PER
        landed = [i for i, t in enumerate(done) if t.state is TransferState.DONE]
        failed = [t for t in done if t.state is TransferState.FAILED]
        assert (len(landed), len(failed)) == (first, jobs - first)
        assert all("launch failed (test)" in t.reason for t in failed)
        assert all(_landed(decode, src, i, dst[i]) for i in landed)
        assert untouched(decode.cache, [b for i in landed for b in dst[i]])

        later = reserve(ipc_sender, ipc_address, "later", PER).block_ids
        t = ship(ipc_sender, ipc_address, "later", list(src.unbind(0)), [0, 1, 2], later, 10.0)
        assert t.state is TransferState.DONE, t.reason
        assert _landed(decode, src, 0, later)
        assert len(launches.sizes(decode.cache)) == 3
    finally:
        decode.close()


def test_jobs_that_cannot_share_a_launch_take_later_ones_in_order(launches):
    dst = kv_cache(8, torch.float32, float("nan"))
    a, b = kv_cache(8, torch.float32), kv_cache(8, torch.float32)
    copier = BlockCopier(dst, stats := CopyStats())
    # (source, source ids, destination ids); job 2 overwrites block 6 after job 1.
    jobs = [(a, [0], [0]), (a, [1, 2], [5, 6]), (a, [3, 4], [6, 7]), (b, [5], [1]), (a, [6], [2])]
    launches.hold = lambda _: len(copier._queue) == len(jobs) - 1

    def one(job: tuple[torch.Tensor, list[int], list[int]]) -> None:
        src, src_ids, dst_ids = job
        copier.copy(src, np.array(src_ids), np.array(dst_ids))

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(one, jobs[0])]
        for k, job in enumerate(jobs[1:], start=1):  # queued in this order
            assert wait_until(lambda k=k: len(copier._queue) == k - 1 and launches.into)
            futures.append(pool.submit(one, job))
        for future in futures:
            future.result()
    assert launches.into[dst.data_ptr()] == [[0], [5, 6, 2], [6, 7], [1]]
    snapshot = stats.snapshot()
    assert (snapshot.launches, snapshot.jobs) == (4, 5)
    want = {
        0: a[:, :, 0],
        5: a[:, :, 1],
        6: a[:, :, 3],
        7: a[:, :, 4],
        1: b[:, :, 5],
        2: a[:, :, 6],
    }
    for block, values in want.items():
        assert torch.equal(dst[:, :, block], values), block
    assert untouched(dst, list(want))


def test_the_leader_runs_its_batch_follow_ups_and_one_failing_fails_alone(launches):
    """After the copy, each job's follow-up (the header post) runs on the leader's thread,
    once the batch's bytes are in place; a follow-up that raises fails only its job."""
    dst = kv_cache(8, torch.float32, float("nan"))
    src = kv_cache(8, torch.float32)
    copier = BlockCopier(dst, CopyStats())
    n = 5
    launches.hold = lambda _: len(copier._queue) == n - 1
    ran: dict[int, int] = {}  # job -> thread that ran its follow-up
    landed: dict[int, bool] = {}

    def follow_up(i: int) -> None:
        ran[i] = threading.get_ident()
        landed[i] = torch.equal(dst[:, :, i], src[:, :, i])
        if i == 3:
            raise TransferError("receiver gone (test)")

    def one(i: int) -> None:
        copier.copy(src, np.array([i]), np.array([i]), then=lambda: follow_up(i))

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(one, 0)]
        for k in range(1, n):
            assert wait_until(lambda k=k: len(copier._queue) == k - 1 and launches.into)
            futures.append(pool.submit(one, k))
        errors = [f.exception() for f in futures]
    assert [e is None for e in errors] == [True, True, True, False, True]
    assert isinstance(errors[3], TransferError) and "receiver gone" in str(errors[3])
    assert launches.into[dst.data_ptr()] == [[0], [1, 2, 3, 4]]
    assert all(landed.values()) and len(landed) == n
    assert len({ran[i] for i in (1, 2, 3, 4)}) == 1  # the second batch's leader, alone


def test_ship_many_moves_every_request_in_one_launch_and_fails_only_the_bad_one(
    fake_ipc, ipc_sender, ipc_address, launches
):
    """What a prefill step that finished several requests does: one call, one launch,
    one header each; a request that was never reserved fails alone."""
    jobs = 5
    decode = Decode(ipc_address, torch.float32, blocks=jobs * PER + 4)
    src = kv_cache(jobs * PER, torch.float32)
    try:
        rids = [f"r{i}" for i in range(jobs)]
        dst = [reserve(ipc_sender, ipc_address, rid, PER).block_ids for rid in rids]
        moves = [
            BlockMove(rid, list(range(i * PER, (i + 1) * PER)), dst[i])
            for i, rid in enumerate(rids)
        ]
        moves.insert(2, BlockMove("never-reserved", [0], [decode.cache.shape[2] - 1]))
        done = ship_many(ipc_sender, ipc_address, moves, list(src.unbind(0)), 10.0)
        assert [t.request_id for t in done] == [m.request_id for m in moves]
        states = {t.request_id: t.state for t in done}
        assert states.pop("never-reserved") is TransferState.FAILED
        assert set(states.values()) == {TransferState.DONE}
        assert launches.sizes(decode.cache) == [jobs * PER]
        assert all(_landed(decode, src, i, ids) for i, ids in enumerate(dst))
        assert untouched(decode.cache, [b for ids in dst for b in ids])
        assert all(handoff(ipc_sender, ipc_address, rid).ok for rid in rids)
    finally:
        decode.close()
