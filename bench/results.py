"""Benchmark results as JSON files in bench/results/: figures plus everything needed to
reproduce them (card, commit, date, exact command)."""

from __future__ import annotations

import datetime as dt
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def card_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def git_commit() -> str:
    """The checkout's commit; on a machine that got the tree without .git, the one
    recorded in .bench_commit by whoever shipped it there."""
    recorded = Path(__file__).resolve().parent.parent / ".bench_commit"
    if recorded.exists():
        return recorded.read_text().strip()
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _program() -> list[str]:
    """How this run was invoked: `python -m tandem.bench ...` has bench/__main__.py as argv[0]."""
    if Path(sys.argv[0]).name == "__main__.py" and Path(sys.argv[0]).parent.name == "bench":
        return ["python", "-m", "tandem.bench"]
    return ["tandem"]


def write_result(
    benchmark: str,
    model: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    out_dir: Path | None = None,
    label: str | None = None,
    card: str | None = None,
) -> Path:
    """Write the record; `label` names the workload in the file name (default: the
    params' input_len x output_len); `card` overrides this machine's card (a remote
    service's run)."""
    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "benchmark": benchmark,
        "model": model,
        "card": card or card_name(),
        "commit": git_commit(),
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [*_program(), *sys.argv[1:]]),
        "params": params,
        "metrics": metrics,
    }
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    label = label or f"{params.get('input_len')}x{params.get('output_len')}"
    name = f"{benchmark}-{model}-{label}-{now.strftime('%Y%m%dT%H%M%S')}.json"
    path = out_dir / name
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return path
