"""`tandem bench latency|throughput` measure the engine alone: a GPU box without the
gateway's gRPC stack (grpcio is only needed to serve) must still run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_engine_benches_need_no_grpc() -> None:
    code = (
        "import sys\n"
        "sys.modules['grpc'] = None  # any import of grpc now raises\n"
        "from tandem.cli import build_parser\n"
        "for bench in ('latency', 'throughput'):\n"
        "    args = build_parser().parse_args(['bench', bench, '--model', 'smollm2'])\n"
        "    assert callable(args.func)\n"
        "import tandem.bench.latency, tandem.bench.throughput\n"
        "print('ok')\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
