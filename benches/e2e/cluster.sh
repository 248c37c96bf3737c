#!/usr/bin/env bash
# The cost of running on a cluster: ROWS generated orders as Parquet -> GROUP BY user_id ->
# Parquet, once in one flumen process and once on a Ballista cluster of one scheduler and two
# executors (2 slots each) on this same machine. Same cores, so no speed-up is expected: the
# ratio is the overhead (planning on the scheduler, task hand-off, shuffle files between the
# stages). Prints both times, the ratio and peak RSS, and checks both wrote the same rows.
# The cluster run uses --partitions 4, the cluster's 4 slots (the default is the client's
# cores, 2, which Ballista would hand to one executor as one task); the local run the default.
#
#   bash benches/e2e/cluster.sh            # 10M rows
#   ROWS=1M RUNS=5 bash benches/e2e/cluster.sh   # medians of RUNS alternating runs (default 3)
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-10M}"
RUNS="${RUNS:-3}"

command -v bc >/dev/null || { sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_=sudo; $sudo_ apt-get install -y -qq bc >/dev/null; }
ensure_time
(cd "$ROOT" && cargo build --release --quiet --features cluster)

D="$BENCH_DIR/cluster-$ROWS"
mkdir -p "$D/orders"
if [ ! -s "$D/orders/part-3.parquet" ]; then
  echo "generating $ROWS orders (4 files) into $D/orders"
  quarter=$(python3 -c "import sys; s=sys.argv[1].upper(); m={'K':10**3,'M':10**6,'B':10**9}; print(int(float(s[:-1])*m[s[-1]]) // 4 if s[-1] in m else int(s) // 4)" "$ROWS")
  for i in 0 1 2 3; do
    "$FLUMEN" gen orders --rows "$quarter" --users 1M --seed $((i + 1)) -o "$D/orders/part-$i.parquet" -q
  done
fi
echo "input: $(du -sh "$D/orders" | cut -f1) Parquet in 4 files; $(nproc) cores"

script() {
  cat > "$D/$1.sql" <<SQL
CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '$D/orders/';
COPY (SELECT user_id, count(*) AS orders, sum(amount) AS amount, max(created_at) AS last_order
      FROM orders GROUP BY user_id)
  TO '$D/out-$1/' STORED AS PARQUET;
SQL
}
script local
script cluster

# The cluster: a scheduler and two executors on free ports, stopped on exit.
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SP=$(port)
"$FLUMEN" cluster scheduler --bind "127.0.0.1:$SP" > "$D/scheduler.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$SP") 2>/dev/null && break; sleep 0.1; done
for i in 0 1; do
  "$FLUMEN" cluster executor --scheduler "127.0.0.1:$SP" --slots 2 \
    --bind "127.0.0.1:$(port)" --grpc-port "$(port)" --work-dir "$D/executor-$i" > "$D/executor-$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 300); do [ "$(grep -c egister "$D/scheduler.log")" -ge 2 ] && break; sleep 0.1; done
[ "$(grep -c egister "$D/scheduler.log")" -ge 2 ] || { echo "the executors did not register" >&2; cat "$D"/*.log >&2; exit 1; }

echo "Parquet -> GROUP BY user_id -> Parquet, $RUNS alternating runs each"
for r in $(seq "$RUNS"); do
  rm -rf "$D/out-local" "$D/out-cluster"
  timed "cluster_local_$r" "$FLUMEN" run "$D/local.sql" --state-dir "$D/state"
  timed "cluster_remote_$r" "$FLUMEN" run "$D/cluster.sql" --state-dir "$D/state" --cluster "df://127.0.0.1:$SP" --partitions 4
done
# The median of the runs' seconds (and that run's RSS) as NAME.secs / NAME.rss.
median() {
  local name="$1" best
  best=$(for r in $(seq "$RUNS"); do echo "$(cat "$BENCH_DIR/${name}_$r.secs") $r"; done | sort -n | sed -n "$(( (RUNS + 1) / 2 ))p" | cut -d' ' -f2)
  cp "$BENCH_DIR/${name}_$best.secs" "$BENCH_DIR/$name.secs"
  cp "$BENCH_DIR/${name}_$best.rss" "$BENCH_DIR/$name.rss"
}
median cluster_local
median cluster_remote

check() { "$FLUMEN" sql -q --format csv -e "SELECT count(*), sum(orders), sum(amount), sum(user_id) FROM '$D/out-$1/'" | tail -1; }
a=$(check local); b=$(check cluster)
[ "$a" = "$b" ] || { echo "the two runs wrote different rows: local $a, cluster $b" >&2; exit 1; }
echo "both wrote the same rows: count, sum(orders), sum(amount), sum(user_id) = $a"
echo
echo "summary ($ROWS rows in 4 files, medians of $RUNS; ratio = cluster time / local time, the overhead)"
printf '  local    %6ss  peak RSS %s MiB\n' "$(cat "$BENCH_DIR/cluster_local.secs")" "$(cat "$BENCH_DIR/cluster_local.rss")"
printf '  cluster  %6ss  client peak RSS %s MiB (1 scheduler + 2 executors x 2 slots)\n' \
  "$(cat "$BENCH_DIR/cluster_remote.secs")" "$(cat "$BENCH_DIR/cluster_remote.rss")"
hwm() { awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo "?"; }
printf '  peak RSS of the scheduler %s MiB, executors %s and %s MiB\n' "$(hwm "${pids[0]}")" "$(hwm "${pids[1]}")" "$(hwm "${pids[2]}")"
printf '  ratio    %s\n' "$(echo "$(cat "$BENCH_DIR/cluster_remote.secs") / $(cat "$BENCH_DIR/cluster_local.secs")" | bc -l | xargs printf '%.2f')"
