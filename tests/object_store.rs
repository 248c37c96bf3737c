//! `s3://` end to end against a local S3-compatible server (moto, started by
//! `tests/services/start.sh`), with credentials and endpoint from the usual AWS variables.

use std::path::Path;
use std::process::{Command, Output};

fn endpoint() -> String {
    format!(
        "http://127.0.0.1:{}",
        std::env::var("FLUMEN_S3_PORT").unwrap_or_else(|_| "5055".into())
    )
}

/// Creates a bucket no earlier run has used (the server keeps its state), failing with how to
/// start the server when it is not running.
fn bucket(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("flumen-{tag}-{}-{nanos}", std::process::id());
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "PUT"])
        .arg(format!("{}/{name}", endpoint()))
        .output()
        .expect("curl runs");
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        code == "200",
        "the S3 test server at {} is not answering (HTTP '{code}'): start it with `bash tests/services/start.sh`",
        endpoint()
    );
    name
}

fn flumen(sql: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["sql", "-q", "--format", "csv", "-e", sql])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .env("AWS_ENDPOINT", endpoint())
        .env("AWS_ALLOW_HTTP", "true")
        .env("AWS_ACCESS_KEY_ID", "flumen")
        .env("AWS_SECRET_ACCESS_KEY", "flumen-secret-key")
        .env("AWS_REGION", "us-east-1")
        .output()
        .expect("the flumen binary runs")
}

fn ok(sql: &str) -> String {
    let out = flumen(sql);
    assert!(
        out.status.success(),
        "{sql}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn partitioned_parquet_to_s3_and_back() {
    let b = bucket("partitioned");
    let written = ok(&format!(
        "COPY (SELECT * FROM 'data/orders.csv') TO 's3://{b}/orders/' STORED AS PARQUET PARTITIONED BY (status)"
    ));
    assert_eq!(written, "10000 rows written\n");
    let counts = ok(&format!(
        "SELECT status, count(*) AS n FROM 's3://{b}/orders/' GROUP BY status ORDER BY status"
    ));
    assert_eq!(
        counts,
        "status,n\ncancelled,586\ndelivered,7045\npending,778\nreturned,385\nshipped,1206\n"
    );
    // One partition directory as its own table.
    let pending = ok(&format!(
        "CREATE EXTERNAL TABLE p STORED AS PARQUET LOCATION 's3://{b}/orders/status=pending/'; SELECT count(*) AS n FROM p"
    ));
    assert_eq!(pending, "n\n778\n");
}

#[test]
fn csv_and_json_on_s3_with_globs() {
    let b = bucket("globs");
    ok(&format!(
        "COPY (SELECT * FROM 'data/users.csv' WHERE user_id <= 600) TO 's3://{b}/users/part-1.csv' STORED AS CSV"
    ));
    ok(&format!(
        "COPY (SELECT * FROM 'data/users.csv' WHERE user_id > 600) TO 's3://{b}/users/part-2.csv' STORED AS CSV"
    ));
    ok(&format!(
        "COPY (SELECT * FROM 'data/events.ndjson') TO 's3://{b}/events/all.json' STORED AS JSON"
    ));
    let users = ok(&format!(
        "CREATE EXTERNAL TABLE u STORED AS CSV LOCATION 's3://{b}/users/part-*.csv' OPTIONS ('has_header' 'true'); \
         SELECT count(*) AS n, sum(user_id) AS s FROM u"
    ));
    assert_eq!(users, format!("n,s\n1000,{}\n", (1..=1000).sum::<i64>()));
    let events = ok(&format!("SELECT count(*) AS n FROM 's3://{b}/events/all.json'"));
    assert_eq!(events, "n\n3000\n");
}

#[test]
fn missing_bucket_is_a_clear_error() {
    let out = flumen("SELECT * FROM 's3://flumen-no-such-bucket/x.parquet'");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("flumen-no-such-bucket") && !err.contains("panicked"),
        "{err}"
    );
    assert!(!err.contains("flumen-secret-key"), "secret leaked: {err}");
}
