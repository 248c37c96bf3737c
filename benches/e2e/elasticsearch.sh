#!/usr/bin/env bash
# Bulk-indexing speed of the client, against a local endpoint that reads each request whole and
# answers a valid all-success bulk response (benches/e2e/bulk_endpoint.py): the search server
# the tests use indexes ~1-3k docs/s, far below any client. Same endpoint, same rows (generated
# orders as Parquet), same bulk size (5,000 documents per request):
#   (a) flumen: Parquet -> ELASTICSEARCH table (bulk NDJSON from Arrow columns);
#   (b) Python elasticsearch helpers.bulk over pandas.read_parquet(...).to_dict('records');
#   (c) the same with helpers.parallel_bulk (2 threads).
# ROWS (default 10M) for flumen, PY_ROWS (default 1M) for Python; rates are compared.
# Prints docs/s, MB/s of bulk bodies, the ratios and flumen's peak RSS. Target: a/b >= 10.
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-10M}"
PY_ROWS="${PY_ROWS:-1M}"
PORT="${BULK_PORT:-9299}"
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
ensure_time
build_flumen
venv_with pandas==2.2.3 pyarrow==18.1.0 "elasticsearch==8.15.1"
D="$BENCH_DIR/elasticsearch"
rm -rf "$D"; mkdir -p "$D"

"$PY" "$ROOT/benches/e2e/bulk_endpoint.py" "$PORT" > "$D/endpoint.log" 2>&1 &
ENDPOINT=$!
trap 'kill $ENDPOINT 2>/dev/null' EXIT
for _ in $(seq 1 50); do grep -q ready "$D/endpoint.log" 2>/dev/null && break; sleep 0.1; done
stats() { curl -s "http://127.0.0.1:$PORT/_stats"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])['$1'])" "$2"; }

echo "generating $ROWS orders (Parquet) and $PY_ROWS for the Python runs"
"$FLUMEN" gen orders --rows "$ROWS" -o "$D/orders.parquet" -q
"$FLUMEN" gen orders --rows "$PY_ROWS" -o "$D/orders_py.parquet" -q

cat > "$D/load.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS PARQUET LOCATION '$D/orders.parquet';
CREATE EXTERNAL TABLE dst (order_id BIGINT NOT NULL, user_id BIGINT, created_at TIMESTAMP, status VARCHAR, city VARCHAR,
  amount DECIMAL(18, 2), quantity INT, discount DOUBLE, note VARCHAR)
  STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:$PORT'
  OPTIONS ('index' 'bench', 'id_column' 'order_id', 'create_index' 'never', 'batch_rows' '5000',
           'concurrency' '${CONCURRENCY:-4}');
INSERT INTO dst SELECT * FROM src;
SQL

cat > "$D/py_bulk.py" <<'PY'
import sys, time
import pandas as pd
from elasticsearch import Elasticsearch, helpers

mode, path, port = sys.argv[1], sys.argv[2], sys.argv[3]
es = Elasticsearch(f"http://127.0.0.1:{port}", request_timeout=60)
t0 = time.perf_counter()
rows = pd.read_parquet(path).to_dict("records")
actions = ({"_index": "bench", "_id": r["order_id"], "_source": r} for r in rows)
if mode == "bulk":
    ok, _ = helpers.bulk(es, actions, chunk_size=5000, stats_only=True)
else:
    ok = sum(1 for good, _ in helpers.parallel_bulk(es, actions, chunk_size=5000, thread_count=2) if good)
print(f"{time.perf_counter() - t0:.2f} {ok}")
PY

before=$(stats)
timed a_flumen "$FLUMEN" run -q --state-dir "$D/state" "$D/load.sql"
after=$(stats)
a_docs=$(( $(field docs "$after") - $(field docs "$before") ))
a_bytes=$(( $(field bytes "$after") - $(field bytes "$before") ))
before=$after
timed b_helpers_bulk "$PY" "$D/py_bulk.py" bulk "$D/orders_py.parquet" "$PORT"
after=$(stats)
b_docs=$(( $(field docs "$after") - $(field docs "$before") ))
b_bytes=$(( $(field bytes "$after") - $(field bytes "$before") ))
before=$after
timed c_parallel_bulk "$PY" "$D/py_bulk.py" parallel "$D/orders_py.parquet" "$PORT"
after=$(stats)
c_docs=$(( $(field docs "$after") - $(field docs "$before") ))
c_bytes=$(( $(field bytes "$after") - $(field bytes "$before") ))

rate() { echo "$2 / $(secs "$1")" | bc -l | xargs printf '%.0f'; }
mbs() { echo "$2 / $(secs "$1") / 1048576" | bc -l | xargs printf '%.1f'; }
ra=$(rate a_flumen "$a_docs"); rb=$(rate b_helpers_bulk "$b_docs"); rc=$(rate c_parallel_bulk "$c_docs")
echo
printf '%-48s %10s %12s %8s\n' "way" "docs" "docs/s" "MB/s"
printf '%-48s %10s %12s %8s\n' "(a) flumen Parquet -> bulk" "$a_docs" "$ra" "$(mbs a_flumen "$a_bytes")"
printf '%-48s %10s %12s %8s\n' "(b) pandas + helpers.bulk" "$b_docs" "$rb" "$(mbs b_helpers_bulk "$b_bytes")"
printf '%-48s %10s %12s %8s\n' "(c) pandas + helpers.parallel_bulk (2 threads)" "$c_docs" "$rc" "$(mbs c_parallel_bulk "$c_bytes")"
echo
echo "a/b $(echo "$ra / $rb" | bc -l | xargs printf '%.1f') (target >= 10)   a/c $(echo "$ra / $rc" | bc -l | xargs printf '%.1f')"
echo "flumen peak RSS $(rss a_flumen) MiB"
