"""`tandem bench latency|throughput`: argument parsing and dispatch."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from bench import latency, throughput
from bench.results import RESULTS_DIR


def add_bench_parser(sub, add_engine_args: Callable[[argparse.ArgumentParser], None],
                     engine_config_from_args: Callable) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    bench = sub.add_parser("bench", help="benchmarks; results go to bench/results/",
                           formatter_class=fmt)
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    for name, module in (("latency", latency), ("throughput", throughput)):
        p = kinds.add_parser(name, help=module.__doc__.splitlines()[0], formatter_class=fmt)
        add_engine_args(p)
        module.add_arguments(p)
        p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)

        def handler(args, module=module) -> int:
            from engine.engine import Engine

            module.run(args, Engine(engine_config_from_args(args)))
            return 0

        p.set_defaults(func=handler)
