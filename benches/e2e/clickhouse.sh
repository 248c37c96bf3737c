#!/usr/bin/env bash
# Loading ClickHouse: flumen against the ways users load it otherwise, in one run, each into a
# fresh MergeTree table of the same schema on the server tests/services/start.sh starts
# (ClickHouse 18.16 on 127.0.0.1:8123 HTTP / 9000 native TCP):
#   (a) flumen: Parquet file -> ClickHouse (Native over HTTP, the sink machinery);
#   (b) curl --data-binary @file.native 'INSERT ... FORMAT Native' (the server's own limit: the
#       file is the server's own Native dump of table (a), so nothing is encoded);
#   (c) clickhouse-client 'INSERT ... FORMAT CSV' from the server's own CSV dump;
#   (d) Python as the seed scripts do it: pandas.read_parquet -> to_dict('records') ->
#       clickhouse-driver execute('INSERT ... VALUES', rows) in batches of 100k;
#   (e) clickhouse-driver with the rows already built as tuples in memory (Python's best case;
#       only the inserts are timed).
# ROWS (default 10M) rows for a, b, c; PY_ROWS (default 1M) for d and e, which hold every row
# as Python objects (10M dicts would need ~10 GiB): their rates are compared, not their times.
# Prints rows/s, the ratios a/b, a/c, a/d, a/e and flumen's peak RSS, and checks every table
# has all its rows. Then reads the table back: flumen into Parquet (1 query, 2 key ranges)
# against the server's own Native dump to /dev/null.
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-10M}"
PY_ROWS="${PY_ROWS:-1M}"
CH="${CH_URL:-http://127.0.0.1:8123/}"
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
ensure_time
bash "$ROOT/tests/services/start.sh"
build_flumen
venv_with pandas==2.2.3 pyarrow==18.1.0 clickhouse-driver==0.2.9
D="$BENCH_DIR/clickhouse"
rm -rf "$D"; mkdir -p "$D"

count() { # "10M" -> 10000000
  echo "$1" | awk '{n=$1; m=1; if (n ~ /[kK]$/) m=1000; if (n ~ /M$/) m=1000000; sub(/[kKM]$/, "", n); printf "%d", n*m}'
}
N=$(count "$ROWS"); PN=$(count "$PY_ROWS")

q() { curl -sS --fail-with-body "$CH" --data-binary "$1"; }
q "CREATE DATABASE IF NOT EXISTS flumen_bench"
fresh() { # fresh TABLE: the same schema each time
  q "DROP TABLE IF EXISTS flumen_bench.$1"
  q "CREATE TABLE flumen_bench.$1 (order_id Int64, user_id Int64, created_at DateTime('UTC'), status String,
     city String, amount Decimal(18, 2), quantity Int32, discount Nullable(Float64), note Nullable(String))
     ENGINE = MergeTree ORDER BY order_id"
}
rows_in() { q "SELECT count() FROM flumen_bench.$1" | tr -d '\n'; }
check() { # check TABLE EXPECTED
  local got; got=$(rows_in "$1")
  [ "$got" = "$2" ] || { echo "table $1 has $got rows, expected $2" >&2; exit 1; }
}

echo "generating $ROWS orders (Parquet) and $PY_ROWS for the Python runs"
"$FLUMEN" gen orders --rows "$ROWS" -o "$D/orders.parquet" -q
"$FLUMEN" gen orders --rows "$PY_ROWS" -o "$D/orders_py.parquet" -q

cat > "$D/load.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS PARQUET LOCATION '$D/orders.parquet';
CREATE EXTERNAL TABLE dst STORED AS CLICKHOUSE LOCATION '${CH%/}/flumen_bench'
  OPTIONS ('table' 'a_flumen', 'batch_rows' '${BATCH_ROWS:-500k}', 'concurrency' '${CONCURRENCY:-2}',
           'compression' '${COMPRESSION:-none}');
INSERT INTO dst SELECT * FROM src;
SQL

# a, b and c alternate RUNS times (default 3) and their medians are compared: single runs on
# a shared 2-core machine, where the server takes most of the CPU, vary by +-10%.
RUNS="${RUNS:-3}"
median_of() { # median_of NAME: the median of NAME_1..NAME_RUNS, saved as NAME
  for i in $(seq 1 "$RUNS"); do secs "${1}_$i"; echo; done | sort -n | awk '{a[NR]=$1} END {printf "%s", a[int((NR+1)/2)]}' > "$BENCH_DIR/$1.secs"
  for i in $(seq 1 "$RUNS"); do rss "${1}_$i"; echo; done | sort -n | tail -1 | tr -d '\n' > "$BENCH_DIR/$1.rss"
}
echo "loading $ROWS rows each way, $RUNS times"
for i in $(seq 1 "$RUNS"); do
  fresh a_flumen
  timed "a_flumen_$i" "$FLUMEN" run -q --state-dir "$D/state" "$D/load.sql"
  check a_flumen "$N"
  if [ "$i" = 1 ]; then
    # The server's own encodings of the same rows, for (b) and (c); not timed.
    q "SELECT * FROM flumen_bench.a_flumen FORMAT Native" > "$D/orders.native"
    q "SELECT * FROM flumen_bench.a_flumen FORMAT CSV" > "$D/orders.csv"
  fi
  fresh b_curl
  timed "b_curl_native_$i" curl -sS --fail-with-body --data-binary @"$D/orders.native" \
    "$CH?query=INSERT%20INTO%20flumen_bench.b_curl%20FORMAT%20Native"
  check b_curl "$N"
  fresh c_client
  timed "c_client_csv_$i" sh -c "clickhouse-client --query 'INSERT INTO flumen_bench.c_client FORMAT CSV' < '$D/orders.csv'"
  check c_client "$N"
done
for name in a_flumen b_curl_native c_client_csv; do median_of "$name"; done

cat > "$D/py_load.py" <<'PY'
import sys, time
import pandas as pd
from clickhouse_driver import Client

mode, path, table = sys.argv[1], sys.argv[2], sys.argv[3]
client = Client("127.0.0.1", port=9000)
insert = f"INSERT INTO flumen_bench.{table} (order_id, user_id, created_at, status, city, amount, quantity, discount, note) VALUES"
if mode == "dicts":
    t0 = time.perf_counter()
    rows = pd.read_parquet(path).to_dict("records")
    for i in range(0, len(rows), 100_000):
        client.execute(insert, rows[i:i + 100_000])
else:
    df = pd.read_parquet(path)
    rows = list(df.itertuples(index=False, name=None))
    t0 = time.perf_counter()
    for i in range(0, len(rows), 100_000):
        client.execute(insert, rows[i:i + 100_000])
print(f"{time.perf_counter() - t0:.2f}")
PY
fresh d_pandas
timed d_pandas_dicts "$PY" "$D/py_load.py" dicts "$D/orders_py.parquet" d_pandas
check d_pandas "$PN"
fresh e_tuples
timed e_driver_tuples "$PY" "$D/py_load.py" tuples "$D/orders_py.parquet" e_tuples
check e_tuples "$PN"
# (e) counts only its inserts: the time the script printed.
cp "$BENCH_DIR/e_driver_tuples.out" "$BENCH_DIR/e_driver_tuples.secs"

# Reading back: the server's own Native dump to /dev/null (its limit) against flumen reading the
# table into a Parquet file, in one query and in 2 key ranges.
timed r_curl_native sh -c "curl -sS --fail-with-body '$CH' --data-binary 'SELECT * FROM flumen_bench.a_flumen FORMAT Native' > /dev/null"
for parts in 1 2; do
  cat > "$D/read$parts.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS CLICKHOUSE LOCATION '${CH%/}/flumen_bench'
  OPTIONS ('table' 'a_flumen', 'partition_on' 'order_id', 'partitions' '$parts');
COPY (SELECT * FROM src) TO '$D/read$parts.parquet' STORED AS PARQUET;
SQL
  timed "r_flumen_${parts}_range" "$FLUMEN" run -q --state-dir "$D/state" "$D/read$parts.sql"
done

rate() { echo "$2 / $(secs "$1")" | bc -l | xargs printf '%.0f'; }
ra=$(rate a_flumen "$N"); rb=$(rate b_curl_native "$N"); rc=$(rate c_client_csv "$N")
rd=$(rate d_pandas_dicts "$PN"); re=$(rate e_driver_tuples "$PN")
r() { echo "$1 / $2" | bc -l | xargs printf '%.2f'; }
echo
printf '%-52s %12s\n' "way" "rows/s"
printf '%-52s %12s\n' "(a) flumen Parquet -> ClickHouse" "$ra"
printf '%-52s %12s\n' "(b) curl Native file (server's limit)" "$rb"
printf '%-52s %12s\n' "(c) clickhouse-client CSV" "$rc"
printf '%-52s %12s\n' "(d) pandas to_dict + clickhouse-driver" "$rd"
printf '%-52s %12s\n' "(e) clickhouse-driver, tuples in memory" "$re"
echo
echo "a/b $(r "$ra" "$rb") (target >= 0.9)   a/c $(r "$ra" "$rc") (>= 1.3)   a/d $(r "$ra" "$rd") (>= 20)   a/e $(r "$ra" "$re") (>= 2.5)"
echo "medians of $RUNS runs for a, b, c; flumen peak RSS $(rss a_flumen) MiB (target < 1024)"
echo
printf '%-52s %12s\n' "read back" "rows/s"
printf '%-52s %12s\n' "curl Native to /dev/null (server's limit)" "$(rate r_curl_native "$N")"
printf '%-52s %12s\n' "flumen ClickHouse -> Parquet, 1 query" "$(rate r_flumen_1_range "$N")"
printf '%-52s %12s\n' "flumen ClickHouse -> Parquet, 2 key ranges" "$(rate r_flumen_2_range "$N")"
echo "flumen read peak RSS $(rss r_flumen_2_range) MiB"
