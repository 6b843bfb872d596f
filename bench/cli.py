"""`tandem bench latency|throughput`: argument parsing and dispatch."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

# Where results go (bench.results writes there too); defined here to keep torch unloaded.
RESULTS_DIR = Path(__file__).parent / "results"


def add_bench_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None],
                     engine_config_from_args: Callable) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    bench = sub.add_parser("bench", help="benchmarks; results go to bench/results/",
                           formatter_class=fmt)
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    helps = {"latency": "one batch timed step by step, beside the hardware ceiling",
             "throughput": "offline: every request at t=0, optionally beside transformers"}
    for name, add_arguments in (("latency", _latency_args), ("throughput", _throughput_args)):
        p = kinds.add_parser(name, help=helps[name], formatter_class=fmt)
        add_engine_args(p)
        add_arguments(p)
        p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)

        def handler(args, name=name) -> int:
            # Imported here: building the CLI must not load torch (the gateway uses it).
            import importlib

            from engine.engine import Engine

            module = importlib.import_module(f"bench.{name}")
            module.run(args, Engine(engine_config_from_args(args)))
            return 0

        p.set_defaults(func=handler)


def _latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--e2e-batch-size", type=int, default=8)
    p.add_argument("--e2e-input-len", type=int, default=32)
    p.add_argument("--e2e-output-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)


def _throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--uniform", action="store_true",
                   help="input and output lengths uniform in [--min-len, --max-len] (seed 0)")
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--peer", choices=["none", "hf"], default="none")
    p.add_argument("--peer-batch-sizes", default="64,128,256",
                   help="transformers batch sizes to try; the best one is reported")
    p.add_argument("--peer-requests", type=int, default=256,
                   help="requests of the workload run through transformers")
