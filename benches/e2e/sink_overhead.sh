#!/usr/bin/env bash
# What the sink machinery costs: the same 10M generated rows (a) COPY'd to uncompressed Parquet
# by DataFusion, (b) INSERTed through the sink machinery into the FAULTY test backend in
# accept-all mode, which writes each request as an uncompressed Parquet file. The difference is
# batching, fingerprints, the journal, metrics and the request pipeline. Both run the same SELECT.
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-10M}"
# Rows per request: each request becomes one Parquet file in the FAULTY backend, so small
# requests measure that backend's per-file cost more than the machinery.
BATCH_ROWS="${BATCH_ROWS:-500k}"
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
ensure_time
(cd "$ROOT" && cargo build --release --quiet --features test-backends)
D="$BENCH_DIR/sink-overhead"
rm -rf "$D"; mkdir -p "$D"
cat > "$D/copy.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '$ROWS');
COPY (SELECT order_id, user_id, arrow_cast(created_at, 'Timestamp(Nanosecond, None)') AS created_at, status, city,
  amount, quantity, discount, note FROM src) TO '$D/copy.parquet' STORED AS PARQUET OPTIONS ('compression' 'uncompressed');
SQL
cat > "$D/insert.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '$ROWS');
CREATE EXTERNAL TABLE sink (order_id BIGINT, user_id BIGINT, created_at TIMESTAMP, status VARCHAR, city VARCHAR,
  amount DECIMAL(18,2), quantity INT, discount DOUBLE, note VARCHAR)
  STORED AS FAULTY LOCATION '$D/sink' OPTIONS ('batch_rows' '$BATCH_ROWS', 'concurrency' '2');
INSERT INTO sink SELECT order_id, user_id, arrow_cast(created_at, 'Timestamp(Nanosecond, None)'), status, city,
  amount, quantity, discount, note FROM src;
SQL
# Alternate the two, RUNS times each, and compare medians: single runs on a shared 2-core
# machine vary by +-20%.
RUNS="${RUNS:-5}"
: > "$D/times"
for i in $(seq 1 "$RUNS"); do
  rm -rf "$D/sink"
  /usr/bin/time -f "insert %e %M" -a -o "$D/times" "$FLUMEN" run -q --state-dir "$D/state" "$D/insert.sql" >/dev/null
  /usr/bin/time -f "copy %e %M" -a -o "$D/times" "$FLUMEN" run -q --state-dir "$D/state" "$D/copy.sql" >/dev/null
done
median() { grep "^$1 " "$D/times" | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
rss() { grep "^$1 " "$D/times" | awk '{if ($3>m) m=$3} END {printf "%.0f", m/1024}'; }
c=$(median copy); s_=$(median insert)
n=$(echo "$ROWS" | sed 's/M$/000000/; s/k$/000/')
echo "copy   runs: $(grep '^copy ' "$D/times" | awk '{printf "%s ", $2}')"
echo "insert runs: $(grep '^insert ' "$D/times" | awk '{printf "%s ", $2}')"
printf 'summary (%s rows, median of %s): COPY to Parquet %.2fs (%.2fM rows/s, RSS %s MiB), INSERT INTO sink %.2fs (%.2fM rows/s, RSS %s MiB), machinery overhead %.1f%%\n' \
  "$ROWS" "$RUNS" "$c" "$(echo "$n / $c / 1000000" | bc -l)" "$(rss copy)" "$s_" "$(echo "$n / $s_ / 1000000" | bc -l)" "$(rss insert)" \
  "$(echo "($s_ / $c - 1) * 100" | bc -l)"
