#!/usr/bin/env bash
# flumen vs DuckDB on files, in one run, on the same machine and the same inputs:
#   (a) CSV -> Parquet of ROWS orders
#   (b) a join + GROUP BY over Parquet (orders x users)
# Prints wall times, ratios (peer time / flumen time: > 1 means flumen is faster) and peak RSS.
#
#   bash benches/e2e/files.sh            # 10M rows
#   ROWS=1M bash benches/e2e/files.sh
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-10M}"
DUCKDB_VERSION="${DUCKDB_VERSION:-2.0.0}"

command -v bc >/dev/null || { sudo_=""; [ "$(id -u)" -eq 0 ] || sudo_=sudo; $sudo_ apt-get install -y -qq bc >/dev/null; }
ensure_time
build_flumen
venv_with "duckdb==$DUCKDB_VERSION"

D="$BENCH_DIR/files-$ROWS"
mkdir -p "$D"
if [ ! -s "$D/orders.csv" ]; then
  echo "generating $ROWS orders and 1M users into $D"
  "$FLUMEN" gen orders --rows "$ROWS" --users 1M --format csv -o "$D/orders.csv" -q
  "$FLUMEN" gen orders --rows "$ROWS" --users 1M --format parquet -o "$D/orders.parquet" -q
  "$FLUMEN" gen users --rows 1M --format parquet -o "$D/users.parquet" -q
fi
echo "inputs: $(du -h "$D/orders.csv" | cut -f1) CSV, $(du -h "$D/orders.parquet" | cut -f1) Parquet; $(nproc) cores"

rm -f "$D"/out-*.parquet
echo "(a) CSV -> Parquet"
timed files_a_flumen "$FLUMEN" sql -q -e "COPY (SELECT * FROM '$D/orders.csv') TO '$D/out-flumen.parquet' STORED AS PARQUET"
timed files_a_duckdb "$PY" -c "import duckdb; duckdb.sql(\"COPY (SELECT * FROM read_csv('$D/orders.csv')) TO '$D/out-duckdb.parquet' (FORMAT parquet)\")"

Q="SELECT u.country, o.status, count(*) AS orders, sum(o.amount) AS revenue, count(DISTINCT o.user_id) AS buyers
   FROM '$D/orders.parquet' o JOIN '$D/users.parquet' u ON u.user_id = o.user_id
   WHERE u.is_active GROUP BY u.country, o.status ORDER BY revenue DESC"
echo "(b) join + GROUP BY over Parquet"
timed files_b_flumen "$FLUMEN" sql -q --format csv -e "$Q"
timed files_b_duckdb "$PY" -c "import duckdb; duckdb.sql(\"\"\"$Q\"\"\").write_csv('/dev/stdout')"

# The two engines must agree on the answer before their times mean anything.
if ! diff <(sort "$BENCH_DIR/files_b_flumen.out") <(sort "$BENCH_DIR/files_b_duckdb.out") >/dev/null; then
  echo "(b) results differ between flumen and duckdb" >&2
  exit 1
fi
echo "(b) both return the same $(($(wc -l < "$BENCH_DIR/files_b_flumen.out") - 1)) rows"
echo
echo "summary ($ROWS rows; ratio = duckdb time / flumen time)"
printf '  (a) CSV->Parquet   flumen %6ss  duckdb %6ss  ratio %s   flumen RSS %s MiB\n' \
  "$(secs files_a_flumen)" "$(secs files_a_duckdb)" "$(ratio files_a_flumen files_a_duckdb)" "$(rss files_a_flumen)"
printf '  (b) join+GROUP BY  flumen %6ss  duckdb %6ss  ratio %s   flumen RSS %s MiB\n' \
  "$(secs files_b_flumen)" "$(secs files_b_duckdb)" "$(ratio files_b_flumen files_b_duckdb)" "$(rss files_b_flumen)"
