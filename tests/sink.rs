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
    assert!(text(&flumen(&state, &["runs"]).stdout).contains("died"));
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

/// Parquet part files under a folder (a table's staging folder).
fn staged_parts(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.file_name().to_string_lossy().starts_with("part-"))
            })
            .count()
        })
        .unwrap_or(0)
}

/// Staging never overwrites: the killed attempt's parts stay where they are and in the
/// manifest, a later attempt that stages adds parts of its own (named after the attempt), and
/// every row ends delivered once.
#[test]
fn staged_parts_of_every_attempt_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink, down) = (
        dir.path().join("state"),
        dir.path().join("sink"),
        dir.path().join("down"),
    );
    let script = format!(
        "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '200k', 'rate' '${{RATE:-50000}}', 'partitions' '1');\n\
         CREATE EXTERNAL TABLE sink (order_id BIGINT, city VARCHAR, amount DECIMAL(18,2)) STORED AS FAULTY\n\
           LOCATION '{}' OPTIONS ('batch_rows' '10k', 'linger' '10m', 'down_while' '{}', 'max_attempts' '1');\n\
         INSERT INTO sink SELECT order_id, city, amount FROM src;\n",
        sink.display(),
        down.display()
    );
    let path = dir.path().join("job.sql");
    std::fs::write(&path, script).unwrap();
    let start = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(args)
            .args(["-q", "--state-dir"])
            .arg(&state)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_for = |what: &str, child: &mut std::process::Child, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what} did not happen");
            assert!(child.try_wait().unwrap().is_none(), "ended before {what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let folder = || {
        std::fs::read_dir(state.join("staging"))
            .ok()
            .and_then(|mut d| d.next())
            .map(|e| e.unwrap().path().join("sink"))
    };
    // The sink is down: the first attempt stages, and is killed half way.
    std::fs::write(&down, b"").unwrap();
    let mut first = start(&["run", path.to_str().unwrap()]);
    wait_for("staging", &mut first, &|| {
        folder().is_some_and(|d| staged_parts(&d) >= 3)
    });
    first.kill().unwrap();
    first.wait().unwrap();
    let run = run_id(&state);
    let folder = folder().unwrap();
    // The parts the manifest lists (a part file written just before the kill, before the
    // manifest named it, owns nothing: its request is still in flight in the journal, and the
    // replay sends its rows again with its token).
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap();
    let first_parts: Vec<String> = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["file"].as_str().unwrap().to_string())
        .collect();
    assert!(first_parts.len() >= 2, "{manifest}");

    // The sink is back: the resume delivers those parts, then replays the script; half way
    // through, the sink goes down again and the replay stages the rest.
    std::fs::remove_file(&down).unwrap();
    let mut second = start(&["resume", &run]);
    wait_for("the replay's first delivery", &mut second, &|| {
        parquet_files(&sink) > first_parts.len()
    });
    std::fs::write(&down, b"").unwrap();
    let out = second.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("manifest.json")).unwrap()).unwrap();
    let listed: Vec<(String, bool)> = manifest["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["file"].as_str().unwrap().to_string(),
                p["delivered"].as_bool().unwrap(),
            )
        })
        .collect();
    for f in &first_parts {
        assert!(folder.join(f).exists(), "{f} was removed");
        assert!(
            listed.contains(&(f.clone(), true)),
            "{f} is not listed as delivered: {listed:?}"
        );
    }
    let later: Vec<&(String, bool)> = listed.iter().filter(|(f, _)| !first_parts.contains(f)).collect();
    assert!(
        !later.is_empty() && later.iter().all(|(_, d)| !d),
        "the replay's own parts: {listed:?}"
    );
    assert_eq!(
        listed.len(),
        staged_parts(&folder),
        "every part file is in the manifest"
    );

    // The sink is back for good: each row once.
    std::fs::remove_file(&down).unwrap();
    let out = flumen(&state, &["resume", &run, "--set", "RATE=10000000"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(delivered(&state, &sink), (200_000, 200_000));
}

/// One process at a time resumes a run: a second `flumen resume` of a run being resumed is
/// refused (the run's lock), and the rows are delivered once.
#[test]
fn a_run_is_resumed_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(
        dir.path(),
        "100k",
        &sink,
        ", 'down' '${SINK_DOWN:-false}', 'max_attempts' '1', 'delay' '${DELAY:-0ms}', 'concurrency' '1'",
    );
    assert_eq!(
        flumen(&state, &["run", &script, "--set", "SINK_DOWN=true"])
            .status
            .code(),
        Some(1)
    );
    let run = run_id(&state);
    // Five parts of 20k rows, 400 ms each: the first resume holds the run for two seconds.
    let first = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["resume", &run, "-q", "--set", "DELAY=400ms", "--state-dir"])
        .arg(&state)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !flumen::sink::run_is_locked(&state, &run) {
        assert!(
            std::time::Instant::now() < deadline,
            "the first resume did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let second = flumen(&state, &["resume", &run]);
    let err = text(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("another flumen process"), "{err}");
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(delivered(&state, &sink), (100_000, 100_000));
}

/// Everything flumen keeps in its state directory (ledgers, journals, scripts, staged rows,
/// dead letters) is private to the user: directories 0700, files 0600, whatever the umask.
#[test]
fn the_state_directory_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (state, sink) = (dir.path().join("state"), dir.path().join("sink"));
    let script = job(dir.path(), "20k", &sink, ", 'down' 'true', 'max_attempts' '1'");
    let out = flumen(&state, &["run", &script]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    fn walk(p: &Path, seen: &mut Vec<(String, u32)>) {
        let mode = std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        seen.push((p.display().to_string(), mode));
        if p.is_dir() {
            for e in std::fs::read_dir(p).unwrap() {
                walk(&e.unwrap().path(), seen);
            }
        }
    }
    let mut seen = Vec::new();
    walk(&state, &mut seen);
    assert!(
        seen.iter().any(|(p, _)| p.ends_with(".parquet")),
        "rows were staged: {seen:?}"
    );
    assert!(
        seen.iter().any(|(p, _)| p.ends_with(".journal.jsonl")),
        "{seen:?}"
    );
    let open: Vec<_> = seen.iter().filter(|(_, m)| m & 0o077 != 0).collect();
    assert!(open.is_empty(), "readable by others: {open:?}");
}
