"""`tandem serve`: worker counts and GPUs as asked, and nothing left behind when stopped."""

from __future__ import annotations

import signal
import time

import psutil
import pytest

from tandem import launcher
from tandem.cli import build_parser
from tandem.launcher import resolve_worker_counts
from tests.service.conftest import generate, start_service, stop_service


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_leaves_no_process_behind(sig):
    svc = start_service()
    try:
        children = psutil.Process(svc.proc.pid).children(recursive=True)
        roles = " ".join(" ".join(c.cmdline()) for c in children)
        for role in ("redis-server", " prefill ", " decode ", " gateway "):
            assert role in roles, f"{role.strip()} not started: {roles}"
        tokens, _, _ = generate(svc.stub(), prompt="Hello", max_tokens=3)
        assert len(tokens) == 3
    finally:
        assert stop_service(svc, sig) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children
    ):
        time.sleep(0.1)
    alive = [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert alive == []


def _serve_args(*argv: str):
    return build_parser().parse_args(["--log-level", "INFO", "serve", *argv])


@pytest.mark.parametrize(("argv", "counts"), [
    ([], (1, 1, 0)),
    (["--colocated-workers", "2"], (0, 0, 2)),
    (["--colocated-workers", "1", "--prefill-workers", "1", "--decode-workers", "2"], (1, 2, 1)),
])  # fmt: skip
def test_prefill_and_decode_default_to_none_beside_colocated_workers(argv, counts):
    args = _serve_args(*argv)
    resolve_worker_counts(args)
    assert (args.prefill_workers, args.decode_workers, args.colocated_workers) == counts


@pytest.mark.parametrize("argv", [
    ["--prefill-workers", "0", "--decode-workers", "0"],
    ["--prefill-workers", "0"],  # decode workers nobody hands requests to
    ["--colocated-workers", "1", "--prefill-workers", "1"],
    ["--colocated-workers", "-1"],
    ["--device", "cuda", "--kv-transport", "nccl"],  # both roles on the inherited GPU
    ["--device", "cuda", "--kv-transport", "nccl", "--prefill-gpus", "0", "--decode-gpus", "0,1"],
    ["--colocated-workers", "1", "--local-prefill-after-ms", "100"],  # no decode worker
    ["--local-prefill-after-ms", "-1"],
    ["--local-prefill-after-ms", "100", "--max-local-prefills", "0"],
    ["--max-local-prefills", "2"],  # means nothing without --local-prefill-after-ms
    ["--local-prefill-uncached-tokens", "-1"],
    ["--colocated-workers", "1", "--local-prefill-uncached-tokens", "64"],  # no decode worker
    ["--reservation-lease", "0"],
    ["--reservation-lease", "nan"],
    ["--reservation-lease", "601"],  # above what a decode worker accepts in a reservation
])  # fmt: skip
def test_worker_sets_that_cannot_serve_are_refused(argv):
    with pytest.raises(ValueError):
        resolve_worker_counts(_serve_args(*argv))


def test_nccl_on_cpu_or_on_separate_gpus_is_accepted():
    for argv in (
        ["--kv-transport", "nccl"],  # CPU: gloo
        ["--device", "cuda", "--kv-transport", "nccl", "--prefill-gpus", "0", "--decode-gpus", "1"],
    ):
        resolve_worker_counts(_serve_args(*argv))


def test_gpu_lists_pin_each_worker_and_keep_the_rest_of_the_environment(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    spawned: list[tuple[list[str], dict | None]] = []

    def popen(cmd, **kw) -> None:  # Service.start only keeps what Popen returns
        spawned.append((cmd, kw.get("env")))

    monkeypatch.setattr(launcher.subprocess, "Popen", popen)
    args = _serve_args(
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--prefill-workers",
        "1",
        "--decode-workers",
        "3",
        "--decode-gpus",
        "1,2",
        "--colocated-workers",
        "2",
        "--colocated-gpus",
        "3",
    )
    resolve_worker_counts(args)
    launcher.Service(args).start()
    roles = [
        next(r for r in ("prefill", "decode", "worker", "gateway") if r in cmd)
        for cmd, _ in spawned
    ]
    assert roles == ["prefill", "decode", "decode", "decode", "worker", "worker", "gateway"]
    gpus = [env["CUDA_VISIBLE_DEVICES"] if env else None for _, env in spawned]
    # Unset lists inherit the environment as it is (here CUDA_VISIBLE_DEVICES=7).
    assert gpus == [None, "1", "2", "1", "3", "3", None]
    assert all(env["NCCL_NVLS_ENABLE"] == "0" for _, env in spawned if env)
    colocated = spawned[4][0]
    assert "--kv-transport" not in colocated and "--gpu-memory-utilization" in colocated
    with pytest.raises(SystemExit):
        _serve_args("--colocated-gpus", "0,x")


def test_local_prefill_flags_go_to_decode_workers_only(monkeypatch):
    spawned: list[list[str]] = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda cmd, **kw: spawned.append(cmd))
    args = _serve_args(
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--decode-workers",
        "2",
        "--colocated-workers",
        "1",
        "--prefill-workers",
        "1",
        "--local-prefill-after-ms",
        "250",
        "--max-local-prefills",
        "3",
    )
    resolve_worker_counts(args)
    launcher.Service(args).start()
    local = ["--local-prefill-after-ms", "250", "--max-local-prefills", "3"]
    for cmd in spawned:
        has = any(cmd[i : i + 4] == local for i in range(len(cmd)))
        assert has == ("decode" in cmd), cmd
    assert sum("decode" in cmd for cmd in spawned) == 2
    spawned.clear()
    plain = _serve_args("--redis-url", "redis://127.0.0.1:1/0")
    resolve_worker_counts(plain)
    launcher.Service(plain).start()
    assert not any("--local-prefill-after-ms" in cmd for cmd in spawned)


def test_the_uncached_length_gate_goes_to_decode_workers_only(monkeypatch):
    spawned: list[list[str]] = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda cmd, **kw: spawned.append(cmd))
    args = _serve_args(
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--local-prefill-uncached-tokens",
        "48",
        "--max-local-prefills",
        "2",
        "--local-prefill-tokens",
        "256",
    )
    resolve_worker_counts(args)
    launcher.Service(args).start()
    local = ["--local-prefill-uncached-tokens", "48", "--max-local-prefills", "2"]
    for cmd in spawned:
        has = any(cmd[i : i + 4] == local for i in range(len(cmd)))
        assert has == ("decode" in cmd), cmd
        assert "--local-prefill-after-ms" not in cmd
    (decode,) = [cmd for cmd in spawned if "decode" in cmd]
    assert _engine_value(decode, "--max-prefill-tokens") == "256"


def _engine_value(cmd: list[str], flag: str) -> str:
    """What a worker's parser ends up with: the last occurrence of the flag wins."""
    return cmd[len(cmd) - 1 - cmd[::-1].index(flag) + 1]


def test_local_prefill_tokens_cap_the_decode_workers_steps_only(monkeypatch):
    spawned: list[list[str]] = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda cmd, **kw: spawned.append(cmd))
    args = _serve_args(
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--max-prefill-tokens",
        "4096",
        "--local-prefill-after-ms",
        "200",
        "--local-prefill-tokens",
        "512",
    )
    resolve_worker_counts(args)
    launcher.Service(args).start()
    workers = {r: c for c in spawned for r in ("prefill", "decode") if r in c}
    assert _engine_value(workers["prefill"], "--max-prefill-tokens") == "4096"
    assert _engine_value(workers["decode"], "--max-prefill-tokens") == "512"
    for bad, why in (
        (["--local-prefill-tokens", "512"], "needs --local-prefill-after-ms"),
        (["--local-prefill-after-ms", "1", "--local-prefill-tokens", "-1"], ">= 0"),
    ):
        with pytest.raises(ValueError, match=why):
            resolve_worker_counts(_serve_args("--redis-url", "redis://127.0.0.1:1/0", *bad))


def test_a_workers_max_prefill_tokens_reaches_its_scheduler():
    from tandem.engine.engine_args import engine_config_from_args

    args = build_parser().parse_args(
        [
            "decode",
            "--redis-url",
            "redis://127.0.0.1:1/0",
            "--max-prefill-tokens",
            "512",
            "--max-prefill-tokens",
            "256",
        ]
    )
    assert engine_config_from_args(args).scheduler.prefill_budget == 256


def test_prefix_flags_reach_the_workers_that_use_them(monkeypatch):
    spawned: list[list[str]] = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda cmd, **kw: spawned.append(cmd))
    args = _serve_args(
        "--redis-url",
        "redis://127.0.0.1:1/0",
        "--colocated-workers",
        "1",
        "--prefill-workers",
        "1",
        "--decode-workers",
        "1",
        "--prefix-route-wait-ms",
        "750",
        "--no-prefix-caching",
    )
    resolve_worker_counts(args)
    launcher.Service(args).start()
    workers = [cmd for cmd in spawned if "gateway" not in cmd]
    assert len(workers) == 3
    for cmd in workers:
        assert "--no-prefix-caching" in cmd
        # Prefill and colocated workers route tasks; a decode worker takes handoffs.
        assert ("--prefix-route-wait-ms" in cmd) == ("decode" not in cmd), cmd
    for command in ("prefill", "worker"):
        (routing,) = [cmd for cmd in workers if command in cmd]
        assert _engine_value(routing, "--prefix-route-wait-ms") == "750"


def test_the_stream_write_timeout_reaches_the_gateway(monkeypatch):
    spawned: list[list[str]] = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda cmd, **kw: spawned.append(cmd))
    args = _serve_args(
        "--redis-url", "redis://127.0.0.1:1/0", "--colocated-workers", "1",
        "--stream-write-timeout", "7.5",
    )  # fmt: skip
    resolve_worker_counts(args)
    launcher.Service(args).start()
    (gateway,) = [cmd for cmd in spawned if "gateway" in cmd]
    assert _engine_value(gateway, "--stream-write-timeout") == "7.5"


def test_the_reservation_lease_reaches_the_prefill_and_decode_workers(monkeypatch):
    spawned: list[list[str]] = []
    monkeypatch.setattr(launcher.subprocess, "Popen", lambda cmd, **kw: spawned.append(cmd))
    args = _serve_args(
        "--redis-url", "redis://127.0.0.1:1/0", "--colocated-workers", "1",
        "--prefill-workers", "1", "--decode-workers", "1", "--reservation-lease", "2.5",
    )  # fmt: skip
    resolve_worker_counts(args)
    launcher.Service(args).start()
    assert len(spawned) == 4
    for cmd in spawned:
        moves_kv = "prefill" in cmd or "decode" in cmd
        assert ("--reservation-lease" in cmd) == moves_kv, cmd
        if moves_kv:
            assert _engine_value(cmd, "--reservation-lease") == "2.5"
