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

/// Files read incrementally by modification time: only files newer than the last load are
/// opened; a rewritten file is read again; `--full-refresh` reads them all.
#[test]
fn files_are_read_incrementally_by_modification_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let input = d.join("in");
    std::fs::create_dir(&input).unwrap();
    let t0 = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_790_000_000);
    let write = |name: &str, text: &str, at: std::time::SystemTime| {
        let path = input.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(at)
            .unwrap();
    };
    write("a.csv", "id,v\n1,a\n2,b\n", t0);
    write("b.csv", "id,v\n3,c\n", t0 + std::time::Duration::from_secs(5));
    let script = format!(
        "CREATE EXTERNAL TABLE src STORED AS CSV LOCATION '{}/' OPTIONS ('format.has_header' 'true', 'incremental_column' '_modified');\n\
         CREATE EXTERNAL TABLE dst (id BIGINT, v VARCHAR, _modified TIMESTAMP) STORED AS SQLITE LOCATION 'sqlite://{}/out.db' \
           OPTIONS ('table' 'dst', 'mode' 'upsert', 'keys' 'id');\n\
         INSERT INTO dst SELECT id, v, _modified FROM src;\n",
        input.display(),
        d.display()
    );
    std::fs::write(d.join("job.sql"), &script).unwrap();
    let run = |extra: &[&str]| -> (u64, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["run", "-q", "--state-dir"])
            .arg(d.join("state"))
            .arg(d.join("job.sql"))
            .args(extra)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let line = stdout
            .lines()
            .find(|l| l.starts_with("incremental src._modified -> dst: "))
            .unwrap_or_else(|| panic!("no incremental line: {stdout}"))
            .to_string();
        let n = line["incremental src._modified -> dst: ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        (n, line)
    };
    let rows = || {
        let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["sql", "-q", "--format", "csv", "-e"])
            .arg(format!(
                "CREATE EXTERNAL TABLE t STORED AS SQLITE LOCATION 'sqlite://{}/out.db' OPTIONS ('table' 'dst'); SELECT id, v FROM t ORDER BY id",
                d.display()
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).replace('\n', " ")
    };
    let (n, line) = run(&[]);
    assert_eq!(n, 3, "{line}");
    assert!(line.ends_with("watermark 2026-09-21T14:13:25Z"), "{line}");
    // A new file, and a.csv rewritten (newer time): both read, b.csv not.
    write(
        "c.csv",
        "id,v\n4,d\n5,e\n",
        t0 + std::time::Duration::from_secs(60),
    );
    write(
        "a.csv",
        "id,v\n1,A\n2,B\n",
        t0 + std::time::Duration::from_secs(61),
    );
    let (n, line) = run(&[]);
    assert_eq!(n, 4, "{line}");
    assert!(line.contains("past 2026-09-21T14:13:25Z"), "{line}");
    assert_eq!(rows(), "id,v 1,A 2,B 3,c 4,d 5,e ");
    let (n, line) = run(&[]);
    assert_eq!(n, 0, "{line}");
    let (n, line) = run(&["--full-refresh"]);
    assert_eq!(n, 5, "{line}");
    assert_eq!(rows(), "id,v 1,A 2,B 3,c 4,d 5,e ");
}

/// A CSV value that does not fit its declared column (a word in a BIGINT column, a bad date) is
/// a rejection: the row goes to dead letters naming the column and the value, the others load.
/// `'strict' 'true'` fails the read instead.
#[test]
fn csv_values_that_do_not_fit_their_column_are_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut csv = String::from("id,amount,day,note\n");
    let mut planted = Vec::new();
    for i in 1..=1000u32 {
        let (amount, day) = match i % 97 {
            0 => {
                planted.push(format!("{i},column amount: 'n/a{i}' is not a Int64"));
                (format!("n/a{i}"), "2026-01-01".to_string())
            }
            13 => {
                planted.push(format!(
                    "{i},column day: '2026-13-{:02}' is not a Date32",
                    i % 28 + 1
                ));
                (i.to_string(), format!("2026-13-{:02}", i % 28 + 1))
            }
            _ => (i.to_string(), "2026-01-01".to_string()),
        };
        // Empty fields are NULLs, not rejections.
        let amount = if i % 50 == 7 { String::new() } else { amount };
        csv.push_str(&format!("{i},{amount},{day},x\n"));
    }
    std::fs::write(d.join("in.csv"), csv).unwrap();
    let script = |strict: &str| {
        format!(
            "CREATE EXTERNAL TABLE src (id BIGINT, amount BIGINT, day DATE, note VARCHAR) STORED AS CSV LOCATION '{}/in.csv' \
               OPTIONS ('format.has_header' 'true'{strict});\n\
             COPY (SELECT * FROM src) TO '{}/out.parquet' STORED AS PARQUET;\n",
            d.display(),
            d.display()
        )
    };
    std::fs::write(d.join("job.sql"), script("")).unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["run", "--state-dir"])
            .arg(d.join("state"))
            .arg(d.join("job.sql"))
            .output()
            .unwrap()
    };
    let out = run();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}");
    assert_eq!(planted.len(), 21);
    assert!(
        stdout.contains("source src: 21 rows rejected (values that do not fit their column"),
        "{stdout}"
    );
    let sql = |q: String| {
        let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
            .args(["sql", "-q", "--format", "csv", "-e"])
            .arg(q)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let loaded = sql(format!(
        "SELECT count(*) AS n, count(amount) AS amounts, sum(id) AS ids FROM '{}/out.parquet'",
        d.display()
    ));
    let good: u32 = (1..=1000u32).filter(|i| i % 97 != 0 && i % 97 != 13).sum();
    let nulls = (1..=1000u32)
        .filter(|i| i % 50 == 7 && i % 97 != 0 && i % 97 != 13)
        .count();
    assert_eq!(loaded, format!("n,amounts,ids\n979,{},{good}\n", 979 - nulls));
    let run_dir = std::fs::read_dir(d.join("state/dead_letter"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let dead = sql(format!(
        "SELECT id, _error FROM '{}/src/' ORDER BY CAST(id AS BIGINT)",
        run_dir.display()
    ));
    let mut want = String::from("id,_error\n");
    for p in &planted {
        want.push_str(p);
        want.push('\n');
    }
    assert_eq!(dead, want);
    // Strict: the first bad value fails the read, naming it.
    std::fs::write(d.join("job.sql"), script(", 'strict' 'true'")).unwrap();
    let out = run();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Error while parsing value"), "{err}");
}
