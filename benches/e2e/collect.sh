#!/usr/bin/env bash
# Collecting third-party data, in one run:
# (a) RECORDS (default 1M) records from flumen-test-api (1,000 per page, page pagination, 8
#     requests in flight) into Parquet:
#   flumen            STORED AS HTTP, 'concurrency' '8' -> COPY ... TO Parquet
#   requests+pandas   requests.Session per thread, ThreadPoolExecutor(8), pandas DataFrame -> Parquet
#   aiohttp           one ClientSession, 8 requests in flight (semaphore), pyarrow -> Parquet
# (b) MESSAGES (default 1M) JSON messages in a 3-partition topic on the Tansu broker
#     (tests/services/start.sh) into Parquet:
#   flumen            STORED AS KAFKA -> COPY ... TO Parquet (offsets committed after)
#   confluent_kafka   Consumer.consume(10,000) until every partition's EOF, json.loads, pyarrow ->
#                     Parquet, commit
# Every output's row count is checked. Prints records/s, ratios and peak RSS.
source "$(dirname "$0")/common.sh"
RECORDS="${RECORDS:-1M}"
MESSAGES="${MESSAGES:-1M}"
PER_PAGE=1000
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
ensure_time
bash "$ROOT/tests/services/start.sh"
# One build gives both flumen and the API server (a test binary, feature test-backends).
(cd "$ROOT" && cargo build --release --quiet --features test-backends --bins)
venv_with pyarrow==18.1.0 pandas==2.2.3 requests==2.32.3 aiohttp==3.11.11 confluent-kafka==2.12.1
D="$BENCH_DIR/collect"
rm -rf "$D"; mkdir -p "$D"
count() { echo "$1" | awk '{n=$1; m=1; if (n ~ /[kK]$/) m=1000; if (n ~ /M$/) m=1000000; sub(/[kKM]$/, "", n); printf "%d", n*m}'; }
N=$(count "$RECORDS")
M=$(count "$MESSAGES")
PAGES=$(( (N + PER_PAGE - 1) / PER_PAGE ))

"$CARGO_TARGET_DIR/release/flumen-test-api" > "$D/api.out" &
API_PID=$!
trap 'kill $API_PID 2>/dev/null || true' EXIT
for _ in $(seq 50); do grep -q listening "$D/api.out" 2>/dev/null && break; sleep 0.1; done
BASE="http://$(sed -n 's/^listening on //p' "$D/api.out")"
URL="$BASE/items?style=page&total=$N&per_page=$PER_PAGE"

cat > "$D/peer.py" <<'PY'
import sys, json, threading
what, url, pages, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if what == "requests":
    import requests, pandas as pd
    from concurrent.futures import ThreadPoolExecutor
    local = threading.local()
    def page(k):
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        r = s.get(url, params={"page": k})
        r.raise_for_status()
        return r.json()["data"]["items"]
    records = []
    with ThreadPoolExecutor(8) as ex:
        for items in ex.map(page, range(1, pages + 1)):
            records.extend(items)
    df = pd.DataFrame.from_records(records)
    df["created_at"] = pd.to_datetime(df["created_at"])
    df.to_parquet(out, index=False)
else:
    import asyncio, aiohttp, pyarrow as pa, pyarrow.parquet as pq
    async def main():
        sem = asyncio.Semaphore(8)
        async with aiohttp.ClientSession() as s:
            async def page(k):
                async with sem:
                    async with s.get(url, params={"page": str(k)}) as r:
                        r.raise_for_status()
                        return (await r.json())["data"]["items"]
            return await asyncio.gather(*(page(k) for k in range(1, pages + 1)))
    records = [r for items in asyncio.run(main()) for r in items]
    pq.write_table(pa.Table.from_pylist(records), out)
PY

cat > "$D/http.sql" <<SQL
CREATE EXTERNAL TABLE items (id BIGINT, name VARCHAR, price DOUBLE, category VARCHAR, active BOOLEAN, created_at TIMESTAMP)
  STORED AS HTTP LOCATION '$BASE/items'
  OPTIONS ('records' '/data/items', 'pagination' 'page', 'page_size' '$PER_PAGE', 'concurrency' '8',
           'params' 'style=page&total=$N');
COPY items TO '$D/flumen.parquet' STORED AS PARQUET;
SQL
echo "== $N records, $PAGES pages of $PER_PAGE"
timed http_flumen "$FLUMEN" run -q --state-dir "$D/state" "$D/http.sql"
timed http_requests "$PY" "$D/peer.py" requests "$URL" "$PAGES" "$D/requests.parquet"
timed http_aiohttp "$PY" "$D/peer.py" aiohttp "$URL" "$PAGES" "$D/aiohttp.parquet"
for f in flumen requests aiohttp; do
  got=$("$PY" -c "import pyarrow.parquet as pq; print(pq.ParquetFile('$D/$f.parquet').metadata.num_rows)")
  [ "$got" = "$N" ] || { echo "$f wrote $got records, expected $N" >&2; exit 1; }
done

cat > "$D/kafka_peer.py" <<'PY'
import sys, json
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
what, topic = sys.argv[1], sys.argv[2]
conf = {"bootstrap.servers": "127.0.0.1:9092"}
if what == "produce":
    n = int(sys.argv[3])
    admin = AdminClient(conf)
    admin.create_topics([NewTopic(topic, 3, 1)])[topic].result()
    p = Producer({**conf, "linger.ms": 20})
    failed = []
    cb = lambda err, msg: err and failed.append(err)
    cats = ["books", "games", "tools"]
    for i in range(n):
        v = json.dumps({"id": i, "user_id": i % 9973, "kind": cats[i % 3], "amount": (i % 1000) / 4, "ts": 1767225600000 + i})
        while True:
            try:
                p.produce(topic, key=str(i), value=v, on_delivery=cb)
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    p.flush(120)
    assert not failed, failed[:3]
else:
    import pyarrow as pa, pyarrow.parquet as pq
    out = sys.argv[3]
    c = Consumer({**conf, "group.id": sys.argv[4], "enable.auto.commit": False,
                  "enable.partition.eof": True, "auto.offset.reset": "earliest"})
    md = c.list_topics(topic, timeout=20).topics[topic]
    c.assign([TopicPartition(topic, p) for p in md.partitions])
    eof, rows = set(), []
    while len(eof) < len(md.partitions):
        for m in c.consume(10000, timeout=5):
            if m.error():
                eof.add(m.partition())
            else:
                rows.append(json.loads(m.value()))
    pq.write_table(pa.Table.from_pylist(rows), out)
    c.commit(asynchronous=False)
PY
TOPIC="bench_events_$(date +%s)"
echo "== $M Kafka messages (3 partitions) into topic $TOPIC"
"$PY" "$D/kafka_peer.py" produce "$TOPIC" "$M"
cat > "$D/kafka.sql" <<SQL
CREATE EXTERNAL TABLE events (id BIGINT, user_id BIGINT, kind VARCHAR, amount DOUBLE, ts BIGINT,
                              _partition INT, _offset BIGINT)
  STORED AS KAFKA LOCATION 'kafka://127.0.0.1:9092/$TOPIC' OPTIONS ('group_id' 'flumen-bench');
COPY events TO '$D/kafka_flumen.parquet' STORED AS PARQUET;
SQL
timed kafka_flumen "$FLUMEN" run -q --state-dir "$D/state" "$D/kafka.sql"
timed kafka_python "$PY" "$D/kafka_peer.py" consume "$TOPIC" "$D/kafka_python.parquet" python-bench
for f in kafka_flumen kafka_python; do
  got=$("$PY" -c "import pyarrow.parquet as pq; print(pq.ParquetFile('$D/$f.parquet').metadata.num_rows)")
  [ "$got" = "$M" ] || { echo "$f wrote $got messages, expected $M" >&2; exit 1; }
done

rate() { echo "$2 / $(secs "$1")" | bc -l | xargs printf '%.0f'; }
echo
printf '%-28s %12s %10s %10s\n' "" "records/s" "vs flumen" "RSS MiB"
for t in http_flumen http_requests http_aiohttp; do
  printf '%-28s %12s %10s %10s\n' "$t" "$(rate $t "$N")" "$(ratio http_flumen $t)" "$(rss $t)"
done
for t in kafka_flumen kafka_python; do
  printf '%-28s %12s %10s %10s\n' "$t" "$(rate $t "$M")" "$(ratio kafka_flumen $t)" "$(rss $t)"
done
echo "targets: flumen >= 5x the Python peers in both"
