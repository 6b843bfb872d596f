"""Where a `--model` value's files live, shared by the gateway (tokenizer, limits) and
the engine (weights). Pure path logic: conversion and loading live in engine/."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tandem" / "models"


def is_model_path(model: str) -> bool:
    return os.sep in model or Path(model).expanduser().is_dir()


def model_name(model: str) -> str:
    """A short stable name for registry entries and Redis streams."""
    return Path(model).expanduser().name if is_model_path(model) else model


def local_model_dir(model: str, cache_dir: Path | None = None) -> Path:
    """The directory holding config.json (and tokenizer, weights) for `model`: the path
    itself, or the cache entry the engine fills for a named model."""
    if is_model_path(model):
        return Path(model).expanduser()
    return (cache_dir or default_cache_dir()) / model
