//! The sink machinery end to end, through the binary and the FAULTY test backend: retries,
//! staging and `flumen resume`, dead letters and `max_rejected`, metrics.
//! Needs the `test-backends` feature (tests/run.sh enables it).

use std::path::Path;
use std::process::{Command, Output};

fn flumen(state: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("the flumen binary runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A script loading `rows` generated orders into a FAULTY sink at `sink`, with extra options.
fn job(dir: &Path, rows: &str, sink: &Path, options: &str) -> String {
    let script = format!(
        "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '{rows}');\n\
         CREATE EXTERNAL TABLE sink (order_id BIGINT, city VARCHAR, amount DECIMAL(18,2)) STORED AS FAULTY\n\
           LOCATION '{}' OPTIONS ('batch_rows' '20k', 'retry_initial' '1ms', 'retry_max' '10ms', 'linger' '10m'{options});\n\
         INSERT INTO sink SELECT order_id, city, amount FROM src;\n",
        sink.display()
    );
    let path = dir.join("job.sql");
    std::fs::write(&path, script).unwrap();
    path.display().to_string()
}

/// Whole Parquet files in a sink folder (a killed writer can leave a hidden temporary file).
fn parquet_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
            })
            .count()
        })
        .unwrap_or(0)
}

/// Starts `flumen run script` and SIGKILLs it once `dir` holds `files` delivered requests.
fn kill_after(state: &Path, script: &str, dir: &Path, files: usize) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", script, "-q", "--state-dir"])
        .arg(state)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while parquet_files(dir) < files {
        assert!(std::time::Instant::now() < deadline, "the load did not progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the load ended before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    assert!(!child.wait().unwrap().success());
}

/// `flumen sql -q --format csv -e QUERY` with the test's state directory.
fn sql_csv(state: &Path, query: &str) -> Output {
    flumen(state, &["sql", "-q", "--format", "csv", "-e", query])
}

/// (rows, distinct order ids) of what the sink directory holds.
fn delivered(state: &Path, sink: &Path) -> (u64, u64) {
    if parquet_files(sink) == 0 {
        return (0, 0);
    }
    let out = sql_csv(
        state,
        &format!(
            "SELECT count(*) AS n, count(DISTINCT order_id) AS d FROM '{}/'",
            sink.display()
        ),
    );
    let s = text(&out.stdout);
    let line = s
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("{s}{}", text(&out.stderr)));
    let mut it = line.split(',').map(|v| v.parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

fn metrics(path: &Path) -> serde_json::Value {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v["sinks"]["sink"].clone()
}

fn run_id(state: &Path) -> String {
    let mut runs: Vec<String> = std::fs::read_dir(state.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".json").map(str::to_string))
        .collect();
    runs.sort();
    runs.pop().expect("a run ledger")
}

#[test]
fn transient_failures_are_retried_and_every_row_lands_once() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(
        dir.path(),
        "1M",
        &sink,
        ", 'fail_ratio' '0.3', 'max_attempts' '30', 'concurrency' '4'",
    );
    let m = dir.path().join("m.json");
    let out = flumen(&state, &["run", &script, "--metrics", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(delivered(&state, &sink), (1_000_000, 1_000_000));
    let m = metrics(&m);
    assert_eq!(m["rows"], 1_000_000);
    let (requests, retries) = (m["requests"].as_u64().unwrap(), m["retries"].as_u64().unwrap());
    assert!(retries > 0, "30% of requests fail: {m}");
    assert_eq!(
        requests - retries,
        50,
        "one first attempt per request of 20k rows: {m}"
    );
    assert_eq!(m["spilled"], 0);
    // Every request is journaled when sent and again when delivered.
    let journal = std::fs::read_to_string(
        state
            .join("runs")
            .join(format!("{}.journal.jsonl", run_id(&state))),
    )
    .unwrap();
    let sends = journal.lines().filter(|l| l.contains("\"t\":\"send\"")).count();
    let dones = journal.lines().filter(|l| l.contains("\"t\":\"done\"")).count();
    assert_eq!((sends, dones), (50, 50));
}

#[test]
fn a_sink_down_for_the_whole_run_is_staged_then_resumed_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(
        dir.path(),
        "300k",
        &sink,
        ", 'down' '${SINK_DOWN:-false}', 'max_attempts' '3'",
    );
    let out = flumen(&state, &["run", &script, "--set", "SINK_DOWN=true"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let run = run_id(&state);
    assert!(
        err.contains("300000 rows in") && err.contains(&format!("flumen resume {run}")),
        "{err}"
    );
    assert_eq!(delivered(&state, &sink).0, 0);

    // Staged parts are plain Parquet that flumen can read.
    let staged = sql_csv(
        &state,
        &format!(
            "SELECT count(*) AS n FROM '{}/staging/{run}/sink/'",
            state.display()
        ),
    );
    assert_eq!(text(&staged.stdout), "n\n300000\n");
    let runs = text(&flumen(&state, &["runs"]).stdout);
    assert!(
        runs.contains(&run) && runs.contains("spilled") && runs.contains("300000 spilled"),
        "{runs}"
    );

    // The sink is back (SINK_DOWN is unset now): resume delivers everything, once.
    let out = flumen(&state, &["resume", &run]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("300000 rows"), "{}", text(&out.stdout));
    assert_eq!(delivered(&state, &sink), (300_000, 300_000));
    let out = flumen(&state, &["resume", &run]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("nothing to deliver"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(delivered(&state, &sink), (300_000, 300_000));
    let runs = text(&flumen(&state, &["runs"]).stdout);
    assert!(
        runs.contains("succeeded") && runs.contains("300000 delivered"),
        "{runs}"
    );
}

#[test]
fn resume_that_fails_again_keeps_the_parts_staged() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(
        dir.path(),
        "50k",
        &sink,
        ", 'down' '${SINK_DOWN:-false}', 'max_attempts' '2'",
    );
    assert_eq!(
        flumen(&state, &["run", &script, "--set", "SINK_DOWN=true"])
            .status
            .code(),
        Some(1)
    );
    let run = run_id(&state);
    let out = flumen(&state, &["resume", &run, "--set", "SINK_DOWN=true"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert_eq!(flumen(&state, &["resume", &run]).status.code(), Some(0));
    assert_eq!(delivered(&state, &sink), (50_000, 50_000));
}

#[test]
fn rejected_rows_go_to_dead_letters_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(
        dir.path(),
        "200k",
        &sink,
        ", 'reject_every' '100', 'max_rejected' '${MAX_REJ:-2%}'",
    );
    let m = dir.path().join("m.json");
    let out = flumen(&state, &["run", &script, "--metrics", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(delivered(&state, &sink), (198_000, 198_000));
    assert_eq!(metrics(&m)["rejected"], 2000);
    let run = run_id(&state);
    let dead = sql_csv(
        &state,
        &format!(
            "SELECT count(*) AS n, sum(CASE WHEN order_id % 100 = 0 THEN 1 ELSE 0 END) AS multiples, \
             min(_error) AS reason, max(_attempts) AS attempts, count(_at) AS stamped \
             FROM '{}/dead_letter/{run}/sink/'",
            state.display()
        ),
    );
    assert_eq!(
        text(&dead.stdout),
        "n,multiples,reason,attempts,stamped\n2000,2000,value 100 is not accepted (injected),1,2000\n",
        "{}",
        text(&dead.stderr)
    );
}

#[test]
fn too_many_rejected_rows_fail_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(
        dir.path(),
        "200k",
        &sink,
        ", 'reject_every' '100', 'max_rejected' '0.5%'",
    );
    let out = flumen(&state, &["run", &script]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("2000 of 200000 rows were rejected, more than max_rejected (0.5% of the rows)"),
        "{err}"
    );
    assert!(err.contains("dead_letter"), "{err}");
}

#[test]
fn too_many_requests_honours_retry_after_and_hung_requests_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(
        dir.path(),
        "40k",
        &sink,
        ", 'too_many_requests' '3', 'retry_after' '20ms', 'concurrency' '1'",
    );
    let m = dir.path().join("m.json");
    let out = flumen(&state, &["run", &script, "--metrics", m.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(metrics(&m)["retries"], 3);
    assert_eq!(delivered(&state, &sink), (40_000, 40_000));

    let sink2 = dir.path().join("sink2");
    let script = job(
        dir.path(),
        "10k",
        &sink2,
        ", 'hang' '5s', 'timeout' '50ms', 'max_attempts' '2', 'on_failure' 'fail'",
    );
    let out = flumen(&state, &["run", &script]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no answer within 50ms"), "{err}");
}

#[test]
fn prometheus_metrics_file() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(dir.path(), "30k", &sink, "");
    let prom = dir.path().join("m.prom");
    let out = flumen(&state, &["run", &script, "--metrics", prom.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let text = std::fs::read_to_string(prom).unwrap();
    assert!(
        text.contains("flumen_sink_rows_total{table=\"sink\"} 30000\n"),
        "{text}"
    );
    assert!(
        text.contains("flumen_sink_requests_total{table=\"sink\"} 2\n"),
        "{text}"
    );
}

#[test]
fn unknown_sink_option_is_rejected_with_the_valid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(dir.path(), "10", &sink, ", 'batch_row' '5'");
    let err = text(&flumen(&state, &["run", &script]).stderr);
    assert!(
        err.contains("unknown FAULTY option 'batch_row' (did you mean 'batch_rows'?)"),
        "{err}"
    );
    assert!(
        err.contains("max_rejected") && err.contains("on_failure"),
        "{err}"
    );
}

#[test]
fn a_run_killed_half_way_is_completed_by_resume_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(
        dir.path(),
        "400k",
        &sink,
        ", 'delay' '${DELAY:-150ms}', 'concurrency' '1', 'validate' 'order_id % 1000 <> 0', 'max_rejected' '400'",
    );
    // 20 requests of 20k rows, 150 ms each: kill it once about half are delivered. Every
    // 1000th row breaks the rule: 400 rows in dead letters, each once, after the replay too.
    kill_after(&state, &script, &sink, 10);
    let (before, _) = delivered(&state, &sink);
    assert!(
        before > 0 && before < 400_000,
        "killed half way: {before} rows delivered"
    );

    let run = run_id(&state);
    assert!(text(&flumen(&state, &["runs"]).stdout).contains("running"));
    let out = flumen(&state, &["resume", &run, "--set", "DELAY=1ms"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains("replayed its script"), "{said}");
    assert_eq!(delivered(&state, &sink), (399_600, 399_600), "every row once");
    let dead = sql_csv(
        &state,
        &format!(
            "SELECT count(*) AS n, count(DISTINCT order_id) AS ids FROM '{}/dead_letter/{run}/sink/'",
            state.display()
        ),
    );
    assert_eq!(text(&dead.stdout), "n,ids\n400,400\n", "{}", text(&dead.stderr));
    // Nothing is left: a second resume delivers nothing.
    let out = flumen(&state, &["resume", &run]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(delivered(&state, &sink), (399_600, 399_600));
}

/// A replay does not run again what the killed attempt finished: the first load is skipped
/// (its source is not read again), the second is completed.
#[test]
fn a_replay_skips_statements_the_killed_run_finished() {
    let dir = tempfile::tempdir().unwrap();
    let (state, first, second) = (
        dir.path().join("state"),
        dir.path().join("first"),
        dir.path().join("second"),
    );
    let script = format!(
        "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '200k');\n\
         CREATE EXTERNAL TABLE first (order_id BIGINT, city VARCHAR) STORED AS FAULTY LOCATION '{}'\n\
           OPTIONS ('batch_rows' '50k');\n\
         CREATE EXTERNAL TABLE second (order_id BIGINT, city VARCHAR) STORED AS FAULTY LOCATION '{}'\n\
           OPTIONS ('batch_rows' '20k', 'delay' '${{DELAY:-200ms}}', 'concurrency' '1');\n\
         INSERT INTO first SELECT order_id, city FROM src;\n\
         INSERT INTO second SELECT order_id, city FROM src;\n",
        first.display(),
        second.display()
    );
    let path = dir.path().join("two.sql");
    std::fs::write(&path, script).unwrap();
    kill_after(&state, path.to_str().unwrap(), &second, 3);
    let out = flumen(&state, &["resume", &run_id(&state), "--set", "DELAY=1ms"]);
    let said = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        said.contains("statement at line 6 was completed by the earlier attempt: skipped"),
        "{said}"
    );
    assert_eq!(delivered(&state, &first), (200_000, 200_000));
    assert_eq!(delivered(&state, &second), (200_000, 200_000));
}
