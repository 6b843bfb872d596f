"""Subcommands that start one service role each: serve, gateway, prefill, decode."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_role_parsers(sub, add_engine_args: Callable[[argparse.ArgumentParser], None]) -> None:
    """Filled in as the roles land."""
