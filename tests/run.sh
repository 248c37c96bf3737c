#!/usr/bin/env bash
# Starts the servers the tests need, then runs every test: unit tests, the sqllogictest files,
# the CLI and integration tests, doc tests; then formatting and lint checks.
#
#   bash tests/run.sh                  everything
#   FLUMEN_SKIP_LINT=1 bash tests/run.sh   tests only
#
# The build goes to ${CARGO_TARGET_DIR:-$HOME/.cache/flumen-target}, outside the clone, so that
# a second run (or CI on the same machine) is incremental.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flumen-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust with rustup (https://rustup.rs) and run again" >&2
  exit 1
fi

bash tests/services/start.sh

start=$(date +%s)
# test-backends: the fault-injecting sink; cluster: Ballista scheduler/executor (tests/cluster.rs).
cargo test --no-fail-fast --features test-backends,cluster
echo "tests took $(( $(date +%s) - start ))s"

if [ "${FLUMEN_SKIP_LINT:-0}" != "1" ]; then
  cargo fmt --all -- --check
  cargo clippy --all-targets --features test-backends,cluster --quiet -- -D warnings
  cargo clippy --all-targets --quiet -- -D warnings
  echo "fmt and clippy clean"
fi
