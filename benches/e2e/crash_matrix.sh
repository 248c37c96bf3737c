#!/usr/bin/env bash
# The whole crash matrix (tests/crash.rs): every sink × mode × create × transaction × fault
# against the real servers, each case's target checked with the server's own client after the
# recovery the output names. CI runs a fixed third of the cases; this runs all of them, with a
# new base seed each time (printed; FLUMEN_CRASH_BASE=N repeats a run, and a failing case prints
# the FLUMEN_CRASH_SEED that reruns it alone).
#
#   bash benches/e2e/crash_matrix.sh                  every case (about 25 minutes here)
#   FLUMEN_CRASH_FILTER=mysql bash benches/e2e/crash_matrix.sh   the cases whose name holds it
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flumen-target}"
bash tests/services/start.sh
if [ -z "${FLUMEN_CRASH_FILTER:-}" ]; then export FLUMEN_CRASH_ALL=1; fi
start=$(date +%s)
cargo test --features test-backends,cluster --test crash
echo "crash matrix took $(( $(date +%s) - start ))s"
