//! Broker sources against the real servers `tests/services/start.sh` starts. Each broker goes
//! through the same contract ([`contract`]): 100k JSON messages (5 malformed) produced by the
//! test's own client are inserted into a Parquet table (counts equal, the malformed ones in dead
//! letters with their raw payload); a second run reads nothing new; a run whose sink fails
//! mid-way acknowledges nothing, and the next run delivers those messages.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{ok, text};

/// Messages `from..from + n`: `{"id": i, "name": "m-i"}`, except that ids with `i % 20000 ==
/// 19999` are cut short (malformed JSON).
fn payload(i: u64) -> String {
    if i % 20_000 == 19_999 {
        format!("{{\"id\": {i}, \"name\": ")
    } else {
        format!("{{\"id\": {i}, \"name\": \"m-{i}\"}}")
    }
}

fn malformed(from: u64, n: u64) -> u64 {
    (from..from + n).filter(|i| i % 20_000 == 19_999).count() as u64
}

/// The rows an INSERT wrote, from the "N rows written" line.
fn written(out: &Output) -> u64 {
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(" rows written"))
        .map(|n| n.trim().parse::<u64>().unwrap())
        .sum()
}

fn sql(query: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["sql", "-q", "--format", "csv", "-e", query])
        .output()
        .unwrap();
    ok(&out)
}

/// Runs the contract for one broker: `create` is the `CREATE EXTERNAL TABLE src (...) ...`
/// statement, `produce(from, n)` sends messages `from..from + n`.
fn contract(dir: &Path, create: &str, produce: &dyn Fn(u64, u64)) {
    let out_dir = dir.join("out");
    let load = format!(
        "{create};\n\
         CREATE EXTERNAL TABLE out (id BIGINT, name VARCHAR) STORED AS PARQUET LOCATION '{}/';\n\
         INSERT INTO out SELECT id, name FROM src;\n",
        out_dir.display()
    );
    let total = 100_000;
    produce(0, total);
    let bad = malformed(0, total);
    assert_eq!(bad, 5);
    let n = written(&common::flumen(dir, &load, &[]));
    assert_eq!(n, total - bad, "first run");
    // The malformed messages are dead letters, with their raw payload.
    let runs: Vec<_> = std::fs::read_dir(dir.join("state/dead_letter"))
        .expect("dead letters were written")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let dead = sql(&format!(
        "SELECT count(*) AS n, min(_payload) AS p, min(_error) LIKE '%JSON%' AS why FROM '{}/src/'",
        runs[0].display()
    ));
    assert_eq!(
        dead,
        format!("n,p,why\n5,\"{{\"\"id\"\": 19999, \"\"name\"\": \",true\n"),
        "dead letters"
    );
    // Everything was acknowledged: nothing new.
    assert_eq!(written(&common::flumen(dir, &load, &[])), 0, "second run");

    // A sink that fails mid-way: the run fails and acknowledges nothing...
    let more = 10_000;
    produce(total, more);
    let failing = format!(
        "{create};\n\
         CREATE EXTERNAL TABLE down (id BIGINT, name VARCHAR) STORED AS FAULTY LOCATION '{}' \
           OPTIONS ('down_after' '2', 'on_failure' 'fail', 'max_attempts' '1', 'batch_rows' '1000', 'concurrency' '1');\n\
         INSERT INTO down SELECT id, name FROM src;\n",
        dir.join("faulty").display()
    );
    let out = common::flumen(dir, &failing, &[]);
    assert!(
        !out.status.success(),
        "the failing sink must fail the run: {}",
        text(&out.stdout)
    );
    // ... so the next run delivers those messages.
    assert_eq!(
        written(&common::flumen(dir, &load, &[])),
        more,
        "rerun after the failure"
    );
    let all = sql(&format!(
        "SELECT count(*) AS n, count(DISTINCT id) AS ids, max(id) AS last FROM '{}/'",
        out_dir.display()
    ));
    let expect = total + more - bad;
    assert_eq!(
        all,
        format!("n,ids,last\n{expect},{expect},{}\n", total + more - 1)
    );
}

/// Runs redis-cli on the password server (database `db`), feeding `input` to `--pipe` if given.
fn redis_cli(db: u32, args: &[&str], input: Option<&[u8]>) -> String {
    let mut c = Command::new("redis-cli");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        "6380",
        "--no-auth-warning",
        "-a",
        "flumen-test",
        "-n",
    ])
    .arg(db.to_string())
    .args(args)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| {
        panic!("redis-cli runs ({e}); start the servers with `bash tests/services/start.sh`")
    });
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        stdin.write_all(input).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let s = text(&out.stdout);
    assert!(
        out.status.success() && !s.contains("Could not connect") && !s.contains("NOAUTH"),
        "redis-cli {args:?}: {s} {}\nstart the servers with `bash tests/services/start.sh`",
        text(&out.stderr)
    );
    s
}

/// A command in the Redis protocol.
fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[test]
fn redis_streams_acknowledge_after_the_sink_commits() {
    let db = 12;
    redis_cli(db, &["FLUSHDB"], None);
    let dir = tempfile::tempdir().unwrap();
    let produce = |from: u64, n: u64| {
        let mut input = Vec::new();
        for i in from..from + n {
            // Two streams, one partition each.
            let key = if i % 2 == 0 { "ev:a" } else { "ev:b" };
            input.extend(resp(&[
                b"XADD",
                key.as_bytes(),
                b"*",
                b"payload",
                payload(i).as_bytes(),
            ]));
        }
        let out = redis_cli(db, &["--pipe"], Some(&input));
        assert!(out.contains(&format!("replies: {n}")), "{out}");
    };
    let create = format!(
        "CREATE EXTERNAL TABLE src (id BIGINT, name VARCHAR, _topic VARCHAR, _id VARCHAR) STORED AS REDIS_STREAM \
         LOCATION 'redis://:flumen-test@127.0.0.1:6380/{db}' OPTIONS ('stream' 'ev:a,ev:b', 'group' 'etl')"
    );
    contract(dir.path(), &create, &produce);
    // Nothing is left pending in the group.
    for key in ["ev:a", "ev:b"] {
        let pending = redis_cli(db, &["XPENDING", key, "etl"], None);
        assert!(pending.starts_with("0\n"), "{key}: {pending}");
    }
}
