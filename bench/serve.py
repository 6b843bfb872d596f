"""`tandem bench serve`: the service under load, like `vllm bench serve`.

For each mode of --modes (or once against a running gateway with --target) and each
rate of --rates, send seeded random token-id prompts with Poisson arrivals (inf: all at
t=0), stream every answer with `ignore_eos`, and report TTFT, TPOT, ITL and end-to-end
latency (mean, p50, p90, p99), request and token throughput and goodput under --goodput
SLOs. Without --target it launches `tandem serve` itself for each mode (free ports, its
log in --log-dir), waits for it, and stops it before the next. --offline-baseline first
runs the in-process engine on the rate-inf prompts, for
`served_vs_offline_throughput_ratio`. Figures are defined in bench/serve_stats.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import multiprocessing
import shlex
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tandem.bench.serve_client import Prompt, RequestResult, client_job, make_prompts
from tandem.bench.serve_hops import HopLog, hop_figures
from tandem.bench.serve_offline import run_offline_baseline
from tandem.bench.serve_service import (
    DISAGGREGATED,
    LaunchedService,
    ServiceError,
    engine_argv,
    mode_argv,
    shares_one_gpu,
)
from tandem.bench.serve_stats import (
    PREFILL_COUNTERS,
    attainment_goodput,
    format_table,
    parse_slo_sets,
    parse_slos,
    prefix_figures,
    ratio,
    summarize_run,
)
from tandem.bench.serve_workloads import workload_prompts
from tandem.core import hop_trace
from tandem.core.config import WorkerConfig
from tandem.core.model_paths import local_model_dir, model_name
from tandem.engine.engine_args import add_engine_args

Dead = Callable[[], str | None]
CLIENT_START_LEAD_S = 1.0  # for every client process to be waiting before t0
CLIENT_BUSY_WARNING = 0.8
PREFILL_COUNT_SETTLE_S = 1.2  # a worker heartbeat (1 s) and a little


@dataclass(frozen=True)
class RateRun:
    label: str  # "4", "0.5", "inf": the key of the rate in the results
    prompts: list[Prompt]
    arrivals: list[float]
    ideal_hit_rate: float  # share of prompt tokens a perfect prefix cache would serve


def parse_rates(text: str) -> list[tuple[str, float]]:
    rates = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        rate = float(item)
        if not rate > 0:
            raise ValueError(f"--rates: {item!r} is not a positive rate")
        rates.append(("inf" if math.isinf(rate) else f"{rate:g}", rate))
    if not rates:
        raise ValueError("--rates is empty")
    return rates


def prompts_for(rate: float, args: argparse.Namespace) -> int:
    if math.isinf(rate) or args.duration <= 0:
        return args.num_prompts
    return min(args.num_prompts, max(args.min_prompts, math.ceil(rate * args.duration)))


def prompt_seed(args: argparse.Namespace, label: str) -> str:
    # Each rate gets its own prompts, so no rate is served from another's cached prefixes.
    return f"{args.prompt_seed}:{label}"


def model_vocab_size(model_dir: Path) -> int:
    """Ids valid for both the model's embedding table and the gateway's tokenizer."""
    config_path = model_dir / "config.json"
    if not config_path.exists():
        raise ValueError(
            f"no {config_path} to read the vocabulary size from: pass "
            "--vocab-size, or --model with a local checkpoint directory"
        )
    config = json.loads(config_path.read_text())
    vocab = int(config.get("text_config", config)["vocab_size"])
    if (model_dir / "tokenizer.json").exists():
        from tandem.core.tokenizer import Tokenizer

        vocab = min(vocab, Tokenizer(model_dir).vocab_size)
    return vocab


def _split_run(
    pool,
    target: str,
    prompts: list[Prompt],
    arrivals: list[float],
    args: argparse.Namespace,
    dead: Dead,
) -> tuple[list[RequestResult], float, float]:
    """Run one schedule over the client processes (request i on process i mod P, so the
    arrivals stay those of the schedule); give up at once if the service dies meanwhile.
    Returns the results, the seconds from t0 to the last completion, and the busiest
    client's CPU share."""
    n = args.client_processes
    caps = [args.max_concurrency // n + (i < args.max_concurrency % n) for i in range(n)]
    t0 = time.perf_counter() + CLIENT_START_LEAD_S
    jobs = [
        pool.apply_async(
            client_job,
            (
                args.backend,
                target,
                args.request_timeout,
                prompts[i::n],
                arrivals[i::n],
                caps[i],
                t0,
            ),
        )
        for i in range(n)
    ]
    while not all(job.ready() for job in jobs):
        if (why := dead()) is not None:
            raise ServiceError(f"the service died under load: {why}")
        time.sleep(0.2)
    parts = [job.get() for job in jobs]
    results = [r for part, _ in parts for r in part]
    duration = max((r.end for r in results), default=t0) - t0
    return results, duration, max(cpu for _, cpu in parts)


def _settled_counts(prefilled: Callable[[], dict[str, int]] | None) -> dict[str, int]:
    if prefilled is None:
        return {}
    time.sleep(PREFILL_COUNT_SETTLE_S)  # the workers' last heartbeat reaches the registry
    return prefilled()


def measure(
    target: str,
    runs: list[RateRun],
    args: argparse.Namespace,
    slos: dict[str, float],
    dead: Dead,
    mode: str,
    prefilled: Callable[[], dict[str, int]] | None = None,
    hop_log: HopLog | None = None,
) -> dict[str, dict]:
    """One row per rate. `prefilled`: the service's prompts prefilled per role so far;
    each row then says how that rate's prompts split between the roles. `hop_log`: the
    service's hop trace; each row then says where its time to first token went."""
    # Client processes are spawned, not forked: a forked gRPC runtime is not safe.
    with multiprocessing.get_context("spawn").Pool(args.client_processes) as pool:
        if args.warmup_prompts > 0:
            warm = make_prompts(
                args.warmup_prompts,
                args.input_len,
                min(args.output_len, 16),
                args.vocab_size,
                f"{args.prompt_seed}:warmup",
            )
            results, _, _ = _split_run(pool, target, warm, [0.0] * len(warm), args, dead)
            if errors := [r.error for r in results if r.error]:
                raise ServiceError(f"warm-up requests failed: {errors[0]}")
        rows = {}
        before = _settled_counts(prefilled)
        for run in runs:
            if hop_log is not None:
                hop_log.take()  # the warm-up's and earlier rates' lines
            results, duration, cpu = _split_run(pool, target, run.prompts, run.arrivals, args, dead)
            row = rows[run.label] = summarize_run(results, duration, slos, args.slo_set_limits)
            if hop_log is not None:
                row["hops_ms"] = hop_figures(hop_log.take())
            row["client_cpu_share"] = round(cpu, 2)
            row["ideal_hit_rate"] = round(run.ideal_hit_rate, 4)
            if prefilled is not None:
                after = _settled_counts(prefilled)
                row["prompts_prefilled_by_role"] = {
                    role: after[role] - before.get(role, 0)
                    for role in PREFILL_COUNTERS
                    if after[role]
                }
                row.update(prefix_figures(before, after, row["completed"]))
                before = after
            print(
                f"{mode} rate {run.label}: {row['completed']}/{row['num_prompts']} completed "
                f"in {row['duration_s']:.1f}s, {row['output_throughput']:.0f} output tok/s",
                flush=True,
            )
            if cpu > CLIENT_BUSY_WARNING:
                print(
                    f"  warning: a client process was busy {cpu:.0%} of the run: the client "
                    "may have set the pace; raise --client-processes",
                    flush=True,
                )
        return rows


@contextlib.contextmanager
def launched(
    mode: str, args: argparse.Namespace, log_dir: Path, hop_path: Path | None = None
) -> Iterator[LaunchedService]:
    on_gpu = args.device != "cpu"
    overrides = {}
    if shares_one_gpu(mode, args.gpus, on_gpu):
        overrides["gpu_memory_utilization"] = round(args.gpu_memory_utilization / 2, 3)
    local_prefill = (
        args.local_prefill_after_ms,
        args.max_local_prefills,
        args.local_prefill_tokens,
    )
    argv = [
        *engine_argv(args, add_engine_args, **overrides),
        *mode_argv(mode, args.gpus, on_gpu, local_prefill),
        *(["--kv-transport", args.kv_transport] if args.kv_transport else []),
        "--ready-timeout",
        str(args.ready_timeout),
        *shlex.split(args.serve_args),
    ]
    env = {hop_trace.ENV: str(hop_path)} if hop_path else {}
    service = LaunchedService(argv, log_dir / f"serve-{mode}.log", env)
    try:
        service.start(args.ready_timeout)
        yield service
    finally:
        service.stop()


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through `launched`, which stops the service


def run(args: argparse.Namespace) -> dict:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    local_prefill = (
        args.local_prefill_after_ms,
        args.max_local_prefills,
        args.local_prefill_tokens,
    )
    for mode in modes:  # unknown modes fail before anything starts
        mode_argv(mode, args.gpus, False, local_prefill)
    if "1p1d-local" in modes:  # the decode worker's own check, before anything starts
        WorkerConfig(
            redis_url="redis://",
            role="decode",
            local_prefill_after_ms=args.local_prefill_after_ms,
            max_local_prefills=args.max_local_prefills,
        )
    slos = parse_slos(args.goodput)
    args.slo_set_limits = parse_slo_sets(args.slo_sets)
    if not 0.0 < args.slo_attainment <= 1.0:
        raise ValueError("--slo-attainment must be in (0, 1]")
    rates = parse_rates(args.rates)
    if args.client_processes < 1:
        raise ValueError("--client-processes must be at least 1")
    if args.trace_hops and args.target is not None:
        raise ValueError("--trace-hops traces a service the bench launches, not --target")
    if 0 < args.max_concurrency < args.client_processes:
        raise ValueError(
            "--max-concurrency is split over client processes: give at least "
            "one request per process"
        )
    if args.target is None:
        from tandem.engine.checkpoint_resolver import resolve_model  # imports no torch

        model_dir = resolve_model(args.model)  # converts the bundled model once, here
    else:
        model_dir = local_model_dir(args.model)
        modes = ["target"]
    args.vocab_size = args.vocab_size or model_vocab_size(model_dir)
    runs = []
    for label, rate in rates:
        seed = prompt_seed(args, label)
        prompts, arrivals, ideal = workload_prompts(args, prompts_for(rate, args), rate, seed)
        runs.append(RateRun(label, prompts, arrivals, ideal))
    signal.signal(signal.SIGTERM, _raise_interrupt)
    metrics: dict = {"modes": {}}
    if args.offline_baseline:
        workload = [
            "--num-prompts",
            str(args.num_prompts),
            "--input-len",
            str(args.input_len),
            "--output-len",
            str(args.output_len),
            "--range-ratio",
            str(args.range_ratio),
            "--vocab-size",
            str(args.vocab_size),
            "--prompt-seed",
            prompt_seed(args, "inf"),
        ]
        metrics["offline"] = run_offline_baseline(
            engine_argv(args, add_engine_args),
            workload,
            "0" if args.device != "cpu" else None,
            args.ready_timeout + 3600,
        )
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="tandem-bench-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    for mode in modes:
        if args.target is not None:
            rows = measure(args.target, runs, args, slos, lambda: None, mode)
            metrics["modes"][mode] = {"rates": rows}
            continue
        hop_path = log_dir / f"hops-{mode}.log" if args.trace_hops else None
        with launched(mode, args, log_dir, hop_path) as service:
            target = service.grpc_target() if args.backend == "grpc" else service.http_target()
            hop_log = HopLog(hop_path) if hop_path else None
            rows = measure(
                target, runs, args, slos, service.dead, mode, service.prompts_prefilled, hop_log
            )
            metrics["modes"][mode] = {"startup_s": round(service.startup_s, 1), "rates": rows}
    _add_ratios(metrics, modes, args.gpus, slos)
    _add_attainment_ratios(metrics, modes, args)
    return _write(args, modes, rates, slos, metrics)


def _add_ratios(metrics: dict, modes: list[str], gpus: int, slos: dict[str, float]) -> None:
    offline = metrics.get("offline")
    for mode in modes:
        section = metrics["modes"][mode]
        served = section["rates"].get("inf")
        if offline and served:
            section["served_vs_offline_throughput_ratio"] = ratio(
                served["total_token_throughput"], offline["total_token_throughput"]
            )
    if offline:
        first = modes[0]
        metrics["served_vs_offline_mode"] = first
        metrics["served_vs_offline_throughput_ratio"] = metrics["modes"][first].get(
            "served_vs_offline_throughput_ratio"
        )
    disaggregated = [m for m in DISAGGREGATED if m in modes]
    if gpus != 2 or "colocated" not in modes or not disaggregated:
        return

    def best(rows: dict) -> float | None:
        values = [r["goodput"] for r in rows.values() if r["goodput"] is not None]
        return max(values, default=None)

    colo = metrics["modes"]["colocated"]["rates"]
    # The goodput: the highest request rate served with every request done and
    # p99 TTFT / TPOT within the SLOs (DistServe's definition, at p99).
    p99 = {
        mode: p99_goodput(metrics["modes"][mode]["rates"], slos)
        for mode in (*disaggregated, "colocated")
    }
    metrics["p99_slo_goodput"] = p99
    for mode in disaggregated:
        disagg = metrics["modes"][mode]["rates"]
        name = mode.replace("-", "_")
        metrics[f"goodput_ratio_{name}_vs_2_colocated"] = ratio(p99[mode], p99["colocated"])
        # vLLM's definition: requests/s that individually met the SLOs, best rate each.
        metrics[f"request_goodput_ratio_{name}_vs_2_colocated"] = ratio(best(disagg), best(colo))
        metrics[f"goodput_ratio_{name}_vs_2_colocated_by_rate"] = {
            label: ratio(disagg[label]["goodput"], colo[label]["goodput"]) for label in disagg
        }


def _add_attainment_ratios(metrics: dict, modes: list[str], args: argparse.Namespace) -> None:
    """Per SLO set: each mode's attainment goodput and, beside two colocated workers, each
    disaggregated mode's ratio and the best of them (`..._by_slo`)."""
    sets = args.slo_set_limits
    if not sets:
        return
    rows = {mode: metrics["modes"][mode]["rates"] for mode in modes}
    goodput = {
        name: {mode: attainment_goodput(rows[mode], name, args.slo_attainment) for mode in modes}
        for name in sets
    }
    metrics["attainment_goodput"] = goodput
    disaggregated = [m for m in DISAGGREGATED if m in modes]
    if args.gpus != 2 or "colocated" not in modes or not disaggregated:
        return
    for mode in disaggregated:
        key = f"goodput_ratio_{mode.replace('-', '_')}_vs_2_colocated_by_slo"
        metrics[key] = {name: ratio(g[mode], g["colocated"]) for name, g in goodput.items()}
    metrics["goodput_ratio_best_disaggregated_vs_2_colocated_by_slo"] = {
        name: ratio(max(g[m] for m in disaggregated), g["colocated"]) for name, g in goodput.items()
    }


def p99_goodput(rows: dict, slos: dict[str, float]) -> float | None:
    """Highest achieved req/s among rates where nothing failed and the p99 of each SLO'd
    latency is within its limit; 0.0 when no rate qualifies, None without SLOs."""
    if not slos:
        return None
    ok = [
        row["request_throughput"]
        for row in rows.values()
        if not row["failed"]
        and row["completed"]
        and all(
            (row.get(f"{key}_ms") or {}).get("p99", float("inf")) <= limit
            for key, limit in slos.items()
        )
    ]
    return max(ok, default=0.0)


def _write(
    args: argparse.Namespace,
    modes: list[str],
    rates: list[tuple[str, float]],
    slos: dict[str, float],
    metrics: dict,
) -> dict:
    from tandem.bench.results import write_result

    params = {
        "modes": modes,
        "gpus": args.gpus,
        "target": args.target,
        "backend": args.backend,
        "rates": [label for label, _ in rates],
        "num_prompts": {run: prompts_for(rate, args) for run, rate in rates},
        "input_len": args.input_len,
        "output_len": args.output_len,
        "range_ratio": args.range_ratio,
        "workload": args.workload,
        "shared_prefix_len": args.shared_prefix_len if args.workload == "shared-prefix" else None,
        "turns": args.turns if args.workload == "multi-turn" else None,
        "turn_gap_s": args.turn_gap if args.workload == "multi-turn" else None,
        "prefix_caching": args.prefix_caching,
        "prompt_seed": args.prompt_seed,
        "vocab_size": args.vocab_size,
        "max_concurrency": args.max_concurrency or None,
        "client_processes": args.client_processes,
        "kv_transport": args.kv_transport or "default",
        "slos_ms": slos,
        "slo_sets_ms": args.slo_set_limits,
        "slo_attainment": args.slo_attainment,
        "serve_args": args.serve_args,
        "load_format": args.load_format,
        "max_num_seqs": args.max_num_seqs,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "offline_baseline": args.offline_baseline,
        "warmup_prompts": args.warmup_prompts,
        # What mode 1p1d-local passed to its decode worker (None without that mode).
        "local_prefill_after_ms": args.local_prefill_after_ms if "1p1d-local" in modes else None,
        "max_local_prefills": args.max_local_prefills if "1p1d-local" in modes else None,
        "local_prefill_tokens": args.local_prefill_tokens if "1p1d-local" in modes else None,
        "max_prefill_tokens": args.max_prefill_tokens,
        "trace_hops": args.trace_hops,
    }
    card = None if args.target is None else "unknown: --target"
    write_result("serve", model_name(args.model), params, metrics, args.out_dir, card=card)
    print(
        format_table(
            [
                (mode, label, row)
                for mode in modes
                for label, row in metrics["modes"][mode]["rates"].items()
            ]
        )
    )
    for key in (
        "served_vs_offline_throughput_ratio",
        "goodput_ratio_1p1d_vs_2_colocated",
        "goodput_ratio_1p1d_local_vs_2_colocated",
        "goodput_ratio_best_disaggregated_vs_2_colocated_by_slo",
    ):
        if key in metrics:
            print(f"{key}: {metrics[key]}")
    return metrics
