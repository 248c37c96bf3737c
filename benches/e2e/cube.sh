#!/usr/bin/env bash
# Cubes and materialized views, in one run, on ROWS (default 10M) generated orders in Parquet:
# (a) the full cube over 3 dimensions (month, city, status) with sum, count, count(DISTINCT) and
#     avg, written as Parquet:
#       flumen   CREATE CUBE (GROUP BY CUBE with a grouping flag per dimension, into the warehouse)
#       duckdb   COPY (SELECT ... GROUP BY CUBE (...)) TO Parquet, the same measures and flags
# (b) a materialized view (sum/count/avg by city and status, watermark order_id) after 1% more
#     rows: REFRESH ... INCREMENTAL vs a full REFRESH, which must give the same rows.
# (c) the cube of (a) with OPTIONS ('watermark' 'order_id') (measures kept as mergeable states:
#     count(DISTINCT) as lists of values): its creation, then REFRESH CUBE ... INCREMENTAL after
#     the same 1% vs a full REFRESH CUBE, which must answer the same.
# Prints seconds, ratios and peak RSS; the row counts of (a) and the answers of (b) are checked.
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-10M}"
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
ensure_time
build_flumen
venv_with duckdb==2.0.0
D="$BENCH_DIR/cube"
rm -rf "$D"; mkdir -p "$D/orders"
count() { echo "$1" | awk '{n=$1; m=1; if (n ~ /[kK]$/) m=1000; if (n ~ /M$/) m=1000000; sub(/[kKM]$/, "", n); printf "%d", n*m}'; }
N=$(count "$ROWS")
NEW=$(( N / 100 ))
"$FLUMEN" gen orders --rows "$N" --users 1M --format parquet -o "$D/orders/part-0.parquet"
echo "== $N orders"

cat > "$D/cube.sql" <<SQL
CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '$D/orders/';
CREATE CUBE sales FROM orders
  DIMENSIONS (month => date_trunc('month', created_at), city, status)
  MEASURES (revenue => sum(amount), orders => count(*), buyers => count(DISTINCT user_id), avg_amount => avg(amount));
SQL
cat > "$D/duck.py" <<'PY'
import sys, duckdb
src, out = sys.argv[1], sys.argv[2]
con = duckdb.connect()
con.execute(f"""COPY (
  SELECT date_trunc('month', created_at) AS month, city, status,
         sum(amount) AS revenue, count(*) AS orders, count(DISTINCT user_id) AS buyers, avg(amount) AS avg_amount,
         grouping(date_trunc('month', created_at)) AS g_month, grouping(city) AS g_city, grouping(status) AS g_status
  FROM read_parquet('{src}/*.parquet')
  GROUP BY CUBE (date_trunc('month', created_at), city, status)) TO '{out}' (FORMAT parquet)""")
print(con.execute(f"SELECT count(*) FROM read_parquet('{out}')").fetchone()[0])
PY
timed cube_flumen "$FLUMEN" run -q --state-dir "$D/state" "$D/cube.sql"
timed cube_duckdb "$PY" "$D/duck.py" "$D/orders" "$D/duck.parquet"
got=$(sed -n 's/^cube sales created: \([0-9]*\) rows.*/\1/p' "$BENCH_DIR/cube_flumen.out")
want=$(cat "$BENCH_DIR/cube_duckdb.out")
[ "$got" = "$want" ] || { echo "flumen's cube has $got rows, duckdb's $want" >&2; exit 1; }
echo "  both cubes: $got rows"

cat > "$D/cube_inc.sql" <<SQL
CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '$D/orders/';
CREATE CUBE sales_inc FROM orders
  DIMENSIONS (month => date_trunc('month', created_at), city, status)
  MEASURES (revenue => sum(amount), orders => count(*), buyers => count(DISTINCT user_id), avg_amount => avg(amount))
  OPTIONS ('watermark' 'order_id');
SQL
timed cube_mergeable_create "$FLUMEN" run -q --state-dir "$D/state" "$D/cube_inc.sql"

cat > "$D/mv.sql" <<SQL
CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '$D/orders/';
CREATE MATERIALIZED VIEW by_city OPTIONS ('watermark' 'order_id') AS
  SELECT city, status, sum(amount) AS revenue, count(*) AS orders, avg(amount) AS avg_amount
  FROM orders GROUP BY city, status;
SQL
"$FLUMEN" run -q --state-dir "$D/state" "$D/mv.sql" > /dev/null
# 1% more orders, with ids past the last one.
cat > "$D/more.sql" <<SQL
CREATE EXTERNAL TABLE more STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '$NEW', 'seed' '43', 'users' '1000000');
COPY (SELECT order_id + $N AS order_id, user_id, created_at, status, city, amount, quantity, discount, note FROM more)
  TO '$D/orders/part-1.parquet' STORED AS PARQUET;
SQL
"$FLUMEN" run -q --state-dir "$D/scratch" "$D/more.sql" > /dev/null
echo "== $NEW new orders (1%)"
echo "REFRESH MATERIALIZED VIEW by_city INCREMENTAL;" > "$D/inc.sql"
echo "REFRESH MATERIALIZED VIEW by_city;" > "$D/full.sql"
Q="SELECT city, status, revenue, orders, round(avg_amount, 6) AS a FROM by_city ORDER BY city, status"
timed refresh_incremental "$FLUMEN" run -q --state-dir "$D/state" "$D/inc.sql"
"$FLUMEN" sql -q --state-dir "$D/state" --format csv -e "$Q" > "$D/inc.csv"
timed refresh_full "$FLUMEN" run -q --state-dir "$D/state" "$D/full.sql"
"$FLUMEN" sql -q --state-dir "$D/state" --format csv -e "$Q" > "$D/full.csv"
cmp -s "$D/inc.csv" "$D/full.csv" || { echo "incremental and full refresh differ" >&2; diff "$D/inc.csv" "$D/full.csv" | head >&2; exit 1; }
echo "  incremental and full refresh: the same $(($(wc -l < "$D/full.csv") - 1)) rows"

echo "REFRESH CUBE sales_inc INCREMENTAL;" > "$D/cinc.sql"
echo "REFRESH CUBE sales_inc;" > "$D/cfull.sql"
CQ="SELECT city, status, revenue, orders, buyers, round(avg_amount, 6) AS a FROM sales_inc ORDER BY city, status"
timed cube_refresh_incremental "$FLUMEN" run -q --state-dir "$D/state" "$D/cinc.sql"
"$FLUMEN" sql -q --state-dir "$D/state" --format csv -e "$CQ" > "$D/cinc.csv"
timed cube_refresh_full "$FLUMEN" run -q --state-dir "$D/state" "$D/cfull.sql"
"$FLUMEN" sql -q --state-dir "$D/state" --format csv -e "$CQ" > "$D/cfull.csv"
# Sums of many floats in another order may differ in the last digits: compare rounded.
round_csv() { awk -F, 'NR>1 {printf "%s,%s,%.2f,%s,%s,%.4f\n", $1, $2, $3, $4, $5, $6}' "$1"; }
cmp -s <(round_csv "$D/cinc.csv") <(round_csv "$D/cfull.csv") || { echo "incremental and full cube refresh differ" >&2; diff "$D/cinc.csv" "$D/cfull.csv" | head >&2; exit 1; }
echo "  incremental and full cube refresh: the same $(($(wc -l < "$D/cfull.csv") - 1)) (city, status) rows"

echo
printf '%-40s %10s %10s\n' "" "seconds" "RSS MiB"
for t in cube_flumen cube_duckdb refresh_incremental refresh_full cube_mergeable_create cube_refresh_incremental cube_refresh_full; do
  printf '%-40s %10s %10s\n' "$t" "$(secs $t)" "$(rss $t)"
done
echo
echo "full cube, 3 dimensions, $N rows: duckdb / flumen = $(ratio cube_flumen cube_duckdb)"
echo "refresh after 1% new rows: full / incremental = $(ratio refresh_incremental refresh_full)"
echo "cube with mergeable states: creation / plain cube = $(ratio cube_flumen cube_mergeable_create)"
echo "cube refresh after 1% new rows: full / incremental = $(ratio cube_refresh_incremental cube_refresh_full)"
