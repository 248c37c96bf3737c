//! The crash matrix: sink × mode × create × transaction × fault, against the real servers
//! `tests/services/start.sh` starts (PostgreSQL 15, MariaDB 10.11, SQLite, ClickHouse 18.16,
//! Redis 7, and the stand-ins osmem-server for Elasticsearch and SecantusDB for MongoDB).
//!
//! Each case loads generated orders (`order_id` 1..N) into a target that may already hold older
//! rows (negative ids), injects one fault while flumen writes, follows the recovery the output
//! names (`flumen resume RUN` for a run that died, failed or staged rows; a new run for one
//! killed before it wrote anything), and then checks the target with the server's own client:
//! for exactly-once sinks the exact rows (count, distinct keys, checksum of the keys, the older
//! rows kept or gone as the mode says); for ClickHouse 18.16, which cannot deduplicate an
//! insert whose answer was lost, every key present and duplicates bounded by the requests in
//! flight. After the recovery nothing may be left staged, and no row may be in dead letters.
//!
//! Faults: `kill` (SIGKILL of flumen at a random moment), `stop` (the server SIGSTOPped past
//! the sink's timeout, then continued), `restart` (the server killed and started again; not for
//! the in-memory Redis and search servers), `lock` (a lock on the target held past the timeout),
//! `source` (the query fails midway: a division by zero at a chosen row).
//!
//!     cargo test --test crash                        the CI sample (about a third of the cases)
//!     FLUMEN_CRASH_ALL=1 cargo test --test crash     every case (benches/e2e/crash_matrix.sh)
//!     FLUMEN_CRASH_SEED=0x1d0000a3f cargo test --test crash    one case, as a failure printed it
//!     FLUMEN_CRASH_FILTER=postgres/append cargo test --test crash   cases whose name holds it
//!     FLUMEN_CRASH_OPTIONS="'delivery_table' 'none'" ...   more options for every sink table
//!         (to see the matrix fail when a guarantee is switched off)
//!
//! Cases run one at a time: a fault on a server must not meet another case's load.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const PW: &str = "flumen-test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sink {
    Postgres,
    MySql,
    Sqlite,
    ClickHouse,
    Redis,
    Search,
    Mongo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Kill,
    Stop,
    Restart,
    Lock,
    Source,
}

#[derive(Debug, Clone)]
struct Case {
    sink: Sink,
    mode: &'static str,
    create: &'static str,
    job: bool,
    fault: Fault,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.sink.name(),
            self.mode,
            self.create,
            if self.job { "job" } else { "batch" },
            self.fault.name()
        )
    }
}

impl Sink {
    fn name(self) -> &'static str {
        match self {
            Sink::Postgres => "postgres",
            Sink::MySql => "mysql",
            Sink::Sqlite => "sqlite",
            Sink::ClickHouse => "clickhouse",
            Sink::Redis => "redis",
            Sink::Search => "search",
            Sink::Mongo => "mongodb",
        }
    }

    /// Rows per case and generated rows per second (the search and MongoDB stand-ins are slow).
    fn load(self) -> (u64, u64, u64) {
        match self {
            Sink::Search => (1_200, 1_500, 200),
            Sink::Mongo => (600, 800, 100),
            _ => (6_000, 6_000, 500),
        }
    }

    fn modes(self) -> &'static [&'static str] {
        match self {
            Sink::Postgres | Sink::MySql | Sink::Sqlite | Sink::ClickHouse => {
                &["append", "upsert", "overwrite"]
            }
            Sink::Redis => &["upsert"],
            Sink::Search => &["append", "overwrite"],
            Sink::Mongo => &["append", "upsert"],
        }
    }

    fn creates(self) -> &'static [&'static str] {
        match self {
            Sink::Postgres | Sink::MySql | Sink::Sqlite | Sink::ClickHouse => {
                &["never", "if_not_exists", "replace"]
            }
            Sink::Search => &["if_not_exists"],
            Sink::Redis | Sink::Mongo => &["-"],
        }
    }

    fn faults(self) -> &'static [Fault] {
        use Fault::*;
        match self {
            Sink::Postgres | Sink::MySql => &[Kill, Stop, Restart, Lock, Source],
            Sink::Sqlite => &[Kill, Lock, Source],
            Sink::ClickHouse | Sink::Mongo => &[Kill, Stop, Restart, Source],
            Sink::Redis => &[Kill, Stop, Lock, Source],
            Sink::Search => &[Kill, Stop, Source],
        }
    }

    /// The sink's `timeout` and how long a `stop` fault holds the server (past the timeout).
    /// The search and MongoDB stand-ins answer a request in up to a second when loaded.
    fn patience(self) -> (u64, u64) {
        match self {
            Sink::Search | Sink::Mongo => (3, 5),
            _ => (1, 3),
        }
    }

    /// Whether every row lands exactly once whatever the fault (else at least once):
    /// ClickHouse 18.16 cannot deduplicate an insert whose answer was lost, in the target
    /// (append) or in the overwrite's staging table; upserts collapse repeats (`FINAL`).
    fn exactly_once(self, mode: &str) -> bool {
        !(self == Sink::ClickHouse && mode != "upsert")
    }
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Stop => "stop",
            Fault::Restart => "restart",
            Fault::Lock => "lock",
            Fault::Source => "source",
        }
    }
}

/// Every case, in a fixed order (a seed names a case by its index).
fn matrix() -> Vec<Case> {
    let mut out = Vec::new();
    for sink in [
        Sink::Postgres,
        Sink::MySql,
        Sink::Sqlite,
        Sink::ClickHouse,
        Sink::Redis,
        Sink::Search,
        Sink::Mongo,
    ] {
        for &mode in sink.modes() {
            for &create in sink.creates() {
                let sql = matches!(sink, Sink::Postgres | Sink::MySql | Sink::Sqlite);
                let jobs: &[bool] = match (sql, mode) {
                    (true, "overwrite") => &[true],
                    (true, _) => &[false, true],
                    _ => &[false],
                };
                for &job in jobs {
                    for &fault in sink.faults() {
                        out.push(Case {
                            sink,
                            mode,
                            create,
                            job,
                            fault,
                        });
                    }
                }
            }
        }
    }
    out
}

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn services_dir() -> PathBuf {
    PathBuf::from(std::env::var("FLUMEN_SERVICES_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/flumen-services",
            std::env::var("HOME").unwrap_or_default()
        )
    }))
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command; its stdout, or an error with its stderr.
fn cmd(c: &mut Command, what: &str) -> Result<String, String> {
    let out = c.output().map_err(|e| {
        format!("{what} does not run ({e}); start the servers with `bash tests/services/start.sh`")
    })?;
    if !out.status.success() {
        return Err(format!(
            "{what} failed: {}{}\n(are the servers running? `bash tests/services/start.sh`)",
            text(&out.stderr),
            text(&out.stdout)
        ));
    }
    Ok(text(&out.stdout).trim().to_string())
}

fn pg(sql: &str) -> Result<String, String> {
    cmd(
        Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "flumen",
                "-d",
                "flumen",
                "-v",
                "ON_ERROR_STOP=1",
                "-qtAc",
                sql,
            ])
            .env("PGPASSWORD", PW),
        "psql",
    )
}

fn my(sql: &str) -> Result<String, String> {
    cmd(
        Command::new("mysql").args([
            "--protocol=tcp",
            "-h",
            "127.0.0.1",
            "-u",
            "flumen",
            &format!("-p{PW}"),
            "-N",
            "-B",
            "flumen",
            "-e",
            sql,
        ]),
        "mysql",
    )
}

fn ch(sql: &str) -> Result<String, String> {
    let out = cmd(
        Command::new("curl").args([
            "-s",
            "-S",
            "--max-time",
            "30",
            "--data-binary",
            sql,
            "http://127.0.0.1:8123/",
        ]),
        "curl to ClickHouse",
    )?;
    if out.contains("DB::Exception") {
        return Err(format!("{sql}: {out}"));
    }
    Ok(out)
}

fn py() -> PathBuf {
    services_dir().join("venv/bin/python")
}

fn sqlite(path: &Path, sql: &str) -> Result<String, String> {
    let script = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nrows=c.execute(sys.argv[2]).fetchall()\nc.commit()\nprint('\\n'.join('|'.join(str(v) for v in r) for r in rows))";
    cmd(
        Command::new("python3").args(["-c", script]).arg(path).arg(sql),
        "python3 sqlite3",
    )
}

fn redis(args: &[&str]) -> Result<String, String> {
    cmd(
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", "6380", "-a", PW, "--no-auth-warning"])
            .args(args),
        "redis-cli",
    )
}

fn es(method: &str, path: &str, body: Option<&str>) -> Result<serde_json::Value, String> {
    let mut c = Command::new("curl");
    c.args([
        "-s",
        "-S",
        "--max-time",
        "30",
        "-X",
        method,
        &format!("http://127.0.0.1:9200/{path}"),
    ]);
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = cmd(&mut c, "curl to the search server")?;
    Ok(serde_json::from_str(&out).unwrap_or(serde_json::Value::Null))
}

fn mongo(code: &str) -> Result<String, String> {
    let script = format!(
        "import pymongo\nc=pymongo.MongoClient('mongodb://127.0.0.1:27018/?directConnection=true', serverSelectionTimeoutMS=20000)\ndb=c['flumen']\n{code}"
    );
    cmd(Command::new(py()).args(["-c", &script]), "python (pymongo)")
}

/// Pids of a server's processes.
fn pids(sink: Sink) -> Vec<u32> {
    let pattern = match sink {
        Sink::Postgres => return pgrep(&["-u", "postgres", "-x", "postgres"]),
        Sink::MySql => {
            let p = pgrep(&["-x", "mariadbd"]);
            return if p.is_empty() { pgrep(&["-x", "mysqld"]) } else { p };
        }
        Sink::ClickHouse => "clickhouse-server",
        Sink::Redis => "redis-server.*:6380",
        Sink::Search => "osmem-server",
        Sink::Mongo => "secantusd",
        Sink::Sqlite => return Vec::new(),
    };
    pgrep(&["-f", pattern])
}

fn pgrep(args: &[&str]) -> Vec<u32> {
    Command::new("pgrep")
        .args(args)
        .output()
        .map(|o| {
            text(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn signal(pids: &[u32], sig: &str) {
    for p in pids {
        let _ = Command::new("kill").args([sig, &p.to_string()]).status();
    }
}

/// Servers stopped by a fault: continued when dropped, whatever happened in between.
struct Stopped(Vec<u32>);

impl Drop for Stopped {
    fn drop(&mut self) {
        signal(&self.0, "-CONT");
    }
}

/// Starts a server again (the start script skips what answers) and waits until it answers.
fn start(sink: Sink) -> Result<(), String> {
    let name = match sink {
        Sink::Postgres => "postgres",
        Sink::MySql => "mysql",
        Sink::ClickHouse => "clickhouse",
        Sink::Redis => "redis",
        Sink::Search => "search",
        Sink::Mongo => "mongo",
        Sink::Sqlite => return Ok(()),
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/services/start.sh");
    let log = services_dir().join("crash-restarts.log");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // Its output goes to a file: a server it starts must not hold a pipe of ours open.
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new("bash")
            .arg(&script)
            .arg(name)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("tests/services/start.sh does not run: {e}"))?;
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!(
                    "tests/services/start.sh {name} did not end; see {}",
                    log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(sink) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not come back; see {}",
                sink.name(),
                log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether a server answers a query now.
fn alive(sink: Sink) -> bool {
    match sink {
        Sink::Postgres => pg("SELECT 1").is_ok(),
        Sink::MySql => my("SELECT 1").is_ok(),
        Sink::ClickHouse => ch("SELECT 1").is_ok(),
        Sink::Redis => redis(&["PING"]).is_ok_and(|p| p == "PONG"),
        Sink::Search => es("GET", "", None).is_ok_and(|v| !v.is_null()),
        Sink::Mongo => mongo("print(c.admin.command('ping')['ok'])").is_ok(),
        Sink::Sqlite => true,
    }
}

/// What the target must hold after the recovery.
struct Expect {
    /// Generated rows (ids 1..=n).
    n: u64,
    /// Older rows (ids -1..=-old) that must still be there.
    old: u64,
    exactly_once: bool,
    /// Most duplicate rows an at-least-once sink may hold.
    dup_bound: u64,
}

/// What the target holds: rows, distinct ids, sum of the positive ids, rows with negative ids.
#[derive(Debug, PartialEq, Eq)]
struct Held {
    rows: u64,
    distinct: u64,
    sum: u64,
    old: u64,
}

struct Env {
    dir: PathBuf,
    table: String,
    case: Case,
    rng: Rng,
}

impl Env {
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn sqlite_file(&self) -> PathBuf {
        self.dir.join("target.db")
    }

    fn old_rows(&self) -> u64 {
        50
    }

    /// Empties the target's server of this table, then (when `pre`) makes it with older rows.
    fn setup(&self, pre: bool) -> Result<(), String> {
        let t = &self.table;
        let old = self.old_rows();
        let upsert = self.case.mode == "upsert";
        match self.case.sink {
            Sink::Postgres => {
                pg(&format!(
                    "DROP TABLE IF EXISTS {t}, {t}__flumen_new, {t}__flumen_old"
                ))?;
                if pre {
                    let key = if upsert { " PRIMARY KEY" } else { "" };
                    pg(&format!(
                        "CREATE TABLE {t} (order_id BIGINT NOT NULL{key}, city TEXT, amount NUMERIC(18,2)); \
                         INSERT INTO {t} SELECT -g, 'old', 1.00 FROM generate_series(1, {old}) g"
                    ))?;
                }
            }
            Sink::MySql => {
                my(&format!(
                    "DROP TABLE IF EXISTS {t}, {t}__flumen_new, {t}__flumen_old"
                ))?;
                if pre {
                    let key = if upsert { ", PRIMARY KEY (order_id)" } else { "" };
                    my(&format!(
                        "CREATE TABLE {t} (order_id BIGINT NOT NULL, city VARCHAR(64), amount DECIMAL(18,2){key}); \
                         INSERT INTO {t} SELECT -seq, 'old', 1.00 FROM seq_1_to_{old}"
                    ))?;
                }
            }
            Sink::Sqlite => {
                let _ = std::fs::remove_file(self.sqlite_file());
                if pre {
                    let key = if upsert { " PRIMARY KEY" } else { "" };
                    sqlite(
                        &self.sqlite_file(),
                        &format!("CREATE TABLE {t} (order_id INTEGER NOT NULL{key}, city TEXT, amount TEXT)"),
                    )?;
                    sqlite(
                        &self.sqlite_file(),
                        &format!(
                            "INSERT INTO {t} WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < {old}) \
                             SELECT -x, 'old', '1.00' FROM g"
                        ),
                    )?;
                }
            }
            Sink::ClickHouse => {
                let existing = ch(&format!(
                    "SELECT name FROM system.tables WHERE database = 'default' AND name LIKE '{t}%' FORMAT TabSeparated"
                ))?;
                for name in existing.lines().filter(|l| !l.is_empty()) {
                    ch(&format!("DROP TABLE IF EXISTS default.`{name}`"))?;
                }
                if pre {
                    let engine = if upsert { "ReplacingMergeTree" } else { "MergeTree" };
                    ch(&format!(
                        "CREATE TABLE default.{t} (order_id Int64, city String, amount Decimal(18, 2)) ENGINE = {engine} ORDER BY order_id"
                    ))?;
                    ch(&format!(
                        "INSERT INTO default.{t} SELECT -toInt64(number + 1), 'old', toDecimal64(1, 2) FROM system.numbers LIMIT {old}"
                    ))?;
                }
            }
            Sink::Redis => {
                let keys = redis(&["--scan", "--pattern", &format!("{t}:*")])?;
                for chunk in keys.lines().collect::<Vec<_>>().chunks(500) {
                    let mut args = vec!["DEL"];
                    args.extend(chunk.iter().copied());
                    redis(&args)?;
                }
                if pre {
                    for i in 1..=old {
                        redis(&[
                            "HSET",
                            &format!("{t}:-{i}"),
                            "order_id",
                            &format!("-{i}"),
                            "city",
                            "old",
                        ])?;
                    }
                }
            }
            Sink::Search => {
                let indices = es("GET", &format!("_cat/indices/{t}*?format=json"), None)?;
                for i in indices.as_array().into_iter().flatten() {
                    if let Some(name) = i["index"].as_str() {
                        es("DELETE", name, None)?;
                    }
                }
                let aliased = es("GET", &format!("_alias/{t}"), None)?;
                for (name, _) in aliased.as_object().into_iter().flatten() {
                    es("DELETE", name, None)?;
                }
                if pre {
                    let mut bulk = String::new();
                    for i in 1..=old {
                        bulk.push_str(&format!(
                            "{{\"index\":{{\"_index\":\"{t}\",\"_id\":\"old-{i}\"}}}}\n{{\"order_id\":-{i},\"city\":\"old\"}}\n"
                        ));
                    }
                    let mut c = Command::new("curl");
                    c.args([
                        "-s",
                        "-S",
                        "-H",
                        "content-type: application/x-ndjson",
                        "--data-binary",
                        &bulk,
                        "http://127.0.0.1:9200/_bulk?refresh=true",
                    ]);
                    cmd(&mut c, "curl bulk")?;
                }
            }
            Sink::Mongo => {
                mongo(&format!("db['{t}'].drop()"))?;
                if upsert {
                    // As anyone upserting on a key would have it.
                    mongo(&format!("db['{t}'].create_index('order_id', unique=True)"))?;
                }
                if pre {
                    mongo(&format!(
                        "db['{t}'].insert_many([{{'order_id': -i, 'city': 'old'}} for i in range(1, {old} + 1)])"
                    ))?;
                }
            }
        }
        Ok(())
    }

    fn script(&self) -> String {
        let (n, rate, batch) = self.case.sink.load();
        let t = &self.table;
        let c = &self.case;
        let mut opts: Vec<String> = Vec::new();
        let (stored, location) = match c.sink {
            Sink::Postgres => (
                "POSTGRES",
                "postgres://flumen:${PW}@127.0.0.1:5432/flumen".to_string(),
            ),
            Sink::MySql => ("MYSQL", "mysql://flumen:${PW}@127.0.0.1:3306/flumen".to_string()),
            Sink::Sqlite => ("SQLITE", format!("sqlite://{}", self.sqlite_file().display())),
            Sink::ClickHouse => ("CLICKHOUSE", "http://127.0.0.1:8123/default".to_string()),
            Sink::Redis => ("REDIS", "redis://:${PW}@127.0.0.1:6380/0".to_string()),
            Sink::Search => ("ELASTICSEARCH", "http://127.0.0.1:9200".to_string()),
            Sink::Mongo => (
                "MONGODB",
                "mongodb://127.0.0.1:27018/flumen?directConnection=true".to_string(),
            ),
        };
        match c.sink {
            Sink::Postgres | Sink::MySql | Sink::Sqlite => {
                opts.push(format!("'table' '{t}'"));
                opts.push(format!("'create' '{}'", c.create));
                opts.push(format!("'transaction' '{}'", if c.job { "job" } else { "batch" }));
            }
            Sink::ClickHouse => {
                opts.push(format!("'table' '{t}'"));
                opts.push(format!("'create' '{}'", c.create));
                if c.mode != "upsert" {
                    opts.push("'order_by' 'order_id'".into());
                }
            }
            Sink::Redis => {
                opts.push("'type' 'hash'".into());
                opts.push(format!("'key' '{t}:{{order_id}}'"));
            }
            Sink::Search => opts.push(format!("'index' '{t}'")),
            Sink::Mongo => opts.push(format!("'collection' '{t}'")),
        }
        if c.mode != "append" && c.sink != Sink::Redis {
            opts.push(format!("'mode' '{}'", c.mode));
        }
        if c.mode == "upsert" && c.sink != Sink::Redis {
            opts.push("'keys' 'order_id'".into());
        }
        opts.extend([
            format!("'batch_rows' '{batch}'"),
            "'concurrency' '2'".into(),
            "'linger' '100ms'".into(),
            format!("'timeout' '{}s'", c.sink.patience().0),
            "'max_attempts' '4'".into(),
            "'retry_initial' '50ms'".into(),
            "'retry_max' '400ms'".into(),
            format!("'max_elapsed' '{}s'", 4 * c.sink.patience().0),
        ]);
        if let Ok(extra) = std::env::var("FLUMEN_CRASH_OPTIONS") {
            opts.push(extra);
        }
        // The source error is a division by zero in the projection, not in a filter: a filter
        // coalesces the source's small batches, so the rows would reach the sink all at the end
        // and a kill would almost never land while requests are in flight.
        format!(
            "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders'\n  \
             OPTIONS ('rows' '{n}', 'rate' '${{RATE:-{rate}}}', 'batch_rows' '{}', 'partitions' '1');\n\
             CREATE EXTERNAL TABLE target (order_id BIGINT NOT NULL, city VARCHAR, amount DECIMAL(18, 2)) STORED AS {stored}\n  \
             LOCATION '{location}'\n  OPTIONS ({});\n\
             INSERT INTO target SELECT order_id * ((order_id - ${{FAIL_AT:--1}}) / (order_id - ${{FAIL_AT:--1}})) AS order_id, city, amount FROM src;\n",
            batch / 2,
            opts.join(", ")
        )
    }

    fn flumen(&self, args: &[&str], extra: &[(&str, String)]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flumen"));
        c.args(args)
            .arg("--state-dir")
            .arg(self.state())
            .args(["-q", "--set", &format!("PW={PW}")]);
        for (k, v) in extra {
            c.args(["--set", &format!("{k}={v}")]);
        }
        c.current_dir(&self.dir);
        c
    }

    fn read(&self) -> Result<Held, String> {
        let t = &self.table;
        let q = format!(
            "SELECT count(*), count(DISTINCT order_id), coalesce(sum(CASE WHEN order_id > 0 THEN order_id ELSE 0 END), 0), \
             sum(CASE WHEN order_id < 0 THEN 1 ELSE 0 END) FROM {t}"
        );
        let line = match self.case.sink {
            Sink::Postgres => pg(&q)?,
            Sink::MySql => my(&q)?.replace('\t', "|"),
            Sink::Sqlite => sqlite(&self.sqlite_file(), &q)?,
            Sink::ClickHouse => {
                let fin = if self.case.mode == "upsert" { " FINAL" } else { "" };
                ch(&format!(
                    "SELECT count(), uniqExact(order_id), sum(if(order_id > 0, order_id, 0)), countIf(order_id < 0) \
                     FROM default.{t}{fin} FORMAT TabSeparated"
                ))?
                .replace('\t', "|")
            }
            Sink::Redis => {
                let keys = redis(&["--scan", "--pattern", &format!("{t}:*")])?;
                let ids: Vec<i64> = keys
                    .lines()
                    .filter_map(|k| k.rsplit(':').next()?.parse().ok())
                    .collect();
                let distinct: std::collections::HashSet<i64> = ids.iter().copied().collect();
                format!(
                    "{}|{}|{}|{}",
                    ids.len(),
                    distinct.len(),
                    ids.iter().filter(|i| **i > 0).sum::<i64>(),
                    ids.iter().filter(|i| **i < 0).count()
                )
            }
            Sink::Search => {
                es("POST", &format!("{t}/_refresh"), None)?;
                let mut ids: Vec<i64> = Vec::new();
                let mut after: Option<serde_json::Value> = None;
                loop {
                    let mut body = serde_json::json!({
                        "size": 1000, "_source": ["order_id"], "sort": [{"order_id": "asc"}], "query": {"match_all": {}}
                    });
                    if let Some(a) = &after {
                        body["search_after"] = a.clone();
                    }
                    let page = es("POST", &format!("{t}/_search"), Some(&body.to_string()))?;
                    let hits = page["hits"]["hits"].as_array().cloned().unwrap_or_default();
                    if hits.is_empty() {
                        break;
                    }
                    for h in &hits {
                        ids.push(
                            h["_source"]["order_id"]
                                .as_i64()
                                .ok_or_else(|| format!("no order_id in {h}"))?,
                        );
                    }
                    after = hits.last().map(|h| h["sort"].clone());
                }
                let distinct: std::collections::HashSet<i64> = ids.iter().copied().collect();
                format!(
                    "{}|{}|{}|{}",
                    ids.len(),
                    distinct.len(),
                    ids.iter().filter(|i| **i > 0).sum::<i64>(),
                    ids.iter().filter(|i| **i < 0).count()
                )
            }
            Sink::Mongo => mongo(&format!(
                "ids=[d['order_id'] for d in db['{t}'].find({{}}, {{'order_id': 1}})]\n\
                 print('%d|%d|%d|%d' % (len(ids), len(set(ids)), sum(i for i in ids if i > 0), len([i for i in ids if i < 0])))"
            ))?,
        };
        let v: Vec<u64> = line
            .trim()
            .split('|')
            .map(|x| x.trim().parse::<f64>().map(|f| f as u64))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("reading '{line}': {e}"))?;
        if v.len() != 4 {
            return Err(format!("reading '{line}': 4 numbers expected"));
        }
        Ok(Held {
            rows: v[0],
            distinct: v[1],
            sum: v[2],
            old: v[3],
        })
    }
}

/// The newest run ledger in `state`: (run id, status).
fn last_run(state: &Path) -> Option<(String, String)> {
    let mut runs: Vec<(String, String)> = std::fs::read_dir(state.join("runs"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter_map(|e| {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            Some((
                v["run_id"].as_str()?.to_string(),
                v["status"].as_str()?.to_string(),
            ))
        })
        .collect();
    runs.sort();
    runs.pop()
}

/// The run id in "`flumen resume RUN ...`" of a run's output, if it names one.
fn named_resume(out: &str) -> Option<String> {
    let at = out.find("flumen resume ")? + "flumen resume ".len();
    Some(
        out[at..]
            .split(|c: char| c.is_whitespace() || c == '`')
            .next()?
            .to_string(),
    )
}

/// Holds a lock on the target past the sink's timeout, in the server's own client.
fn hold_lock(env: &Env, secs: u64) -> Option<Child> {
    let t = &env.table;
    let mut c = match env.case.sink {
        Sink::Postgres => {
            let mut c = Command::new("psql");
            c.args(["-h", "127.0.0.1", "-U", "flumen", "-d", "flumen", "-qtAc"])
                .arg(format!(
                    "BEGIN; LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({secs}); COMMIT;"
                ))
                .env("PGPASSWORD", PW);
            c
        }
        Sink::MySql => {
            let mut c = Command::new("mysql");
            c.args([
                "--protocol=tcp",
                "-h",
                "127.0.0.1",
                "-u",
                "flumen",
                &format!("-p{PW}"),
                "flumen",
                "-e",
            ])
            .arg(format!("LOCK TABLES {t} WRITE; DO SLEEP({secs}); UNLOCK TABLES;"));
            c
        }
        Sink::Sqlite => {
            let mut c = Command::new("python3");
            c.args([
                "-c",
                "import sqlite3,sys,time\nc=sqlite3.connect(sys.argv[1], isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\ntime.sleep(float(sys.argv[2]))\nc.execute('COMMIT')",
            ])
            .arg(env.sqlite_file())
            .arg(secs.to_string());
            c
        }
        Sink::Redis => {
            let mut c = Command::new("redis-cli");
            c.args([
                "-h",
                "127.0.0.1",
                "-p",
                "6380",
                "-a",
                PW,
                "--no-auth-warning",
                "CLIENT",
                "PAUSE",
            ])
            .arg((secs * 1000).to_string())
            .arg("WRITE");
            c
        }
        _ => return None,
    };
    c.stdout(Stdio::null()).stderr(Stdio::null()).spawn().ok()
}

/// Runs one case; `Err` says what went wrong.
fn run_case(case: &Case, seed: u64) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let index = seed >> 32;
    let mut env = Env {
        dir: dir.path().to_path_buf(),
        table: format!("crash_c{index}"),
        case: case.clone(),
        rng: Rng(seed),
    };
    if !alive(case.sink) {
        start(case.sink)?;
    }
    // The table is there with older rows, unless a create mode may make it and the seed says not.
    let pre = case.create == "never"
        || case.fault == Fault::Lock
        || matches!(case.sink, Sink::Redis | Sink::Mongo | Sink::Search) && env.rng.below(2) == 0
        || env.rng.below(3) != 0;
    env.setup(pre)?;
    let script = env.dir.join("job.sql");
    std::fs::write(&script, env.script()).map_err(|e| e.to_string())?;
    let script_arg = script.display().to_string();
    let (n, rate, _) = case.sink.load();
    let duration_ms = n * 1000 / rate;

    // The run with its fault.
    let fail_at = 1 + env.rng.below(n - 1);
    let mut vars: Vec<(&str, String)> = Vec::new();
    if case.fault == Fault::Source {
        vars.push(("FAIL_AT", fail_at.to_string()));
    }
    let mut child = env
        .flumen(&["run", &script_arg], &vars)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("flumen does not start: {e}"))?;
    // While the rows flow: once the write has begun (its ledger is written when the sink
    // starts), at a random moment of the `duration_ms` the source takes.
    let began = Instant::now();
    while last_run(&env.state()).is_none() && child.try_wait().map_err(|e| e.to_string())?.is_none() {
        if began.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            return Err("the write did not begin within 30 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let at = Duration::from_millis(env.rng.below(duration_ms * 3 / 4));
    let mut note = format!("fault {}ms into the write", at.as_millis());
    std::thread::sleep(at);
    match case.fault {
        Fault::Kill => {
            let _ = child.kill();
        }
        Fault::Stop => {
            let stopped = Stopped(pids(case.sink));
            if stopped.0.is_empty() {
                return Err(format!("no {} process to stop", case.sink.name()));
            }
            signal(&stopped.0, "-STOP");
            let hold = case.sink.patience().1 * 1000;
            std::thread::sleep(Duration::from_millis(hold - 500 + env.rng.below(1_500)));
            drop(stopped);
        }
        Fault::Restart => {
            let p = pids(case.sink);
            if p.is_empty() {
                return Err(format!("no {} process to kill", case.sink.name()));
            }
            signal(&p, "-KILL");
            std::thread::sleep(Duration::from_millis(1_000 + env.rng.below(1_500)));
            start(case.sink)?;
        }
        Fault::Lock => {
            if let Some(mut l) = hold_lock(&env, 3) {
                let _ = l.wait();
            }
        }
        Fault::Source => note = format!("source error at row {fail_at}"),
    }
    let out: Output = child.wait_with_output().map_err(|e| e.to_string())?;
    if !alive(case.sink) {
        start(case.sink)?;
    }
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    if std::env::var("FLUMEN_CRASH_VERBOSE").is_ok() {
        eprintln!(
            "the run ended {:?} after {:?}: {:?}, {:?}",
            out.status,
            began.elapsed(),
            env.read(),
            last_run(&env.state())
        );
    }

    // The recovery the output names.
    let fast = ("RATE", "1000000".to_string());
    let mut recoveries = 0;
    loop {
        let last = last_run(&env.state());
        match (&last, named_resume(&said)) {
            (Some((run, _)), Some(named)) if recoveries == 0 && *run != named => {
                return Err(format!(
                    "the output names run {named}, the newest ledger is {run}:\n{said}"
                ));
            }
            _ => {}
        }
        let next = match last {
            None => {
                // Killed before it wrote anything: nothing to resume, the job runs again.
                note.push_str(", rerun");
                env.flumen(&["run", &script_arg], std::slice::from_ref(&fast))
                    .output()
            }
            Some((_, status)) if status == "succeeded" => break,
            Some((run, status)) => {
                note.push_str(&format!(", resume {status}"));
                env.flumen(&["resume", &run], std::slice::from_ref(&fast))
                    .output()
            }
        }
        .map_err(|e| e.to_string())?;
        if std::env::var("FLUMEN_CRASH_VERBOSE").is_ok() {
            eprintln!(
                "after the fault: {:?}\nrecovery said: {}{}",
                env.read(),
                text(&next.stdout),
                text(&next.stderr)
            );
        }
        recoveries += 1;
        if recoveries > 3 {
            return Err(format!(
                "still not succeeded after 3 recoveries; the last said:\n{}{}",
                text(&next.stdout),
                text(&next.stderr)
            ));
        }
        if !next.status.success() && !alive(case.sink) {
            start(case.sink)?;
        }
    }

    // A second resume of a finished run changes nothing.
    if let Some((run, _)) = last_run(&env.state()) {
        let again = env
            .flumen(&["resume", &run], std::slice::from_ref(&fast))
            .output()
            .map_err(|e| e.to_string())?;
        if !again.status.success() {
            return Err(format!("a second resume failed: {}", text(&again.stderr)));
        }
    }

    // The invariant, read with the server's own client.
    let replaced = case.create == "replace" || case.mode == "overwrite";
    let expect = Expect {
        n,
        old: if pre && !replaced { env.old_rows() } else { 0 },
        exactly_once: case.sink.exactly_once(case.mode),
        // Each of the 2 requests in flight at the fault, applied by each of its 4 attempts
        // (a timed-out insert that the server then runs) but counted once.
        dup_bound: 2 * case.sink.load().2 * (4 - 1),
    };
    let held = env.read()?;
    if std::env::var("FLUMEN_CRASH_VERBOSE").is_ok() {
        eprintln!("{held:?}\n{said}");
    }
    let want = Held {
        rows: expect.n + expect.old,
        distinct: expect.n + expect.old,
        sum: expect.n * (expect.n + 1) / 2,
        old: expect.old,
    };
    if expect.exactly_once {
        if held != want {
            return Err(format!(
                "target holds {held:?}, expected {want:?} ({note})\nfirst run said:\n{said}"
            ));
        }
    } else if held.distinct != want.distinct
        || held.old != want.old
        || held.rows < want.rows
        || held.rows - held.distinct > expect.dup_bound
    {
        return Err(format!(
            "target holds {held:?}, expected every key of {want:?} with at most {} duplicates ({note})\nfirst run said:\n{said}",
            expect.dup_bound
        ));
    } else if held.rows > want.rows {
        note.push_str(&format!(", {} duplicates (at-least-once)", held.rows - want.rows));
    }
    // Staged and dead-letter files accounted for: nothing left staged, nothing rejected.
    let runs = text(
        &env.flumen(&["runs"], &[])
            .output()
            .map_err(|e| e.to_string())?
            .stdout,
    );
    if runs
        .lines()
        .any(|l| !l.contains(" 0 spilled") && l.contains("spilled"))
    {
        return Err(format!("rows are still staged:\n{runs}"));
    }
    let dead = env.state().join("dead_letter");
    if dead.exists() && walk_files(&dead) > 0 {
        return Err(format!("rows went to dead letters under {}", dead.display()));
    }
    Ok(note)
}

fn walk_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| {
                    if e.path().is_dir() {
                        walk_files(&e.path())
                    } else {
                        usize::from(e.file_name().to_string_lossy().ends_with(".parquet"))
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The fixed third of the cases CI runs: chosen by a hash of the case's index, plus the first
/// case of every (sink, fault) pair the hash left out, so each fault meets each sink.
fn ci_sample(cases: &[Case]) -> Vec<usize> {
    let mut chosen: Vec<usize> = (0..cases.len())
        .filter(|i| Rng(0xC1 ^ *i as u64).next().is_multiple_of(3))
        .collect();
    for (i, c) in cases.iter().enumerate() {
        let covered = chosen
            .iter()
            .any(|j| cases[*j].sink == c.sink && cases[*j].fault == c.fault);
        if !covered {
            chosen.push(i);
        }
    }
    chosen.sort_unstable();
    chosen
}

fn main() {
    // `cargo test` passes libtest's flags (--quiet, filters): only ours are read.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cases = matrix();
    let base: u64 = match std::env::var("FLUMEN_CRASH_BASE") {
        Ok(b) => b.parse().unwrap_or(7),
        Err(_) if std::env::var("FLUMEN_CRASH_ALL").is_ok() => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64);
            t & 0xffff_ffff
        }
        Err(_) => 7,
    };
    let seed_of = |i: usize| ((i as u64) << 32) | (Rng(base ^ i as u64).next() & 0xffff_ffff);
    let chosen: Vec<(usize, u64)> = match std::env::var("FLUMEN_CRASH_SEED") {
        Ok(s) => {
            let seed = u64::from_str_radix(s.trim_start_matches("0x"), 16)
                .unwrap_or_else(|_| panic!("FLUMEN_CRASH_SEED={s} is not a hex seed"));
            vec![((seed >> 32) as usize, seed)]
        }
        Err(_) => {
            let all = std::env::var("FLUMEN_CRASH_ALL").is_ok();
            let filter = std::env::var("FLUMEN_CRASH_FILTER").unwrap_or_default();
            let sample = if all || !filter.is_empty() {
                (0..cases.len()).collect()
            } else {
                ci_sample(&cases)
            };
            sample
                .into_iter()
                .filter(|i| cases[*i].name().contains(&filter))
                .map(|i| (i, seed_of(i)))
                .collect()
        }
    };
    println!(
        "crash matrix: {} of {} cases (base {base})",
        chosen.len(),
        cases.len()
    );
    let started = Instant::now();
    let mut failed = Vec::new();
    for (i, seed) in &chosen {
        let Some(case) = cases.get(*i) else {
            panic!("seed {seed:#x} names case {i}; there are {}", cases.len());
        };
        let t = Instant::now();
        match run_case(case, *seed) {
            Ok(note) => println!(
                "case {i:>3} {:<45} seed={seed:#x} ok ({:.1}s; {note})",
                case.name(),
                t.elapsed().as_secs_f64()
            ),
            Err(e) => {
                println!(
                    "case {i:>3} {:<45} seed={seed:#x} FAILED ({:.1}s)\n    rerun: FLUMEN_CRASH_SEED={seed:#x} cargo test --test crash\n    {}",
                    case.name(),
                    t.elapsed().as_secs_f64(),
                    e.replace('\n', "\n    ")
                );
                failed.push((case.name(), *seed));
            }
        }
    }
    println!(
        "crash matrix: {} passed, {} failed in {:.0}s",
        chosen.len() - failed.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        for (name, seed) in &failed {
            println!("  FLUMEN_CRASH_SEED={seed:#x}  {name}");
        }
        std::process::exit(1);
    }
}
