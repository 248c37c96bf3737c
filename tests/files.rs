//! Files beyond CSV/JSON/Parquet: Avro, and files served over HTTP through object_store.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use flumen::datagen::{Dataset, GenSpec};
use flumen::{Config, Flumen};

fn engine() -> Flumen {
    Flumen::new(Config::default()).unwrap()
}

fn single_i64(out: &flumen::engine::SqlOutput, col: usize) -> i64 {
    out.batches[0].column(col).as_primitive::<Int64Type>().value(0)
}

#[tokio::test]
async fn reads_avro() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("users.avro");
    let spec = GenSpec::new(Dataset::Users, 2_000);
    let batch = spec.batch(0, 2_000).unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let mut w = arrow_avro::writer::AvroWriter::new(file, batch.schema().as_ref().clone()).unwrap();
    w.write(&batch).unwrap();
    w.finish().unwrap();

    let f = engine();
    f.sql(&format!(
        "CREATE EXTERNAL TABLE u STORED AS AVRO LOCATION '{}'",
        path.display()
    ))
    .await
    .unwrap();
    let out = f
        .sql("SELECT count(*), sum(user_id), count(email) FROM u")
        .await
        .unwrap();
    assert_eq!(single_i64(&out, 0), 2_000);
    assert_eq!(single_i64(&out, 1), (1..=2_000).sum::<i64>());
    let emails = batch.column(2).len() as i64 - batch.column(2).null_count() as i64;
    assert_eq!(single_i64(&out, 2), emails, "NULL emails survive");
}

/// A static HTTP file server with Range support on a free loopback port
/// (`tests/services/http_server.py`; Python is on every machine here).
struct HttpServer {
    child: Child,
    port: u16,
}

impl HttpServer {
    fn start(dir: &Path) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/services/http_server.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 must be installed to serve files over HTTP (apt-get install python3)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        // "Serving HTTP on 127.0.0.1 port 41234 (http://127.0.0.1:41234/) ..."
        let port = line
            .split("port ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected http.server banner: {line}"));
        Self { child, port }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn reads_csv_and_parquet_over_http() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(data.join("orders.csv"), dir.path().join("orders.csv")).unwrap();
    let f = engine();
    f.sql(&format!(
        "COPY (SELECT * FROM '{}') TO '{}' STORED AS PARQUET",
        data.join("orders.csv").display(),
        dir.path().join("orders.parquet").display()
    ))
    .await
    .unwrap();
    let server = HttpServer::start(dir.path());
    let base = format!("http://127.0.0.1:{}", server.port);
    f.sql(&format!(
        "CREATE EXTERNAL TABLE web_orders STORED AS CSV LOCATION '{base}/orders.csv' OPTIONS ('has_header' 'true')"
    ))
    .await
    .unwrap();
    let csv = f
        .sql("SELECT count(*), sum(quantity) FROM web_orders")
        .await
        .unwrap();
    assert_eq!(single_i64(&csv, 0), 10_000);
    let local = f
        .sql(&format!(
            "SELECT sum(quantity) FROM '{}'",
            data.join("orders.csv").display()
        ))
        .await
        .unwrap();
    assert_eq!(single_i64(&csv, 1), single_i64(&local, 0));
    f.sql(&format!(
        "CREATE EXTERNAL TABLE web_pq STORED AS PARQUET LOCATION '{base}/orders.parquet'"
    ))
    .await
    .unwrap();
    let pq = f
        .sql("SELECT count(*) FROM web_pq WHERE status = 'delivered'")
        .await
        .unwrap();
    assert_eq!(single_i64(&pq, 0), 7045);
}

#[tokio::test]
async fn unreachable_http_host_is_a_clear_error() {
    let f = engine();
    let err = f
        .sql("CREATE EXTERNAL TABLE t STORED AS CSV LOCATION 'http://127.0.0.1:9/nothing.csv'")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("127.0.0.1:9/nothing.csv"), "{err}");
    assert!(err.contains("statement at line 1"), "{err}");
}

/// Progress knows how much input there is: Parquet states its rows, CSV rows are estimated.
#[tokio::test]
async fn progress_knows_the_input_size() {
    use flumen::progress::PlanInput;
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("data");
    let f = engine();
    let plan = |sql: String| {
        let ctx = f.context().clone();
        async move { ctx.sql(&sql).await.unwrap().create_physical_plan().await.unwrap() }
    };
    let csv = data.join("orders.csv");
    let input = PlanInput::of(&plan(format!("SELECT * FROM '{}'", csv.display())).await);
    assert!(input.estimated);
    let est = input.total_rows.unwrap();
    assert!((9_000..=11_000).contains(&est), "estimate {est} for 10000 rows");
    assert_eq!(input.total_bytes, Some(std::fs::metadata(&csv).unwrap().len()));

    let dir = tempfile::tempdir().unwrap();
    let pq = dir.path().join("o.parquet");
    f.sql(&format!(
        "COPY (SELECT * FROM '{}') TO '{}' STORED AS PARQUET",
        csv.display(),
        pq.display()
    ))
    .await
    .unwrap();
    let input = PlanInput::of(&plan(format!("SELECT * FROM '{}'", pq.display())).await);
    assert_eq!((input.total_rows, input.estimated), (Some(10_000), false));
}
