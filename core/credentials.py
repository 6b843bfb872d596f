"""Secrets kept off command lines, where `ps` shows them to every user of the host.

The gateway's API key and a Redis URL (which may hold a password) are taken from, in
order: the flag itself (kept for compatibility), `--NAME-file` (the file's text, one
line), or the environment variable. `tandem serve` hands the API key to its gateway
through the environment.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

API_KEY_ENV = "TANDEM_API_KEY"
REDIS_URL_ENV = "TANDEM_REDIS_URL"


def add_secret_args(parser: argparse.ArgumentParser, name: str, env: str, help: str) -> None:
    """`--NAME VALUE` and `--NAME-file PATH`; unset, the variable `env` is read."""
    dest = name.replace("-", "_")
    parser.add_argument(
        f"--{name}", default=None, dest=dest, help=f"{help} (visible in ps: prefer the file "
        f"or {env})"
    )  # fmt: skip
    parser.add_argument(
        f"--{name}-file",
        type=Path,
        default=None,
        dest=f"{dest}_file",
        metavar="PATH",
        help=f"read --{name} from this file (its first line)",
    )


def secret_from_args(args: argparse.Namespace, name: str, env: str) -> str | None:
    """The value of `--NAME`, `--NAME-file` or `env`, in that order; None if none is set.
    ValueError when both flags are given or the file is empty or unreadable."""
    dest = name.replace("-", "_")
    value, path = getattr(args, dest, None), getattr(args, f"{dest}_file", None)
    if value and path:
        raise ValueError(f"give --{name} or --{name}-file, not both")
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise ValueError(f"--{name}-file {path}: {exc.strerror}") from None
        value = lines[0].strip() if lines else ""
        if not value:
            raise ValueError(f"--{name}-file {path} is empty")
        return value
    return value or os.environ.get(env) or None
