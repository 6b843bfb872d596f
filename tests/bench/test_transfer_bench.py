"""`python -m tandem.bench transfer` on CPU: the zmq backend with tiny requests, end to end
(CLI, receiver process, ceiling, result file); figures are not judged, only present."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tandem.bench import transfer
from tandem.kvtransfer.cuda_ipc_backend import CudaIpcKVSender
from tandem.kvtransfer.transport import ZmqKVSender

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("calls", ["one", "threads"])
def test_zmq_transfer_bench_writes_a_complete_result(tmp_path: Path, calls: str):
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "transfer",
        "--backends",
        "zmq",
        "--tokens",
        "16,32",
        "--requests",
        "1,2",
        "--iters",
        "1",
        "--sender-device",
        "cpu",
        "--receiver-device",
        "cpu",
        "--max-gib",
        "0.005",
        "--calls",
        calls,
        "--out-dir",
        str(tmp_path),
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [path] = tmp_path.glob("transfer-llama-3.1-8b-zmq-*.json")
    record = json.loads(path.read_text())
    assert record["benchmark"] == "transfer" and record["model"] == "llama-3.1-8b"
    for key in ("card", "commit", "date", "command", "params", "metrics"):
        assert record[key], key
    metrics = record["metrics"]
    # 32 tokens x 2 requests is 8 MiB of KV, over the 5 MiB cap.
    assert set(metrics["gb_per_s"]) == {"zmq/16tok/1req", "zmq/16tok/2req", "zmq/32tok/1req"}
    assert [(s["tokens"], s["requests"]) for s in metrics["skipped"]] == [(32, 2)]
    assert all(v > 0 for v in metrics["gb_per_s"].values())
    assert metrics["ceilings_gb_per_s"]["host_memcpy"] > 0
    assert "bytes_counted" in metrics
    for case in metrics["cases"]:
        assert case["ceiling"] == "host_memcpy" and case["fraction_of_ceiling"] > 0
        assert case["bytes"] == case["tokens"] * case["requests"] * 128 * 1024
    assert record["params"]["kv_shape"]["bytes_per_token"] == 128 * 1024
    assert record["params"]["calls"] == calls


def test_rows_count_copy_launches_of_the_cuda_ipc_sender_only():
    ipc, plain = CudaIpcKVSender("bench-ipc"), ZmqKVSender("bench-zmq")
    try:
        before = transfer._copy_counts(ipc)
        ipc.copy_stats.add(jobs=16, host_s=0.0002)
        ipc.copy_stats.add(jobs=16, host_s=0.0004)
        row = transfer._launches_per_round(before, transfer._copy_counts(ipc), rounds=2)
        assert row == {"launches_per_round": 1.0, "launch_host_ms_per_round": 0.3}
        zmq_counts = transfer._copy_counts(plain)
        assert zmq_counts is None and transfer._launches_per_round(zmq_counts, None, 2) == {}
    finally:
        ipc.close()
        plain.close()
