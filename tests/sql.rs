//! MYSQL, POSTGRES and SQLITE tables against the real servers `tests/services/start.sh` starts:
//! PostgreSQL 15 and MariaDB 10.11 (MySQL protocol) on 127.0.0.1, user `flumen`, password
//! `flumen-test`, database `flumen`; SQLite files in a temporary folder.

mod common;

use std::path::Path;
use std::process::{Command, Output};

const PG: &str = "postgres://flumen:${PW}@127.0.0.1:5432/flumen";
const MY: &str = "mysql://flumen:${PW}@127.0.0.1:3306/flumen";

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("{what} runs ({e}); start the servers with `bash tests/services/start.sh`")
    });
    assert!(
        out.status.success(),
        "{what} failed: {}\nis the server running? start it with `bash tests/services/start.sh`",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs SQL in PostgreSQL; the output unaligned, tuples only.
fn pg(sql: &str) -> String {
    run(
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
            .env("PGPASSWORD", "flumen-test"),
        "psql",
    )
}

/// Runs SQL in MariaDB; tab-separated, no headers.
fn my(sql: &str) -> String {
    run(
        Command::new("mysql").args([
            "--protocol=tcp",
            "--default-character-set=utf8mb4",
            "-h",
            "127.0.0.1",
            "-u",
            "flumen",
            "-pflumen-test",
            "-N",
            "-B",
            "flumen",
            "-e",
            sql,
        ]),
        "mysql",
    )
}

/// Runs SQL in a SQLite file (Python's sqlite3); rows as `|`-joined lines.
fn lite(path: &Path, sql: &str) -> String {
    let code = "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1])\nr=c.executescript(sys.argv[2]) if ';' in sys.argv[2].strip()[:-1] else None\n\
                rows=c.execute(sys.argv[2]).fetchall() if r is None else []\nc.commit()\nprint('\\n'.join('|'.join('' if v is None else str(v) for v in row) for row in rows))";
    run(
        Command::new("python3").args(["-c", code]).arg(path).arg(sql),
        "python3 sqlite3",
    )
}

fn flumen(dir: &Path, script: &str, extra: &[&str]) -> Output {
    let path = dir.join("job.sql");
    std::fs::write(&path, script).unwrap();
    Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args([
            "run",
            path.to_str().unwrap(),
            "-q",
            "--set",
            "PW=flumen-test",
            "--state-dir",
        ])
        .arg(dir.join("state"))
        .args(extra)
        .output()
        .expect("flumen runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

#[test]
fn postgres_types_survive_a_copy_through_flumen() {
    let cols = "id INT PRIMARY KEY, i2 SMALLINT, i4 INTEGER, i8 BIGINT, f4 REAL, f8 DOUBLE PRECISION, \
                n NUMERIC(28, 10), money NUMERIC(10, 2), vc VARCHAR(20), t TEXT, b BYTEA, d DATE, tm TIME, \
                ts TIMESTAMP, tz TIMESTAMPTZ, ok BOOLEAN, j JSONB, u UUID, ia INTEGER[], ta TEXT[], m mood";
    pg(&format!(
        "DROP TABLE IF EXISTS rt_src, rt_dst; DROP TYPE IF EXISTS mood; CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE rt_src ({cols}); CREATE TABLE rt_dst ({cols});
         INSERT INTO rt_src VALUES
         (1, -32768, -2147483648, -9223372036854775808, -3.4e38, 1e300, 123456789012345678.1234567891, -99999999.99,
          'héllo', E'tab\\there \"q\" \\\\ new\\nline 東京 🎉', '\\x00ff10'::bytea, '1969-07-20', '23:59:59.999999',
          '1969-12-31 23:59:59.5', '2040-01-02 03:04:05.678+02', true, '{{\"a\": [1, \"x\"], \"b\": null}}',
          'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{{1,NULL,-3}}', '{{\"x\",\"\",NULL}}', 'happy'),
         (2, 32767, 2147483647, 9223372036854775807, 1.5, -0.0, 0, 0.01, '', '', '', '2262-04-11', '00:00:00',
          '2040-01-02 03:04:05.678', '1970-01-01 00:00:00+00', false, '[]', '00000000-0000-0000-0000-000000000000', '{{}}', '{{}}', 'sad'),
         (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);"
    ));
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE src STORED AS POSTGRES LOCATION '{PG}' OPTIONS ('table' 'rt_src');\n\
             CREATE EXTERNAL TABLE dst STORED AS POSTGRES LOCATION '{PG}' OPTIONS ('table' 'rt_dst', 'create' 'never');\n\
             INSERT INTO dst SELECT * FROM src;\n"
        ),
        &[],
    );
    ok(&out);
    assert_eq!(pg("SELECT count(*) FROM rt_dst"), "3");
    assert_eq!(
        pg("SELECT count(*) FROM (SELECT * FROM rt_src EXCEPT SELECT * FROM rt_dst) x"),
        "0",
        "rows differ: {}",
        pg("SELECT * FROM rt_src EXCEPT SELECT * FROM rt_dst")
    );
}

#[test]
fn mysql_types_survive_a_copy_through_flumen() {
    let cols = "id INT PRIMARY KEY, i1 TINYINT, i2 SMALLINT, i4 INT, i8 BIGINT, u1 TINYINT UNSIGNED, u8 BIGINT UNSIGNED, \
                f FLOAT, d DOUBLE, n DECIMAL(28, 10), money DECIMAL(10, 2), vc VARCHAR(20), t TEXT, b BLOB, dt DATE, \
                tm TIME(6), ts DATETIME(6), ok BOOLEAN, j JSON, e ENUM('red', 'green')";
    my(&format!(
        "DROP TABLE IF EXISTS rt_src, rt_dst; CREATE TABLE rt_src ({cols}) CHARACTER SET utf8mb4; CREATE TABLE rt_dst LIKE rt_src;
         INSERT INTO rt_src VALUES
         (1, -128, -32768, -2147483648, -9223372036854775808, 255, 18446744073709551615, -3.4e38, 1e300,
          123456789012345678.1234567891, -99999999.99, 'héllo', 'tab\\there \"q\" \\\\ new\\nline 東京 🎉', X'00ff10',
          '1000-01-01', '23:59:59.999999', '1969-12-31 23:59:59.5', true, '{{\"a\": [1, \"x\"]}}', 'green'),
         (2, 127, 32767, 2147483647, 9223372036854775807, 0, 0, 1.5, -0.5, 0, 0.01, '', '', X'', '9999-12-31',
          '00:00:00', '2040-01-02 03:04:05.678', false, '[]', 'red'),
         (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);"
    ));
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE src STORED AS MYSQL LOCATION '{MY}' OPTIONS ('table' 'rt_src');\n\
             CREATE EXTERNAL TABLE dst STORED AS MYSQL LOCATION '{MY}' OPTIONS ('table' 'rt_dst', 'create' 'never');\n\
             INSERT INTO dst SELECT * FROM src;\n"
        ),
        &[],
    );
    ok(&out);
    assert_eq!(my("SELECT count(*) FROM rt_dst"), "3");
    assert_eq!(
        my("SELECT count(*) FROM (SELECT * FROM rt_src EXCEPT SELECT * FROM rt_dst) x"),
        "0",
        "rows differ: {}",
        my("SELECT * FROM rt_src EXCEPT SELECT * FROM rt_dst")
    );
}

#[test]
fn sqlite_types_survive_a_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("t.db");
    let loc = format!("sqlite://{}", db.display());
    let cols = "id BIGINT NOT NULL, i8 TINYINT, u32 INT UNSIGNED, f DOUBLE, dec DECIMAL(20, 4), s VARCHAR, b BYTEA, \
                ok BOOLEAN, d DATE, ts TIMESTAMP, tags VARCHAR[]";
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE TABLE src ({cols}) AS VALUES\n\
               (1, -128, 4294967295, 1e300, 1234567890123456.7891, 'tab\there ''q'' 東京', X'00ff', true, DATE '1969-07-20',\n\
                TIMESTAMP '1969-12-31 23:59:59.5', ['a', 'b']),\n\
               (2, 127, 0, -0.5, -0.0001, '', X'', false, DATE '2262-04-11', TIMESTAMP '2040-01-02 03:04:05.678', []),\n\
               (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);\n\
             CREATE EXTERNAL TABLE t ({cols}) STORED AS SQLITE LOCATION '{loc}' OPTIONS ('table' 'rt');\n\
             INSERT INTO t SELECT * FROM src;\n\
             CREATE EXTERNAL TABLE back (id BIGINT NOT NULL, i8 TINYINT, u32 INT UNSIGNED, f DOUBLE, dec DECIMAL(20, 4),\n\
               s VARCHAR, b BYTEA, ok BOOLEAN, d DATE, ts TIMESTAMP, tags VARCHAR)\n\
               STORED AS SQLITE LOCATION '{loc}' OPTIONS ('table' 'rt');\n\
             SELECT count(*) AS n FROM (SELECT id, i8, u32, f, dec, s, b, ok, d, ts FROM src\n\
               EXCEPT ALL SELECT id, i8, u32, f, dec, s, b, ok, d, ts FROM back) x;\n\
             SELECT id, tags FROM back ORDER BY id;\n"
        ),
        &["--format", "csv"],
    );
    assert_eq!(
        ok(&out),
        "3 rows written\nn\n0\nid,tags\n1,\"[\"\"a\"\",\"\"b\"\"]\"\n2,[]\n3,\n"
    );
    assert_eq!(
        lite(
            &db,
            "SELECT typeof(id), typeof(f), typeof(dec), typeof(b), d, ts FROM rt WHERE id = 1"
        ),
        "integer|real|text|blob|1969-07-20|1969-12-31 23:59:59.500"
    );
}

/// Runs SQL in one database.
type Runner = Box<dyn Fn(&str) -> String>;

/// The three databases, each with its LOCATION and a way to run SQL in it.
fn targets(dir: &Path) -> Vec<(&'static str, String, Runner)> {
    let db = dir.join("t.db");
    let loc = format!("sqlite://{}", db.display());
    vec![
        ("POSTGRES", PG.to_string(), Box::new(pg)),
        ("MYSQL", MY.to_string(), Box::new(my)),
        ("SQLITE", loc, Box::new(move |sql: &str| lite(&db, sql))),
    ]
}

#[test]
fn a_job_transaction_failing_at_60_percent_leaves_the_table_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, loc, sql) in targets(dir.path()) {
        let t = format!("job_{}", kind.to_lowercase());
        sql(&format!("DROP TABLE IF EXISTS {t}"));
        sql(&format!(
            "CREATE TABLE {t} (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)"
        ));
        sql(&format!("INSERT INTO {t} VALUES (-1, 7), (-2, 8)"));
        // 10 requests of 1,000 rows; row 6,000 has a NULL the table refuses.
        let script = format!(
            "CREATE EXTERNAL TABLE t (id BIGINT, v BIGINT) STORED AS {kind} LOCATION '{loc}'\n\
               OPTIONS ('table' '{t}', 'transaction' 'job', 'batch_rows' '1000');\n\
             INSERT INTO t SELECT value, CASE WHEN value = 6000 THEN NULL ELSE value * 2 END FROM generate_series(1, 10000);\n"
        );
        let out = flumen(dir.path(), &script, &[]);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{kind}: the job should fail");
        assert!(
            err.contains("rolled back") || err.contains("NOT NULL") || err.contains("null"),
            "{kind}: {err}"
        );
        assert_eq!(
            sql(&format!("SELECT count(*), sum(v) FROM {t}")).replace('\t', "|"),
            "2|15",
            "{kind}: the table changed"
        );
        // The same job without the bad row commits all of it.
        let out = flumen(dir.path(), &script.replace("value = 6000", "value = -6000"), &[]);
        ok(&out);
        assert_eq!(
            sql(&format!("SELECT count(*), sum(v) FROM {t}")).replace('\t', "|"),
            "10002|100010015",
            "{kind}"
        );
    }
}

#[test]
fn upserting_twice_updates_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, loc, sql) in targets(dir.path()) {
        let t = format!("up_{}", kind.to_lowercase());
        sql(&format!("DROP TABLE IF EXISTS {t}"));
        let script = |factor: u32| {
            format!(
                "CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, name VARCHAR, v BIGINT) STORED AS {kind} LOCATION '{loc}'\n\
                   OPTIONS ('table' '{t}', 'mode' 'upsert', 'keys' 'id', 'batch_rows' '700');\n\
                 INSERT INTO t SELECT value % 1500, 'n' || value, value * {factor} FROM generate_series(1, 3000);\n"
            )
        };
        ok(&flumen(dir.path(), &script(1), &[]));
        ok(&flumen(dir.path(), &script(10), &[]));
        // 1,500 keys; each holds its last row (value 1501..3000) times 10.
        assert_eq!(
            sql(&format!(
                "SELECT count(*), count(DISTINCT id), sum(v), min(name) FROM {t}"
            ))
            .replace('\t', "|"),
            format!("1500|1500|{}|n1501", (1501..=3000u64).sum::<u64>() * 10),
            "{kind}"
        );
    }
}

#[test]
fn connection_and_option_mistakes_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    pg("DROP TABLE IF EXISTS err_t, err_big; CREATE TABLE err_t (id BIGINT, name TEXT);
        CREATE TABLE err_big (id INT, n NUMERIC(38, 0)); INSERT INTO err_big VALUES (1, 12345678901234567890123456789012345)");
    for (script, want) in [
        (
            "CREATE EXTERNAL TABLE t STORED AS POSTGRES LOCATION 'postgres://flumen:${PW}@127.0.0.1:1/flumen' OPTIONS ('table' 'err_t');\n",
            "connect",
        ),
        (
            "CREATE EXTERNAL TABLE t STORED AS POSTGRES LOCATION 'postgres://flumen:wrong-secret@127.0.0.1:5432/flumen' OPTIONS ('table' 'err_t');\n",
            "password authentication failed",
        ),
        (
            "CREATE EXTERNAL TABLE t STORED AS MYSQL LOCATION 'mysql://flumen:wrong-secret@127.0.0.1:3306/flumen' OPTIONS ('table' 'err_t');\n",
            "Access denied",
        ),
        (
            "CREATE EXTERNAL TABLE t STORED AS POSTGRES LOCATION 'postgres://flumen:${PW}@127.0.0.1:5432/flumen' OPTIONS ('table' 'no_such_table');\n",
            "no_such_table",
        ),
        (
            "CREATE EXTERNAL TABLE t STORED AS POSTGRES LOCATION 'postgres://flumen:${PW}@127.0.0.1:5432/flumen' OPTIONS ('table' 'err_t', 'partition_on' 'name');\n",
            "'partition_on' name is Utf8; it must be an integer column",
        ),
        (
            "CREATE EXTERNAL TABLE t STORED AS POSTGRES LOCATION 'postgres://flumen:${PW}@127.0.0.1:5432/flumen' OPTIONS ('table' 'err_t', 'partition_on' 'nope');\n",
            "'nope' is not a column",
        ),
        (
            // 35 digits: more than ConnectorX's decimals hold.
            "CREATE EXTERNAL TABLE t STORED AS POSTGRES LOCATION 'postgres://flumen:${PW}@127.0.0.1:5432/flumen' OPTIONS ('table' 'err_big');\n",
            "table t (column n cannot be read as Decimal128(38, 0))",
        ),
        (
            "CREATE EXTERNAL TABLE t STORED AS POSTGRES LOCATION 'mysql://h/db' OPTIONS ('table' 'err_t');\n",
            "does not fit STORED AS POSTGRES",
        ),
        (
            "CREATE EXTERNAL TABLE t STORED AS POSTGRES LOCATION 'postgres://flumen:${PW}@127.0.0.1:5432/flumen' OPTIONS ('tabel' 'err_t');\n",
            "did you mean 'table'",
        ),
    ] {
        let out = flumen(dir.path(), &(script.to_string() + "SELECT * FROM t;\n"), &[]);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want) && !err.contains("panicked"),
            "{script}: {err}"
        );
        assert!(
            !err.contains("wrong-secret") && !err.contains("flumen-test"),
            "a password leaked: {err}"
        );
    }
}

#[test]
fn refused_rows_go_to_dead_letters_and_the_rest_is_written() {
    let dir = tempfile::tempdir().unwrap();
    for (kind, loc, sql) in targets(dir.path()) {
        let t = format!("dl_{}", kind.to_lowercase());
        sql(&format!("DROP TABLE IF EXISTS {t}"));
        sql(&format!(
            "CREATE TABLE {t} (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)"
        ));
        let state = dir.path().join(format!("state-{kind}"));
        let script = format!(
            "CREATE EXTERNAL TABLE t (id BIGINT, v BIGINT) STORED AS {kind} LOCATION '{loc}'\n\
               OPTIONS ('table' '{t}', 'batch_rows' '1000', 'max_rejected' '10');\n\
             INSERT INTO t SELECT value, CASE WHEN value IN (17, 1500, 2999) THEN NULL ELSE value END FROM generate_series(1, 3000);\n"
        );
        let path = dir.path().join("dl.sql");
        std::fs::write(&path, script).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args([
                "run",
                path.to_str().unwrap(),
                "-q",
                "--set",
                "PW=flumen-test",
                "--state-dir",
            ])
            .arg(&state)
            .output()
            .unwrap();
        ok(&out);
        assert_eq!(
            sql(&format!("SELECT count(*), sum(v) FROM {t}")).replace('\t', "|"),
            format!("2997|{}", (1..=3000u64).sum::<u64>() - 17 - 1500 - 2999),
            "{kind}"
        );
        let dead = std::fs::read_dir(state.join("dead_letter"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["sql", "-q", "--format", "csv", "-e"])
            .arg(format!(
                "SELECT string_agg(CAST(id AS VARCHAR), ',' ORDER BY id) AS ids, min(_error) AS reason FROM '{}/t/'",
                dead.display()
            ))
            .output()
            .unwrap();
        let csv = ok(&out);
        assert!(csv.starts_with("ids,reason\n\"17,1500,2999\","), "{kind}: {csv}");
        assert!(
            csv.to_lowercase().contains("null"),
            "{kind}: the reason names the fault: {csv}"
        );
    }
}

#[test]
fn a_million_rows_go_mysql_to_postgres_and_back_with_a_transformation() {
    my("DROP TABLE IF EXISTS mill_src, mill_back");
    pg("DROP TABLE IF EXISTS mill_pg");
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "CREATE EXTERNAL TABLE gen STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '1M');\n\
         CREATE EXTERNAL TABLE m (order_id BIGINT NOT NULL, user_id BIGINT, created_at TIMESTAMP, status VARCHAR, amount DECIMAL(18, 2))\n\
           STORED AS MYSQL LOCATION '{MY}' OPTIONS ('table' 'mill_src');\n\
         INSERT INTO m SELECT order_id, user_id, created_at, status, amount FROM gen;\n\
         CREATE EXTERNAL TABLE src STORED AS MYSQL LOCATION '{MY}' OPTIONS ('table' 'mill_src', 'partition_on' 'order_id', 'partitions' '3', 'chunk_keys' '200000');\n\
         CREATE EXTERNAL TABLE p (order_id BIGINT NOT NULL, user_id BIGINT, created_at TIMESTAMP, status VARCHAR, amount2 DECIMAL(19, 2))\n\
           STORED AS POSTGRES LOCATION '{PG}' OPTIONS ('table' 'mill_pg');\n\
         INSERT INTO p SELECT order_id, user_id, created_at, upper(status), CAST(amount * 2 AS DECIMAL(19, 2)) FROM src;\n\
         CREATE EXTERNAL TABLE pin STORED AS POSTGRES LOCATION '{PG}' OPTIONS ('table' 'mill_pg', 'partition_on' 'order_id', 'partitions' '2');\n\
         CREATE EXTERNAL TABLE back (order_id BIGINT NOT NULL, user_id BIGINT, created_at TIMESTAMP, status VARCHAR, amount DECIMAL(18, 2))\n\
           STORED AS MYSQL LOCATION '{MY}' OPTIONS ('table' 'mill_back');\n\
         INSERT INTO back SELECT order_id, user_id, created_at, lower(status), CAST(amount2 / 2 AS DECIMAL(18, 2)) FROM pin;\n"
    );
    let out = flumen(dir.path(), &script, &[]);
    ok(&out);
    let sums = "count(*), sum(order_id), sum(user_id % 1000003), sum(length(status))";
    let mysrc = my(&format!(
        "SELECT {sums}, sum(amount) * 2, count(DISTINCT created_at) FROM mill_src"
    ));
    let pgmid = pg(&format!(
        "SELECT {sums}, sum(amount2), count(DISTINCT created_at) FROM mill_pg WHERE status = upper(status)"
    ));
    assert_eq!(mysrc.split('\t').next(), Some("1000000"));
    assert_eq!(mysrc.replace('\t', "|"), pgmid, "MySQL source vs PostgreSQL");
    // Back in MySQL: every row equals its source row.
    assert_eq!(
        my("SELECT count(*) FROM (SELECT * FROM mill_src EXCEPT SELECT * FROM mill_back) x"),
        "0"
    );
    assert_eq!(my("SELECT count(*) FROM mill_back"), "1000000");
}

/// A materialized view stored in PostgreSQL (`STORED AS POSTGRES`): the warehouse keeps the
/// view, and each refresh (full or incremental) replaces the PostgreSQL table's rows in one
/// transaction; the password stays out of every message and of the warehouse.
#[test]
fn a_materialized_view_stored_in_postgres_follows_its_refreshes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pg("DROP TABLE IF EXISTS mv_by_city");
    let append = |from: u64, to: u64| {
        ok(&flumen(
            d,
            &format!(
                "COPY (SELECT id, 'c' || CAST(id % 7 AS VARCHAR) AS city, CAST(id % 1013 AS DOUBLE) / 4 AS amount \
                 FROM generate_series({from}, {}) t(id)) TO '{}/orders/part-{from:08}.parquet';\n",
                to - 1,
                d.display()
            ),
            &[],
        ))
    };
    append(0, 70_000);
    let created = ok(&flumen(
        d,
        &format!(
            "CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '{}/orders/';\n\
             CREATE MATERIALIZED VIEW by_city STORED AS POSTGRES LOCATION '{PG}' \
               OPTIONS ('table' 'mv_by_city', 'watermark' 'id') \
               AS SELECT city, count(*) AS n, sum(amount) AS revenue, avg(amount) AS mean FROM orders GROUP BY city;\n",
            d.display()
        ),
        &[],
    ));
    assert_eq!(
        created,
        "materialized view by_city created: 7 rows (version 1); 7 rows written to STORED AS POSTGRES LOCATION 'postgres://flumen:***@127.0.0.1:5432/flumen'\n"
    );
    // Rows as fields, numbers parsed: the two print floats differently.
    let fields = |t: &str, sep: char| -> Vec<Vec<String>> {
        t.lines()
            .map(|l| {
                l.split(sep)
                    .map(|f| match f.parse::<f64>() {
                        Ok(x) => format!("{x:.6}"),
                        Err(_) => f.to_string(),
                    })
                    .collect()
            })
            .collect()
    };
    let in_pg = || {
        fields(
            &pg("SELECT city, n, revenue, mean FROM mv_by_city ORDER BY city"),
            '|',
        )
    };
    let in_flumen = || {
        let out = ok(&flumen(
            d,
            "SELECT city, n, revenue, mean FROM by_city ORDER BY city;\n",
            &["--format", "csv"],
        ));
        fields(&out.lines().skip(1).collect::<Vec<_>>().join("\n"), ',')
    };
    assert_eq!(in_pg(), in_flumen());
    assert_eq!(in_pg().len(), 7);
    assert_eq!(in_pg()[0][..2], ["c0".to_string(), "10000.000000".to_string()]);
    append(70_000, 77_000);
    let refreshed = ok(&flumen(
        d,
        "REFRESH MATERIALIZED VIEW by_city INCREMENTAL;\n",
        &[],
    ));
    assert!(
        refreshed.contains("refreshed incrementally, id past 69999 up to 76999")
            && refreshed.ends_with("; 7 rows written to STORED AS POSTGRES LOCATION 'postgres://flumen:***@127.0.0.1:5432/flumen'\n"),
        "{refreshed}"
    );
    assert_eq!(in_pg(), in_flumen());
    assert_eq!(pg("SELECT sum(n) FROM mv_by_city"), "77000");
    // The warehouse keeps the location as written.
    let kept = std::fs::read_to_string(d.join("state/warehouse/by_city/view.json")).unwrap();
    assert!(kept.contains("${PW}") && !kept.contains("flumen-test"), "{kept}");
    // A target that cannot replace its rows, and a mode the view decides, are refused at CREATE.
    let e = text(
        &flumen(
            d,
            &format!(
                "CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '{}/orders/';\n\
                 CREATE MATERIALIZED VIEW v2 STORED AS POSTGRES LOCATION '{PG}' OPTIONS ('table' 'x', 'mode' 'append') AS SELECT id FROM orders;\n",
                d.display()
            ),
            &[],
        )
        .stderr,
    );
    assert!(
        e.contains("option 'mode': the view decides how its target is written"),
        "{e}"
    );
    let e = text(
        &flumen(
            d,
            &format!(
                "CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '{}/orders/';\n\
                 CREATE MATERIALIZED VIEW v3 STORED AS KAFKA LOCATION 'kafka://127.0.0.1:1' OPTIONS ('topic' 't') AS SELECT id FROM orders;\n",
                d.display()
            ),
            &[],
        )
        .stderr,
    );
    assert!(
        e.contains(
            "materialized view v3: STORED AS KAFKA LOCATION 'kafka://127.0.0.1:1' cannot hold the view"
        ) && e.contains("'mode' 'overwrite'"),
        "{e}"
    );
    assert!(!d.join("state/warehouse/v3").exists());
}

/// Incremental loads: a MariaDB table that grows and changes between runs, loaded into
/// PostgreSQL (upsert on the key) by the same script three times. Each run after the first
/// reads only the rows past the saved `updated_at` (the count the source query returned), the
/// target equals the source after each run, a run whose sink fails leaves the watermark where
/// it was (the rerun loads the rows it missed), and `--full-refresh` reads everything.
#[test]
fn incremental_runs_read_only_new_and_updated_rows() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    my("DROP TABLE IF EXISTS inc_src; CREATE TABLE inc_src (id INT PRIMARY KEY, name VARCHAR(20), amount BIGINT, updated_at DATETIME(6) NOT NULL);
        INSERT INTO inc_src SELECT seq, CONCAT('n', seq), seq * 10, TIMESTAMP('2026-01-01') + INTERVAL seq SECOND FROM seq_1_to_1000;");
    pg("DROP TABLE IF EXISTS inc_dst");
    common::ch("DROP DATABASE IF EXISTS flumen_t_inc");
    common::ch("CREATE DATABASE flumen_t_inc");
    // Two targets of one source, each with its own watermark: PostgreSQL (ON CONFLICT) and
    // ClickHouse (a ReplacingMergeTree by id, versioned by updated_at, read with FINAL). The
    // ClickHouse statement comes second, so a failed PostgreSQL run stops before it.
    let script = "CREATE EXTERNAL TABLE inc_src STORED AS MYSQL LOCATION '".to_string()
        + MY
        + "' OPTIONS ('table' 'inc_src', 'incremental_column' 'updated_at');\n\
           CREATE EXTERNAL TABLE dst (id INT NOT NULL, name VARCHAR, amount BIGINT, updated_at TIMESTAMP) STORED AS POSTGRES \
             LOCATION 'postgres://flumen:${PW}@127.0.0.1:${PORT}/flumen' \
             OPTIONS ('table' 'inc_dst', 'mode' 'upsert', 'keys' 'id', 'max_attempts' '1', 'on_failure' 'fail');\n\
           CREATE EXTERNAL TABLE chdst (id INT NOT NULL, name VARCHAR, amount BIGINT, updated_at TIMESTAMP NOT NULL) \
             STORED AS CLICKHOUSE LOCATION 'http://127.0.0.1:8123/flumen_t_inc' \
             OPTIONS ('table' 'inc_dst', 'create' 'if_not_exists', 'mode' 'upsert', 'keys' 'id', 'version' 'updated_at');\n\
           INSERT INTO dst SELECT id, name, amount, updated_at FROM inc_src;\n\
           INSERT INTO chdst SELECT id, name, amount, updated_at FROM inc_src;\n";
    let run = |port: &str, extra: &[&str]| {
        let mut args = vec!["--set", "PORT"];
        let set = format!("PORT={port}");
        args[1] = &set;
        args.extend_from_slice(extra);
        flumen(d, &script, &args)
    };
    // The rows the source query returned for one target, from the run's report.
    let read_for = |target: &str, out: &str| -> u64 {
        let prefix = format!("incremental inc_src.updated_at -> {target}: ");
        let line = out
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no incremental line for {target} in {out}"));
        line[prefix.len()..].split(' ').next().unwrap().parse().unwrap()
    };
    // Both targets read the same rows.
    let read = |out: &str| -> u64 {
        let n = read_for("dst", out);
        assert_eq!(read_for("chdst", out), n, "{out}");
        n
    };
    let same = || {
        let src = my(
            "SELECT id, name, amount, DATE_FORMAT(updated_at, '%Y-%m-%d %H:%i:%s') FROM inc_src ORDER BY id",
        )
        .replace('\t', "|");
        let dst = pg(
            "SELECT id, name, amount, to_char(updated_at, 'YYYY-MM-DD HH24:MI:SS') FROM inc_dst ORDER BY id",
        );
        assert_eq!(src.lines().count(), dst.lines().count());
        assert!(src == dst, "the target differs from the source");
        let ch = common::ch(
            "SELECT id, name, amount, toString(updated_at, 'UTC') FROM flumen_t_inc.inc_dst FINAL ORDER BY id FORMAT TabSeparated",
        )
        .replace('\t', "|");
        assert_eq!(src.lines().count(), ch.lines().count());
        assert!(
            src.trim_end() == ch.trim_end(),
            "the ClickHouse target differs from the source"
        );
    };
    let out = ok(&run("5432", &[]));
    assert_eq!(read(&out), 1000, "{out}");
    same();
    // Round 2: 200 new rows and 50 updated old ones (a newer updated_at; 10 more of the new).
    my("INSERT INTO inc_src SELECT seq, CONCAT('n', seq), seq * 10, TIMESTAMP('2026-01-01') + INTERVAL seq SECOND FROM seq_1001_to_1200;
        UPDATE inc_src SET amount = -amount, updated_at = TIMESTAMP('2026-02-01') + INTERVAL id SECOND WHERE id % 20 = 0;");
    let out = ok(&run("5432", &[]));
    assert_eq!(read(&out), 250, "{out}");
    same();
    // Round 3: the sink is down. The run fails and the watermark stays.
    my("INSERT INTO inc_src SELECT seq, CONCAT('n', seq), seq * 10, TIMESTAMP('2026-03-01') + INTERVAL seq SECOND FROM seq_1201_to_1300;
        UPDATE inc_src SET name = 'changed', updated_at = TIMESTAMP('2026-03-02') WHERE id <= 7;");
    let before = std::fs::read_to_string(d.join("state/watermarks.json")).unwrap();
    let failed = run("1", &[]);
    assert!(!failed.status.success(), "a run to a closed port succeeded");
    assert_eq!(
        std::fs::read_to_string(d.join("state/watermarks.json")).unwrap(),
        before
    );
    let out = ok(&run("5432", &[]));
    assert_eq!(read(&out), 107, "{out}");
    same();
    // Nothing new: nothing read.
    let out = ok(&run("5432", &[]));
    assert_eq!(read(&out), 0, "{out}");
    // --full-refresh reads it all again; the upsert keeps the target equal.
    let out = ok(&run("5432", &["--full-refresh"]));
    assert_eq!(read(&out), 1300, "{out}");
    same();
    let runs = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["runs", "--state-dir"])
        .arg(d.join("state"))
        .output()
        .unwrap();
    let runs = ok(&runs);
    assert!(
        runs.contains("incremental inc_src.updated_at -> dst: 250 rows read past 2026-01-01T00:16:40"),
        "{runs}"
    );
}

/// Filters pushed to the server mean the same whatever the session's string settings: a value
/// with a backslash and a quote, compared in PostgreSQL with `standard_conforming_strings` off
/// (where `'a\'` would escape the quote) and in MariaDB (where a backslash escapes unless
/// `NO_BACKSLASH_ESCAPES`), finds its row and nothing else.
#[test]
fn pushed_string_filters_mean_the_same_in_every_session_mode() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pg(
        "DROP TABLE IF EXISTS pushed_bs; CREATE TABLE pushed_bs (id int, v text); \
        INSERT INTO pushed_bs VALUES (1, E'a\\\\'), (2, 'a'), (3, E'a\\\\'' OR 1=1 -- '), (4, 'b')",
    );
    my(
        "DROP TABLE IF EXISTS pushed_bs; CREATE TABLE pushed_bs (id int, v text); \
        INSERT INTO pushed_bs VALUES (1, 'a\\\\'), (2, 'a'), (3, 'a\\\\'' OR 1=1 -- '), (4, 'b')",
    );
    let check = |stored: &str, location: &str| {
        let script = format!(
            "CREATE EXTERNAL TABLE t STORED AS {stored} LOCATION '{location}' OPTIONS ('table' 'pushed_bs');\n\
             SELECT id FROM t WHERE v = 'a\\' ORDER BY id;\n\
             SELECT id FROM t WHERE v = 'a\\'' OR 1=1 -- ' ORDER BY id;\n\
             SELECT id FROM t WHERE v IN ('b', 'a') ORDER BY id;\n"
        );
        let out = ok(&flumen(d, &script, &["--format", "csv"]));
        assert_eq!(out, "id\n1\nid\n3\nid\n2\n4\n", "{stored} {location}");
    };
    check(
        "POSTGRES",
        &format!("{PG}?options=-c%20standard_conforming_strings%3Doff"),
    );
    check("POSTGRES", PG);
    check("MYSQL", MY);
}
