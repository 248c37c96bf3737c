#!/usr/bin/env bash
# PostgreSQL and MySQL (MariaDB) reads and writes: flumen against the tools users pick
# otherwise, in one run, on the servers tests/services/start.sh starts.
#   reads  (a) flumen: table -> Parquet (ConnectorX inside, 2 key ranges);
#          (b) Python ConnectorX read_sql(return_type="arrow", 2 partitions) + pyarrow.parquet;
#          (c) pandas.read_sql via SQLAlchemy + to_parquet (the seed scripts' way);
#   writes (d) flumen: Parquet -> table (binary COPY / LOAD DATA LOCAL INFILE);
#          (e) psql \copy / mysql LOAD DATA LOCAL INFILE from a CSV file (the server's own bulk path);
#          (f) pandas to_sql(method='multi', chunksize=1000).
# ROWS (default 10M) rows for a, b, d, e; PY_ROWS (default 1M) for c and f, whose pandas frames
# hold every row as Python objects: their rates are compared, not their times.
# Prints rows/s, the ratios a/b, a/c, d/e, d/f and flumen's peak RSS; checks every table's count.
source "$(dirname "$0")/common.sh"
ROWS="${ROWS:-10M}"
PY_ROWS="${PY_ROWS:-1M}"
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
ensure_time
bash "$ROOT/tests/services/start.sh"
build_flumen
venv_with pandas==2.2.3 pyarrow==18.1.0 connectorx==0.4.6 SQLAlchemy==2.0.36 psycopg2-binary==2.9.10 PyMySQL==1.1.1
D="$BENCH_DIR/sql"
rm -rf "$D"; mkdir -p "$D"
count() { echo "$1" | awk '{n=$1; m=1; if (n ~ /[kK]$/) m=1000; if (n ~ /M$/) m=1000000; sub(/[kKM]$/, "", n); printf "%d", n*m}'; }
N=$(count "$ROWS"); PN=$(count "$PY_ROWS")
export PGPASSWORD=flumen-test
PGU="postgres://flumen:flumen-test@127.0.0.1:5432/flumen"
MYU="mysql://flumen:flumen-test@127.0.0.1:3306/flumen"
pgq() { psql -h 127.0.0.1 -U flumen -d flumen -qtAc "$1"; }
myq() { mysql --local-infile=1 --protocol=tcp -h 127.0.0.1 -u flumen -pflumen-test -N -B flumen -e "$1"; }
COLS="order_id BIGINT PRIMARY KEY, user_id BIGINT, created_at TIMESTAMP, status VARCHAR(20), city VARCHAR(40), amount DECIMAL(18, 2), quantity INT, discount DOUBLE PRECISION, note TEXT"
fresh() { # fresh DB TABLE
  case "$1" in
    pg) pgq "DROP TABLE IF EXISTS $2; CREATE TABLE $2 ($COLS)" ;;
    my) myq "DROP TABLE IF EXISTS $2; CREATE TABLE $2 (${COLS//TIMESTAMP/DATETIME(6)}) CHARACTER SET utf8mb4" ;;
  esac
}
check() { # check DB TABLE EXPECTED
  local got; if [ "$1" = pg ]; then got=$(pgq "SELECT count(*) FROM $2"); else got=$(myq "SELECT count(*) FROM $2"); fi
  [ "$got" = "$3" ] || { echo "$1 table $2 has $got rows, expected $3" >&2; exit 1; }
}

echo "generating $ROWS orders (Parquet, CSV) and $PY_ROWS for the Python runs"
"$FLUMEN" gen orders --rows "$ROWS" -o "$D/orders.parquet" -q
"$FLUMEN" gen orders --rows "$ROWS" --format csv -o "$D/orders.csv" -q
"$FLUMEN" gen orders --rows "$PY_ROWS" -o "$D/orders_py.parquet" -q

cat > "$D/py.py" <<'PY'
import sys, time
import pandas as pd, pyarrow.parquet as pq, connectorx as cx
from sqlalchemy import create_engine
what, url, table, path = sys.argv[1:5]
sa = url.replace("postgres://", "postgresql+psycopg2://").replace("mysql://", "mysql+pymysql://")
if what == "cx":
    t = cx.read_sql(url, f"SELECT * FROM {table}", return_type="arrow", partition_on="order_id", partition_num=2)
    pq.write_table(t, path)
elif what == "pandas_read":
    pd.read_sql(f"SELECT * FROM {table}", create_engine(sa)).to_parquet(path)
elif what == "pandas_write":
    df = pd.read_parquet(path)
    t0 = time.perf_counter()
    df.to_sql(table, create_engine(sa), if_exists="append", index=False, method="multi", chunksize=1000)
    print(f"{time.perf_counter() - t0:.2f}")
PY

for db in pg my; do
  url=$([ $db = pg ] && echo "$PGU" || echo "$MYU")
  kind=$([ $db = pg ] && echo POSTGRES || echo MYSQL)
  echo "== $kind: writes"
  fresh $db d_flumen
  cat > "$D/write_$db.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS PARQUET LOCATION '$D/orders.parquet';
CREATE EXTERNAL TABLE dst STORED AS $kind LOCATION '$url'
  OPTIONS ('table' 'd_flumen', 'create' 'never', 'batch_rows' '${BATCH_ROWS:-200k}', 'concurrency' '${CONCURRENCY:-2}');
INSERT INTO dst SELECT * FROM src;
SQL
  timed "${db}_d_flumen" "$FLUMEN" run -q --state-dir "$D/state" "$D/write_$db.sql"
  check $db d_flumen "$N"
  fresh $db e_native
  if [ $db = pg ]; then
    timed pg_e_copy psql -h 127.0.0.1 -U flumen -d flumen -qc "\\copy e_native FROM '$D/orders.csv' CSV HEADER"
  else
    timed my_e_copy mysql --local-infile=1 --protocol=tcp -h 127.0.0.1 -u flumen -pflumen-test flumen -e \
      "LOAD DATA LOCAL INFILE '$D/orders.csv' INTO TABLE e_native FIELDS TERMINATED BY ',' OPTIONALLY ENCLOSED BY '\"' IGNORE 1 LINES
       (order_id, user_id, @ts, status, city, amount, quantity, @disc, @note)
       SET created_at = REPLACE(@ts, 'T', ' '), discount = NULLIF(@disc, ''), note = NULLIF(@note, '')"
  fi
  check $db e_native "$N"
  fresh $db f_pandas
  timed "${db}_f_pandas" "$PY" "$D/py.py" pandas_write "$url" f_pandas "$D/orders_py.parquet"
  check $db f_pandas "$PN"
  cp "$BENCH_DIR/${db}_f_pandas.out" "$BENCH_DIR/${db}_f_pandas.secs"

  echo "== $kind: reads"
  cat > "$D/read_$db.sql" <<SQL
CREATE EXTERNAL TABLE src STORED AS $kind LOCATION '$url' OPTIONS ('table' 'd_flumen', 'partition_on' 'order_id', 'partitions' '2');
COPY (SELECT * FROM src) TO '$D/read_$db.parquet' STORED AS PARQUET;
SQL
  timed "${db}_a_flumen" "$FLUMEN" run -q --state-dir "$D/state" "$D/read_$db.sql"
  timed "${db}_b_connectorx" "$PY" "$D/py.py" cx "$url" d_flumen "$D/cx_$db.parquet"
  timed "${db}_c_pandas" "$PY" "$D/py.py" pandas_read "$url" f_pandas "$D/pd_$db.parquet"
done

rate() { echo "$2 / $(secs "$1")" | bc -l | xargs printf '%.0f'; }
r() { echo "$1 / $2" | bc -l | xargs printf '%.2f'; }
echo
for db in pg my; do
  native=$([ $db = pg ] && echo pg_e_copy || echo my_e_copy)
  ra=$(rate ${db}_a_flumen "$N"); rb=$(rate ${db}_b_connectorx "$N"); rc=$(rate ${db}_c_pandas "$PN")
  rd=$(rate ${db}_d_flumen "$N"); re=$(rate $native "$N"); rf=$(rate ${db}_f_pandas "$PN")
  echo "$([ $db = pg ] && echo PostgreSQL || echo MariaDB)"
  printf '  %-50s %12s\n' "(a) flumen table -> Parquet" "$ra" "(b) ConnectorX (Python) -> Parquet" "$rb" \
    "(c) pandas read_sql -> Parquet ($PY_ROWS rows)" "$rc" "(d) flumen Parquet -> table" "$rd" \
    "(e) server bulk load from CSV" "$re" "(f) pandas to_sql multi ($PY_ROWS rows)" "$rf"
  echo "  ratios (rows/s): a/b $(r "$ra" "$rb") (target >= 1.0), a/c $(r "$ra" "$rc") (>= 10), d/e $(r "$rd" "$re") (>= 1.0), d/f $(r "$rd" "$rf") (>= 20)"
  echo "  flumen peak RSS: read $(rss ${db}_a_flumen) MiB, write $(rss ${db}_d_flumen) MiB"
done
