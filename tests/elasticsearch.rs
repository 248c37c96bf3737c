//! The ELASTICSEARCH connector against the OpenSearch-compatible server `tests/services/start.sh`
//! installs and starts on 127.0.0.1:9200 (osmem-server 0.1.6 from PyPI, a third-party
//! reimplementation of the REST API; no real Elasticsearch or OpenSearch can be installed here),
//! and a test proxy in front of it (`tests/services/es_proxy.py`) for 429s and credentials.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

use common::{ES, es};

fn fresh(index: &str) {
    es("DELETE", index, None);
}

fn count(index: &str) -> u64 {
    es("POST", &format!("{index}/_refresh"), None);
    es("GET", &format!("{index}/_count"), None)["count"]
        .as_u64()
        .unwrap_or(0)
}

fn flumen(dir: &Path, script: &str, extra: &[&str]) -> Output {
    let path = dir.join("job.sql");
    std::fs::write(&path, script).unwrap();
    Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", path.to_str().unwrap(), "-q", "--state-dir"])
        .arg(dir.join("state"))
        .args(extra)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("flumen runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The test proxy: (process, port).
struct Proxy(Child, u16);

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proxy(args: &[&str]) -> Proxy {
    let mut child = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/services/es_proxy.py"))
        .arg(ES)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs the test proxy");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port = line.trim().parse().expect("the proxy prints its port");
    Proxy(child, port)
}

#[test]
fn documents_keep_their_types_and_refusals_go_to_dead_letters() {
    fresh("flumen-t-types");
    let dir = tempfile::tempdir().unwrap();
    let script = "CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, name VARCHAR, price DECIMAL(12, 2), ok BOOLEAN, \
                  ratio DOUBLE, day DATE, at TIMESTAMP WITH TIME ZONE, tags VARCHAR[], \
                  place STRUCT<city VARCHAR, zip INT>)\n\
                  STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200' OPTIONS ('index' 'flumen-t-types', 'id_column' 'id');\n\
                  INSERT INTO t VALUES\n\
                    (1, 'héllo \"東京\"\\n', 1234567890.12, true, 0.5, DATE '1969-07-20', TIMESTAMP '2040-01-02 03:04:05.678Z',\n\
                     ['a', 'b'], named_struct('city', 'Zürich', 'zip', 8001)),\n\
                    (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);\n";
    let out = flumen(dir.path(), script, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let one = es("GET", "flumen-t-types/_doc/1", None);
    assert_eq!(
        one["_source"],
        serde_json::json!({
            "name": "héllo \"東京\"\\n", "price": 1234567890.12, "ok": true, "ratio": 0.5, "day": "1969-07-20",
            "at": "2040-01-02T03:04:05.678Z", "tags": ["a", "b"], "place": {"city": "Zürich", "zip": 8001}
        })
    );
    assert_eq!(
        es("GET", "flumen-t-types/_doc/2", None)["_source"],
        serde_json::json!({})
    );
    let mapping = es("GET", "flumen-t-types/_mapping", None);
    let props = &mapping["flumen-t-types"]["mappings"]["properties"];
    assert_eq!(props["price"]["type"], "scaled_float");
    assert_eq!(props["at"]["type"], "date");

    // An explicit mapping the rows break: exactly the bad ones go to dead letters.
    fresh("flumen-t-bad");
    let script = "CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, n VARCHAR) STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200'\n\
                  OPTIONS ('index' 'flumen-t-bad', 'id_column' 'id', 'mappings' '{\"properties\": {\"n\": {\"type\": \"long\"}}}',\n\
                           'max_rejected' '10');\n\
                  INSERT INTO t SELECT value, CASE WHEN value % 100 = 7 THEN 'x' || value ELSE CAST(value AS VARCHAR) END\n\
                  FROM generate_series(1, 1000);\n";
    let out = flumen(dir.path(), script, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count("flumen-t-bad"), 990);
    let dead = std::fs::read_dir(dir.path().join("state/dead_letter"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["sql", "-q", "--format", "csv", "-e"])
        .arg(format!(
            "SELECT count(*) AS n, sum(CASE WHEN id % 100 = 7 THEN 1 ELSE 0 END) AS bad, min(_error) AS reason FROM '{}/t/'",
            dead.display()
        ))
        .output()
        .unwrap();
    let csv = text(&out.stdout);
    assert!(
        csv.starts_with("n,bad,reason\n10,10,"),
        "{csv}{}",
        text(&out.stderr)
    );
    assert!(csv.contains("HTTP 400") && csv.contains("n"), "{csv}");
}

#[test]
fn generated_rows_all_land_and_match_the_source() {
    fresh("flumen-t-orders");
    let dir = tempfile::tempdir().unwrap();
    let script = "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '100k');\n\
                  CREATE EXTERNAL TABLE dst (order_id BIGINT NOT NULL, user_id BIGINT, created_at TIMESTAMP, status VARCHAR,\n\
                    city VARCHAR, amount DECIMAL(18, 2), quantity INT, discount DOUBLE, note VARCHAR)\n\
                  STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200' OPTIONS ('index' 'flumen-t-orders', 'concurrency' '4');\n\
                  INSERT INTO dst SELECT * FROM src;\n\
                  SELECT order_id, user_id, status, city, CAST(amount AS VARCHAR) AS amount, quantity, note FROM src\n\
                  WHERE order_id IN (1, 777, 50000, 99999) ORDER BY order_id;\n";
    let out = flumen(dir.path(), script, &["--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count("flumen-t-orders"), 100_000);
    // Documents have flumen's ids (no id_column): find the sample by order_id.
    let stdout = text(&out.stdout);
    for line in stdout.lines().skip(1) {
        let want: Value = serde_json::from_str(line).unwrap();
        let id = want["order_id"].as_i64().unwrap();
        let hits = es(
            "POST",
            "flumen-t-orders/_search",
            Some(&format!("{{\"query\": {{\"term\": {{\"order_id\": {id}}}}}}}")),
        );
        let hits = hits["hits"]["hits"].as_array().unwrap().clone();
        assert_eq!(hits.len(), 1, "order {id}: {hits:?}");
        let doc = &hits[0]["_source"];
        for field in ["user_id", "status", "city", "quantity", "note"] {
            assert_eq!(doc[field], want[field], "order {id} field {field}");
        }
        assert_eq!(
            doc["amount"].to_string(),
            want["amount"].as_str().unwrap(),
            "order {id} amount"
        );
    }

    // Read back through flumen's reader (schema from the mapping, 3 scroll slices): every row
    // equals its source row, none missing, none extra.
    let cols =
        "order_id, user_id, status, city, CAST(amount AS DECIMAL(18, 2)) AS amount, quantity, discount, note";
    let script = format!(
        "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '100k');\n\
         CREATE EXTERNAL TABLE back STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200'\n\
           OPTIONS ('index' 'flumen-t-orders', 'partitions' '3');\n\
         SELECT (SELECT count(*) FROM (SELECT {cols} FROM src EXCEPT ALL SELECT {cols} FROM back)) AS missing,\n\
                (SELECT count(*) FROM (SELECT {cols} FROM back EXCEPT ALL SELECT {cols} FROM src)) AS extra,\n\
                (SELECT count(*) FROM back) AS n;\n\
         SELECT order_id, city FROM back WHERE status = 'shipped' AND order_id BETWEEN 100 AND 200 ORDER BY order_id LIMIT 2;\n"
    );
    let out = flumen(dir.path(), &script, &["--format", "csv"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("missing,extra,n\n0,0,100000\n"), "{stdout}");
    let shipped = es(
        "POST",
        "flumen-t-orders/_search",
        Some(
            r#"{"size": 2, "sort": [{"order_id": "asc"}], "query": {"bool": {"filter": [{"term": {"status": "shipped"}}, {"range": {"order_id": {"gte": 100, "lte": 200}}}]}}}"#,
        ),
    );
    let want: Vec<String> = shipped["hits"]["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            format!(
                "{},{}",
                h["_source"]["order_id"],
                h["_source"]["city"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        stdout.rsplit("order_id,city\n").next().unwrap().trim_end(),
        want.join("\n")
    );

    // What went to the server: the columns, the filters as query DSL, the limit as size.
    let path = dir.path().join("explain.sql");
    std::fs::write(
        &path,
        "CREATE EXTERNAL TABLE back STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200' OPTIONS ('index' 'flumen-t-orders');\n\
         SELECT order_id FROM back WHERE status = 'paid' AND quantity >= 3 LIMIT 5;\n\
         SELECT order_id FROM back WHERE city LIKE 'Z%';\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["explain", path.to_str().unwrap()])
        .output()
        .unwrap();
    let plan = text(&out.stdout);
    // (The search body's keys are in the order flumen builds them.)
    assert!(
        plan.contains(r#""size":5,"#)
            && plan.contains(r#""_source":{"includes":["order_id"]}"#)
            && plan.contains(
                r#""query":{"bool":{"filter":[{"term":{"status":"paid"}},{"range":{"quantity":{"gte":3}}}]}}"#
            ),
        "{plan}"
    );
    assert!(
        plan.contains("LIKE")
            && plan.contains(r#""includes":["city","order_id"]}"#)
            && plan.contains(r#""query":{"match_all":{}}"#),
        "{plan}"
    );
}

#[test]
fn a_429_storm_ends_with_every_document_indexed_once() {
    fresh("flumen-t-storm");
    let p = proxy(&["--reject", "0.3", "--seed", "7"]);
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.json");
    let script = format!(
        "CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, v VARCHAR) STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:{}'\n\
         OPTIONS ('index' 'flumen-t-storm', 'id_column' 'id', 'batch_rows' '500', 'retry_initial' '10ms', 'retry_max' '50ms',\n\
                  'max_attempts' '30');\n\
         INSERT INTO t SELECT value, 'v' || value FROM generate_series(1, 5000);\n",
        p.1
    );
    let out = flumen(dir.path(), &script, &["--metrics", metrics.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count("flumen-t-storm"), 5000);
    // Every id 1..5000 is there once: 5000 documents whose ids come from a set of 5000.
    let stats = text(
        &Command::new("curl")
            .args(["-s", &format!("http://127.0.0.1:{}/_proxy_stats", p.1)])
            .output()
            .unwrap()
            .stdout,
    );
    let stats: Value = serde_json::from_str(&stats).unwrap();
    let rejected = stats["rejected_items"].as_u64().unwrap();
    assert!(rejected > 1000, "{stats}");
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&metrics).unwrap()).unwrap();
    assert_eq!(m["sinks"]["t"]["rows"], 5000, "{m}");
    assert!(m["sinks"]["t"]["retries"].as_u64().unwrap() > 0, "{m}");
}

#[test]
fn an_unreachable_server_spills_and_resume_completes() {
    fresh("flumen-t-down");
    let dir = tempfile::tempdir().unwrap();
    // A port nothing listens on; the proxy is started on it only for the resume.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let script = format!(
        "CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, v VARCHAR) STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:{port}'\n\
         OPTIONS ('index' 'flumen-t-down', 'id_column' 'id', 'batch_rows' '1000', 'max_attempts' '2', 'retry_initial' '10ms');\n\
         INSERT INTO t SELECT value, 'v' || value FROM generate_series(1, 3000);\n"
    );
    let out = flumen(dir.path(), &script, &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("cannot reach") && err.contains("resume"), "{err}");
    let run = err
        .split("flumen resume ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the error names the run to resume")
        .trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '_')
        .to_string();
    // The server comes back (a forwarding proxy on that port), and resume delivers the rest.
    let back = proxy(&["--port", &port.to_string()]);
    assert_eq!(back.1, port);
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["resume", &run, "-q", "--state-dir"])
        .arg(dir.path().join("state"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count("flumen-t-down"), 3000);
}

#[test]
fn wrong_credentials_bad_index_names_and_unknown_options_are_clear_errors() {
    let p = proxy(&["--auth", "etl:right-secret"]);
    let dir = tempfile::tempdir().unwrap();
    let script = format!(
        "CREATE EXTERNAL TABLE t (id BIGINT) STORED AS ELASTICSEARCH LOCATION 'http://etl:${{ES_PASSWORD}}@127.0.0.1:{}'\n\
         OPTIONS ('index' 'flumen-t-auth');\n\
         INSERT INTO t VALUES (1);\n",
        p.1
    );
    let out = flumen(dir.path(), &script, &["--set", "ES_PASSWORD=wrong-secret"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("HTTP 401") && err.contains("credentials"), "{err}");
    assert!(!err.contains("wrong-secret"), "the password leaked: {err}");
    let out = flumen(dir.path(), &script, &["--set", "ES_PASSWORD=right-secret"]);
    assert!(out.status.success(), "{}", text(&out.stderr));

    for (opts, want) in [
        ("'index' 'Bad Index'", "not a valid index name"),
        ("'indx' 'x'", "did you mean 'index'"),
        ("'index' 'x-{nope}'", "{nope} is not a column"),
        ("'index' 'x', 'op' 'upsert'", "needs 'id_column'"),
    ] {
        let script = format!(
            "CREATE EXTERNAL TABLE t (id BIGINT) STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200' OPTIONS ({opts});\n"
        );
        let out = flumen(dir.path(), &script, &[]);
        let err = text(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want) && !err.contains("panicked"),
            "{opts}: {err}"
        );
    }
}

#[test]
fn full_text_match_runs_on_the_server() {
    fresh("flumen-t-text");
    let dir = tempfile::tempdir().unwrap();
    let script = "CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, body VARCHAR) STORED AS ELASTICSEARCH\n\
                    LOCATION 'http://127.0.0.1:9200' OPTIONS ('index' 'flumen-t-text', 'id_column' 'id', 'strings' 'text', 'refresh' 'true');\n\
                  INSERT INTO t VALUES (1, 'The quick brown fox'), (2, 'Lazy dogs sleep'), (3, 'A QUICK test');\n\
                  CREATE EXTERNAL TABLE r STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200' OPTIONS ('index' 'flumen-t-text');\n\
                  SELECT body FROM r WHERE match(body, 'quick') ORDER BY body;\n";
    let out = flumen(dir.path(), script, &["--format", "csv"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // Analysed text: case does not matter, other words do.
    assert_eq!(
        text(&out.stdout),
        "3 rows written\nbody\nA QUICK test\nThe quick brown fox\n"
    );
    let out = flumen(dir.path(), "SELECT match('a', 'b');\n", &[]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("run by the search server"),
        "{err}"
    );
}

#[test]
fn every_mappable_type_reads_back_as_written() {
    fresh("flumen-t-rt");
    let dir = tempfile::tempdir().unwrap();
    let cols = "id BIGINT NOT NULL, i8 TINYINT, i16 SMALLINT, i32 INT, i64 BIGINT, u8 TINYINT UNSIGNED,\n\
                u16 SMALLINT UNSIGNED, u32 INT UNSIGNED, u64 BIGINT UNSIGNED, f32 REAL, f64 DOUBLE, dec DECIMAL(12, 2),\n\
                s VARCHAR, b BOOLEAN, d DATE, ts TIMESTAMP, bin BYTEA, tags VARCHAR[], nums BIGINT[],\n\
                obj STRUCT<name VARCHAR, n INT, inner STRUCT<x DOUBLE, ok BOOLEAN>>";
    let script = format!(
        "CREATE TABLE src ({cols}) AS VALUES\n\
           (1, -128, -32768, -2147483648, -9223372036854775808, 255, 65535, 4294967295, 18446744073709551615,\n\
            0.1, 1e300, -9999999999.99, 'héllo \"東京\"\\n\\t\\\\ 🎉', true, DATE '1969-07-20', TIMESTAMP '1969-12-31 23:59:59.5',\n\
            X'00ff10fe', ['a', 'ü', ''], [1, -2, 9007199254740993],\n\
            named_struct('name', 'Zürich', 'n', 8001, 'inner', named_struct('x', 1.5, 'ok', false))),\n\
           (2, 127, 32767, 2147483647, 9223372036854775807, 0, 0, 0, 0,\n\
            -3.4e38, -0.0, 0.01, '', false, DATE '2262-04-11', TIMESTAMP '2040-01-02 03:04:05.678',\n\
            X'', [], [], named_struct('name', NULL, 'n', NULL, 'inner', NULL)),\n\
           (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);\n\
         CREATE EXTERNAL TABLE t ({cols}) STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200'\n\
           OPTIONS ('index' 'flumen-t-rt', 'id_column' 'id', 'refresh' 'true');\n\
         INSERT INTO t SELECT * FROM src;\n\
         SELECT (SELECT count(*) FROM t) AS n,\n\
                (SELECT count(*) FROM (SELECT * FROM src EXCEPT ALL SELECT * FROM t)) AS missing,\n\
                (SELECT count(*) FROM (SELECT * FROM t EXCEPT ALL SELECT * FROM src)) AS changed;\n\
         SELECT id, i8 FROM t WHERE id = 2 OR id IN (3, 4) ORDER BY id;\n\
         CREATE EXTERNAL TABLE back STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200'\n\
           OPTIONS ('index' 'flumen-t-rt', 'id_column' '_id');\n\
         SELECT _id, arrow_typeof(ts) AS ty, ts, u64, bin, dec, tags FROM back WHERE _id IN ('1', '3') ORDER BY _id;\n"
    );
    let out = flumen(dir.path(), &script, &["--format", "csv"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    // Written with the declared columns and read back through them: every value equal.
    assert!(
        stdout.contains("n,missing,changed\n3,0,0\nid,i8\n2,127\n3,\n"),
        "{stdout}"
    );
    let doc = es("GET", "flumen-t-rt/_doc/1", None);
    assert_eq!(doc["_source"]["bin"], "AP8Q/g==", "binary as base64");
    assert_eq!(doc["_source"]["ts"], "1969-12-31T23:59:59.500Z");
    // Read through the index's own mapping: dates as UTC instants, binary as its base64 text,
    // scaled_float as a double, keyword arrays as their JSON text, the id from _id.
    assert!(
        stdout.ends_with(
            "_id,ty,ts,u64,bin,dec,tags\n\
             1,\"Timestamp(ms, \"\"UTC\"\")\",1969-12-31T23:59:59.500Z,18446744073709551615,AP8Q/g==,-9999999999.99,\"[\"\"a\"\",\"\"ü\"\",\"\"\"\"]\"\n\
             3,\"Timestamp(ms, \"\"UTC\"\")\",,,,,\n"
        ),
        "{stdout}"
    );
}

#[test]
fn documents_the_mapping_cannot_foresee_read_per_document() {
    fresh("flumen-t-multi");
    es(
        "PUT",
        "flumen-t-multi",
        Some(
            r#"{"mappings": {"properties": {"k": {"type": "keyword"}, "n": {"type": "long"}, "tb": {"type": "long"},
                "o": {"type": "object", "enabled": false}, "at": {"type": "date"}}}}"#,
        ),
    );
    let bulk = [
        r#"{"index": {"_id": "a"}}"#,
        r#"{"k": "x", "n": 1, "tb": 1, "o": {"p": 1}, "at": "2040-01-02T05:04:05.678+02:00"}"#,
        r#"{"index": {"_id": "b"}}"#,
        r#"{"k": ["y", "z"], "n": [2], "tb": 2, "o": [1, 2], "at": "2040-01-02T03:04:05Z"}"#,
        r#"{"index": {"_id": "c"}}"#,
        r#"{"k": [], "n": 3, "tb": 2}"#,
        r#"{"index": {"_id": "d"}}"#,
        r#"{"n": [4, 5], "tb": 4}"#,
        r#"{"index": {"_id": "e"}}"#,
        r#"{"n": 6}"#,
    ]
    .join("\n")
        + "\n";
    let out = Command::new("curl")
        .args([
            "-s",
            "-S",
            "-X",
            "POST",
            &format!("{ES}/flumen-t-multi/_bulk?refresh=true"),
        ])
        .args(["-H", "content-type: application/x-ndjson", "--data-binary", &bulk])
        .output()
        .unwrap();
    assert!(
        text(&out.stdout).contains("\"errors\":false"),
        "{}",
        text(&out.stdout)
    );
    let dir = tempfile::tempdir().unwrap();
    let table = |name: &str, cols: &str, opts: &str| {
        format!(
            "CREATE EXTERNAL TABLE {name} {cols} STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200'\n\
               OPTIONS ('index' 'flumen-t-multi'{opts});\n"
        )
    };
    // Single values read as one-element lists, one-element arrays as their value, objects and
    // arrays in string columns as JSON text, offsets as the UTC instant.
    let script = table(
        "t",
        "(_id VARCHAR, k VARCHAR[], n BIGINT, o VARCHAR, at TIMESTAMP, tb BIGINT)",
        "",
    ) + "SELECT _id, cardinality(k) AS nk, array_to_string(k, '|') AS k, n, o, at FROM t WHERE tb < 4 ORDER BY n;\n";
    let out = flumen(dir.path(), &script, &["--format", "csv"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "_id,nk,k,n,o,at\n\
         a,1,x,1,\"{\"\"p\"\":1}\",2040-01-02T03:04:05.678\n\
         b,2,y|z,2,\"[1,2]\",2040-01-02T03:04:05\n\
         c,0,,3,,\n"
    );
    // Several values in a scalar column: an error naming the document and the column.
    let out = flumen(dir.path(), &(table("t", "", "") + "SELECT n FROM t;\n"), &[]);
    let err = text(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("document d: column n holds 2 values")
            && err.contains("BIGINT[]"),
        "{err}"
    );

    // search_after pages by a column that must be unique and present: both are checked.
    let out = flumen(
        dir.path(),
        &(String::from("SET datafusion.execution.batch_size = 2;\n")
            + &table("t", "", ", 'search_after' 'tb'")
            + "SELECT k FROM t WHERE tb < 4;\n"),
        &[],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("'tb' is not unique (2 is in 2 documents)"),
        "{err}"
    );
    let out = flumen(
        dir.path(),
        &(table("t", "", ", 'search_after' 'tb'") + "SELECT k FROM t;\n"),
        &[],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("1 documents have no 'tb'"),
        "{err}"
    );
}

#[test]
fn search_after_reads_every_document_once_in_parallel_ranges() {
    fresh("flumen-t-after");
    let dir = tempfile::tempdir().unwrap();
    let script = "CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '20k');\n\
                  CREATE EXTERNAL TABLE dst (order_id BIGINT NOT NULL, user_id BIGINT, status VARCHAR, amount DECIMAL(18, 2))\n\
                  STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200' OPTIONS ('index' 'flumen-t-after');\n\
                  INSERT INTO dst SELECT order_id, user_id, status, amount FROM src;\n";
    let out = flumen(dir.path(), script, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count("flumen-t-after"), 20_000);
    let read = "SET datafusion.execution.batch_size = 1500;\n\
                CREATE EXTERNAL TABLE src STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '20k');\n\
                CREATE EXTERNAL TABLE back (order_id BIGINT NOT NULL, user_id BIGINT, status VARCHAR, amount DECIMAL(18, 2))\n\
                  STORED AS ELASTICSEARCH LOCATION 'http://127.0.0.1:9200'\n\
                  OPTIONS ('index' 'flumen-t-after', 'search_after' 'order_id', 'partitions' '3');\n\
                SELECT (SELECT count(*) FROM back) AS n,\n\
                  (SELECT count(*) FROM (SELECT order_id, user_id, status, amount FROM src EXCEPT ALL SELECT * FROM back)) AS missing,\n\
                  (SELECT count(*) FROM (SELECT * FROM back EXCEPT ALL SELECT order_id, user_id, status, amount FROM src)) AS extra;\n";
    let out = flumen(dir.path(), read, &["--format", "csv"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "n,missing,extra\n20000,0,0\n");

    let path = dir.path().join("explain.sql");
    let (tables, _) = read.split_once("SELECT (SELECT").unwrap();
    std::fs::write(
        &path,
        format!("{tables}SELECT status FROM back WHERE user_id > 0;\n"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["explain", path.to_str().unwrap()])
        .output()
        .unwrap();
    let plan = text(&out.stdout);
    assert!(
        plan.contains("search_after(order_id) ranges=3")
            && plan.contains(r#""range":{"order_id":{"lt":"#)
            && plan.contains(r#""sort":[{"order_id":"asc"}]"#),
        "{plan}{}",
        text(&out.stderr)
    );
    // A column that is not unique is refused instead of skipping documents.
    let out = flumen(
        dir.path(),
        &read.replace(
            "'search_after' 'order_id', 'partitions' '3'",
            "'search_after' 'status'",
        ),
        &[],
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success() && err.contains("'status' is not unique"),
        "{err}"
    );
}

/// An incremental read on a date field sends the watermark as an epoch-milliseconds range
/// bound, so the second run fetches only the newer documents.
#[test]
fn incremental_reads_on_a_date_field_bound_the_search() {
    fresh("flumen-t-inc-date");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let load = |from: u32, to: u32| {
        let script = format!(
            "CREATE EXTERNAL TABLE t (id BIGINT NOT NULL, ts TIMESTAMP) STORED AS ELASTICSEARCH LOCATION '{ES}' \
               OPTIONS ('index' 'flumen-t-inc-date', 'refresh' 'true');\n\
             INSERT INTO t SELECT value AS id, to_timestamp_millis(1772409600000 + value * 1500) AS ts FROM generate_series({from}, {to});\n"
        );
        let out = flumen(d, &script, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    load(1, 100);
    let job = format!(
        "CREATE EXTERNAL TABLE src STORED AS ELASTICSEARCH LOCATION '{ES}' OPTIONS ('index' 'flumen-t-inc-date', 'incremental_column' 'ts');\n\
         CREATE EXTERNAL TABLE dst (id BIGINT, ts TIMESTAMP) STORED AS SQLITE LOCATION 'sqlite://{}/out.db' OPTIONS ('table' 'dst');\n\
         INSERT INTO dst SELECT id, ts FROM src;\n",
        d.display()
    );
    let read = |out: &Output| -> u64 {
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("incremental src.ts -> dst: "))
            .unwrap_or_else(|| panic!("no incremental line: {stdout}"))
            .to_string();
        line["incremental src.ts -> dst: ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let run_dir = d.join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let run = |extra: &[&str]| {
        std::fs::write(run_dir.join("job.sql"), &job).unwrap();
        Command::new(env!("CARGO_BIN_EXE_flumen"))
            .arg(if extra.contains(&"explain") {
                "explain"
            } else {
                "run"
            })
            .arg(run_dir.join("job.sql"))
            .args(["-q", "--state-dir"])
            .arg(run_dir.join("state"))
            .output()
            .unwrap()
    };
    assert_eq!(read(&run(&[])), 100);
    load(101, 130);
    let explain = text(&run(&["explain"]).stdout);
    assert!(
        explain.contains(r#""format":"epoch_millis""#) && explain.contains(r#""gt":1772409750000"#),
        "the bound is not in the search: {explain}"
    );
    assert_eq!(read(&run(&[])), 30);
    assert_eq!(read(&run(&[])), 0);
}
