"""`tandem bench transfer`: KV transfer GB/s per backend, beside each backend's ceiling.

What moves: Llama-3.1-8B-shaped KV (32 layers, 8 KV heads, head_dim 128, bf16, 16-token
blocks; 128 KiB per token) from a cache on --sender-device, in this process, into the
cache of a decode-like receiver process on --receiver-device (bench.transfer_peers),
through the calls the workers make: make_sender / make_receiver, reserve, send_blocks
(via kvtransfer.ship), release. Nothing here knows a backend's internals.

How: for each backend, request length (--tokens) and concurrency (--requests N), N
requests are reserved, then shipped at once (each request from its own source blocks
into its own reserved blocks): with `--calls one` (default) in one ship_many call, as a
prefill worker ships every request one step finished; with `--calls threads` from N
threads sharing one sender, each calling ship, as independent callers would. A round's
figure is N * request bytes over the wall time from the start to the last ack.
Untimed warm-up rounds come first (connections, mappings, kernel compilation); the
median of the next --iters rounds is reported. Cases over --max-gib (per side) are skipped.
For cuda_ipc a row also counts the copy kernel launches per round and the host time
spent launching them (the sender's copy_stats): concurrent requests into one receiver
share launches, so N requests in fewer than N launches shows it happened.

Ceilings, measured in the same run: the device copy bandwidth for cuda_ipc (torch copy
on the sender's GPU, or a peer copy to the receiver's GPU when they differ), the host
memcpy bandwidth for zmq (one thread), the NCCL send/recv bandwidth between the two
GPUs for nccl. Every figure counts the KV bytes moved once: a copy of B bytes counts B,
not B read plus B written (bench.ceiling's copy_bandwidth_bytes_per_s counts both, so
its figure is halved here).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from tandem.bench.results import write_result
from tandem.bench.transfer_peers import CacheShape, Receiver, nccl_p2p_bytes_per_s
from tandem.core.protocol import ReserveRequest
from tandem.kvtransfer.cuda_ipc_copy import CopyCounts, CopyStats
from tandem.kvtransfer.transport import (
    BlockMove,
    TransferState,
    layout_of,
    make_sender,
    ship,
    ship_many,
)

MODEL = "llama-3.1-8b"
CEILING_OF = {"zmq": "host_memcpy", "cuda_ipc": "device_copy", "nccl": "nccl_p2p"}
SHAPE = CacheShape()
_GIB = 1 << 30


@dataclass(frozen=True)
class Case:
    backend: str
    tokens: int
    requests: int

    @property
    def blocks_per_request(self) -> int:
        return -(-self.tokens // SHAPE.block_size)

    @property
    def blocks(self) -> int:
        return self.blocks_per_request * self.requests

    @property
    def nbytes(self) -> int:
        return self.blocks * SHAPE.block_bytes

    @property
    def key(self) -> str:
        return f"{self.backend}/{self.tokens}tok/{self.requests}req"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def plan(args: argparse.Namespace) -> tuple[list[Case], list[dict]]:
    """The cases to run and the ones skipped for memory, with why."""
    cases, skipped = [], []
    cap = int(args.max_gib * _GIB)
    for backend in args.backends.split(","):
        for tokens in _ints(args.tokens):
            for requests in _ints(args.requests):
                case = Case(backend, tokens, requests)
                if case.nbytes > cap:
                    skipped.append(
                        {
                            "backend": backend,
                            "tokens": tokens,
                            "requests": requests,
                            "reason": f"{case.nbytes / _GIB:.1f} GiB per side exceeds "
                            f"--max-gib {args.max_gib:g}",
                        }
                    )
                else:
                    cases.append(case)
    return cases, skipped


def run_round(
    sender,
    address: str,
    case: Case,
    views: list[torch.Tensor],
    timeout_s: float,
    calls: str = "one",
) -> float:
    """Reserve N requests, ship them at once (one call, or N threads); seconds from the
    start to the last ack. Reservations are given back afterwards."""
    layout = layout_of(views, MODEL, SHAPE.block_size)
    tag = uuid.uuid4().hex[:8]
    rids = [f"{case.key}-{tag}-{i}" for i in range(case.requests)]
    dst = []
    for rid in rids:
        reply = sender.reserve(
            address,
            ReserveRequest(
                request_id=rid, num_tokens=case.tokens, layout=layout, lease_s=timeout_s * 4
            ),
            timeout_s,
        )
        if not reply.ok:
            raise RuntimeError(f"{case.key}: reservation refused: {reply.reason}")
        dst.append(list(reply.block_ids))
    n = case.blocks_per_request
    failures: list[str] = []
    if calls == "one":
        moves = [
            BlockMove(rid, list(range(i * n, (i + 1) * n)), dst[i]) for i, rid in enumerate(rids)
        ]
        t0 = time.perf_counter()
        done = ship_many(sender, address, moves, views, timeout_s)
        elapsed = time.perf_counter() - t0
        failures = [t.reason for t in done if t.state is not TransferState.DONE]
        for rid in rids:
            sender.release(address, rid)
        if failures:
            raise RuntimeError(f"{case.key}: {len(failures)} transfer(s) failed: {failures[0]}")
        return elapsed
    start = threading.Barrier(case.requests + 1)

    def ship_one(i: int) -> None:
        start.wait()
        try:
            done = ship(
                sender, address, rids[i], views, list(range(i * n, (i + 1) * n)), dst[i], timeout_s
            )
        except Exception as exc:  # reported below: a dead thread must not look fast
            failures.append(repr(exc))
            return
        if done.state is not TransferState.DONE:
            failures.append(done.reason)

    threads = [
        threading.Thread(target=ship_one, args=(i,), daemon=True) for i in range(case.requests)
    ]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - t0
    for rid in rids:
        sender.release(address, rid)
    if failures:
        raise RuntimeError(f"{case.key}: {len(failures)} transfer(s) failed: {failures[0]}")
    return elapsed


def run_backend(
    backend: str, cases: list[Case], views: list[torch.Tensor], args: argparse.Namespace
) -> list[dict]:
    receiver = Receiver(backend, args.receiver_device, max(c.blocks for c in cases))
    sender = make_sender(backend, f"bench-transfer-{uuid.uuid4().hex[:8]}")
    rows = []
    try:
        for case in cases:
            # Warm-up, untimed: one request alone first (connection, mapping, and kernel
            # compilation happen once, not in N threads at once), then a full round.
            run_round(sender, receiver.address, Case(backend, case.tokens, 1), views, args.timeout)
            run_round(sender, receiver.address, case, views, args.timeout, args.calls)
            before = _copy_counts(sender)
            rounds = [
                run_round(sender, receiver.address, case, views, args.timeout, args.calls)
                for _ in range(args.iters)
            ]
            gbps = [case.nbytes / s / 1e9 for s in rounds]
            rows.append(
                {
                    "backend": backend,
                    "tokens": case.tokens,
                    "requests": case.requests,
                    "bytes": case.nbytes,
                    "seconds_median": statistics.median(rounds),
                    "gb_per_s": round(statistics.median(gbps), 3),
                    "rounds_gb_per_s": [round(g, 3) for g in gbps],
                    **_launches_per_round(before, _copy_counts(sender), args.iters),
                }
            )
            launches = rows[-1].get("launches_per_round")
            shared = "" if launches is None else f" ({launches:g} launches per round)"
            print(f"{case.key}: {rows[-1]['gb_per_s']:.2f} GB/s{shared}")
    finally:
        sender.close()
        receiver.stop()
    return rows


def _copy_counts(sender: object) -> CopyCounts | None:
    """The cuda_ipc sender's kernel launch totals (other backends launch no copy)."""
    stats = getattr(sender, "copy_stats", None)
    return stats.snapshot() if isinstance(stats, CopyStats) else None


def _launches_per_round(
    before: CopyCounts | None, after: CopyCounts | None, rounds: int
) -> dict[str, float]:
    """How concurrent transfers coalesced: copy launches per round (1 is one launch for
    all N requests, N is none shared), and the launching leaders' host time per round."""
    if before is None or after is None:
        return {}
    return {
        "launches_per_round": (after.launches - before.launches) / rounds,
        "launch_host_ms_per_round": round((after.host_s - before.host_s) * 1e3 / rounds, 4),
    }


def host_memcpy_bytes_per_s(nbytes: int, iters: int = 5) -> float:
    """One thread's memcpy between two host buffers (what each zmq hop is bound by)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros_like(src)
    np.copyto(dst, src)
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def device_copy_bytes_per_s(
    sender: torch.device, receiver: torch.device, nbytes: int = _GIB, iters: int = 10
) -> tuple[float, str]:
    """Bytes copied per second on the sender's GPU, or from it to the receiver's."""
    if sender == receiver:
        from tandem.bench.ceiling import copy_bandwidth_bytes_per_s

        with torch.cuda.device(sender):
            return copy_bandwidth_bytes_per_s(nbytes) / 2, f"device copy on {sender}"
    src = torch.empty(nbytes, dtype=torch.uint8, device=sender)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=receiver)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(sender)
    torch.cuda.synchronize(receiver)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    torch.cuda.synchronize(sender)
    torch.cuda.synchronize(receiver)
    return nbytes * iters / (time.perf_counter() - t0), f"peer copy {sender} -> {receiver}"


def kernel_bytes_per_s(src: torch.Tensor, blocks: int, iters: int = 20) -> float:
    """The cuda_ipc copy kernel alone, `blocks` random blocks between two local caches."""
    from tandem.kernels.kv_block_transfer import kv_block_transfer

    dst = torch.empty_like(src[:, :, :blocks])
    ids = torch.stack([torch.randperm(src.shape[2])[:blocks], torch.randperm(blocks)])
    ids = ids.to(torch.int32).to(src.device)
    for _ in range(3):
        kv_block_transfer(src, dst, ids)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        kv_block_transfer(src, dst, ids)
    end.record()
    end.synchronize()
    return blocks * SHAPE.block_bytes * iters / (start.elapsed_time(end) / 1e3)


def _at_2048(rows: list[dict], backend: str) -> dict | None:
    """The 2048-token case with the most concurrent requests that ran."""
    ran = [r for r in rows if r["backend"] == backend and r["tokens"] == 2048]
    return max(ran, key=lambda r: r["requests"]) if ran else None


def _check_devices(backends: list[str], sender: torch.device, receiver: torch.device) -> None:
    for backend in backends:
        if backend not in CEILING_OF:
            raise SystemExit(f"unknown backend {backend!r}; choose from {sorted(CEILING_OF)}")
        if backend != "zmq" and "cpu" in (sender.type, receiver.type):
            raise SystemExit(
                f"{backend} moves KV between GPUs: give --sender-device and "
                "--receiver-device as cuda:N"
            )
    if "nccl" in backends and sender == receiver:
        raise SystemExit("nccl needs two GPUs: --receiver-device must differ from the sender's")


def _defaults(args: argparse.Namespace) -> None:
    cuda = torch.cuda.is_available()
    args.backends = args.backends or ("zmq,cuda_ipc" if cuda else "zmq")
    args.sender_device = args.sender_device or ("cuda:0" if cuda else "cpu")
    args.receiver_device = args.receiver_device or args.sender_device


def run(args: argparse.Namespace) -> dict:
    _defaults(args)
    sender_dev, receiver_dev = torch.device(args.sender_device), torch.device(args.receiver_device)
    backends = args.backends.split(",")
    _check_devices(backends, sender_dev, receiver_dev)
    if sender_dev.type == "cuda":
        torch.cuda.set_device(sender_dev)
    cases, skipped = plan(args)
    if not cases:
        raise SystemExit("every case exceeds --max-gib; raise it or pick fewer/shorter requests")
    # One source cache for every case: request i of a case reads its own blocks.
    blocks = max(c.blocks for c in cases)
    source = torch.empty(SHAPE.dims(blocks), dtype=SHAPE.dtype, device=sender_dev).normal_()
    views = list(source.unbind(0))
    rows: list[dict] = []
    for backend in backends:
        mine = [c for c in cases if c.backend == backend]
        if mine:
            rows += run_backend(backend, mine, views, args)

    ceilings: dict[str, float] = {}
    notes: dict[str, str] = {}
    largest = max(c.nbytes for c in cases)
    if "zmq" in backends:
        nbytes = min(_GIB, max(64 << 20, largest))
        ceilings["host_memcpy"] = host_memcpy_bytes_per_s(nbytes)
        notes["host_memcpy"] = f"numpy copyto of {nbytes} bytes, one thread"
    if "cuda_ipc" in backends:
        ceilings["device_copy"], notes["device_copy"] = device_copy_bytes_per_s(
            sender_dev, receiver_dev
        )
    if "nccl" in backends:
        ceilings["nccl_p2p"] = nccl_p2p_bytes_per_s(args.sender_device, args.receiver_device)
        notes["nccl_p2p"] = "torch.distributed NCCL send/recv of 1 GiB, two processes"
    for row in rows:
        ceiling = ceilings[CEILING_OF[row["backend"]]]
        row["ceiling"] = CEILING_OF[row["backend"]]
        row["fraction_of_ceiling"] = round(row["gb_per_s"] * 1e9 / ceiling, 4)

    metrics: dict = {
        "bytes_counted": "KV bytes moved, each once: a copy of B bytes counts B (not B read "
        "+ B written); ceilings are counted the same way",
        "ceilings_gb_per_s": {k: round(v / 1e9, 3) for k, v in ceilings.items()},
        "ceiling_methods": notes,
        "gb_per_s": {
            f"{r['backend']}/{r['tokens']}tok/{r['requests']}req": r["gb_per_s"] for r in rows
        },
        "cases": rows,
        "skipped": skipped,
    }
    if (ipc := _at_2048(rows, "cuda_ipc")) is not None:
        metrics["cuda_ipc_fraction_of_copy_bw"] = ipc["fraction_of_ceiling"]
        metrics["cuda_ipc_fraction_case"] = f"2048 tokens x {ipc['requests']} requests"
        metrics["cuda_ipc_launches_per_round"] = ipc["launches_per_round"]
        metrics["cuda_ipc_launch_host_ms_per_round"] = ipc["launch_host_ms_per_round"]
    if "cuda_ipc" in backends:
        kernel = kernel_bytes_per_s(source, min(128, source.shape[2]))
        metrics["cuda_ipc_kernel_gb_per_s"] = round(kernel / 1e9, 3)
        metrics["cuda_ipc_kernel_fraction_of_copy_bw"] = round(kernel / ceilings["device_copy"], 4)
    if (nccl := _at_2048(rows, "nccl")) is not None:
        metrics["nccl_gb_per_s"] = nccl["gb_per_s"]
    params = {
        "backends": backends,
        "tokens": _ints(args.tokens),
        "requests": _ints(args.requests),
        "iters": args.iters,
        "calls": args.calls,
        "sender_device": args.sender_device,
        "receiver_device": args.receiver_device,
        "max_gib": args.max_gib,
        "timeout_s": args.timeout,
        "kv_shape": {
            "layers": SHAPE.layers,
            "kv_heads": SHAPE.kv_heads,
            "head_dim": SHAPE.head_dim,
            "block_size": SHAPE.block_size,
            "dtype": "bfloat16",
            "bytes_per_token": SHAPE.block_bytes // SHAPE.block_size,
        },
    }
    write_result("transfer", MODEL, params, metrics, args.out_dir, label="-".join(backends))
    return metrics
