#!/usr/bin/env bash
# Redis and MongoDB writes and full reads: flumen against the Python clients users would script
# otherwise, in one run, on the servers tests/services/start.sh starts (Redis 7 on 127.0.0.1:6380,
# SecantusDB, a MongoDB-wire server written in Python, on 127.0.0.1:27018).
#   Redis writes:  flumen Parquet -> hashes 'order:{order_id}'  vs  redis-py pipelines of 1,000 HSETs
#   Redis reads:   flumen hashes -> Parquet                      vs  redis-py SCAN + pipelined HGETALL -> pyarrow -> Parquet
#   Mongo writes:  flumen Parquet -> collection                  vs  pymongo insert_many of 1,000
#   Mongo reads:   flumen collection -> Parquet                  vs  pymongo find -> pyarrow -> Parquet
#                  (one partition: SecantusDB scans the whole collection for each _id range)
# ROWS (default 1M) generated orders. Prints rows/s, ratios and peak RSS; checks every count.
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-1M}"
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
ensure_time
bash "$ROOT/tests/services/start.sh"
build_flumen
venv_with pyarrow==18.1.0 redis==5.2.1 pymongo==4.20.0
D="$BENCH_DIR/mongodb_redis"
rm -rf "$D"; mkdir -p "$D"
N=$(echo "$ROWS" | awk '{n=$1; m=1; if (n ~ /[kK]$/) m=1000; if (n ~ /M$/) m=1000000; sub(/[kKM]$/, "", n); printf "%d", n*m}')
REDIS_DB=9
RU="redis://:flumen-test@127.0.0.1:6380/$REDIS_DB"
MU="mongodb://127.0.0.1:27018/flumen_bench?directConnection=true"
rcli() { redis-cli -h 127.0.0.1 -p 6380 -a flumen-test --no-auth-warning -n "$REDIS_DB" "$@"; }
mpy() { "$PY" -c "import pymongo; db = pymongo.MongoClient('$MU').flumen_bench; $1"; }

echo "generating $ROWS orders"
"$FLUMEN" gen orders --rows "$ROWS" -o "$D/orders.parquet" -q

cat > "$D/peer.py" <<'PY'
import sys, pyarrow as pa, pyarrow.parquet as pq
what, path = sys.argv[1:3]
B = 1000
if what.startswith("redis"):
    import redis
    r = redis.Redis(host="127.0.0.1", port=6380, password="flumen-test", db=9)
    if what == "redis_write":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=B):
            p = r.pipeline(transaction=False)
            for row in batch.to_pylist():
                p.hset(f"py:{row['order_id']}", mapping={k: str(v) for k, v in row.items() if v is not None})
            p.execute()
    else:
        rows, keys = [], []
        def flush():
            p = r.pipeline(transaction=False)
            for k in keys:
                p.hgetall(k)
            for k, h in zip(keys, p.execute()):
                d = {f.decode(): v.decode() for f, v in h.items()}
                d["_key"] = k.decode()
                rows.append(d)
            keys.clear()
        for k in r.scan_iter(match="py:*", count=B, _type="hash"):
            keys.append(k)
            if len(keys) >= B:
                flush()
        flush()
        pq.write_table(pa.Table.from_pylist(rows), path)
else:
    import pymongo
    from bson import Decimal128
    from decimal import Decimal
    db = pymongo.MongoClient("mongodb://127.0.0.1:27018/?directConnection=true").flumen_bench
    if what == "mongo_write":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=B):
            docs = [{("_id" if k == "order_id" else k): (Decimal128(v) if isinstance(v, Decimal) else v)
                     for k, v in row.items() if v is not None} for row in batch.to_pylist()]
            db.p_orders.insert_many(docs, ordered=False)
    else:
        docs = list(db.p_orders.find({}, batch_size=B))
        for d in docs:
            d["amount"] = str(d["amount"].to_decimal()) if hasattr(d.get("amount"), "to_decimal") else d.get("amount")
        pq.write_table(pa.Table.from_pylist(docs), path)
PY

echo "== Redis"
rcli FLUSHDB >/dev/null
cat > "$D/redis_write.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS PARQUET LOCATION '$D/orders.parquet';
CREATE EXTERNAL TABLE r (order_id BIGINT, user_id BIGINT, created_at TIMESTAMP, status VARCHAR, city VARCHAR,
  amount DECIMAL(18, 2), quantity INT, discount DOUBLE, note VARCHAR)
  STORED AS REDIS LOCATION '$RU' OPTIONS ('key' 'order:{order_id}');
INSERT INTO r SELECT * FROM src;
SQL
timed redis_w_flumen "$FLUMEN" run -q --state-dir "$D/state" "$D/redis_write.sql"
[ "$(rcli DBSIZE)" = "$N" ] || { echo "redis holds $(rcli DBSIZE) keys, expected $N" >&2; exit 1; }
cat > "$D/redis_read.sql" <<SQL
CREATE EXTERNAL TABLE r (_key VARCHAR, order_id BIGINT, user_id BIGINT, created_at TIMESTAMP, status VARCHAR, city VARCHAR,
  amount DECIMAL(18, 2), quantity INT, discount DOUBLE, note VARCHAR)
  STORED AS REDIS LOCATION '$RU' OPTIONS ('key_pattern' 'order:*');
COPY (SELECT * FROM r) TO '$D/redis_flumen.parquet' STORED AS PARQUET;
SQL
timed redis_r_flumen "$FLUMEN" run -q --state-dir "$D/state" "$D/redis_read.sql"
rcli FLUSHDB >/dev/null
timed redis_w_python "$PY" "$D/peer.py" redis_write "$D/orders.parquet"
[ "$(rcli DBSIZE)" = "$N" ] || { echo "redis holds $(rcli DBSIZE) keys after redis-py, expected $N" >&2; exit 1; }
timed redis_r_python "$PY" "$D/peer.py" redis_read "$D/redis_py.parquet"
rcli FLUSHDB >/dev/null

echo "== MongoDB (SecantusDB)"
mpy "db.f_orders.drop(); db.p_orders.drop()"
cat > "$D/mongo_write.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS PARQUET LOCATION '$D/orders.parquet';
CREATE EXTERNAL TABLE m (_id BIGINT, user_id BIGINT, created_at TIMESTAMP(3) WITH TIME ZONE, status VARCHAR, city VARCHAR,
  amount DECIMAL(18, 2), quantity INT, discount DOUBLE, note VARCHAR)
  STORED AS MONGODB LOCATION '$MU' OPTIONS ('collection' 'f_orders');
INSERT INTO m SELECT * FROM src;
SQL
timed mongo_w_flumen "$FLUMEN" run -q --state-dir "$D/state" "$D/mongo_write.sql"
got=$(mpy "print(db.f_orders.count_documents({}))"); [ "$got" = "$N" ] || { echo "f_orders holds $got, expected $N" >&2; exit 1; }
cat > "$D/mongo_read.sql" <<SQL
CREATE EXTERNAL TABLE m STORED AS MONGODB LOCATION '$MU' OPTIONS ('collection' 'f_orders', 'partitions' '1');
COPY (SELECT * FROM m) TO '$D/mongo_flumen.parquet' STORED AS PARQUET;
SQL
timed mongo_r_flumen "$FLUMEN" run -q --state-dir "$D/state" "$D/mongo_read.sql"
timed mongo_w_python "$PY" "$D/peer.py" mongo_write "$D/orders.parquet"
got=$(mpy "print(db.p_orders.count_documents({}))"); [ "$got" = "$N" ] || { echo "p_orders holds $got, expected $N" >&2; exit 1; }
timed mongo_r_python "$PY" "$D/peer.py" mongo_read "$D/mongo_py.parquet"
mpy "db.f_orders.drop(); db.p_orders.drop()"

rate() { echo "$N / $(secs "$1")" | bc -l | xargs printf '%.0f'; }
echo
printf '%-40s %12s %12s %8s %14s\n' "" "flumen rows/s" "python rows/s" "ratio" "flumen RSS MiB"
for t in redis_w redis_r mongo_w mongo_r; do
  printf '%-40s %12s %12s %8s %14s\n' "$t" "$(rate ${t}_flumen)" "$(rate ${t}_python)" "$(ratio ${t}_flumen ${t}_python)" "$(rss ${t}_flumen)"
done
echo "targets: Redis >= 5x, MongoDB >= 3x (SecantusDB is a Python server: it is the limit for both clients)"
