//! Validation rules on a sink table: 10,000 rows with 37 planted violations of three rules
//! (12 NULL ids, 15 negative amounts, 10 repeated ids) land exactly those 37 rows in dead
//! letters with the rule named, the ledger and summary count them per rule, and `max_rejected`
//! applies to them.

mod common;

use std::path::Path;

use common::{fails, ok};

fn script(db: &Path, max_rejected: u32) -> String {
    format!(
        "CREATE EXTERNAL TABLE dst (id BIGINT, amount BIGINT, email VARCHAR) STORED AS SQLITE LOCATION 'sqlite://{}' \
           OPTIONS ('table' 'dst', 'not_null' 'id', 'validate' 'amount >= 0 AND email LIKE ''%@%''', 'unique' 'id', \
                    'max_rejected' '{max_rejected}');\n\
         INSERT INTO dst SELECT \
           CASE WHEN v % 11 = 0 AND v <= 132 THEN NULL WHEN v BETWEEN 9001 AND 9010 THEN v - 9000 ELSE v END, \
           CASE WHEN v BETWEEN 1000 AND 1014 THEN -v ELSE v END, \
           'u' || CAST(v AS VARCHAR) || '@example.org' \
         FROM generate_series(1, 10000) t(v);\n",
        db.display()
    )
}

#[test]
fn planted_violations_go_to_dead_letters_by_rule() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(&common::flumen(d, &script(&d.join("t.db"), 37), &[]));
    let dead = common::dead_letters(&d.join("state"), "dst", "id");
    let count = |rule: &str| dead.lines().filter(|l| l.contains(rule)).count();
    assert_eq!(dead.lines().count(), 1 + 37, "{dead}");
    assert_eq!(count("rule not_null: id is NULL"), 12, "{dead}");
    assert_eq!(
        count("rule validate: amount >= 0 AND email LIKE '%@%' is false"),
        15,
        "{dead}"
    );
    assert_eq!(count("rule unique: (id) repeats an earlier row"), 10, "{dead}");
    // The repeated ids are 1..10 (their first rows were written); the negative amounts are
    // the rows 1000..1014.
    let ids = |rule: &str| -> Vec<String> {
        dead.lines()
            .filter(|l| l.contains(rule))
            .map(|l| l.split(',').next().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        ids("rule unique"),
        (1..=10).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(
        ids("rule validate"),
        (1000..=1014).map(|i| i.to_string()).collect::<Vec<_>>()
    );
    // The ledger counts them per rule.
    let runs: Vec<_> = std::fs::read_dir(d.join("state/runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    let ledger = std::fs::read_to_string(&runs[0]).unwrap();
    let ledger: serde_json::Value = serde_json::from_str(&ledger).unwrap();
    assert_eq!(
        ledger["sinks"]["dst"]["rules"],
        serde_json::json!({"not_null": 12, "unique": 10, "validate": 15})
    );
    assert_eq!(ledger["sinks"]["dst"]["rejected"], 37);
    assert_eq!(ledger["sinks"]["dst"]["rows"], 10_000 - 37);
    // One rejected row more than allowed fails the job, naming the limit.
    let again = tempfile::tempdir().unwrap();
    let e = fails(&common::flumen(
        again.path(),
        &script(&again.path().join("t.db"), 36),
        &[],
    ));
    assert!(
        e.contains("37 of 10000 rows were rejected, more than max_rejected (36 rows)"),
        "{e}"
    );
}

#[test]
fn rule_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let e = fails(&common::flumen(
        d,
        &format!(
            "CREATE EXTERNAL TABLE dst (id BIGINT) STORED AS SQLITE LOCATION 'sqlite://{}' OPTIONS ('table' 'dst', 'unique' 'nosuch');\n\
             INSERT INTO dst VALUES (1);\n",
            d.join("t.db").display()
        ),
        &[],
    ));
    assert!(
        e.contains("table dst: option 'unique': no column 'nosuch' (columns: id)"),
        "{e}"
    );
}
