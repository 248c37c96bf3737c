//! Focused regression tests of the recovery model, against the real servers
//! `tests/services/start.sh` starts (PostgreSQL 15, MariaDB 10.11, ClickHouse 18.16, SQLite
//! files). The crash matrix (`tests/crash.rs`) covers the cross product; these pin the defects
//! one by one, each read back with the server's own client:
//! - a sink that cannot be reached at `CREATE` stages the whole write, and `flumen resume`
//!   delivers it;
//! - a failed statement leaves its target as it was (`'create' 'replace'`, `'transaction' 'job'`,
//!   `overwrite`);
//! - a write that waits on a lock past its timeout writes each row once (no abandoned attempt
//!   commits beside its retry);
//! - `'create' 'replace'` runs once per run: rows delivered before the sink failed survive the
//!   `flumen resume` that delivers the rest.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::text;

const PW: &str = "flumen-test";

fn must(c: &mut Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| {
        panic!("{what} runs ({e}); start the servers with `bash tests/services/start.sh`")
    });
    assert!(
        out.status.success(),
        "{what} failed: {}\nare the servers running? `bash tests/services/start.sh`",
        text(&out.stderr)
    );
    text(&out.stdout).trim().to_string()
}

fn pg(sql: &str) -> String {
    must(
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

fn my(sql: &str) -> String {
    must(
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

fn sqlite(path: &Path, sql: &str) -> String {
    must(
        Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nrows=c.execute(sys.argv[2]).fetchall()\nc.commit()\nprint('\\n'.join('|'.join(str(v) for v in r) for r in rows))",
            ])
            .arg(path)
            .arg(sql),
        "python3 sqlite3",
    )
}

/// `flumen <args> --state-dir <dir>/state -q --set PW=...` in `dir`.
fn flumen(dir: &Path, args: &[&str], vars: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flumen"));
    c.args(args)
        .arg("--state-dir")
        .arg(dir.join("state"))
        .args(["-q", "--set", &format!("PW={PW}")]);
    for v in vars {
        c.args(["--set", v]);
    }
    c.current_dir(dir).output().expect("flumen runs")
}

fn write(dir: &Path, script: &str) -> String {
    let p = dir.join("job.sql");
    std::fs::write(&p, script).unwrap();
    p.display().to_string()
}

/// The run id in "`flumen resume RUN --state-dir ...`" of an error.
fn resume_of(err: &str) -> String {
    let at = err
        .find("flumen resume ")
        .unwrap_or_else(|| panic!("the error names no resume command: {err}"))
        + "flumen resume ".len();
    err[at..]
        .split(|c: char| c.is_whitespace() || c == '`')
        .next()
        .unwrap()
        .to_string()
}

const SINK: &str =
    "'timeout' '1s', 'max_attempts' '3', 'retry_initial' '20ms', 'retry_max' '100ms', 'max_elapsed' '2s'";

/// Item 11: with the columns declared, a target that does not answer at CREATE is not an
/// error: every row is staged and the error names the resume command, which delivers them.
#[test]
fn a_sink_down_at_create_stages_the_whole_write() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ch = |sql: &str| common::ch(sql);
    ch("DROP TABLE IF EXISTS default.down_at_create");
    ch("CREATE TABLE default.down_at_create (id Int64, v String) ENGINE = MergeTree ORDER BY id");
    pg("DROP TABLE IF EXISTS down_at_create");
    let script = write(
        d,
        &format!(
            "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '10000');\n\
             CREATE EXTERNAL TABLE c (id BIGINT NOT NULL, v VARCHAR) STORED AS CLICKHOUSE\n  \
               LOCATION 'http://127.0.0.1:${{CH_PORT}}/default' OPTIONS ('table' 'down_at_create', 'create' 'never', {SINK});\n\
             CREATE EXTERNAL TABLE p (id BIGINT NOT NULL, v VARCHAR) STORED AS POSTGRES\n  \
               LOCATION 'postgres://flumen:${{PW}}@127.0.0.1:${{PG_PORT}}/flumen' OPTIONS ('table' 'down_at_create', {SINK});\n\
             INSERT INTO c SELECT order_id, city FROM src;\n\
             INSERT INTO p SELECT order_id, city FROM src;\n"
        ),
    );
    // Nothing listens on port 9 here: both servers are "down".
    let out = flumen(d, &["run", &script], &["CH_PORT=9", "PG_PORT=9"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("10000 rows in") && err.contains("staged"), "{err}");
    let run = resume_of(&err);
    assert_eq!(ch("SELECT count() FROM default.down_at_create").trim(), "0");
    // The servers are back: the resume delivers the ClickHouse rows, then the replay runs
    // the PostgreSQL statement the run never reached (the table is made now).
    let out = flumen(d, &["resume", &run], &["CH_PORT=8123", "PG_PORT=5432"]);
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(
        ch("SELECT count(), uniqExact(id), sum(id) FROM default.down_at_create FORMAT TSV").trim(),
        "10000\t10000\t50005000"
    );
    assert_eq!(
        pg("SELECT count(*), count(DISTINCT id), sum(id) FROM down_at_create"),
        "10000|10000|50005000"
    );
    let runs = text(&flumen(d, &["runs"], &[]).stdout);
    assert!(
        runs.contains("succeeded") && runs.contains(" 0 spilled"),
        "{runs}"
    );
}

/// Item 2: a statement that fails (here a division by zero at row 3000 of the query) leaves the
/// target with the rows and columns it had: a replace's new table is never swapped in, a job
/// and an overwrite roll back.
#[test]
fn a_failed_statement_leaves_the_target_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("t.db");
    // (connector, location, options, the row the query fails at): a job or an overwrite fails
    // after several requests went in; a statement of one transaction per request fails before
    // its first (its delivered requests would stay: they are committed). One source partition:
    // with two, the other's rows could reach the sink before the failing batch.
    let my_url = "mysql://flumen:${PW}@127.0.0.1:3306/flumen".to_string();
    let pg_url = "postgres://flumen:${PW}@127.0.0.1:5432/flumen".to_string();
    let lite = format!("sqlite://{}", db.display());
    let cases: Vec<(&str, String, &str, u32)> = vec![
        (
            "MYSQL",
            my_url.clone(),
            "'create' 'replace', 'transaction' 'job'",
            3000,
        ),
        ("MYSQL", my_url.clone(), "'create' 'replace'", 300),
        ("MYSQL", my_url, "'mode' 'overwrite'", 3000),
        (
            "POSTGRES",
            pg_url.clone(),
            "'create' 'replace', 'transaction' 'job'",
            3000,
        ),
        ("POSTGRES", pg_url, "'create' 'replace'", 300),
        (
            "SQLITE",
            lite.clone(),
            "'create' 'replace', 'mode' 'overwrite'",
            3000,
        ),
        ("SQLITE", lite, "'create' 'replace'", 300),
    ];
    for (i, (stored, location, options, fail)) in cases.iter().enumerate() {
        let t = format!("keep_{i}");
        match *stored {
            "MYSQL" => {
                my(&format!(
                    "DROP TABLE IF EXISTS {t}, {t}__flumen_new; CREATE TABLE {t} (id BIGINT, v VARCHAR(20), extra INT); \
                     INSERT INTO {t} VALUES (-1, 'a', 1), (-2, 'b', 2), (-3, 'c', 3)"
                ));
            }
            "POSTGRES" => {
                pg(&format!(
                    "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (id BIGINT, v TEXT, extra INT); \
                     INSERT INTO {t} VALUES (-1, 'a', 1), (-2, 'b', 2), (-3, 'c', 3)"
                ));
            }
            _ => {
                sqlite(&db, &format!("DROP TABLE IF EXISTS {t}"));
                sqlite(
                    &db,
                    &format!("CREATE TABLE {t} (id INTEGER, v TEXT, extra INTEGER)"),
                );
                sqlite(
                    &db,
                    &format!("INSERT INTO {t} VALUES (-1, 'a', 1), (-2, 'b', 2), (-3, 'c', 3)"),
                );
            }
        }
        let read = |stored: &str| match stored {
            "MYSQL" => my(&format!("SELECT count(*), sum(id), sum(extra) FROM {t}")).replace('\t', "|"),
            "POSTGRES" => pg(&format!("SELECT count(*), sum(id), sum(extra) FROM {t}")),
            _ => sqlite(&db, &format!("SELECT count(*), sum(id), sum(extra) FROM {t}")),
        };
        let before = read(stored);
        assert_eq!(before, "3|-6|6", "{stored}");
        let script = write(
            d,
            &format!(
                "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '6000', 'batch_rows' '500', 'partitions' '1');\n\
                 CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, v VARCHAR) STORED AS {stored} LOCATION '{location}'\n  \
                   OPTIONS ('table' '{t}', {options}, 'batch_rows' '1000', 'concurrency' '1', {SINK});\n\
                 INSERT INTO t SELECT order_id, city FROM src WHERE (order_id - {fail}) / (order_id - {fail}) = 1;\n"
            ),
        );
        let out = flumen(d, &["run", &script], &[]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stored} {options}: {err}");
        assert!(err.to_lowercase().contains("divide by zero"), "{err}");
        assert_eq!(
            read(stored),
            before,
            "{stored} {options}: the target changed: {err}"
        );
        if *stored == "MYSQL" {
            assert_eq!(
                my(&format!("SHOW TABLES LIKE '{t}\\_\\_flumen%'")),
                "",
                "no new table is left behind"
            );
        }
    }
}

/// Item 3: a write that waits on a table lock longer than its timeout. The attempt that timed
/// out is killed at the server and the delivery table refuses a second commit of a request, so
/// each row lands once; a job fails (rolled back) and its resume writes each row once.
#[test]
fn a_write_held_by_a_lock_past_its_timeout_writes_each_row_once() {
    for (job, t) in [(false, "locked_batch"), (true, "locked_job")] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        my(&format!(
            "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (id BIGINT, v VARCHAR(64))"
        ));
        let tx = if job { "job" } else { "batch" };
        let script = write(
            d,
            &format!(
                "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '20000', 'rate' '${{RATE:-10000}}', 'partitions' '1');\n\
                 CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, v VARCHAR) STORED AS MYSQL LOCATION 'mysql://flumen:${{PW}}@127.0.0.1:3306/flumen'\n  \
                   OPTIONS ('table' '{t}', 'transaction' '{tx}', 'batch_rows' '2000', 'concurrency' '2', 'timeout' '2s',\n  \
                   'max_attempts' '20', 'retry_initial' '100ms', 'retry_max' '500ms', 'max_elapsed' '30s');\n\
                 INSERT INTO t SELECT order_id, city FROM src;\n"
            ),
        );
        let run = Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["run", &script, "-q", "--state-dir"])
            .arg(d.join("state"))
            .args(["--set", &format!("PW={PW}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Once the first rows are in (or at once for a job, whose rows show at its commit), a
        // lock for 8 s: four timeouts.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !job && my(&format!("SELECT count(*) FROM {t}")) == "0" {
            assert!(Instant::now() < deadline, "no rows arrived");
            std::thread::sleep(Duration::from_millis(50));
        }
        if job {
            std::thread::sleep(Duration::from_millis(500));
        }
        my(&format!("LOCK TABLES {t} WRITE; DO SLEEP(8); UNLOCK TABLES;"));
        let out = run.wait_with_output().unwrap();
        if !out.status.success() {
            let err = text(&out.stderr);
            assert!(job, "the batch write retries until the lock is gone: {err}");
            let id = resume_of(&err);
            let r = flumen(d, &["resume", &id], &["RATE=1000000"]);
            assert!(r.status.success(), "{}", text(&r.stderr));
        }
        assert_eq!(
            my(&format!("SELECT count(*), count(DISTINCT id), sum(id) FROM {t}")),
            "20000\t20000\t200010000",
            "{tx}"
        );
    }
}

/// Item 1: with `'create' 'replace'`, rows delivered before the sink failed stay when `flumen
/// resume` delivers the rest: the replace happened once, in the first run.
#[test]
fn replace_happens_once_per_run() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let t = "replaced_once";
    pg(&format!(
        "DROP TABLE IF EXISTS {t}; CREATE TABLE {t} (id BIGINT, v TEXT); INSERT INTO {t} VALUES (-1, 'old')"
    ));
    let script = write(
        d,
        &format!(
            "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '20000', 'rate' '${{RATE:-8000}}', 'partitions' '1');\n\
             CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, v VARCHAR) STORED AS POSTGRES LOCATION 'postgres://flumen:${{PW}}@127.0.0.1:5432/flumen'\n  \
               OPTIONS ('table' '{t}', 'create' 'replace', 'batch_rows' '1000', 'concurrency' '1', {SINK});\n\
             INSERT INTO t SELECT order_id, city FROM src;\n"
        ),
    );
    let run = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", &script, "-q", "--state-dir"])
        .arg(d.join("state"))
        .args(["--set", &format!("PW={PW}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The replace is done once the old row is gone and new ones are in; then the table is
    // locked past the sink's patience, so the rest is staged.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let counts = pg(&format!(
            "SELECT count(*) FILTER (WHERE id < 0), count(*) FROM {t}"
        ));
        if counts.starts_with("0|") && counts != "0|0" {
            break;
        }
        assert!(Instant::now() < deadline, "the replace did not happen: {counts}");
        std::thread::sleep(Duration::from_millis(50));
    }
    pg(&format!(
        "BEGIN; LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(5); COMMIT;"
    ));
    let out = run.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let delivered: u64 = pg(&format!("SELECT count(*) FROM {t}")).parse().unwrap();
    assert!(
        delivered > 0 && delivered < 20_000,
        "{delivered} rows before the resume: {err}"
    );
    let out = flumen(d, &["resume", &resume_of(&err)], &["RATE=1000000"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        pg(&format!("SELECT count(*), count(DISTINCT id), sum(id) FROM {t}")),
        "20000|20000|200010000"
    );
}
