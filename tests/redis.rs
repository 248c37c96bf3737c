//! REDIS tables against the real Redis 7 servers `tests/services/start.sh` starts: one on
//! 127.0.0.1:6380 with password `flumen-test` (each test its own database number), and a
//! three-master cluster on 127.0.0.1:7101-7103.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{dead_letters, fails, ok, services_dir, text};

const CLUSTER: &str = "redis://127.0.0.1:7101";

fn loc(db: u32) -> String {
    format!("redis://:${{PW}}@127.0.0.1:6380/{db}")
}

/// Runs redis-cli against the password server's database `db` (or a cluster port with db None).
fn cli(target: (u16, Option<u32>), args: &[&str]) -> String {
    let (port, db) = target;
    let mut c = Command::new("redis-cli");
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "--no-auth-warning"]);
    if let Some(db) = db {
        c.args(["-a", "flumen-test", "-n", &db.to_string()]);
    }
    let out = c.args(args).output().unwrap_or_else(|e| {
        panic!("redis-cli runs ({e}); start the servers with `bash tests/services/start.sh`")
    });
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !s.starts_with("Could not connect") && !s.contains("NOAUTH"),
        "redis-cli {args:?} on port {port} failed: {s} {}\nstart the servers with `bash tests/services/start.sh`",
        String::from_utf8_lossy(&out.stderr)
    );
    s
}

fn db(n: u32) -> (u16, Option<u32>) {
    (6380, Some(n))
}

/// A script run with the test password as `${PW}`.
fn flumen(dir: &Path, script: &str, extra: &[&str]) -> Output {
    let mut args = vec!["--set", "PW=flumen-test"];
    args.extend_from_slice(extra);
    common::flumen(dir, script, &args)
}

const COLS: &str = "id BIGINT NOT NULL, n INT, f DOUBLE, dec DECIMAL(20, 4), s VARCHAR, ok BOOLEAN, d DATE, \
                    ts TIMESTAMP, b BYTEA";
const ROWS: &str = "(1, -2147483648, 1e300, '1234567890123456.7891', 'tab\there ''q'' 東京 🎉 {x}', true, DATE '1969-07-20', \
                      TIMESTAMP '1969-12-31 23:59:59.5', X'00ff10'),\n\
                    (2, 2147483647, -0.5, '-0.0001', '', false, DATE '2262-04-11', TIMESTAMP '2040-01-02 03:04:05.678', X''),\n\
                    (3, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)";

#[test]
fn hash_rows_survive_a_round_trip() {
    cli(db(1), &["FLUSHDB"]);
    let dir = tempfile::tempdir().unwrap();
    let l = loc(1);
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE TABLE src ({COLS}) AS VALUES {ROWS};\n\
             CREATE EXTERNAL TABLE h (_key VARCHAR, {COLS}) STORED AS REDIS LOCATION '{l}' OPTIONS ('key' 'rt:{{id}}');\n\
             INSERT INTO h (id, n, f, dec, s, ok, d, ts, b) SELECT * FROM src;\n\
             SELECT count(*) AS diff FROM (SELECT * FROM src EXCEPT ALL SELECT id, n, f, dec, s, ok, d, ts, b FROM h) x;\n\
             SELECT _key, id FROM h ORDER BY id;\n"
        ),
        &["--format", "csv"],
    );
    let got = ok(&out);
    assert_eq!(got, "diff\n0\n_key,id\nrt:1,1\nrt:2,2\nrt:3,3\n");
    // Values as text; NULL fields absent, not empty.
    assert_eq!(cli(db(1), &["HGET", "rt:1", "ok"]), "true");
    assert_eq!(cli(db(1), &["HGET", "rt:1", "dec"]), "1234567890123456.7891");
    assert_eq!(cli(db(1), &["HGET", "rt:2", "s"]), "");
    assert_eq!(cli(db(1), &["HEXISTS", "rt:3", "s"]), "0");
    assert_eq!(cli(db(1), &["HLEN", "rt:3"]), "1");
    // Writing a NULL over a value removes the field.
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE h ({COLS}) STORED AS REDIS LOCATION '{l}' OPTIONS ('key' 'rt:{{id}}', 'ttl' '1h');\n\
             INSERT INTO h (id, n) VALUES (1, NULL);\n"
        ),
        &[],
    );
    ok(&out);
    assert_eq!(cli(db(1), &["HEXISTS", "rt:1", "n"]), "0");
    assert_eq!(cli(db(1), &["HGET", "rt:1", "s"]), "");
    let ttl: i64 = cli(db(1), &["TTL", "rt:1"]).parse().unwrap();
    assert!((3500..=3600).contains(&ttl), "ttl {ttl}");
}

#[test]
fn every_type_reads_and_writes() {
    cli(db(2), &["FLUSHDB"]);
    let dir = tempfile::tempdir().unwrap();
    let l = loc(2);
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE j (id BIGINT, name VARCHAR, tags VARCHAR[], addr STRUCT<city VARCHAR, zip VARCHAR>, price DECIMAL(10, 2))\n\
               STORED AS REDIS LOCATION '{l}' OPTIONS ('type' 'json', 'key' 'doc:{{id}}');\n\
             INSERT INTO j VALUES (1, 'Zoë', ['a', 'b'], named_struct('city', '東京', 'zip', '007'), 12.50),\n\
               (2, NULL, [], NULL, NULL);\n\
             CREATE EXTERNAL TABLE s (_key VARCHAR, value BIGINT) STORED AS REDIS LOCATION '{l}' OPTIONS ('type' 'string', 'key_pattern' 'cnt:*');\n\
             INSERT INTO s VALUES ('cnt:a', 1), ('cnt:b', -9223372036854775808);\n\
             CREATE EXTERNAL TABLE z (_key VARCHAR, member VARCHAR, score DOUBLE) STORED AS REDIS LOCATION '{l}' OPTIONS ('type' 'zset', 'key_pattern' 'rank:*');\n\
             INSERT INTO z VALUES ('rank:x', 'ann', 1.5), ('rank:x', 'bob', -2), ('rank:y', 'ann', 3);\n\
             CREATE EXTERNAL TABLE li (_key VARCHAR, value VARCHAR) STORED AS REDIS LOCATION '{l}' OPTIONS ('type' 'list', 'key_pattern' 'q:*');\n\
             INSERT INTO li VALUES ('q:1', 'first'), ('q:1', 'second'), ('q:2', 'only');\n\
             CREATE EXTERNAL TABLE st (id BIGINT, tags VARCHAR[]) STORED AS REDIS LOCATION '{l}' OPTIONS ('type' 'set', 'key' 'tags:{{id}}', 'value_column' 'tags');\n\
             INSERT INTO st VALUES (1, ['x', 'y', 'x']);\n\
             CREATE EXTERNAL TABLE ev (_key VARCHAR, _id VARCHAR, kind VARCHAR, n BIGINT) STORED AS REDIS LOCATION '{l}' OPTIONS ('type' 'stream', 'key_pattern' 'ev:*');\n\
             INSERT INTO ev VALUES ('ev:1', '1-1', 'click', 1), ('ev:1', '2-0', 'buy', NULL), ('ev:2', NULL, 'view', 7);\n\
             SELECT id, name, array_to_string(tags, '|') AS tags, addr['city'] AS city, addr['zip'] AS zip, price FROM j ORDER BY id;\n\
             SELECT * FROM s ORDER BY _key;\n\
             SELECT * FROM z ORDER BY _key, score;\n\
             SELECT _key, value FROM li ORDER BY _key, value;\n\
             SELECT kind, n, _id IS NOT NULL AS has_id FROM ev ORDER BY kind;\n"
        ),
        &["--format", "csv"],
    );
    let got = ok(&out);
    let parts: Vec<&str> = got.split('\n').collect();
    assert_eq!(
        got.trim_end(),
        [
            "id,name,tags,city,zip,price",
            "1,Zoë,a|b,東京,007,12.50",
            "2,,,,,",
            "_key,value",
            "cnt:a,1",
            "cnt:b,-9223372036854775808",
            "_key,member,score",
            "rank:x,bob,-2.0",
            "rank:x,ann,1.5",
            "rank:y,ann,3.0",
            "_key,value",
            "q:1,first",
            "q:1,second",
            "q:2,only",
            "kind,n,has_id",
            "buy,,true",
            "click,1,true",
            "view,7,true",
        ]
        .join("\n"),
        "{parts:?}"
    );
    assert_eq!(cli(db(2), &["SCARD", "tags:1"]), "2");
    assert_eq!(
        cli(db(2), &["XRANGE", "ev:1", "-", "+", "COUNT", "1"])
            .lines()
            .next(),
        Some("1-1")
    );
    // Without declared columns, each type's columns come from sampled keys.
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE st STORED AS REDIS LOCATION '{l}' OPTIONS ('type' 'set', 'key_pattern' 'tags:*');\n\
             SELECT _key, array_to_string(array_sort(value), '|') AS v FROM st;\n\
             CREATE EXTERNAL TABLE j STORED AS REDIS LOCATION '{l}' OPTIONS ('type' 'json', 'key_pattern' 'doc:*');\n\
             SELECT _key, id, name FROM j ORDER BY id;\n"
        ),
        &["--format", "csv"],
    );
    assert_eq!(
        ok(&out),
        "_key,v\ntags:1,x|y\n_key,id,name\ndoc:1,1,Zoë\ndoc:2,2,\n"
    );
}

#[test]
fn hash_columns_are_inferred_from_sampled_keys() {
    cli(db(3), &["FLUSHDB"]);
    for (k, age, score, zip, name) in [
        ("u:1", "31", "1.5", "007", "ann"),
        ("u:2", "-4", "2", "10115", "bob"),
    ] {
        cli(
            db(3),
            &[
                "HSET", k, "age", age, "score", score, "zip", zip, "name", name, "vip", "true",
            ],
        );
    }
    cli(db(3), &["SET", "u:not-a-hash", "x"]);
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE u STORED AS REDIS LOCATION '{}' OPTIONS ('key_pattern' 'u:*');\n\
             SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'u' ORDER BY ordinal_position;\n\
             SELECT _key, age + 1 AS next, score, zip, vip FROM u ORDER BY _key;\n\
             SELECT name FROM u WHERE _key = 'u:2';\n",
            loc(3)
        ),
        &["--format", "csv"],
    );
    assert_eq!(
        ok(&out),
        "column_name,data_type\n_key,Utf8\nage,Int64\nname,Utf8\nscore,Float64\nvip,Boolean\nzip,Utf8\n\
         _key,next,score,zip,vip\nu:1,32,1.5,007,true\nu:2,-3,2.0,10115,true\nname\nbob\n"
    );
    // A value that does not parse as its column's type names the key and the field.
    cli(db(3), &["HSET", "u:3", "age", "old"]);
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE u (_key VARCHAR, age BIGINT) STORED AS REDIS LOCATION '{}' OPTIONS ('key_pattern' 'u:*');\n\
             SELECT sum(age) FROM u;\n",
            loc(3)
        ),
        &[],
    );
    let err = fails(&out);
    assert!(
        err.contains("key 'u:3' field age holds 'old', which is not Int64"),
        "{err}"
    );
}

#[test]
fn a_million_rows_into_redis_and_back() {
    cli(db(4), &["FLUSHDB"]);
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE o STORED AS GENERATE LOCATION 'orders' OPTIONS ('rows' '1M');\n\
             CREATE EXTERNAL TABLE r (order_id BIGINT, user_id BIGINT, created_at TIMESTAMP, status VARCHAR, city VARCHAR,\n\
               amount DECIMAL(18, 2), quantity INT, discount DOUBLE, note VARCHAR)\n\
               STORED AS REDIS LOCATION '{}' OPTIONS ('key' 'order:{{order_id}}');\n\
             INSERT INTO r SELECT * FROM o;\n\
             SELECT count(*) AS n, sum(order_id) AS ids, sum(amount) AS amount, sum(quantity) AS q, count(note) AS notes,\n\
               sum(length(city)) AS cities, count(DISTINCT created_at) AS ts FROM o;\n\
             SELECT count(*) AS n, sum(order_id) AS ids, sum(amount) AS amount, sum(quantity) AS q, count(note) AS notes,\n\
               sum(length(city)) AS cities, count(DISTINCT created_at) AS ts FROM r;\n\
             SELECT count(*) AS diff FROM (SELECT * FROM o EXCEPT ALL SELECT * FROM r) x;\n",
            loc(4)
        ),
        &["--format", "csv"],
    );
    let got = ok(&out);
    let lines: Vec<&str> = got.lines().collect();
    assert_eq!(lines.len(), 6, "{got}");
    assert!(lines[1].starts_with("1000000,"), "{got}");
    assert_eq!(lines[1], lines[3], "source and Redis differ: {got}");
    assert_eq!(lines[5], "0", "{got}");
    assert_eq!(cli(db(4), &["DBSIZE"]), "1000000");
}

#[test]
fn a_cluster_takes_keys_across_slots_and_gives_them_back() {
    for p in [7101u16, 7102, 7103] {
        cli((p, None), &["FLUSHALL"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE c (_key VARCHAR, id BIGINT, v VARCHAR) STORED AS REDIS LOCATION '{CLUSTER}' OPTIONS ('key' 'k:{{id}}');\n\
             INSERT INTO c (id, v) SELECT value AS id, concat('v', value) AS v FROM generate_series(1, 100000);\n\
             SELECT count(*) AS n, sum(id) AS s, count(DISTINCT v) AS d FROM c;\n\
             SELECT v FROM c WHERE _key IN ('k:1', 'k:99999', 'k:nope') ORDER BY v;\n\
             EXPLAIN SELECT count(*) FROM c;\n"
        ),
        &["--format", "csv"],
    );
    let got = ok(&out);
    assert!(
        got.starts_with("n,s,d\n100000,5000050000,100000\nv\nv1\nv99999\n"),
        "{got}"
    );
    assert!(got.contains("nodes=3"), "{got}");
    let sizes: Vec<u64> = [7101u16, 7102, 7103]
        .iter()
        .map(|p| cli((*p, None), &["DBSIZE"]).parse().unwrap())
        .collect();
    assert_eq!(sizes.iter().sum::<u64>(), 100_000);
    assert!(
        sizes.iter().all(|&s| s > 20_000),
        "keys spread over the masters: {sizes:?}"
    );
}

#[test]
fn refused_rows_go_to_dead_letters() {
    cli(db(5), &["FLUSHDB"]);
    cli(db(5), &["SET", "w:2", "a string, not a hash"]);
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE w (id BIGINT, k VARCHAR, v VARCHAR) STORED AS REDIS LOCATION '{}'\n\
               OPTIONS ('key' 'w:{{k}}', 'max_rejected' '10');\n\
             INSERT INTO w VALUES (1, '1', 'a'), (2, '2', 'b'), (3, NULL, 'c'), (4, '4', 'd');\n",
            loc(5)
        ),
        &[],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(cli(db(5), &["HGET", "w:4", "v"]), "d");
    let dead = dead_letters(&dir.path().join("state"), "w", "id");
    assert!(
        dead.starts_with("id,_error\n2,redis WRONGTYPE") && dead.contains("3,key column k is NULL"),
        "dead letters name the reason: {dead}\n{err}"
    );
}

#[test]
fn bad_connections_and_options_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let case = |script: &str| fails(&flumen(dir.path(), script, &[]));
    let err = case("CREATE EXTERNAL TABLE t STORED AS REDIS LOCATION 'redis://127.0.0.1:1/0';");
    assert!(
        err.contains("127.0.0.1:1") && err.contains("server running"),
        "{err}"
    );
    let err = case(
        "CREATE EXTERNAL TABLE t STORED AS REDIS LOCATION 'redis://:wrong-secret@127.0.0.1:6380/0' OPTIONS ('key_pattern' 'x:*');",
    );
    assert!(
        err.contains("127.0.0.1:6380") && err.contains("authentication failed"),
        "{err}"
    );
    assert!(
        !err.contains("wrong-secret"),
        "the password is never shown: {err}"
    );
    let err = case(&format!(
        "CREATE EXTERNAL TABLE t (a BIGINT) STORED AS REDIS LOCATION '{}' OPTIONS ('type' 'hashes');",
        loc(6)
    ));
    assert!(err.contains("'type'") && err.contains("hash"), "{err}");
    cli(db(6), &["FLUSHDB"]);
    let err = case(&format!(
        "CREATE EXTERNAL TABLE t STORED AS REDIS LOCATION '{}' OPTIONS ('key_pattern' 'nothing:*');",
        loc(6)
    ));
    assert!(
        err.contains("no hash keys match 'nothing:*'") && err.contains("declare the columns"),
        "{err}"
    );
    let err = case(&format!(
        "CREATE EXTERNAL TABLE t (id BIGINT) STORED AS REDIS LOCATION '{}' OPTIONS ('key' 'u:{{uid}}');",
        loc(6)
    ));
    assert!(err.contains("{uid} is not a column"), "{err}");
    let err = case(&format!(
        "CREATE EXTERNAL TABLE t (id BIGINT, tags VARCHAR[]) STORED AS REDIS LOCATION '{}' OPTIONS ('key' 'u:{{id}}');",
        loc(6)
    ));
    assert!(
        err.contains("column tags") && err.contains("'type' 'json'"),
        "{err}"
    );
    let err = case(&format!(
        "CREATE EXTERNAL TABLE t (a BIGINT) STORED AS REDIS LOCATION '{}' OPTIONS ('cluster' 'true');",
        loc(6)
    ));
    assert!(err.contains("not a cluster"), "{err}");
    let err = case("CREATE EXTERNAL TABLE t (a BIGINT) STORED AS REDIS LOCATION 'http://127.0.0.1:6380';");
    assert!(err.contains("redis://"), "{err}");
}

#[test]
fn tls_with_a_private_ca() {
    let services = services_dir();
    let ca = format!("{services}/redis-tls/ca.crt");
    assert!(
        Path::new(&ca).exists(),
        "{ca} is missing; start the servers with `bash tests/services/start.sh`"
    );
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE t (id BIGINT, v VARCHAR) STORED AS REDIS LOCATION 'rediss://:${{PW}}@127.0.0.1:6381/2'\n\
               OPTIONS ('key' 'tls:{{id}}', 'ca_cert' '{ca}');\n\
             INSERT INTO t VALUES (1, 'over TLS'), (2, 'ok');\n\
             SELECT id, v FROM t ORDER BY id;\n"
        ),
        &["--format", "csv"],
    );
    assert_eq!(ok(&out), "id,v\n1,over TLS\n2,ok\n");
    // Without the CA, the server's certificate is refused.
    let err = fails(&flumen(
        dir.path(),
        "CREATE EXTERNAL TABLE t (id BIGINT) STORED AS REDIS LOCATION 'rediss://:${PW}@127.0.0.1:6381/2'\n\
           OPTIONS ('key_pattern' 'tls:*');\n\
         SELECT * FROM t;\n",
        &[],
    ));
    assert!(
        err.contains("127.0.0.1:6381") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[test]
fn hashes_without_the_asked_fields_are_still_rows() {
    cli(db(7), &["FLUSHDB"]);
    cli(db(7), &["HSET", "p:1", "a", "1"]);
    cli(db(7), &["HSET", "p:2", "b", "2"]);
    let dir = tempfile::tempdir().unwrap();
    let out = flumen(
        dir.path(),
        &format!(
            "CREATE EXTERNAL TABLE p (_key VARCHAR, a BIGINT, b BIGINT) STORED AS REDIS LOCATION '{}' OPTIONS ('key_pattern' 'p:*');\n\
             SELECT count(*) AS n, count(a) AS with_a FROM p;\n\
             SELECT _key FROM p WHERE a IS NULL;\n\
             SELECT count(*) AS n FROM p;\n",
            loc(7)
        ),
        &["--format", "csv"],
    );
    assert_eq!(ok(&out), "n,with_a\n2,1\n_key\np:2\nn\n2\n");
}
