#!/usr/bin/env bash
# Installs and starts what the tests need, idempotently; binds to 127.0.0.1 only.
# Pids and logs go under one run folder: ${FLUMEN_SERVICES_DIR:-$HOME/.cache/flumen-services}.
#
# What runs today:
#   - an S3-compatible server (moto, PyPI `moto[server]`, pinned) on 127.0.0.1:5055 for the
#     s3:// object store tests; it is an independent reimplementation of the S3 API, not AWS;
#   - Python 3 for tests/services/http_server.py, which the HTTP tests start themselves;
#   - chdb (PyPI, the ClickHouse 26.9 engine in-process) in the run folder's venv, which
#     tests/services/chdb_read.py uses to read the Native files flumen's encoder writes.
# Connector issues add their servers here (PostgreSQL, MariaDB, Redis, ClickHouse, ...), each as
# a `start_<name>` function that skips what already answers.
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

VENV="$RUN_DIR/venv"

# pip_install PACKAGE==VERSION ...: into the run folder's venv, only when missing.
pip_install() {
  if [ ! -x "$VENV/bin/pip" ]; then
    python3 -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; apt_install python3-venv; python3 -m venv "$VENV"; }
  fi
  local need=()
  for spec in "$@"; do
    local name="${spec%%==*}" have
    have=$("$VENV/bin/pip" show "${name%%[*}" 2>/dev/null | sed -n 's/^Version: //p')
    [ "$have" = "${spec##*==}" ] || need+=("$spec")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  log "pip installing ${need[*]}"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${need[@]}"
}

# wait_for NAME CMD...: retries CMD for up to 30 s.
wait_for() {
  local name="$1"; shift
  for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$name did not come up; see $RUN_DIR/$name.log"
  return 1
}

S3_PORT="${FLUMEN_S3_PORT:-5055}"
start_s3() {
  if curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/"; then
    log "s3 (moto): already answering on 127.0.0.1:$S3_PORT"
    return 0
  fi
  pip_install "moto[server]==5.2.5"
  nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" > "$RUN_DIR/s3.log" 2>&1 &
  echo $! > "$RUN_DIR/s3.pid"
  wait_for s3 curl -sf "http://127.0.0.1:$S3_PORT/"
  log "s3 (moto): started on 127.0.0.1:$S3_PORT (pid $(cat "$RUN_DIR/s3.pid"))"
}

# The ClickHouse 26.9 engine in-process (PyPI chdb): reads Native files the encoder writes.
start_chdb() {
  pip_install "chdb==4.4.0"
  log "chdb: $("$VENV/bin/python" -c 'import chdb; print(chdb.query("SELECT version()", "CSV"))' | tr -d '\"')"
}

command -v curl >/dev/null 2>&1 || apt_install curl
start_python
start_s3
start_chdb
log "ready (run folder: $RUN_DIR)"
