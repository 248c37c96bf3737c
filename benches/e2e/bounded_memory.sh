#!/usr/bin/env bash
# The bounded-memory run: COPY of a ROWS-row CSV (default 100M) to Parquet with a GROUP BY over a
# high-cardinality key (USERS distinct user ids, default 50M), under --memory-limit LIMIT
# (default 1GiB). Prints wall time, peak RSS and the row counts it checked.
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-100M}"
USERS="${USERS:-50M}"
LIMIT="${LIMIT:-1GiB}"
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
ensure_time
build_flumen

D="$BENCH_DIR/bounded-$ROWS-$USERS"
mkdir -p "$D/spill"
if [ ! -s "$D/orders.csv" ]; then
  echo "generating $ROWS orders over $USERS users into $D"
  timed bounded_gen "$FLUMEN" gen orders --rows "$ROWS" --users "$USERS" --format csv -o "$D/orders.csv"
fi
echo "input: $(du -h "$D/orders.csv" | cut -f1) CSV; memory limit $LIMIT"
rm -rf "$D/user_totals"
timed bounded_copy "$FLUMEN" run "$(dirname "$0")/bounded_memory.sql" --memory-limit "$LIMIT" \
  --spill-dir "$D/spill" --set "IN=$D/orders.csv" --set "OUT=$D/user_totals" --progress-interval 30
"$FLUMEN" sql -q --format csv -e "SELECT count(*) AS user_rows, sum(orders) AS order_rows FROM '$D/user_totals/'" \
  | tee "$BENCH_DIR/bounded_check.out"
echo "summary: $ROWS rows, $(secs bounded_copy)s, peak RSS $(rss bounded_copy) MiB (limit $LIMIT)"
