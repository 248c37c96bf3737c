#!/usr/bin/env bash
# Installs and starts what the tests need, idempotently; binds to 127.0.0.1 only.
# Pids and logs go under one run folder: ${FLUMEN_SERVICES_DIR:-$HOME/.cache/flumen-services}.
#
# Today the tests need no database server: files, the GENERATE source and a Python HTTP file
# server (tests/services/http_server.py, started by the tests themselves) are enough. Connector
# issues add their servers here (PostgreSQL, MariaDB, Redis, ClickHouse, ...), each as a
# `start_<name>` function that skips what already answers.
set -euo pipefail

RUN_DIR="${FLUMEN_SERVICES_DIR:-$HOME/.cache/flumen-services}"
mkdir -p "$RUN_DIR"

log() { printf '[services] %s\n' "$*" >&2; }

apt_install() {
  # Installs Debian packages only when a command is missing.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

start_python() {
  command -v python3 >/dev/null 2>&1 || apt_install python3
  log "python3: $(python3 --version 2>&1)"
}

start_python
log "ready (run folder: $RUN_DIR)"
