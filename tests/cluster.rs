//! flumen on a Ballista cluster: each test starts a scheduler and two executors as separate
//! `flumen cluster` processes on 127.0.0.1 (ephemeral ports), runs a script on it with
//! `flumen run --cluster`, and checks the results against the same script run locally. The
//! ClickHouse tables are on the server `tests/services/start.sh` starts.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{ch, text};

const BIN: &str = env!("CARGO_BIN_EXE_flumen");

/// A scheduler and its executors, stopped when dropped.
struct Cluster {
    url: String,
    dir: PathBuf,
    scheduler: Child,
    executors: Vec<Child>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in self
            .executors
            .iter_mut()
            .chain(std::iter::once(&mut self.scheduler))
        {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("an ephemeral port")
}

fn logged(dir: &Path, name: &str) -> (Stdio, Stdio) {
    let f = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    (Stdio::from(f.try_clone().unwrap()), Stdio::from(f))
}

fn log(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default()
}

impl Cluster {
    /// A scheduler that counts an executor lost after 5 s without a heartbeat, and two
    /// executors with 2 slots each, a heartbeat a second and work directories under `dir`.
    fn start(dir: &Path) -> Cluster {
        let port = free_port();
        let (out, err) = logged(dir, "scheduler");
        let scheduler = Command::new(BIN)
            .args(["cluster", "scheduler", "--executor-timeout", "5", "--bind"])
            .arg(format!("127.0.0.1:{port}"))
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("the scheduler starts");
        let mut cluster = Cluster {
            url: format!("df://127.0.0.1:{port}"),
            dir: dir.to_path_buf(),
            scheduler,
            executors: Vec::new(),
        };
        let until = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < until,
                "the scheduler did not listen on {port}: {}",
                log(dir, "scheduler")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        for i in 0..2 {
            cluster.add_executor(port, i);
        }
        // Both executors have registered when both answer on their gRPC port and the scheduler
        // has logged them.
        let until = Instant::now() + Duration::from_secs(60);
        let mut restarts = 0;
        loop {
            let registered = log(dir, "scheduler").matches("egister").count();
            if registered >= 2 {
                break;
            }
            // An executor whose free port another test took in the meantime ("Address already
            // in use") starts again on new ones.
            for i in 0..cluster.executors.len() {
                if restarts < 3
                    && matches!(cluster.executors[i].try_wait(), Ok(Some(_)))
                    && log(dir, &format!("executor-{i}")).contains("Address already in use")
                {
                    restarts += 1;
                    let mut gone = cluster.executors.remove(i);
                    let _ = gone.wait();
                    cluster.add_executor(port, i);
                    let last = cluster.executors.len() - 1;
                    cluster.executors.swap(i, last);
                }
            }
            assert!(
                Instant::now() < until,
                "two executors did not register: {}\n{}\n{}",
                log(dir, "scheduler"),
                log(dir, "executor-0"),
                log(dir, "executor-1")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        cluster
    }

    fn add_executor(&mut self, scheduler: u16, i: usize) {
        let (out, err) = logged(&self.dir, &format!("executor-{i}"));
        let child = Command::new(BIN)
            .args([
                "cluster",
                "executor",
                "--slots",
                "2",
                "--heartbeat",
                "1",
                "--scheduler",
            ])
            .arg(format!("127.0.0.1:{scheduler}"))
            .arg("--bind")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--grpc-port")
            .arg(free_port().to_string())
            .arg("--work-dir")
            .arg(self.dir.join(format!("e{i}")))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("an executor starts");
        self.executors.push(child);
    }

    /// What `flumen explain --cluster` prints for `script`.
    fn explain(&self, script: &Path) -> String {
        let out = Command::new(BIN)
            .args(["explain", "--cluster", &self.url])
            .arg(script)
            .output()
            .expect("flumen explain runs");
        succeeded("explain --cluster", &out, Some(self))
    }

    /// Starts `flumen run --cluster` of `script` in the background, its output piped.
    fn spawn_run(&self, script: &Path, state: &Path) -> Child {
        Command::new(BIN)
            .arg("run")
            .arg(script)
            .arg("--state-dir")
            .arg(state)
            .args(["--cluster", &self.url])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("flumen runs")
    }

    /// The first executor (polled in order) for which `ready` holds.
    fn first_executor(&self, within: Duration, ready: impl Fn(usize) -> bool) -> usize {
        let until = Instant::now() + within;
        loop {
            if let Some(i) = (0..self.executors.len()).find(|i| ready(*i)) {
                return i;
            }
            assert!(Instant::now() < until, "no executor got there: {}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills executor `i` with SIGKILL: no goodbye to the scheduler.
    fn kill(&mut self, i: usize) {
        self.executors[i].kill().unwrap();
        self.executors[i].wait().unwrap();
    }

    fn logs(&self) -> String {
        let mut s = log(&self.dir, "scheduler");
        for i in 0..self.executors.len() {
            s.push_str(&log(&self.dir, &format!("executor-{i}")));
        }
        s
    }
}

/// `flumen run` of `script` (a file), state under `state`, with `extra` arguments.
fn run(script: &Path, state: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .arg("run")
        .arg(script)
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("flumen runs")
}

fn succeeded(what: &str, out: &Output, cluster: Option<&Cluster>) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        text(&out.stderr),
        cluster.map(Cluster::logs).unwrap_or_default()
    );
    text(&out.stdout)
}

/// The one row of a local query, as CSV without the header.
fn query(sql: &str) -> String {
    let out = Command::new(BIN)
        .args(["sql", "-q", "--format", "csv", "-e", sql])
        .output()
        .expect("flumen sql runs");
    succeeded(sql, &out, None)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string()
}

/// Row count and checksums of ClickHouse table `db.agg`.
fn agg_checksums(db: &str) -> String {
    ch(&format!(
        "SELECT count(), sum(n), sum(amount), sum(cityHash64(city, status, n, toString(amount))) FROM {db}.agg"
    ))
}

fn database(name: &str) -> String {
    ch(&format!("DROP DATABASE IF EXISTS {name}"));
    ch(&format!("CREATE DATABASE {name}"));
    name.to_string()
}

/// `files` Parquet files of generated orders (`rows` each, seeds 1..) under `dir/orders/`.
fn orders(dir: &Path, files: usize, rows: &str) -> PathBuf {
    let at = dir.join("orders");
    std::fs::create_dir_all(&at).unwrap();
    for i in 0..files {
        let out = Command::new(BIN)
            .args(["gen", "orders", "--rows", rows, "--users", "100k", "--seed"])
            .arg((i + 1).to_string())
            .arg("-o")
            .arg(at.join(format!("part-{i}.parquet")))
            .output()
            .unwrap();
        succeeded("flumen gen", &out, None);
    }
    at
}

/// The checksums of the group-by script run locally into a fresh database `db`.
fn local_checksums(dir: &Path, orders: &Path, db: &str) -> String {
    let db = database(db);
    let out = run(&group_by_script(dir, orders, &db), &dir.join("state-local"), &[]);
    succeeded("group by (local)", &out, None);
    agg_checksums(&db)
}

/// Orders per city and status into ClickHouse table `db.agg`.
fn group_by_script(dir: &Path, orders: &Path, db: &str) -> PathBuf {
    let path = dir.join(format!("{db}.sql"));
    std::fs::write(
        &path,
        format!(
            "CREATE EXTERNAL TABLE orders STORED AS PARQUET LOCATION '{}/';\n\
             CREATE EXTERNAL TABLE agg (city VARCHAR NOT NULL, status VARCHAR NOT NULL, n BIGINT NOT NULL, amount DECIMAL(38, 2))\n\
               STORED AS CLICKHOUSE LOCATION 'http://127.0.0.1:8123/{db}'\n\
               OPTIONS ('table' 'agg', 'create' 'if_not_exists', 'order_by' '(city, status)');\n\
             INSERT INTO agg SELECT city, status, count(*) AS n, sum(amount) AS amount FROM orders GROUP BY city, status;\n",
            orders.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn quickstart_and_a_group_by_into_clickhouse_equal_the_local_run() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("sql/examples/quickstart.sql");
    let data = format!("DATA={}/data", env!("CARGO_MANIFEST_DIR"));

    // The quickstart: COPY to partitioned Parquet, a view, and a query of what was written.
    let mut printed = Vec::new();
    for (name, on) in [("local", None), ("cluster", Some(&cluster))] {
        let out_dir = dir.path().join(format!("quickstart-{name}"));
        let set_out = format!("OUT={}", out_dir.display());
        let mut args = vec!["--set", &set_out, "--set", &data];
        if let Some(c) = on {
            args.extend(["--cluster", c.url.as_str()]);
        }
        let out = run(&quickstart, &dir.path().join(format!("state-{name}")), &args);
        let stdout = succeeded(&format!("quickstart ({name})"), &out, on);
        let sums = query(&format!(
            "SELECT count(*), sum(orders), sum(revenue), sum(customers), count(DISTINCT country) FROM '{}/revenue_by_country/'",
            out_dir.display()
        ));
        let cube = query(&format!(
            "SELECT count(*), sum(orders), sum(avg_amount) FROM '{}/city_activity.parquet'",
            out_dir.display()
        ));
        printed.push((stdout, sums, cube));
    }
    let (local, cluster_run) = (&printed[0], &printed[1]);
    assert!(local.0.contains("(10 rows)"), "{}", local.0);
    assert_eq!(local.0, cluster_run.0, "the top-10 table");
    assert_eq!(local.1, cluster_run.1, "revenue_by_country");
    assert_eq!(local.2, cluster_run.2, "city_activity");
    assert!(
        !local.1.starts_with("0,"),
        "the quickstart wrote nothing: {}",
        local.1
    );

    // Parquet -> GROUP BY -> ClickHouse: the sink writes from the executors.
    let orders = orders(dir.path(), 2, "200k");
    let want = local_checksums(dir.path(), &orders, "flumen_t_cluster_local");
    let cluster_db = database("flumen_t_cluster_remote");
    let script = group_by_script(dir.path(), &orders, &cluster_db);
    let out = run(
        &script,
        &dir.path().join("state-cluster"),
        &["--cluster", &cluster.url],
    );
    let stdout = succeeded("group by (cluster)", &out, Some(&cluster));
    assert!(want.starts_with("100\t400000\t"), "{want}");
    assert_eq!(agg_checksums(&cluster_db), want);
    assert!(stdout.contains("100 rows written"), "{stdout}");
    // The run summary counts what the executors' sinks delivered.
    let stderr = text(&out.stderr);
    assert!(stderr.contains("sink agg: 100 rows delivered"), "{stderr}");
    // ... and what the executors read, from the scheduler's job metrics.
    assert!(stderr.contains("400.0k rows read"), "{stderr}");
    // The executors kept their own journals under their work directories.
    let journals = (0..2)
        .filter_map(|i| std::fs::read_dir(dir.path().join(format!("e{i}/flumen/runs"))).ok())
        .flatten()
        .filter(|e| {
            e.as_ref()
                .map(|e| e.file_name().to_string_lossy().ends_with(".journal.jsonl"))
                .unwrap_or(false)
        })
        .count();
    assert!(journals >= 1, "no executor journal: {}", cluster.logs());

    // explain --cluster says how each statement runs.
    let plan = cluster.explain(&script);
    assert!(plan.contains("on the cluster:"), "{plan}");
    assert!(plan.contains("table agg: written by"), "{plan}");
    assert!(plan.contains("DataSourceExec: read by"), "{plan}");
    // A source of one partition is read as one task, and a file write says how it runs.
    let one = dir.path().join("one.sql");
    std::fs::write(
        &one,
        format!(
            "CREATE EXTERNAL TABLE one STORED AS GENERATE LOCATION 'users' OPTIONS ('rows' '1000', 'partitions' '1');
             COPY (SELECT * FROM one) TO '{}/one.parquet' STORED AS PARQUET;
",
            dir.path().display()
        ),
    )
    .unwrap();
    let plan = cluster.explain(&one);
    assert!(
        plan.contains("table one: read as one task (its source is one stream that cannot be split)"),
        "{plan}"
    );
    assert!(plan.contains("files: written"), "{plan}");
}

#[test]
fn a_lost_executor_s_tasks_run_again_on_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let orders = orders(dir.path(), 4, "1M");
    let want = local_checksums(dir.path(), &orders, "flumen_t_cluster_kill_local");
    let cluster_db = database("flumen_t_cluster_kill_remote");
    assert!(want.starts_with("100\t4000000\t"), "{want}");

    let mut cluster = Cluster::start(dir.path());
    let script = group_by_script(dir.path(), &orders, &cluster_db);
    let job = cluster.spawn_run(&script, &dir.path().join("state-cluster"));
    // Kill the executor that runs the first task of the first stage (the scan and partial
    // aggregate), as soon as it starts it.
    let killed = cluster.first_executor(Duration::from_secs(120), |i| {
        log(dir.path(), &format!("executor-{i}")).contains("Execute task  : [TID ")
    });
    cluster.kill(killed);
    let out = job.wait_with_output().unwrap();
    succeeded("group by (cluster, an executor killed)", &out, Some(&cluster));
    assert_eq!(
        agg_checksums(&cluster_db),
        want,
        "the job ran again what the lost executor had: {}",
        cluster.logs()
    );
}

#[test]
fn a_write_lost_with_its_executor_is_not_written_twice() {
    // A slow sink (each request 300 ms) fed by two partitions: both executors write. One is
    // killed while its write is under way; the second attempt of that write must refuse to run
    // rather than deliver again what the first may have delivered.
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::start(dir.path());
    let sink = dir.path().join("sink");
    let script = dir.path().join("slow.sql");
    std::fs::write(
        &script,
        format!(
            "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '200k', 'partitions' '2');\n\
             CREATE EXTERNAL TABLE slow (order_id BIGINT NOT NULL, amount DECIMAL(18, 2)) STORED AS FAULTY LOCATION '{}'\n\
               OPTIONS ('delay' '300ms', 'batch_rows' '2000', 'concurrency' '1');\n\
             INSERT INTO slow SELECT order_id, amount FROM src;\n",
            sink.display()
        ),
    )
    .unwrap();
    let job = cluster.spawn_run(&script, &dir.path().join("state"));
    // Kill the first executor whose sink has sent a request (its journal appears then).
    let killed = cluster.first_executor(Duration::from_secs(120), |i| {
        std::fs::read_dir(dir.path().join(format!("e{i}/flumen/runs")))
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().ends_with(".journal.jsonl"))
            })
            .unwrap_or(false)
    });
    cluster.kill(killed);
    let out = job.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the run should fail: {err}");
    assert!(
        err.contains("table slow: the write of partition") && err.contains("instead of writing them twice"),
        "{err}\n{}",
        cluster.logs()
    );
}

#[test]
fn what_an_executor_staged_is_resumed_on_that_executor() {
    // A sink that is down: the executor's write stages its rows and the run fails, naming the
    // executor's run and state directory; `flumen resume` there delivers them, once.
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path());
    let sink = dir.path().join("sink");
    let script = dir.path().join("down.sql");
    std::fs::write(
        &script,
        format!(
            "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '10k', 'partitions' '1');\n\
             CREATE EXTERNAL TABLE down (order_id BIGINT NOT NULL, amount DECIMAL(18, 2)) STORED AS FAULTY LOCATION '{}'\n\
               OPTIONS ('down' '${{DOWN}}', 'max_attempts' '2', 'retry_initial' '10ms', 'batch_rows' '3000');\n\
             INSERT INTO down SELECT order_id, amount FROM src;\n",
            sink.display()
        ),
    )
    .unwrap();
    let out = run(
        &script,
        &dir.path().join("state"),
        &["--cluster", &cluster.url, "--set", "DOWN=true"],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success(), "the sink is down: {err}");
    assert!(
        err.contains("failed on the cluster: table down: 10000 rows in 4 parts could not be delivered"),
        "{err}"
    );
    let hint = err
        .split('`')
        .find(|s| s.starts_with("flumen resume "))
        .unwrap_or_else(|| panic!("no resume hint: {err}"));
    let words: Vec<&str> = hint.split_whitespace().collect();
    assert_eq!(words.len(), 5, "flumen resume RUN --state-dir DIR: {hint}");
    assert!(err.contains(&format!("`{hint}` on that executor")), "{err}");
    let resumed = Command::new(BIN)
        .args(["resume", words[2], "--state-dir", words[4], "--set", "DOWN=false"])
        .output()
        .unwrap();
    let said = succeeded("resume on the executor", &resumed, Some(&cluster));
    assert!(said.contains("delivered 4 staged parts, 10000 rows"), "{said}");
    assert_eq!(
        query(&format!(
            "SELECT count(*), count(DISTINCT order_id) FROM '{}/'",
            sink.display()
        )),
        "10000,10000"
    );
}
