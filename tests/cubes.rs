//! Cubes through the binary: every grouping set of a cube over 1M generated orders equals the
//! same GROUP BY computed directly (keys and counts exactly, float measures to a relative 1e-9),
//! ROLLUP and explicit sets answer what they can and name what they cannot, a later run
//! refreshes and drops the cube, and mistakes are named.

mod common;

use std::path::Path;

use common::{fails, ok};

const DIMS: [(&str, &str); 3] = [
    ("month", "date_trunc('month', created_at)"),
    ("city", "city"),
    ("status", "status"),
];

fn run(dir: &Path, script: &str) -> String {
    ok(&common::flumen(dir, script, &["--format", "csv"]))
}

/// 1M generated orders as Parquet files, and the table that reads them.
fn orders(dir: &Path, rows: &str) -> String {
    let source = format!(
        "CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '{}/orders/';",
        dir.display()
    );
    run(
        dir,
        &format!(
            "CREATE EXTERNAL TABLE gen STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '{rows}', 'seed' '7');\n\
             COPY gen TO '{}/orders/' STORED AS PARQUET;",
            dir.display()
        ),
    );
    source
}

#[test]
fn every_grouping_set_equals_a_direct_group_by() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = orders(d, "1M");
    let dims = DIMS
        .iter()
        .map(|(n, e)| format!("{n} => {e}"))
        .collect::<Vec<_>>()
        .join(", ");
    let created = run(
        d,
        &format!(
            "{source}\nCREATE CUBE sales FROM orders DIMENSIONS ({dims}) \
             MEASURES (revenue => sum(amount), orders => count(*), buyers => count(DISTINCT user_id), \
                       avg_amount => avg(amount), biggest => max(amount));"
        ),
    );
    assert!(created.starts_with("cube sales created: "), "{created}");
    // A later run: the cube comes from the warehouse.
    for mask in 0..8u32 {
        let set: Vec<(&str, &str)> = DIMS
            .iter()
            .enumerate()
            .filter(|(i, _)| mask & (1 << i) != 0)
            .map(|(_, d)| *d)
            .collect();
        let names: Vec<&str> = set.iter().map(|(n, _)| *n).collect();
        let order = if names.is_empty() {
            String::new()
        } else {
            format!(" ORDER BY {}", names.join(", "))
        };
        let lead = names.iter().map(|n| format!("{n}, ")).collect::<String>();
        let from_cube = run(
            d,
            &format!("SELECT {lead}revenue, orders, buyers, avg_amount, biggest FROM sales{order};"),
        );
        let keys = set
            .iter()
            .map(|(n, e)| format!("{e} AS {n}, "))
            .collect::<String>();
        let group = if set.is_empty() {
            String::new()
        } else {
            format!(
                " GROUP BY {}",
                set.iter().map(|(_, e)| *e).collect::<Vec<_>>().join(", ")
            )
        };
        let direct = run(
            d,
            &format!(
                "{source}\nSELECT {keys}sum(amount) AS revenue, count(*) AS orders, count(DISTINCT user_id) AS buyers, \
                 avg(amount) AS avg_amount, max(amount) AS biggest FROM orders{group}{order};"
            ),
        );
        common::assert_rows_close(&format!("set ({})", names.join(", ")), &from_cube, &direct);
    }
    // Slice and dice: a filter on a dimension reads the set of the dimensions used.
    let sliced = run(
        d,
        "SELECT status, buyers FROM sales WHERE city = 'Zürich' AND month >= '2021-01-01' AND month < '2021-02-01' ORDER BY status;",
    );
    let direct = run(
        d,
        &format!(
            "{source}\nSELECT status, count(DISTINCT user_id) AS buyers FROM orders WHERE city = 'Zürich' \
             AND date_trunc('month', created_at) >= '2021-01-01' AND date_trunc('month', created_at) < '2021-02-01' \
             GROUP BY status ORDER BY status;"
        ),
    );
    common::assert_rows_close("slice", &sliced, &direct);
}

#[test]
fn rollups_answer_what_they_can_and_name_what_they_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = orders(d, "50k");
    run(
        d,
        &format!(
            "{source}\nCREATE CUBE r FROM orders DIMENSIONS (city, status) \
             MEASURES (revenue => sum(amount), buyers => count(DISTINCT user_id)) ROLLUP;\n\
             CREATE CUBE g FROM orders DIMENSIONS (city, status) \
             MEASURES (n => count(*)) GROUPING SETS ((city), (status), ());"
        ),
    );
    // ROLLUP (city, status) has no (status) set: sums re-aggregate from (city, status)...
    let got = run(d, "SELECT status, revenue FROM r ORDER BY status;");
    let want = run(
        d,
        &format!(
            "{source}\nSELECT status, sum(amount) AS revenue FROM orders GROUP BY status ORDER BY status;"
        ),
    );
    common::assert_rows_close("status from rollup", &got, &want);
    // ... distinct counts cannot.
    let e = fails(&common::flumen(d, "SELECT status, buyers FROM r;", &[]));
    assert!(
        e.contains("measure buyers cannot be re-aggregated") && e.contains("GROUPING SETS"),
        "{e}"
    );
    let e = fails(&common::flumen(d, "SELECT city, status, n FROM g;", &[]));
    assert!(
        e.contains("no grouping set holds (city, status)") && e.contains("(city), (status), ()"),
        "{e}"
    );
    assert_eq!(run(d, "SELECT n FROM g;"), "n\n50000\n");
}

#[test]
fn a_later_run_refreshes_and_drops_the_cube() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = orders(d, "1000");
    run(
        d,
        &format!("{source}\nCREATE CUBE c FROM orders DIMENSIONS (city) MEASURES (n => count(*));"),
    );
    assert_eq!(run(d, "SELECT n FROM c;"), "n\n1000\n");
    run(
        d,
        &format!(
            "CREATE EXTERNAL TABLE more STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '500', 'seed' '8');\n\
             COPY more TO '{}/orders/more.parquet' STORED AS PARQUET;",
            d.display()
        ),
    );
    // The source is declared again from what the cube kept.
    let out = run(d, "REFRESH CUBE c;");
    assert!(out.contains("refreshed") && out.contains("(version 2)"), "{out}");
    assert_eq!(run(d, "SELECT n FROM c;"), "n\n1500\n");
    let e = fails(&common::flumen(d, "REFRESH CUBE c INCREMENTAL;", &[]));
    assert!(
        e.contains("cube c has no watermark")
            && e.contains("OPTIONS ('watermark' 'column') at the end of CREATE CUBE"),
        "{e}"
    );
    let shown = run(d, "SHOW MATERIALIZED VIEWS;");
    assert!(shown.contains("c,") && shown.contains(",no,"), "{shown}");
    assert_eq!(run(d, "DROP CUBE c;"), "cube c dropped\n");
    assert!(!d.join("state/warehouse/c").exists());
}

#[test]
fn cube_mistakes_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = orders(d, "100");
    let err = |s: &str| fails(&common::flumen(d, &format!("{source}\n{s}"), &[]));
    let e = err(
        "CREATE CUBE c FROM orders DIMENSIONS (city) MEASURES (n => count(*)) GROUPING SETS ((city), (town));",
    );
    assert!(
        e.contains("names town, which is not a dimension (dimensions: city)"),
        "{e}"
    );
    let e = err("CREATE CUBE c FROM nosuch DIMENSIONS (city) MEASURES (n => count(*));");
    assert!(e.contains("nosuch") && e.contains("not found"), "{e}");
    let e = err("CREATE CUBE c FROM orders DIMENSIONS (town) MEASURES (n => count(*));");
    assert!(e.contains("town"), "{e}");
    let e = err("CREATE CUBE c FROM orders DIMENSIONS (city) MEASURES (count(*));");
    assert!(
        e.contains("measure 'count(*)' must be written name => expression"),
        "{e}"
    );
    let e = err("CREATE CUBE c FROM orders DIMENSIONS (city) MEASURES (city => count(*));");
    assert!(e.contains("the name city is used twice"), "{e}");
    // An incremental cube keeps only measures that merge.
    let e = err(
        "CREATE CUBE c FROM orders DIMENSIONS (city) MEASURES (m => median(amount)) OPTIONS ('watermark' 'order_id');",
    );
    assert!(
        e.contains(
            "measure m => median(amount) cannot be merged with new rows (median has no mergeable state)"
        ) && e.contains("drop the watermark option"),
        "{e}"
    );
    let e = err(
        "CREATE CUBE c FROM orders DIMENSIONS (city) MEASURES (r => sum(amount) / count(*)) OPTIONS ('watermark' 'order_id');",
    );
    assert!(e.contains("not one plain aggregate call"), "{e}");
    let e = err(
        "CREATE CUBE c FROM orders DIMENSIONS (city) MEASURES (n => count(*)) OPTIONS ('watermark' 'nosuch');",
    );
    assert!(
        e.contains("option 'watermark': no table the query reads has a column 'nosuch'"),
        "{e}"
    );
}

/// Appends orders `from..to` (ids in that range) as one more Parquet file.
fn append_orders(dir: &Path, from: u64, to: u64) {
    run(
        dir,
        &format!(
            "COPY (SELECT id, 'c' || CAST(id % 7 AS VARCHAR) AS city, CAST(id % 5 AS BIGINT) AS kind, \
                    id % 9973 AS user_id, CAST(id % 1000 AS DOUBLE) / 8 AS amount \
             FROM generate_series({from}, {}) t(id)) TO '{}/orders/part-{from:08}.parquet'",
            to - 1,
            dir.display()
        ),
    );
}

#[test]
fn incremental_cube_refreshes_equal_full_ones_after_three_rounds() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let source = format!(
        "CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '{}/orders/';",
        d.display()
    );
    append_orders(d, 0, 300_000);
    let measures = "MEASURES (revenue => sum(amount), orders => count(*), buyers => count(DISTINCT user_id), \
                    mean => avg(amount), low => min(amount), last => max(id))";
    let created = run(
        d,
        &format!(
            "{source}
\
             CREATE CUBE inc FROM orders DIMENSIONS (city, kind) {measures} OPTIONS ('watermark' 'id');\n\
             CREATE CUBE roll FROM orders DIMENSIONS (city, kind) {measures} ROLLUP OPTIONS ('watermark' 'id');"
        ),
    );
    assert!(created.contains("cube inc created: 48 rows"), "{created}");
    // Every set of `inc`; from `roll`, (kind) is no set of ROLLUP (city, kind): its distinct
    // counts and means re-aggregate from the kept states of (city, kind).
    let queries = [
        ("inc", "city, kind", "city, kind"),
        ("inc", "city", "city"),
        ("inc", "kind", "kind"),
        ("inc", "", ""),
        ("roll", "kind", "kind"),
        ("roll", "city", "city"),
    ];
    let check = |round: &str| {
        for (cube, keys, group) in queries {
            let (lead, order, by) = if keys.is_empty() {
                (String::new(), String::new(), String::new())
            } else {
                (
                    format!("{keys}, "),
                    format!(" ORDER BY {keys}"),
                    format!(" GROUP BY {group}"),
                )
            };
            let got = run(
                d,
                &format!("SELECT {lead}revenue, orders, buyers, mean, low, last FROM {cube}{order};"),
            );
            let want = run(
                d,
                &format!(
                    "{source}\nSELECT {lead}sum(amount) AS revenue, count(*) AS orders, count(DISTINCT user_id) AS buyers, \
                     avg(amount) AS mean, min(amount) AS low, max(id) AS last FROM orders{by}{order};"
                ),
            );
            common::assert_rows_close(&format!("{round}: {cube} ({keys})"), &got, &want);
        }
    };
    check("created");
    for round in 1..=3u64 {
        let from = 300_000 + (round - 1) * 40_000;
        append_orders(d, from, from + 40_000);
        // A later run: the cube and its source come from the warehouse.
        let out = run(
            d,
            "REFRESH CUBE inc INCREMENTAL;
REFRESH CUBE roll INCREMENTAL;",
        );
        assert!(
            out.contains(&format!("id past {} up to {}", from - 1, from + 39_999)),
            "{out}"
        );
        check(&format!("round {round}"));
    }
    // A full refresh gives the same cube as the three incremental ones.
    let all = "SELECT city, kind, revenue, orders, buyers, mean, low, last FROM inc ORDER BY city, kind;";
    let incremental = run(d, all);
    run(d, "REFRESH CUBE inc;");
    common::assert_rows_close("full after incremental", &run(d, all), &incremental);
    let shown = run(d, "SHOW MATERIALIZED VIEWS;");
    assert!(shown.contains(",orders.id,419999,merge,"), "{shown}");
}
