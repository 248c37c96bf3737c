//! What the connector tests share: running a script with the flumen binary, reading its output
//! and its dead letters, and where `tests/services/start.sh` keeps its run folder.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// The services' run folder (`FLUMEN_SERVICES_DIR`, as `tests/services/start.sh` uses it).
pub fn services_dir() -> String {
    std::env::var("FLUMEN_SERVICES_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/flumen-services",
            std::env::var("HOME").unwrap_or_default()
        )
    })
}

/// Runs `script` (written to `dir/job.sql`) with `flumen run -q`, state under `dir/state`.
pub fn flumen(dir: &Path, script: &str, extra: &[&str]) -> Output {
    let path = dir.join("job.sql");
    std::fs::write(&path, script).unwrap();
    Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", path.to_str().unwrap(), "-q", "--state-dir"])
        .arg(dir.join("state"))
        .args(extra)
        .output()
        .expect("flumen runs")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The run's output without the "N rows written" lines of its INSERTs.
pub fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .filter(|l| !l.ends_with(" rows written"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The error of a run that must fail.
pub fn fails(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "should fail; printed {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

/// The dead letters of the (only) run in `state` for `table`, as CSV `id,_error` ordered by id.
pub fn dead_letters(state: &Path, table: &str, id: &str) -> String {
    let run = std::fs::read_dir(state.join("dead_letter"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["sql", "-q", "--format", "csv", "-e"])
        .arg(format!(
            "SELECT {id}, _error FROM '{}/{table}/' ORDER BY {id}",
            run.display()
        ))
        .output()
        .unwrap();
    ok(&out)
}

/// Two CSV answers with the same rows, field by field: quotes dropped, numbers equal to a
/// relative 1e-9 (sums added in another order), everything else exactly.
pub fn assert_rows_close(what: &str, got: &str, want: &str) {
    let rows = |s: &str| -> Vec<Vec<String>> {
        s.lines()
            .map(|l| l.split(',').map(|f| f.trim_matches('"').to_string()).collect())
            .collect()
    };
    let (a, b) = (rows(got), rows(want));
    assert_eq!(a.len(), b.len(), "{what}: {got}\nvs\n{want}");
    assert!(!a.is_empty(), "{what}: no rows");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.len(), y.len(), "{what}: {x:?} vs {y:?}");
        for (p, q) in x.iter().zip(y) {
            match (p.parse::<f64>(), q.parse::<f64>()) {
                (Ok(p), Ok(q)) => assert!((p - q).abs() <= 1e-9 * q.abs().max(1.0), "{what}: {x:?} vs {y:?}"),
                _ => assert_eq!(p, q, "{what}: {x:?} vs {y:?}"),
            }
        }
    }
}

/// ClickHouse's HTTP interface, as `tests/services/start.sh` starts it.
pub const CLICKHOUSE: &str = "http://127.0.0.1:8123/";

/// Runs one ClickHouse statement over HTTP; its answer as text. Fails the test on a server
/// error, or with how to start the server when none answers.
pub fn ch(sql: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-S", "--data-binary", sql, CLICKHOUSE])
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "ClickHouse is not answering on {CLICKHOUSE}: start it with `bash tests/services/start.sh` ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("DB::Exception"), "{sql}: {text}");
    text
}

/// The search server `tests/services/start.sh` starts.
pub const ES: &str = "http://127.0.0.1:9200";

/// Calls the search server with curl: its JSON answer (Null when not JSON). Fails with how to
/// start the server when none answers.
pub fn es(method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
    let mut c = Command::new("curl");
    c.args(["-s", "-S", "-X", method, &format!("{ES}/{path}")]);
    if let Some(b) = body {
        c.args(["-H", "content-type: application/json", "--data-binary", b]);
    }
    let out = c.output().expect("curl runs");
    assert!(
        out.status.success(),
        "the search server is not answering on {ES}: start it with `bash tests/services/start.sh` ({})",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}
