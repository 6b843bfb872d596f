#!/usr/bin/env bash
# CI step after the main test command: the compose deployment for real
# (tests/compose/test_compose_stack.py, marker `compose`). Builds the images offline
# (compose/offline_build.py; the base image and the wheelhouse are cached under
# /var/cache/tandem-compose), runs the stack on CPU and tears it down.
#
# Where no Docker engine answers, this starts one when it can (root, with Debian's
# docker.io, debootstrap and docker-compose installed by apt-get if missing) and stops it
# at the end. Where none can be started, the test skips, and says so loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
started_at=$(date +%s)
say() { echo "compose-test: $*" >&2; }
dockerd_pid=""
cleanup() {
  if [ -n "$dockerd_pid" ]; then
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
  fi
  say "took $(( $(date +%s) - started_at )) s"
}
trap cleanup EXIT

# A docker client that builds with BuildKit: one with buildx, or one from before 23.0
# (BuildKit built in). A newer client without buildx cannot build the images.
pick_docker() {
  local c v
  for c in $(type -ap docker); do
    if "$c" buildx version >/dev/null 2>&1; then echo "$c"; return 0; fi
    v=$("$c" version --format '{{.Client.Version}}' 2>/dev/null || true)
    case "$v" in 1[89].*|2[0-2].*) echo "$c"; return 0 ;; esac
  done
  return 1
}

install_tools() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v docker-compose >/dev/null || missing+=(docker-compose)
  pick_docker >/dev/null || missing+=(docker.io)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    say "cannot install ${missing[*]} (needs root and apt-get)"
    return 0
  fi
  say "installing ${missing[*]}"
  apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    "${missing[@]}" >/dev/null || say "apt-get install ${missing[*]} failed"
}

engine_answers() { timeout 20 "$DOCKER" info >/dev/null 2>&1; }

start_engine() {
  engine_answers && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v dockerd >/dev/null; then
    say "no Docker engine answers and none can be started here (not root, or no dockerd)"
    return 0
  fi
  local opts
  for opts in "" "--iptables=false"; do
    say "starting dockerd $opts (log: /var/log/tandem-compose-dockerd.log)"
    # shellcheck disable=SC2086
    dockerd $opts >>/var/log/tandem-compose-dockerd.log 2>&1 &
    dockerd_pid=$!
    for _ in $(seq 60); do
      engine_answers && return 0
      kill -0 "$dockerd_pid" 2>/dev/null || break
      sleep 1
    done
    kill "$dockerd_pid" 2>/dev/null || true
    wait "$dockerd_pid" 2>/dev/null || true
    dockerd_pid=""
  done
  say "dockerd did not start; see /var/log/tandem-compose-dockerd.log"
}

install_tools
DOCKER=$(pick_docker || echo docker)
export DOCKER
start_engine
engine_answers || say "WARNING: NO DOCKER ENGINE: the compose stack test will be SKIPPED"
.venv/bin/python -m pytest -m compose tests/compose/test_compose_stack.py -ra --durations=0
