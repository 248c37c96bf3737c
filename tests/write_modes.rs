//! Write modes against real servers: `overwrite` on ClickHouse and Elasticsearch while a reader
//! keeps querying the target (it must only ever see the old rows or the new ones), and modes a
//! sink cannot honour refused when the table is declared. Servers: `bash tests/services/start.sh`
//! (ClickHouse on 127.0.0.1:8123, the search server on 127.0.0.1:9200, Redis on 6380, MongoDB
//! on 27018).

mod common;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{ES, ch, es, fails, flumen, ok};

/// Queries `probe` in a loop on another thread while `work` runs; every distinct answer seen,
/// with how often. The loop has seen at least one answer before `work` starts.
fn watching(probe: impl Fn() -> String + Send + 'static, work: impl FnOnce()) -> Vec<(String, usize)> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let flag = Arc::clone(&stop);
    let reader = std::thread::spawn(move || {
        let mut seen: Vec<(String, usize)> = Vec::new();
        while !flag.load(Ordering::Relaxed) {
            let answer = probe();
            if seen.is_empty() {
                let _ = tx.send(answer.clone());
            }
            match seen.iter_mut().find(|(a, _)| *a == answer) {
                Some((_, n)) => *n += 1,
                None => seen.push((answer, 1)),
            }
        }
        seen
    });
    rx.recv().expect("the reader answers once");
    work();
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("the reader ends")
}

/// One ClickHouse query that may fail (its error becomes the answer, so the test can say so).
fn ch_answer(sql: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-S", "--data-binary", sql, common::CLICKHOUSE])
        .output()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn clickhouse_overwrite_switches_old_rows_for_new_in_one_step() {
    ch("DROP DATABASE IF EXISTS flumen_t_ow");
    ch("CREATE DATABASE flumen_t_ow");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let declare = |extra: &str| {
        format!(
            "CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, gen INT NOT NULL) STORED AS CLICKHOUSE \
             LOCATION 'http://127.0.0.1:8123/flumen_t_ow' \
             OPTIONS ('table' 't', 'create' 'if_not_exists', 'mode' 'overwrite', 'batch_rows' '10000', 'concurrency' '2'{extra});\n\
             INSERT INTO t SELECT value AS id, CAST(${{GEN}} AS INT) AS gen FROM generate_series(1, ${{ROWS}});\n"
        )
    };
    let script = declare("");
    let run = |script: &str, generation: u32, rows: u32| {
        flumen(
            d,
            script,
            &[
                "--set",
                &format!("GEN={generation}"),
                "--set",
                &format!("ROWS={rows}"),
            ],
        )
    };
    let state = || ch("SELECT count(), min(gen), max(gen) FROM flumen_t_ow.t FORMAT TabSeparated");
    ok(&run(&script, 1, 100_000));
    assert_eq!(state().trim(), "100000\t1\t1");
    // 300k new rows in 30 inserts, while a reader counts.
    let seen = watching(
        || ch_answer("SELECT count(), min(gen), max(gen) FROM flumen_t_ow.t FORMAT TabSeparated"),
        || {
            ok(&run(&script, 2, 300_000));
        },
    );
    for (answer, _) in &seen {
        assert!(
            answer == "100000\t1\t1" || answer == "300000\t2\t2",
            "a reader saw {answer:?} during the overwrite (all answers: {seen:?})"
        );
    }
    assert!(seen.iter().map(|(_, n)| n).sum::<usize>() > 1, "{seen:?}");
    assert_eq!(state().trim(), "300000\t2\t2");
    let staging = "SELECT count() FROM system.tables WHERE database = 'flumen_t_ow' AND name != 't' FORMAT TabSeparated";
    assert_eq!(ch(staging).trim(), "0", "the staging table is left behind");
    // A statement that fails (every row breaks a rule) leaves the target as it was.
    let err = fails(&run(&declare(", 'validate' 'gen < 3'"), 3, 1000));
    assert!(err.contains("rejected"), "{err}");
    assert_eq!(state().trim(), "300000\t2\t2");
    assert_eq!(
        ch(staging).trim(),
        "0",
        "the staging table of a failed overwrite is left behind"
    );
    // Zero rows overwrite to an empty table.
    ok(&run(&script, 4, 0));
    assert_eq!(
        ch("SELECT count() FROM flumen_t_ow.t FORMAT TabSeparated").trim(),
        "0"
    );

    // A partitioned table: the new rows' partitions replace the old, the others are dropped.
    let partitioned = "CREATE EXTERNAL TABLE p (id BIGINT NOT NULL) STORED AS CLICKHOUSE \
         LOCATION 'http://127.0.0.1:8123/flumen_t_ow' \
         OPTIONS ('table' 'p', 'create' 'if_not_exists', 'mode' 'overwrite', 'partition_by' 'id % 4');\n\
         INSERT INTO p SELECT value * ${STEP} AS id FROM generate_series(1, 1000);\n";
    let parts = "SELECT count(DISTINCT partition_id) FROM system.parts WHERE database = 'flumen_t_ow' AND table = 'p' AND active FORMAT TabSeparated";
    ok(&flumen(d, partitioned, &["--set", "STEP=1"]));
    assert_eq!(ch(parts).trim(), "4");
    ok(&flumen(d, partitioned, &["--set", "STEP=4"]));
    assert_eq!(
        ch("SELECT count(), countIf(id % 4 != 0), max(id) FROM flumen_t_ow.p FORMAT TabSeparated").trim(),
        "1000\t0\t4000"
    );
    assert_eq!(ch(parts).trim(), "1");
}

/// The indices whose names start with `prefix`.
fn indices(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = es("GET", "_cat/indices?format=json", None)
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["index"].as_str())
        .filter(|i| i.starts_with(prefix))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[test]
fn elasticsearch_overwrite_swaps_an_alias_to_a_full_new_index() {
    let alias = "flumen-t-overwrite";
    for i in indices(alias) {
        es("DELETE", &i, None);
    }
    // A concrete index of that name with 10 documents, as a hand-made index would be.
    es(
        "PUT",
        alias,
        Some(r#"{"mappings":{"properties":{"id":{"type":"long"},"gen":{"type":"integer"}}}}"#),
    );
    for id in 1..=10 {
        es(
            "PUT",
            &format!("{alias}/_doc/{id}"),
            Some(&format!(r#"{{"id":{id},"gen":0}}"#)),
        );
    }
    es("POST", &format!("{alias}/_refresh"), None);
    let count = || es("GET", &format!("{alias}/_count"), None)["count"].as_u64();
    assert_eq!(count(), Some(10));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let script = format!(
        "CREATE EXTERNAL TABLE e (id BIGINT NOT NULL, gen INT NOT NULL) STORED AS ELASTICSEARCH LOCATION '{ES}' \
         OPTIONS ('index' '{alias}', 'mode' 'overwrite', 'batch_rows' '500', 'concurrency' '2');\n\
         INSERT INTO e SELECT value AS id, CAST(${{GEN}} AS INT) AS gen FROM generate_series(1, ${{ROWS}});\n"
    );
    let run = |generation: u32, rows: u32| {
        flumen(
            d,
            &script,
            &[
                "--set",
                &format!("GEN={generation}"),
                "--set",
                &format!("ROWS={rows}"),
            ],
        )
    };
    ok(&run(1, 2000));
    assert_eq!(count(), Some(2000));
    let generations = indices(alias);
    assert_eq!(generations.len(), 1, "{generations:?}");
    assert!(
        generations[0].starts_with("flumen-t-overwrite-flumen-"),
        "{generations:?}"
    );
    let seen = watching(
        move || {
            format!(
                "{:?}",
                es("GET", &format!("{alias}/_count"), None)["count"].as_u64()
            )
        },
        || {
            ok(&run(2, 5000));
        },
    );
    for (answer, _) in &seen {
        assert!(
            answer == "Some(2000)" || answer == "Some(5000)",
            "a search saw {answer} documents during the overwrite (all answers: {seen:?})"
        );
    }
    assert_eq!(count(), Some(5000));
    let old = es(
        "GET",
        &format!("{alias}/_count"),
        Some(r#"{"query":{"term":{"gen":1}}}"#),
    );
    assert_eq!(old["count"].as_u64(), Some(0), "{old}");
    let after = indices(alias);
    assert_eq!(after.len(), 1, "the earlier generation is left behind: {after:?}");
    assert_ne!(after, generations);
}

#[test]
fn modes_a_sink_cannot_honour_are_refused_when_declared() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (
            "CREATE EXTERNAL TABLE t (_key VARCHAR, v VARCHAR) STORED AS REDIS LOCATION 'redis://:${PW}@127.0.0.1:6380/9' \
             OPTIONS ('type' 'list', 'value_column' 'v', 'mode' 'upsert');",
            "'mode' 'upsert' is not available for STORED AS REDIS; it honours: append",
        ),
        (
            "CREATE EXTERNAL TABLE t (_key VARCHAR, v VARCHAR) STORED AS REDIS LOCATION 'redis://:${PW}@127.0.0.1:6380/9' \
             OPTIONS ('mode' 'overwrite');",
            "'mode' 'overwrite' is not available for STORED AS REDIS; it honours: append, upsert",
        ),
        (
            "CREATE EXTERNAL TABLE t (_id VARCHAR, v VARCHAR) STORED AS MONGODB \
             LOCATION 'mongodb://127.0.0.1:27018/flumen_t?directConnection=true' OPTIONS ('collection' 'c', 'mode' 'overwrite');",
            "'mode' 'overwrite' is not available for STORED AS MONGODB; it honours: append, upsert",
        ),
        (
            "CREATE EXTERNAL TABLE t (id BIGINT, ts TIMESTAMP) STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200' \
             OPTIONS ('index' 'logs-{ts:%Y.%m}', 'mode' 'overwrite');",
            "'mode' 'overwrite' needs one index name, not the template 'logs-{ts:%Y.%m}'",
        ),
        (
            "CREATE EXTERNAL TABLE t (id BIGINT, v VARCHAR) STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200' \
             OPTIONS ('index' 'flumen-t-modes', 'mode' 'upsert');",
            "'mode' 'upsert' needs the document id",
        ),
        (
            "CREATE EXTERNAL TABLE t (id BIGINT, v VARCHAR) STORED AS CLICKHOUSE LOCATION 'http://127.0.0.1:8123/default' \
             OPTIONS ('table' 'flumen_t_modes_plain', 'mode' 'upsert', 'keys' 'id');",
            "'mode' 'upsert' needs a ReplacingMergeTree, and ClickHouse `default`.`flumen_t_modes_plain` is a MergeTree",
        ),
        (
            "CREATE EXTERNAL TABLE t (id BIGINT, v VARCHAR) STORED AS CLICKHOUSE LOCATION 'http://127.0.0.1:8123/default' \
             OPTIONS ('table' 'flumen_t_modes_plain', 'keys' 'id');",
            "option 'keys' is for 'mode' 'upsert' (the mode is 'append')",
        ),
        (
            "CREATE EXTERNAL TABLE t (id BIGINT, v VARCHAR) STORED AS CLICKHOUSE LOCATION 'http://127.0.0.1:8123/default' \
             OPTIONS ('table' 'flumen_t_modes_new', 'create' 'if_not_exists', 'mode' 'upsert', 'keys' 'id', 'version' 'v');",
            "'version' column v is Nullable(String); a ReplacingMergeTree version is an integer, Date or DateTime",
        ),
        (
            "CREATE EXTERNAL TABLE t (id BIGINT, v VARCHAR) STORED AS POSTGRES LOCATION 'postgres://flumen:${PW}@127.0.0.1:5432/flumen' \
             OPTIONS ('table' 't', 'mode' 'merge');",
            "expected one of append, overwrite, upsert",
        ),
    ];
    ch("DROP TABLE IF EXISTS default.flumen_t_modes_plain");
    ch("CREATE TABLE default.flumen_t_modes_plain (id Int64, v String) ENGINE = MergeTree ORDER BY id");
    for (declaration, want) in cases {
        let err = fails(&flumen(d, declaration, &["--set", "PW=flumen-test"]));
        assert!(err.contains(want), "{declaration}\nwants {want:?}, said: {err}");
    }
    ch("DROP TABLE IF EXISTS default.flumen_t_modes_plain");
}
