//! MONGODB tables against the MongoDB-wire server `tests/services/start.sh` starts on
//! 127.0.0.1:27018: SecantusDB (PyPI), an independent reimplementation of the protocol, since no
//! real mongod can be installed here. Documents are set up and checked with pymongo from the
//! services' venv.

mod common;

use std::process::Command;

use common::{dead_letters, fails, flumen, ok, services_dir};

const URI: &str = "mongodb://127.0.0.1:27018/flumen_t?directConnection=true";

fn python() -> String {
    format!("{}/venv/bin/python", services_dir())
}

/// Runs Python with `db` bound to the test database (pymongo); returns its output.
fn py(code: &str) -> String {
    let prelude = format!(
        "import pymongo, datetime, bson, json\nfrom bson import ObjectId, Decimal128, Binary\n\
         c = pymongo.MongoClient('{URI}', serverSelectionTimeoutMS=3000)\ndb = c.flumen_t\n"
    );
    let out = Command::new(python())
        .arg("-c")
        .arg(format!("{prelude}{code}"))
        .output()
        .unwrap_or_else(|e| {
            panic!("python runs ({e}); start the servers with `bash tests/services/start.sh`")
        });
    assert!(
        out.status.success(),
        "pymongo failed: {}\nis the server running? start it with `bash tests/services/start.sh`",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn documents_survive_a_round_trip() {
    py("db.rt_src.drop(); db.rt_dst.drop()\n\
        db.rt_src.insert_many([\n\
          {'_id': ObjectId('5f1d7a4e9b1e8a3c2d4e6f80'), 'i': 7, 'l': 2**40, 'f': 1e300, 's': 'tab\\there \"q\" 東京 🎉',\n\
           'b': True, 'd': datetime.datetime(1969, 7, 20, 20, 17, 40, 123000), 'dec': Decimal128('1234.5600'),\n\
           'bin': Binary(b'\\x00\\xff\\x10'), 'sub': {'a': 1, 't': 'x', 'deep': {'z': [1, 2]}}, 'arr': [1.5, 2],\n\
           'tags': ['a', 'b'], 'n': None},\n\
          {'_id': ObjectId('5f1d7a4e9b1e8a3c2d4e6f81'), 'i': -2147483648, 'l': -9223372036854775808, 'f': -0.5, 's': '',\n\
           'b': False, 'd': datetime.datetime(2040, 1, 2, 3, 4, 5, 678000), 'dec': Decimal128('-0.0001'),\n\
           'bin': Binary(b''), 'sub': {'a': 2}, 'arr': [], 'tags': []},\n\
          {'_id': ObjectId('5f1d7a4e9b1e8a3c2d4e6f82')},\n\
        ])");
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE src STORED AS MONGODB LOCATION '{URI}' OPTIONS ('collection' 'rt_src');\n\
             SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'src' ORDER BY ordinal_position;\n\
             CREATE EXTERNAL TABLE dst (_id VARCHAR, i INT, l BIGINT, f DOUBLE, s VARCHAR, b BOOLEAN, d TIMESTAMP(3) WITH TIME ZONE,\n\
               dec DECIMAL(34, 4), bin BYTEA, sub STRUCT<a INT, t VARCHAR, deep STRUCT<z INT[]>>, arr DOUBLE[], tags VARCHAR[], n VARCHAR)\n\
               STORED AS MONGODB LOCATION '{URI}' OPTIONS ('collection' 'rt_dst');\n\
             INSERT INTO dst SELECT * FROM src;\n\
             SELECT count(*) AS diff FROM (SELECT _id, i, l, f, s, b, dec, bin, arr, tags FROM src\n\
               EXCEPT ALL SELECT _id, i, l, f, s, b, dec, bin, arr, tags FROM dst) x;\n"
        ),
        &["--format", "csv"],
    );
    let got = ok(&out);
    assert!(
        got.starts_with(
            "column_name,data_type\n_id,Utf8\ni,Int32\nl,Int64\nf,Float64\ns,Utf8\nb,Boolean\nd,\"Timestamp(ms, \"\"UTC\"\")\"\n\
             dec,\"Decimal128(34, 4)\"\nbin,Binary\n"
        ),
        "{got}"
    );
    assert!(got.ends_with("diff\n0\n"), "{got}");
    // The documents themselves: types kept (ObjectId, int32/int64, date, decimal, binary,
    // nested), NULL written as a missing field.
    let cmp = py(
        "def norm(d):\n    return {k: v for k, v in d.items() if v is not None}\n\
                  a = {d['_id']: norm(d) for d in db.rt_src.find()}\nb = {d['_id']: norm(d) for d in db.rt_dst.find()}\n\
                  print(len(a), len(b), a == b)\n\
                  d = db.rt_dst.find_one({'_id': ObjectId('5f1d7a4e9b1e8a3c2d4e6f80')})\n\
                  print(type(d['i']).__name__, type(d['dec']).__name__, type(d['bin']).__name__, d['d'].isoformat(), 'n' in d)",
    );
    assert_eq!(
        cmp, "3 3 True\nint Decimal128 bytes 1969-07-20T20:17:40.123000 False",
        "{cmp}"
    );
}

#[test]
fn filters_columns_and_limits_go_to_the_server() {
    py(
        "db.pd.drop()\ndb.pd.insert_many([{'_id': i, 'k': i, 'g': 'even' if i % 2 == 0 else 'odd', 'pad': 'x' * 50} for i in range(10000)])",
    );
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE t STORED AS MONGODB LOCATION '{URI}' OPTIONS ('collection' 'pd', 'partitions' '3');\n\
             SELECT count(*) AS n, sum(k) AS s FROM t WHERE k >= 9000 AND g = 'even';\n\
             SELECT count(*) AS n FROM t WHERE k IN (1, 2, 3) OR g IS NULL;\n\
             SELECT count(*) AS n, sum(k) AS s FROM t;\n\
             EXPLAIN ANALYZE SELECT k FROM t WHERE k >= 9000 AND g = 'even';\n"
        ),
        &["--format", "csv"],
    );
    let got = ok(&out).replace("\"\"", "\"");
    assert!(
        got.starts_with("n,s\n500,4749500\nn\n3\nn,s\n10000,49995000\n"),
        "{got}"
    );
    // The scan itself returned only the 500 matching documents, with the filter and only the
    // asked column sent to the server; DataFusion filters nothing.
    let scan = got
        .lines()
        .find(|l| l.contains("MongoScanExec"))
        .unwrap_or_default()
        .to_string();
    assert!(
        scan.contains("\"$gte\":9000") && scan.contains("\"g\":{\"$eq\":\"even\"}"),
        "{got}"
    );
    assert!(scan.contains("projection={\"k\":1,\"_id\":0}"), "{got}");
    assert!(scan.contains("output_rows=500"), "{got}");
    assert!(!got.contains("FilterExec"), "{got}");
}

#[test]
fn a_failed_job_transaction_leaves_the_collection_unchanged_and_duplicates_go_to_dead_letters() {
    py("db.tx.drop()\ndb.tx.insert_one({'_id': 600, 'v': 'already here'})");
    let dir = tempfile::tempdir().unwrap();
    let script = |opts: &str| {
        format!(
            "CREATE EXTERNAL TABLE t (_id BIGINT, v VARCHAR) STORED AS MONGODB LOCATION '{URI}'\n\
               OPTIONS ('collection' 'tx', 'batch_rows' '100', {opts});\n\
             INSERT INTO t SELECT value, concat('v', value) FROM generate_series(1, 1000);\n"
        )
    };
    let err = fails(&flumen(dir.path(), &script("'transaction' 'job'"), &[]));
    assert!(err.contains("11000") && err.contains("rolled back"), "{err}");
    assert_eq!(
        py("print(db.tx.count_documents({}), db.tx.find_one({'_id': 600})['v'])"),
        "1 already here"
    );
    // Per batch: the one duplicate goes to dead letters, the rest is written.
    let out = flumen(dir.path(), &script("'max_rejected' '5'"), &[]);
    ok(&out);
    assert_eq!(
        py("print(db.tx.count_documents({}), db.tx.find_one({'_id': 600})['v'])"),
        "1000 already here"
    );
    let dead = dead_letters(&dir.path().join("state"), "t", "_id");
    assert!(dead.starts_with("_id,_error\n600,mongodb code 11000"), "{dead}");
}

#[test]
fn upserts_twice_leave_one_document_per_key_with_the_new_values() {
    py("db.up.drop()");
    let dir = tempfile::tempdir().unwrap();
    for (round, label) in [(1, "first"), (2, "second")] {
        let out = flumen(
            dir.path(),
            &format!(
                "CREATE EXTERNAL TABLE t (_id BIGINT, v VARCHAR, round INT, gone VARCHAR) STORED AS MONGODB LOCATION '{URI}'\n\
                   OPTIONS ('collection' 'up', 'op' 'upsert', 'batch_rows' '300');\n\
                 INSERT INTO t SELECT value, '{label}', {round}, CASE WHEN {round} = 1 THEN 'x' END FROM generate_series(1, 1000);\n"
            ),
            &[],
        );
        ok(&out);
    }
    assert_eq!(
        py(
            "print(db.up.count_documents({}), db.up.count_documents({'v': 'second', 'round': 2}), db.up.count_documents({'gone': {'$exists': True}}))"
        ),
        "1000 1000 0"
    );
}

#[test]
fn a_million_rows_into_mongodb_and_back() {
    py("db.big.drop()");
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE o STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '1M');\n\
             CREATE EXTERNAL TABLE m (_id BIGINT, user_id BIGINT, created_at TIMESTAMP(3) WITH TIME ZONE, status VARCHAR,\n\
               city VARCHAR, amount DECIMAL(18, 2), quantity INT, discount DOUBLE, note VARCHAR)\n\
               STORED AS MONGODB LOCATION '{URI}' OPTIONS ('collection' 'big');\n\
             INSERT INTO m SELECT order_id, user_id, created_at, status, city, amount, quantity, discount, note FROM o;\n\
             SELECT count(*) AS n, sum(order_id) AS ids, sum(amount) AS amount, sum(quantity) AS q, count(note) AS notes,\n\
               sum(length(city)) AS cities, count(DISTINCT date_trunc('millisecond', created_at)) AS ts FROM o;\n\
             SELECT count(*) AS n, sum(_id) AS ids, sum(amount) AS amount, sum(quantity) AS q, count(note) AS notes,\n\
               sum(length(city)) AS cities, count(DISTINCT created_at) AS ts FROM m;\n"
        ),
        &["--format", "csv"],
    );
    let got = ok(&out);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 4, "{got}");
    assert!(lines[1].starts_with("1000000,"), "{got}");
    assert_eq!(lines[1], lines[3], "source and MongoDB differ: {got}");
    assert_eq!(py("print(db.big.count_documents({}))"), "1000000");
}

#[test]
fn bad_connections_and_options_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let case = |script: &str| fails(&flumen(dir.path(), script, &[]));
    let err = case(
        "CREATE EXTERNAL TABLE t STORED AS MONGODB LOCATION 'mongodb://u:s3cret-pw@127.0.0.1:1/x?directConnection=true&serverSelectionTimeoutMS=500' OPTIONS ('collection' 'c');",
    );
    assert!(
        err.contains("127.0.0.1:1") && err.contains("cannot reach"),
        "{err}"
    );
    assert!(!err.contains("s3cret-pw"), "{err}");
    let err = case(
        "CREATE EXTERNAL TABLE t STORED AS MONGODB LOCATION 'mongodb://nobody:wrong-secret@127.0.0.1:27018/flumen_t?directConnection=true' OPTIONS ('collection' 'c');",
    );
    assert!(
        err.contains("127.0.0.1:27018") && err.to_lowercase().contains("authentication failed"),
        "{err}"
    );
    assert!(!err.contains("wrong-secret"), "{err}");
    let err = case(&format!(
        "CREATE EXTERNAL TABLE t STORED AS MONGODB LOCATION '{URI}';"
    ));
    assert!(err.contains("'collection'"), "{err}");
    let err = case(&format!(
        "CREATE EXTERNAL TABLE t STORED AS MONGODB LOCATION '{URI}' OPTIONS ('collection' 'c', 'pipeline' '{{\"$match\": 1}}');"
    ));
    assert!(err.contains("'pipeline'") && err.contains("JSON array"), "{err}");
    py("db.empty.drop()");
    let err = case(&format!(
        "CREATE EXTERNAL TABLE t STORED AS MONGODB LOCATION '{URI}' OPTIONS ('collection' 'empty');"
    ));
    assert!(
        err.contains("no documents") && err.contains("declare the columns"),
        "{err}"
    );
    let err = case(&format!(
        "CREATE EXTERNAL TABLE t (a BIGINT) STORED AS MONGODB LOCATION '{URI}' OPTIONS ('collection' 'c', 'op' 'upsert');"
    ));
    assert!(err.contains("'keys'"), "{err}");
    let err = case(
        "CREATE EXTERNAL TABLE t (a BIGINT) STORED AS MONGODB LOCATION 'mongodb://127.0.0.1:27018/?directConnection=true' OPTIONS ('collection' 'c');",
    );
    assert!(err.contains("no database"), "{err}");
}
