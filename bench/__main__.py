"""`python -m tandem.bench latency|throughput|transfer ...`: the same as `tandem bench ...`,
without the service roles' imports (grpc, redis), for machines that only run the engine."""

from __future__ import annotations

import argparse
import logging
import sys

from tandem.bench.cli import add_bench_parser


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.bench")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    add_bench_parser(sub)
    args = parser.parse_args(
        ["bench", *sys.argv[1:]] if sys.argv[1:2] != ["bench"] else sys.argv[1:]
    )
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args) or 0
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"python -m tandem.bench {args.benchmark}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
