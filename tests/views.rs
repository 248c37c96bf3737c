//! Materialized views through the binary, as users run them: kept in the warehouse across
//! runs, refreshed in full or incrementally (equal after rounds of appended data), a refresh
//! killed mid-write leaving the previous version readable, and mistakes named.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{fails, ok};

/// Appends orders `from..to` as one more Parquet file of the source directory.
fn append_orders(dir: &Path, from: u64, to: u64) {
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["sql", "-q", "--state-dir"])
        .arg(dir.join("scratch"))
        .arg("-e")
        .arg(format!(
            "COPY (SELECT id, 'c' || CAST(id % 7 AS VARCHAR) AS city, CAST(id % 13 AS BIGINT) AS kind, \
                    CAST(id % 1000 AS DOUBLE) / 8 AS amount \
             FROM generate_series({from}, {}) t(id)) TO '{}/orders/part-{from}.parquet'",
            to - 1,
            dir.display()
        ))
        .output()
        .unwrap();
    ok(&out);
}

const SOURCE: &str = "CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '${DIR}/orders/';";

fn run(dir: &Path, script: &str) -> String {
    let set = format!("DIR={}", dir.display());
    ok(&common::flumen(dir, script, &["--format", "csv", "--set", &set]))
}

/// The same aggregate computed straight from the files.
fn direct(dir: &Path, select: &str) -> String {
    run(dir, &format!("{SOURCE}\n{select}"))
}

#[test]
fn incremental_refreshes_equal_full_ones_after_three_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    append_orders(d, 0, 200_000);
    let created = run(
        d,
        &format!(
            "{SOURCE}\n\
             CREATE MATERIALIZED VIEW by_city OPTIONS ('watermark' 'id') AS \
               SELECT city, kind, sum(amount) AS revenue, count(*) AS orders, min(amount) AS low, \
                      max(id) AS last, avg(amount) AS mean FROM orders GROUP BY city, kind;\n\
             CREATE MATERIALIZED VIEW big OPTIONS ('watermark' 'orders.id') AS \
               SELECT id, city, amount FROM orders WHERE amount > 120;\n\
             CREATE MATERIALIZED VIEW full_only AS SELECT city, count(DISTINCT kind) AS kinds FROM orders GROUP BY city;"
        ),
    );
    assert_eq!(
        created,
        "materialized view by_city created: 91 rows (version 1)\n\
         materialized view big created: 7800 rows (version 1)\n\
         materialized view full_only created: 7 rows (version 1)\n"
    );
    // Exact for sums of eighths and for counts; the mean is compared to 1e-9.
    let view = "SELECT city, kind, revenue, orders, low, last, round(mean, 9) AS mean FROM by_city ORDER BY city, kind";
    let from_files = "SELECT city, kind, sum(amount) AS revenue, count(*) AS orders, min(amount) AS low, \
                      max(id) AS last, round(avg(amount), 9) AS mean FROM orders GROUP BY city, kind ORDER BY city, kind";
    let big = "SELECT count(*) AS n, sum(id) AS ids, count(DISTINCT id) AS distinct_ids FROM big";
    let big_files = "SELECT count(*) AS n, sum(id) AS ids, count(DISTINCT id) AS distinct_ids FROM orders WHERE amount > 120";
    for round in 1..=3u64 {
        append_orders(d, round * 200_000, round * 200_000 + 50_000);
        // A later run: the views and their sources come from the warehouse, nothing declared.
        let out = run(
            d,
            "REFRESH MATERIALIZED VIEW by_city INCREMENTAL;\nREFRESH MATERIALIZED VIEW big INCREMENTAL;",
        );
        let high = round * 200_000 + 49_999;
        assert!(
            out.contains(&format!(
                "id past {} up to {high}",
                if round == 1 { 199_999 } else { high - 200_000 }
            )),
            "{out}"
        );
        assert!(
            out.contains("big refreshed incrementally") && out.contains("rows appended"),
            "{out}"
        );
        assert_eq!(run(d, view), direct(d, from_files), "round {round}");
        assert_eq!(run(d, big), direct(d, big_files), "round {round}");
    }
    // A full refresh gives the same rows as the three incremental ones.
    let incremental = run(d, view);
    run(d, &format!("{SOURCE}\nREFRESH MATERIALIZED VIEW by_city;"));
    assert_eq!(run(d, view), incremental);
    // Nothing new: the incremental refresh reads nothing and keeps the version.
    let again = run(d, "REFRESH MATERIALIZED VIEW by_city INCREMENTAL;");
    assert!(
        again.contains("nothing new past id 649999") && again.contains("(version 5)"),
        "{again}"
    );
    let show = run(d, "SHOW MATERIALIZED VIEWS;");
    let lines: Vec<&str> = show.lines().collect();
    assert!(
        lines[0].starts_with("name,rows,version,refreshed_at,watermark,watermark_value,incremental"),
        "{show}"
    );
    assert!(
        lines[1].starts_with("big,") && lines[1].contains(",orders.id,649999,append,"),
        "{show}"
    );
    assert!(
        lines[2].starts_with("by_city,91,5,") && lines[2].contains(",orders.id,649999,merge,"),
        "{show}"
    );
    assert!(
        lines[3].starts_with("full_only,7,1,") && lines[3].contains(",no,"),
        "{show}"
    );
    // The previous version stays for readers that listed it; older ones are gone.
    let versions: Vec<String> = std::fs::read_dir(d.join("state/warehouse/by_city"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("v0"))
        .collect();
    let mut versions = versions;
    versions.sort();
    assert_eq!(versions, ["v000004", "v000005"]);
    // Dropped: gone from the warehouse and from later runs.
    assert_eq!(
        run(d, "DROP MATERIALIZED VIEW big;"),
        "materialized view big dropped\n"
    );
    let e = fails(&common::flumen(d, "SELECT count(*) FROM big;", &[]));
    assert!(e.contains("big") && e.contains("not found"), "{e}");
    assert!(!d.join("state/warehouse/big").exists());
}

#[test]
fn a_killed_refresh_leaves_the_previous_version_readable() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    append_orders(d, 0, 1000);
    let count = "SELECT count(*) AS n FROM heavy;";
    run(
        d,
        &format!("{SOURCE}\nCREATE MATERIALIZED VIEW heavy AS SELECT o.id, o.city, o.amount FROM orders o;"),
    );
    assert_eq!(run(d, count), "n\n1000\n");
    append_orders(d, 1000, 3_000_000);
    let script = d.join("refresh.sql");
    std::fs::write(&script, "REFRESH MATERIALIZED VIEW heavy;").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", script.to_str().unwrap(), "-q", "--state-dir"])
        .arg(d.join("state"))
        .arg("--set")
        .arg(format!("DIR={}", d.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let tmp = d.join("state/warehouse/heavy/v000002.tmp");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !tmp.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the refresh ended before it could be killed"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // Killed mid-write: readers still see version 1 whole.
    assert_eq!(run(d, count), "n\n1000\n");
    // The next refresh clears what the killed one left and switches to the new rows.
    let out = run(d, "REFRESH MATERIALIZED VIEW heavy;");
    assert_eq!(
        out,
        "materialized view heavy refreshed: 3000000 rows (version 2)\n"
    );
    assert_eq!(run(d, count), "n\n3000000\n");
}

#[test]
fn view_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    append_orders(d, 0, 100);
    let err = |script: &str| {
        let set = format!("DIR={}", d.display());
        fails(&common::flumen(
            d,
            &format!("{SOURCE}\n{script}"),
            &["--set", &set],
        ))
    };
    let e = err(
        "CREATE MATERIALIZED VIEW v OPTIONS ('watermark' 'id') AS SELECT city, count(DISTINCT kind) AS k FROM orders GROUP BY city;",
    );
    assert!(
        e.contains("materialized view v: incremental refresh") && e.contains("distinct count"),
        "{e}"
    );
    let e = err("CREATE MATERIALIZED VIEW v OPTIONS ('watermark' 'created_at') AS SELECT * FROM orders;");
    assert!(
        e.contains("no table the query reads has a column 'created_at'") && e.contains("orders"),
        "{e}"
    );
    let e = err("CREATE MATERIALIZED VIEW v OPTIONS ('watermrk' 'id') AS SELECT * FROM orders;");
    assert!(
        e.contains("unknown option 'watermrk'; valid options: watermark"),
        "{e}"
    );
    let e = err("CREATE MATERIALIZED VIEW v AS SELECT nosuch FROM orders;");
    assert!(e.contains("nosuch"), "{e}");
    let e = err("CREATE MATERIALIZED VIEW v AS SELECT * FROM missing_table;");
    assert!(e.contains("missing_table"), "{e}");
    let e = err("REFRESH MATERIALIZED VIEW nothere;");
    assert!(
        e.contains("no materialized view nothere") && e.contains("SHOW MATERIALIZED VIEWS"),
        "{e}"
    );
    run(
        d,
        &format!("{SOURCE}\nCREATE MATERIALIZED VIEW plain AS SELECT * FROM orders;"),
    );
    let e = err("REFRESH MATERIALIZED VIEW plain INCREMENTAL;");
    assert!(e.contains("has no watermark"), "{e}");
    let e = err("CREATE MATERIALIZED VIEW plain AS SELECT 1;");
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(
        run(d, "CREATE MATERIALIZED VIEW IF NOT EXISTS plain AS SELECT 1;"),
        "materialized view plain exists: left as it is\n"
    );
    let e = err("DROP MATERIALIZED VIEW nothere;");
    assert!(e.contains("no materialized view or cube nothere to drop"), "{e}");
    // The statement is checked with the rest of the script: nothing ran before the typo.
    let e = err("CREATE MATERIALIZED VIEW w AS SELECT * FROM orders;\nREFRESH MATERIALIZED VIEW w FULLY;");
    assert!(e.contains("line 3") && e.contains("FULLY"), "{e}");
    assert!(!d.join("state/warehouse/w").exists());
}
