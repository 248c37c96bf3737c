//! The `flumen` binary as a user runs it: exit codes, messages, outputs, and bounded memory.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn flumen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(args)
        .current_dir(root())
        .env_remove("FLUMEN_MEMORY_LIMIT")
        .output()
        .expect("the flumen binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a script and expects failure: returns stderr after checking it is a clean error.
fn fails(script: &str, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.sql");
    std::fs::write(&path, script).unwrap();
    let mut args = vec!["run", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = flumen(&args);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "expected exit 1, stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains("job.sql"), "names the script: {err}");
    err
}

fn write_script(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("job.sql");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn quickstart_prints_a_result_and_writes_partitioned_parquet() {
    let out_dir = tempfile::tempdir().unwrap();
    let set = format!("OUT={}", out_dir.path().display());
    let out = flumen(&["run", "sql/examples/quickstart.sql", "--set", &set]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("| country | orders | revenue"), "{stdout}");
    assert!(stdout.contains("(10 rows)"), "{stdout}");
    let partitions: Vec<String> = std::fs::read_dir(out_dir.path().join("revenue_by_country"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(partitions.len(), 17, "16 countries + ALL: {partitions:?}");
    assert!(partitions.contains(&"country=DE".to_string()));
    assert!(out_dir.path().join("city_activity.parquet").is_file());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("done: 7 statements") && stderr.contains("peak memory"),
        "{stderr}"
    );
}

#[test]
fn quickstart_twice_gives_the_same_output() {
    let out_dir = tempfile::tempdir().unwrap();
    let set = format!("OUT={}", out_dir.path().display());
    let first = flumen(&["run", "sql/examples/quickstart.sql", "--set", &set, "-q"]);
    let second = flumen(&["run", "sql/examples/quickstart.sql", "--set", &set, "-q"]);
    assert!(first.status.success() && second.status.success());
    assert_eq!(text(&first.stdout), text(&second.stdout));
}

#[test]
fn bad_sql_names_the_line() {
    let err = fails("SELECT 1;\n\nSELEC 2;\n", &[]);
    assert!(err.contains("statement at line 3"), "{err}");
    assert!(err.contains("SELEC 2"), "{err}");
}

#[test]
fn syntax_errors_stop_the_script_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("never.csv");
    let script = format!(
        "COPY (SELECT 1 AS x) TO '{}' STORED AS CSV;\nSELEC oops;\n",
        target.display()
    );
    let err = fails(&script, &[]);
    assert!(err.contains("line 2"), "{err}");
    assert!(!target.exists(), "the first statement must not have run");
}

#[test]
fn missing_file_names_the_path() {
    let err = fails(
        "CREATE EXTERNAL TABLE t STORED AS CSV LOCATION '/nonexistent/flumen/x.csv';",
        &[],
    );
    assert!(
        err.contains("/nonexistent/flumen/x.csv") && err.contains("line 1"),
        "{err}"
    );
}

#[test]
fn unknown_stored_as_lists_known_names() {
    let err = fails("\nCREATE EXTERNAL TABLE t STORED AS CLIKHOUSE LOCATION 'x';", &[]);
    assert!(
        err.contains("unknown STORED AS name 'CLIKHOUSE'") && err.contains("PARQUET"),
        "{err}"
    );
    assert!(err.contains("line 2"), "{err}");
}

#[test]
fn unknown_option_lists_valid_ones() {
    let err = fails(
        "CREATE EXTERNAL TABLE t STORED AS GENERATE LOCATION 'users' OPTIONS ('sed' '1');",
        &[],
    );
    assert!(
        err.contains("unknown GENERATE option 'sed'") && err.contains("valid options: rows, seed"),
        "{err}"
    );
}

#[test]
fn unset_variable_names_variable_and_line() {
    let err = fails("SELECT 1;\nSELECT '${REGION}';\n", &[]);
    assert!(err.contains("line 2: variable ${REGION} is not set"), "{err}");
}

#[test]
fn malformed_csv_row_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bad.csv");
    std::fs::write(&csv, "a,b\n1,2\n3,4\n5\n").unwrap();
    let err = fails(
        &format!(
            "CREATE EXTERNAL TABLE t (a INT, b INT) STORED AS CSV LOCATION '{}' OPTIONS ('has_header' 'true');\nSELECT sum(a) FROM t;",
            csv.display()
        ),
        &[],
    );
    assert!(err.contains("line 4"), "the CSV line: {err}");
    assert!(err.contains("statement at line 2"), "the script line: {err}");
}

#[test]
fn set_overrides_the_environment() {
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args([
            "sql",
            "-e",
            "SELECT '${WHO}' AS who",
            "--format",
            "csv",
            "--set",
            "WHO=cli",
            "-q",
        ])
        .env("WHO", "env")
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "who\ncli\n");
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["sql", "-e", "SELECT '${WHO}' AS who", "--format", "csv", "-q"])
        .env("WHO", "env")
        .output()
        .unwrap();
    assert_eq!(text(&out.stdout), "who\nenv\n");
}

#[test]
fn explain_prints_plans_writes_nothing_and_hides_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out");
    let script = write_script(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE o STORED AS CSV LOCATION '{}/data/orders.csv' OPTIONS ('has_header' 'true');\n\
             CREATE TABLE big AS SELECT city, count(*) AS n FROM o GROUP BY city;\n\
             COPY (SELECT * FROM big WHERE city <> '${{API_TOKEN}}') TO '{}/' STORED AS PARQUET;\n",
            root().display(),
            target.display()
        ),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["explain", script.to_str().unwrap()])
        .env("API_TOKEN", "tok-very-secret-123")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("-- statement at line 3") && stdout.contains("physical plan:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("CopyTo") || stdout.contains("DataSinkExec"),
        "{stdout}"
    );
    assert!(!stdout.contains("tok-very-secret-123"), "secret leaked: {stdout}");
    assert!(stdout.contains("***"), "{stdout}");
    assert!(!target.exists(), "explain must not write");
}

#[test]
fn results_as_csv_json_and_parquet() {
    let q = "SELECT user_id, country FROM 'data/users.csv' WHERE user_id <= 3 ORDER BY user_id";
    let csv = flumen(&["sql", "-e", q, "--format", "csv", "-q"]);
    assert_eq!(
        text(&csv.stdout),
        "user_id,country\n1,SE\n2,SE\n3,GB\n",
        "{}",
        text(&csv.stderr)
    );
    let json = flumen(&["sql", "-e", q, "--format", "json", "-q"]);
    let lines: Vec<serde_json::Value> = text(&json.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["country"], "GB");
    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("r.parquet");
    let out = flumen(&[
        "sql",
        "-e",
        q,
        "--format",
        "parquet",
        "--output",
        pq.to_str().unwrap(),
        "-q",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let back = flumen(&[
        "sql",
        "-e",
        &format!("SELECT count(*) AS n FROM '{}'", pq.display()),
        "--format",
        "csv",
        "-q",
    ]);
    assert_eq!(text(&back.stdout), "n\n3\n");
}

#[test]
fn output_needs_exactly_one_query() {
    let out = flumen(&[
        "sql",
        "-e",
        "SELECT 1; SELECT 2",
        "--format",
        "csv",
        "--output",
        "/tmp/never-written.csv",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--output takes the result of exactly one query, but the script has 2")
    );
}

#[test]
fn table_output_shows_first_rows_and_counts_all() {
    let out = flumen(&[
        "sql",
        "-e",
        "SELECT * FROM 'data/orders.csv'",
        "--max-rows",
        "5",
        "-q",
    ]);
    let stdout = text(&out.stdout);
    assert!(stdout.contains("(10000 rows, first 5 shown"), "{stdout}");
}

#[test]
fn gen_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.csv");
    let b = dir.path().join("b.csv");
    for p in [&a, &b] {
        let out = flumen(&[
            "gen",
            "orders",
            "--rows",
            "50k",
            "--format",
            "csv",
            "-o",
            p.to_str().unwrap(),
            "-q",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a, b);
    assert_eq!(a.iter().filter(|c| **c == b'\n').count(), 50_001);
}

#[test]
fn json_logs_and_quiet() {
    let out = flumen(&["sql", "-e", "SELECT 1", "--log-format", "json"]);
    let summary = text(&out.stderr);
    let line = summary
        .lines()
        .find(|l| l.contains("\"done\""))
        .unwrap_or_else(|| panic!("{summary}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let inner: serde_json::Value = serde_json::from_str(v["fields"]["summary"].as_str().unwrap()).unwrap();
    assert_eq!(inner["statements"], 1);
    let quiet = flumen(&["sql", "-e", "SELECT 1", "-q"]);
    assert_eq!(text(&quiet.stderr), "");
}

#[test]
fn progress_lines_off_a_terminal() {
    let out = flumen(&[
        "sql",
        "-e",
        "CREATE EXTERNAL TABLE g STORED AS GENERATE LOCATION 'events' OPTIONS ('rows' '3M'); SELECT count(*) FROM g WHERE kind = 'purchase'",
        "--progress-interval",
        "1",
    ]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("rows read") && stderr.contains("rows/s"),
        "{stderr}"
    );
}

/// A GROUP BY with more groups than the memory limit can hold completes by spilling.
#[test]
fn high_cardinality_group_by_spills_within_the_limit() {
    let spill = tempfile::tempdir().unwrap();
    let out = flumen(&[
        "sql",
        "-e",
        "CREATE EXTERNAL TABLE o STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '1M'); \
         SELECT count(*) AS groups, sum(n) AS rows FROM (SELECT order_id, count(*) AS n FROM o GROUP BY order_id)",
        "--memory-limit",
        "24MiB",
        "--spill-dir",
        spill.path().to_str().unwrap(),
        "--format",
        "csv",
        "-q",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "groups,rows\n1000000,1000000\n");
    // And it did spill: the aggregate's own metrics say so.
    let analyze = flumen(&[
        "sql",
        "-e",
        "CREATE EXTERNAL TABLE o STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '1M'); \
         EXPLAIN ANALYZE SELECT count(*) FROM (SELECT order_id, count(*) AS n FROM o GROUP BY order_id)",
        "--memory-limit",
        "24MiB",
        "--format",
        "csv",
        "-q",
    ]);
    let plan = text(&analyze.stdout);
    let spills: u64 = plan
        .split("spill_count=")
        .skip(1)
        .filter_map(|s| s.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok())
        .sum();
    assert!(spills > 0, "expected spilling: {plan}");
}

#[test]
fn too_little_memory_is_a_clear_error() {
    let out = flumen(&[
        "sql",
        "-e",
        "CREATE EXTERNAL TABLE o STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '200k'); \
         SELECT order_id, count(*) FROM o GROUP BY order_id ORDER BY order_id",
        "--memory-limit",
        "64KiB",
        "-q",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("--memory-limit"), "{err}");
}

#[test]
fn generate_example_writes_a_partitioned_lake() {
    let out_dir = tempfile::tempdir().unwrap();
    let set = format!("OUT={}", out_dir.path().display());
    let out = flumen(&[
        "run",
        "sql/examples/generate_to_parquet.sql",
        "--set",
        "ROWS=20k",
        "--set",
        &set,
        "-q",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.starts_with("20000 rows written\n"), "{stdout}");
    assert!(out_dir.path().join("orders/status=delivered").is_dir());
    let back = flumen(&[
        "sql",
        "-e",
        &format!("SELECT count(*) AS n FROM '{}/orders/'", out_dir.path().display()),
        "--format",
        "csv",
        "-q",
    ]);
    assert_eq!(text(&back.stdout), "n\n20000\n");
}

#[test]
fn incremental_option_mistakes_are_named() {
    let src =
        "CREATE EXTERNAL TABLE o STORED AS CSV LOCATION 'data/orders.csv' OPTIONS ('has_header' 'true', ";
    let copy = "COPY (SELECT order_id FROM o) TO '/tmp/flumen-never-written.parquet';";
    let e = fails(&format!("{src}'incremental_column' 'nosuch');\n{copy}"), &[]);
    assert!(
        e.contains("table o: option 'incremental_column': no column 'nosuch' (columns: order_id, user_id"),
        "{e}"
    );
    let e = fails(
        &format!("{src}'incremental_column' 'city', 'lookback' '1h');\n{copy}"),
        &[],
    );
    assert!(
        e.contains(
            "table o: option 'lookback' '1h': a lookback needs a time or numeric column, and city is Utf8"
        ),
        "{e}"
    );
    let e = fails(&format!("{src}'lookback' '1h');\n{copy}"), &[]);
    assert!(
        e.contains("table o: option 'lookback' needs 'incremental_column'"),
        "{e}"
    );
}
