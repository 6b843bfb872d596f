"""The distribution adds one top-level package, `tandem`, and the role folders at the
repository root shadow nothing: run from the root, bare names like `kernels` resolve to
other distributions (transformers imports Hugging Face's `kernels`)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROLE_FOLDERS = ("core", "engine", "kernels", "kvtransfer", "prefill", "decode", "gateway", "bench")


def test_role_folders_are_no_regular_packages_at_the_root() -> None:
    """From the repository root (first on sys.path, as for `python -c` or `-m`), no bare
    folder name finds a regular package of ours; an installed one wins over the folder."""
    code = (
        "import importlib.util, json, sys\n"
        f"names = {list(ROLE_FOLDERS)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    spec = importlib.util.find_spec(n)\n"
        "    out[n] = None if spec is None else spec.origin\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    for name, origin in json.loads(res.stdout).items():
        # None: not importable, or a namespace portion, which any regular package beats.
        assert origin is None or not Path(origin).is_relative_to(REPO / name), (name, origin)
        assert not (REPO / name / "__init__.py").exists(), name


def test_hugging_face_kernels_wins_from_the_repository_root() -> None:
    pytest.importorskip("kernels", reason="Hugging Face's kernels is not installed here")
    res = subprocess.run(
        [sys.executable, "-c", "import kernels, transformers; print(kernels.__file__)"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert not Path(res.stdout.strip()).is_relative_to(REPO / "kernels"), res.stdout


def test_every_role_imports_as_a_tandem_subpackage() -> None:
    code = "; ".join(f"import tandem.{n}" for n in ROLE_FOLDERS)
    code += "; import tandem.kernels.gemv, tandem.kvtransfer.transport, tandem.gateway.config"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr


def test_the_wheel_installs_exactly_one_top_level_package(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    (wheel,) = tmp_path.glob("tandem-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"tandem"}, tops
    # The linked folders travel as real files, package data included.
    for path in (
        "tandem/kernels/gemv.py",
        "tandem/gateway/tandem.proto",
        "tandem/gateway/proto/tandem_pb2.py",
        "tandem/engine/configs/llama-3.1-8b.json",
        "tandem/bench/__main__.py",
    ):
        assert path in names, path
    assert not any(n.startswith("tandem/bench/results/") for n in names)


def test_the_design_document_lives_in_the_repository() -> None:
    design = REPO / "docs" / "DESIGN.md"
    assert design.is_file()
    readme = (REPO / "README.md").read_text()
    assert "docs/DESIGN.md" in readme and "shared/DESIGN" not in readme
