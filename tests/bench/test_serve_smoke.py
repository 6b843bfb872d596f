"""`tandem bench serve` end to end on CPU: it launches the real service (SmolLM2),
sends tiny workloads, writes the results JSON and leaves no process behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import psutil
import pytest

from tandem.core.hop_trace import HOPS

ROW_KEYS = {"num_prompts", "completed", "failed", "errors", "duration_s", "request_throughput",
            "output_throughput", "total_token_throughput", "goodput", "goodput_requests",
            "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "client_cpu_share", "slo_attainment"}  # fmt: skip
PREFIX_KEYS = {"ideal_hit_rate", "prefix_hit_rate", "kv_bytes_per_request"}


def bench_serve(tmp_path: Path, *flags: str) -> tuple[dict, str]:
    # One torch thread per process: the service's two workers and the baseline share the CPU.
    cmd = [
        sys.executable,
        "-m",
        "tandem.cli",
        "bench",
        "serve",
        "--device",
        "cpu",
        "--num-blocks",
        "256",
        "--threads",
        "1",
        "--modes",
        "1p1d",
        "--input-len",
        "16",
        "--output-len",
        "8",
        "--warmup-prompts",
        "2",
        "--out-dir",
        str(tmp_path),
        "--log-dir",
        str(tmp_path / "logs"),
        *flags,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("serve-smollm2-16x8-*.json")
    return json.loads(path.read_text()), done.stdout


def assert_nothing_left(stdout: str) -> None:
    # The gateway's command line carries the gRPC port the bench picked for the service.
    port = re.search(r"--grpc-port (\d+)", stdout).group(1)
    left = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if f"--grpc-port {port} " in cmdline + " " and "tandem" in cmdline:
            left.append(cmdline)
    assert left == []


def test_grpc_two_rates_every_request_complete(tmp_path):
    record, stdout = bench_serve(
        tmp_path, "--num-prompts", "6", "--rates", "inf,4", "--slo-sets", "loose=ttft:600000"
    )
    assert record["benchmark"] == "serve" and record["model"] == "smollm2"
    assert {"card", "commit", "date", "command", "params", "metrics"} <= set(record)
    params = record["params"]
    assert params["modes"] == ["1p1d"] and params["rates"] == ["inf", "4"]
    assert (params["local_prefill_after_ms"], params["max_local_prefills"]) == (None, None)
    assert (params["input_len"], params["output_len"]) == (16, 8)
    assert params["num_prompts"] == {"inf": 6, "4": 6}
    mode = record["metrics"]["modes"]["1p1d"]
    assert set(mode["rates"]) == {"inf", "4"}
    for row in mode["rates"].values():
        assert set(row) == ROW_KEYS | {"prompts_prefilled_by_role", *PREFIX_KEYS}
        # completed means: no error and exactly output-len tokens streamed
        assert (row["completed"], row["failed"]) == (6, 0), row["errors"]
        assert row["slo_attainment"] == {"loose": 1.0}  # every request within 10 minutes
        # Every prompt of the rate went through the one prefill worker.
        assert row["prompts_prefilled_by_role"] == {"prefill": 6}
        assert row["output_throughput"] * row["duration_s"] == pytest.approx(6 * 8, rel=0.01)
        assert row["goodput"] is None
    assert "served_vs_offline_throughput_ratio" not in record["metrics"]
    assert not list((tmp_path / "logs").glob("hops-*"))  # no --trace-hops: no trace
    assert_nothing_left(stdout)


def test_http_backend_goodput_offline_baseline_and_local_prefill_mode(tmp_path):
    record, stdout = bench_serve(
        tmp_path,
        "--num-prompts",
        "4",
        "--rates",
        "inf",
        "--backend",
        "http",
        "--goodput",
        "ttft:600000",
        "tpot:600000",
        "--offline-baseline",
        "--client-processes",
        "2",
        "--modes",
        "1p1d-local",
        "--local-prefill-after-ms",
        "50",
    )
    assert "--decode-workers 1 --local-prefill-after-ms 50 --max-local-prefills 1" in stdout
    params = record["params"]
    assert (params["local_prefill_after_ms"], params["max_local_prefills"]) == (50.0, 1)
    metrics = record["metrics"]
    row = metrics["modes"]["1p1d-local"]["rates"]["inf"]
    assert (row["completed"], row["failed"]) == (4, 0), row["errors"]
    assert row["goodput_requests"] == 4  # ten-minute SLOs: every completed request is good
    assert record["params"]["slos_ms"] == {"ttft": 600000.0, "tpot": 600000.0}
    assert metrics["offline"]["num_prompts"] == 4
    assert metrics["served_vs_offline_mode"] == "1p1d-local"
    assert metrics["served_vs_offline_throughput_ratio"] > 0
    assert_nothing_left(stdout)


def test_shared_prefix_workload_reports_hit_rate_and_bytes_shipped(tmp_path):
    from tandem.engine.checkpoint_resolver import resolve_model
    from tandem.engine.model_config import ModelConfig

    record, stdout = bench_serve(
        tmp_path, "--num-prompts", "4", "--rates", "1", "--workload", "shared-prefix",
        "--shared-prefix-len", "64", "--trace-hops",
    )  # fmt: skip
    assert record["params"]["workload"] == "shared-prefix"
    row = record["metrics"]["modes"]["1p1d"]["rates"]["1"]
    assert (row["completed"], row["failed"]) == (4, 0), row["errors"]
    # Every request of the rate (not the warm-up's) passed every hop, in order, on one
    # clock; all of it lies within the client's time to first token.
    hops = row.pop("hops_ms")
    assert hops["requests"] == 4 and hops["hops"] == list(HOPS)
    assert all(hops[f"{a}->{b}"]["p50"] >= 0 for a, b in pairwise(HOPS))
    assert 0 < hops[f"{HOPS[0]}->{HOPS[-1]}"]["p50"] <= row["ttft_ms"]["p50"]
    assert row["ideal_hit_rate"] == pytest.approx(64 * 3 / (80 * 4), abs=1e-4)
    assert 0 < row["prefix_hit_rate"] <= row["ideal_hit_rate"]
    # A request's KV is 80 prompt tokens, 5 blocks of 16; the first one ships all of
    # them, later ones only what the decode worker does not hold yet (at least 1).
    block = ModelConfig.from_dir(resolve_model("smollm2")).kv_layout("float32", 16).bytes_per_block
    assert 2 * block <= row["kv_bytes_per_request"] <= 5 * block
    assert_nothing_left(stdout)
