#!/usr/bin/env bash
# Incremental load vs full reload: a MariaDB table of ROWS (default 10M) orders is loaded into
# PostgreSQL (upsert on order_id) by one script whose source is read incrementally on order_id.
#   (a) first run: everything is new (the watermark is empty);
#   (b) NEW (default 1% of ROWS) rows are added to the source; the same script reads only them;
#   (c) the same script with --full-refresh: every row read again and upserted.
# Prints each run's time and the rows its source query returned (flumen's `incremental` line),
# the ratios c/b (time) and b/c (rows read: ~1%), and checks the target's count after each run.
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-10M}"
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
ensure_time
bash "$ROOT/tests/services/start.sh"
build_flumen
D="$BENCH_DIR/incremental"
rm -rf "$D"; mkdir -p "$D"
count() { echo "$1" | awk '{n=$1; m=1; if (n ~ /[kK]$/) m=1000; if (n ~ /M$/) m=1000000; sub(/[kKM]$/, "", n); printf "%d", n*m}'; }
N=$(count "$ROWS"); NEW=$(count "${NEW:-$((N / 100))}")
export PGPASSWORD=flumen-test
pgq() { psql -h 127.0.0.1 -U flumen -d flumen -qtAc "$1"; }
myq() { mysql --protocol=tcp -h 127.0.0.1 -u flumen -pflumen-test -N -B flumen -e "$1"; }
COLS="order_id BIGINT PRIMARY KEY, user_id BIGINT, created_at DATETIME(6), status VARCHAR(20), city VARCHAR(40), amount DECIMAL(18, 2), quantity INT, discount DOUBLE PRECISION, note TEXT"

echo "generating $ROWS orders and loading them into MariaDB"
"$FLUMEN" gen orders --rows "$ROWS" -o "$D/orders.parquet" -q
myq "DROP TABLE IF EXISTS inc_bench; CREATE TABLE inc_bench ($COLS) CHARACTER SET utf8mb4"
cat > "$D/seed.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS PARQUET LOCATION '$D/orders.parquet';
CREATE EXTERNAL TABLE dst STORED AS MYSQL LOCATION 'mysql://flumen:flumen-test@127.0.0.1:3306/flumen'
  OPTIONS ('table' 'inc_bench', 'create' 'never', 'batch_rows' '200k', 'concurrency' '2');
INSERT INTO dst SELECT * FROM src;
SQL
"$FLUMEN" run -q --state-dir "$D/seed-state" "$D/seed.sql" >/dev/null
pgq "DROP TABLE IF EXISTS inc_bench_dst; CREATE TABLE inc_bench_dst (${COLS//DATETIME(6)/TIMESTAMP})"
cat > "$D/job.sql" <<SQL
CREATE EXTERNAL TABLE orders STORED AS MYSQL LOCATION 'mysql://flumen:flumen-test@127.0.0.1:3306/flumen'
  OPTIONS ('table' 'inc_bench', 'incremental_column' 'order_id', 'partition_on' 'order_id', 'partitions' '2');
CREATE EXTERNAL TABLE dst STORED AS POSTGRES LOCATION 'postgres://flumen:flumen-test@127.0.0.1:5432/flumen'
  OPTIONS ('table' 'inc_bench_dst', 'mode' 'upsert', 'keys' 'order_id', 'batch_rows' '200k');
INSERT INTO dst SELECT * FROM orders;
SQL
read_rows() { grep -o 'incremental orders.order_id -> dst: [0-9]* rows' "$BENCH_DIR/$1.out" | awk '{print $5}'; }
check() { local got; got=$(pgq "SELECT count(*) FROM inc_bench_dst")
  [ "$got" = "$1" ] || { echo "the target has $got rows, expected $1" >&2; exit 1; }; }

echo "== (a) first run: the whole table"
timed inc_a_first "$FLUMEN" run -q --state-dir "$D/state" "$D/job.sql"
check "$N"
echo "== (b) $NEW new rows, incremental run"
myq "INSERT INTO inc_bench SELECT order_id + $N, user_id, created_at, status, city, amount, quantity, discount, note
     FROM inc_bench WHERE order_id <= $NEW"
timed inc_b_incremental "$FLUMEN" run -q --state-dir "$D/state" "$D/job.sql"
check "$((N + NEW))"
echo "== (c) full reload (--full-refresh)"
timed inc_c_full "$FLUMEN" run -q --full-refresh --state-dir "$D/state" "$D/job.sql"
check "$((N + NEW))"

ra=$(read_rows inc_a_first); rb=$(read_rows inc_b_incremental); rc=$(read_rows inc_c_full)
echo
printf '  %-44s %10s s %12s rows read\n' "(a) first run" "$(secs inc_a_first)" "$ra" \
  "(b) incremental run, $NEW new rows" "$(secs inc_b_incremental)" "$rb" \
  "(c) full reload" "$(secs inc_c_full)" "$rc"
echo "  ratios: time c/b $(ratio inc_b_incremental inc_c_full), rows read b/c $(echo "$rb / $rc" | bc -l | xargs printf '%.4f') (target ~0.01)"
echo "  flumen peak RSS: incremental $(rss inc_b_incremental) MiB, full $(rss inc_c_full) MiB"
