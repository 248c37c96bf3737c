# Shared by the end-to-end benchmarks: paths, the release binary, a Python venv for peers,
# and timing with peak RSS.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flumen-target}"
BENCH_DIR="${FLUMEN_BENCH_DIR:-$HOME/.cache/flumen-bench}"
mkdir -p "$BENCH_DIR"
FLUMEN="$CARGO_TARGET_DIR/release/flumen"

build_flumen() {
  (cd "$ROOT" && cargo build --release --quiet)
}

# A venv with pinned peer tools: venv_with PACKAGE==VERSION ...
venv_with() {
  local venv="$BENCH_DIR/venv"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
  PY="$venv/bin/python"
}

ensure_time() {
  [ -x /usr/bin/time ] && return 0
  local sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq time >/dev/null
}

# timed NAME CMD...: runs CMD, records wall seconds and peak RSS (MiB) in $BENCH_DIR/NAME.{secs,rss}
timed() {
  local name="$1"; shift
  local log="$BENCH_DIR/$name.time"
  local t0 t1
  t0=$(date +%s.%N)
  /usr/bin/time -v -o "$log" "$@" > "$BENCH_DIR/$name.out" 2> "$BENCH_DIR/$name.err" || {
    echo "$name failed:" >&2; tail -20 "$BENCH_DIR/$name.err" >&2; return 1; }
  t1=$(date +%s.%N)
  echo "$t1 - $t0" | bc -l | xargs printf '%.2f' > "$BENCH_DIR/$name.secs"
  awk '/Maximum resident set size/ {printf "%.0f", $NF/1024}' "$log" > "$BENCH_DIR/$name.rss"
  printf '  %-34s %8s s   peak RSS %6s MiB\n' "$name" "$(cat "$BENCH_DIR/$name.secs")" "$(cat "$BENCH_DIR/$name.rss")"
}

secs() { cat "$BENCH_DIR/$1.secs"; }
rss() { cat "$BENCH_DIR/$1.rss"; }
ratio() { echo "$(secs "$2") / $(secs "$1")" | bc -l | xargs printf '%.2f'; }
