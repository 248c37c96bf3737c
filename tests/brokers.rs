//! Broker sources against the real servers `tests/services/start.sh` starts. Each broker goes
//! through the same contract ([`contract`]): 100k JSON messages (5 malformed) produced by the
//! test's own client are inserted into a Parquet table (counts equal, the malformed ones in dead
//! letters with their raw payload); a second run reads nothing new; a run whose sink fails
//! mid-way acknowledges nothing, and the next run delivers those messages. MQTT goes through the
//! same contract, its messages kept in flumen's spool instead of unacknowledged on the broker.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{ok, text};

/// Messages `from..from + n`: `{"id": i, "name": "m-i"}`, except that ids with `i % 20000 ==
/// 19999` are cut short (malformed JSON).
fn payload(i: u64) -> String {
    if i % 20_000 == 19_999 {
        format!("{{\"id\": {i}, \"name\": ")
    } else {
        format!("{{\"id\": {i}, \"name\": \"m-{i}\"}}")
    }
}

fn malformed(from: u64, n: u64) -> u64 {
    (from..from + n).filter(|i| i % 20_000 == 19_999).count() as u64
}

/// The rows an INSERT wrote, from the "N rows written" line.
fn written(out: &Output) -> u64 {
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(" rows written"))
        .map(|n| n.trim().parse::<u64>().unwrap())
        .sum()
}

fn sql(query: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["sql", "-q", "--format", "csv", "-e", query])
        .output()
        .unwrap();
    ok(&out)
}

/// Runs the contract for one broker: `create` is the `CREATE EXTERNAL TABLE src (...) ...`
/// statement, `produce(from, n)` sends messages `from..from + n`.
fn contract(dir: &Path, create: &str, produce: &dyn Fn(u64, u64)) {
    let out_dir = dir.join("out");
    let load = format!(
        "{create};\n\
         CREATE EXTERNAL TABLE out (id BIGINT, name VARCHAR) STORED AS PARQUET LOCATION '{}/';\n\
         INSERT INTO out SELECT id, name FROM src;\n",
        out_dir.display()
    );
    let total = 100_000;
    produce(0, total);
    let bad = malformed(0, total);
    assert_eq!(bad, 5);
    let n = written(&common::flumen(dir, &load, &[]));
    assert_eq!(n, total - bad, "first run");
    // The malformed messages are dead letters, with their raw payload.
    let runs: Vec<_> = std::fs::read_dir(dir.join("state/dead_letter"))
        .expect("dead letters were written")
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let dead = sql(&format!(
        "SELECT count(*) AS n, min(_payload) AS p, min(_error) LIKE '%JSON%' AS why FROM '{}/src/'",
        runs[0].display()
    ));
    assert_eq!(
        dead,
        format!("n,p,why\n5,\"{{\"\"id\"\": 19999, \"\"name\"\": \",true\n"),
        "dead letters"
    );
    // Everything was acknowledged: nothing new.
    assert_eq!(written(&common::flumen(dir, &load, &[])), 0, "second run");

    // A sink that fails mid-way: the run fails and acknowledges nothing...
    let more = 10_000;
    produce(total, more);
    let failing = format!(
        "{create};\n\
         CREATE EXTERNAL TABLE down (id BIGINT, name VARCHAR) STORED AS FAULTY LOCATION '{}' \
           OPTIONS ('down_after' '2', 'on_failure' 'fail', 'max_attempts' '1', 'batch_rows' '1000', 'concurrency' '1');\n\
         INSERT INTO down SELECT id, name FROM src;\n",
        dir.join("faulty").display()
    );
    let out = common::flumen(dir, &failing, &[]);
    assert!(
        !out.status.success(),
        "the failing sink must fail the run: {}",
        text(&out.stdout)
    );
    // ... so the next run delivers those messages.
    assert_eq!(
        written(&common::flumen(dir, &load, &[])),
        more,
        "rerun after the failure"
    );
    let all = sql(&format!(
        "SELECT count(*) AS n, count(DISTINCT id) AS ids, max(id) AS last FROM '{}/'",
        out_dir.display()
    ));
    let expect = total + more - bad;
    assert_eq!(
        all,
        format!("n,ids,last\n{expect},{expect},{}\n", total + more - 1)
    );
}

/// Runs redis-cli on the password server (database `db`), feeding `input` to `--pipe` if given.
fn redis_cli(db: u32, args: &[&str], input: Option<&[u8]>) -> String {
    let mut c = Command::new("redis-cli");
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        "6380",
        "--no-auth-warning",
        "-a",
        "flumen-test",
        "-n",
    ])
    .arg(db.to_string())
    .args(args)
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap_or_else(|e| {
        panic!("redis-cli runs ({e}); start the servers with `bash tests/services/start.sh`")
    });
    let mut stdin = child.stdin.take().unwrap();
    if let Some(input) = input {
        stdin.write_all(input).unwrap();
    }
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let s = text(&out.stdout);
    assert!(
        out.status.success() && !s.contains("Could not connect") && !s.contains("NOAUTH"),
        "redis-cli {args:?}: {s} {}\nstart the servers with `bash tests/services/start.sh`",
        text(&out.stderr)
    );
    s
}

/// A command in the Redis protocol.
fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[test]
fn redis_streams_acknowledge_after_the_sink_commits() {
    let db = 12;
    redis_cli(db, &["FLUSHDB"], None);
    let dir = tempfile::tempdir().unwrap();
    let produce = |from: u64, n: u64| {
        let mut input = Vec::new();
        for i in from..from + n {
            // Two streams, one partition each.
            let key = if i % 2 == 0 { "ev:a" } else { "ev:b" };
            input.extend(resp(&[
                b"XADD",
                key.as_bytes(),
                b"*",
                b"payload",
                payload(i).as_bytes(),
            ]));
        }
        let out = redis_cli(db, &["--pipe"], Some(&input));
        assert!(out.contains(&format!("replies: {n}")), "{out}");
    };
    let create = format!(
        "CREATE EXTERNAL TABLE src (id BIGINT, name VARCHAR, _topic VARCHAR, _id VARCHAR) STORED AS REDIS_STREAM \
         LOCATION 'redis://:flumen-test@127.0.0.1:6380/{db}' OPTIONS ('stream' 'ev:a,ev:b', 'group' 'etl')"
    );
    contract(dir.path(), &create, &produce);
    // Nothing is left pending in the group.
    for key in ["ev:a", "ev:b"] {
        let pending = redis_cli(db, &["XPENDING", key, "etl"], None);
        assert!(pending.starts_with("0\n"), "{key}: {pending}");
    }
}

/// A name no earlier run of the tests used (the brokers keep their state between runs).
fn fresh(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!("{prefix}_{}_{t}", std::process::id())
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn kafka_commits_offsets_after_the_sink_commits() {
    use rdkafka::ClientConfig;
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let servers = "127.0.0.1:9092";
    let topic = fresh("flumen_events");
    let group = fresh("flumen_etl");
    let rt = runtime();
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .create()
        .unwrap();
    let created = rt
        .block_on(admin.create_topics(
            &[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(20))),
        ))
        .unwrap_or_else(|e| panic!("kafka on {servers}: {e}; start it with `bash tests/services/start.sh`"));
    assert!(created.iter().all(|r| r.is_ok()), "{created:?}");
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", servers)
        .set("linger.ms", "20")
        .create()
        .unwrap();
    // Every delivery is awaited and checked: a message the broker did not take fails the test.
    let produce = |from: u64, n: u64| {
        rt.block_on(async {
            let ids: Vec<u64> = (from..from + n).collect();
            for chunk in ids.chunks(2000) {
                let sends = chunk.iter().map(|i| {
                    let (key, value) = (i.to_string(), payload(*i));
                    let producer = &producer;
                    let topic = &topic;
                    async move {
                        producer
                            .send(
                                FutureRecord::to(topic).key(&key).payload(&value),
                                std::time::Duration::from_secs(30),
                            )
                            .await
                    }
                });
                for r in futures::future::join_all(sends).await {
                    if let Err((e, _)) = r {
                        panic!("kafka did not take a message: {e}");
                    }
                }
            }
        });
    };
    let dir = tempfile::tempdir().unwrap();
    let table = |options: &str| {
        format!(
            "CREATE EXTERNAL TABLE src (id BIGINT, name VARCHAR, _partition INT, _offset BIGINT, _key VARCHAR) \
             STORED AS KAFKA LOCATION 'kafka://{servers}/{topic}' OPTIONS ({options})"
        )
    };
    contract(dir.path(), &table(&format!("'group_id' '{group}'")), &produce);
    // The three partitions were read in parallel; keys and offsets are columns. Another group
    // reading from the start sees every message (a query acknowledges nothing).
    let peek = format!(
        "{};\n\
         SELECT count(DISTINCT _partition) AS parts, count(*) AS n, count(DISTINCT CAST(_partition AS BIGINT) * 1000000000 + _offset) AS positions, \
                sum(CASE WHEN _key = CAST(id AS VARCHAR) THEN 1 ELSE 0 END) AS keyed FROM src;",
        table(&format!("'group_id' '{group}-peek', 'start' 'earliest'"))
    );
    let expect = "parts,n,positions,keyed\n3,109995,109995,109995\n";
    let peek_dir = tempfile::tempdir().unwrap();
    assert_eq!(
        ok(&common::flumen(peek_dir.path(), &peek, &["--format", "csv"])),
        expect
    );
    assert_eq!(
        ok(&common::flumen(peek_dir.path(), &peek, &["--format", "csv"])),
        expect
    );
}

#[test]
fn nats_jetstream_acknowledges_after_the_sink_commits() {
    let stream = fresh("FLUMEN");
    let subject = format!("{}.events", stream.to_lowercase());
    let rt = runtime();
    let client = rt
        .block_on(async_nats::connect("nats://127.0.0.1:4222"))
        .unwrap_or_else(|e| {
            panic!("nats on 127.0.0.1:4222: {e}; start it with `bash tests/services/start.sh`")
        });
    let _guard = rt.enter();
    let js = async_nats::jetstream::new(client.clone());
    rt.block_on(js.create_stream(async_nats::jetstream::stream::Config {
        name: stream.clone(),
        subjects: vec![format!("{}.>", stream.to_lowercase())],
        ..Default::default()
    }))
    .unwrap();
    let produce = |from: u64, n: u64| {
        rt.block_on(async {
            for chunk in (from..from + n).collect::<Vec<_>>().chunks(1000) {
                let mut acks = Vec::new();
                for i in chunk {
                    acks.push(js.publish(subject.clone(), payload(*i).into()).await.unwrap());
                }
                for a in acks {
                    a.await.unwrap();
                }
            }
        });
    };
    let dir = tempfile::tempdir().unwrap();
    let create = format!(
        "CREATE EXTERNAL TABLE src (id BIGINT, name VARCHAR, _topic VARCHAR, _offset BIGINT) STORED AS NATS \
         LOCATION 'nats://127.0.0.1:4222/{stream}' OPTIONS ('consumer' 'etl')"
    );
    contract(dir.path(), &create, &produce);
    let info = rt
        .block_on(async {
            let s = js.get_stream(&stream).await?;
            let mut c: async_nats::jetstream::consumer::PullConsumer = s.get_consumer("etl").await?;
            let i = c.info().await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((i.num_pending, i.num_ack_pending))
        })
        .unwrap();
    assert_eq!(info, (0, 0), "nothing left pending or unacknowledged");
}

#[test]
fn rabbitmq_acknowledges_after_the_sink_commits() {
    use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let queue = fresh("flumen_orders");
    let rt = runtime();
    let uri = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let conn = rt
        .block_on(Connection::connect(uri, ConnectionProperties::default()))
        .unwrap_or_else(|e| {
            panic!("rabbitmq on 127.0.0.1:5672: {e}; start it with `bash tests/services/start.sh`")
        });
    let channel = rt.block_on(conn.create_channel()).unwrap();
    let declare = |passive: bool| {
        rt.block_on(channel.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .unwrap()
    };
    declare(false);
    let produce = |from: u64, n: u64| {
        rt.block_on(async {
            for i in from..from + n {
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        payload(i).as_bytes(),
                        BasicProperties::default(),
                    )
                    .await
                    .unwrap();
            }
        });
        // Published asynchronously: wait until the queue holds them all.
        for _ in 0..600 {
            if declare(true).message_count() as u64 >= n {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        panic!("the queue never held {n} messages");
    };
    let dir = tempfile::tempdir().unwrap();
    let create = format!(
        "CREATE EXTERNAL TABLE src (id BIGINT, name VARCHAR, _topic VARCHAR) STORED AS RABBITMQ \
         LOCATION '{uri}' OPTIONS ('queue' '{queue}')"
    );
    contract(dir.path(), &create, &produce);
    assert_eq!(declare(true).message_count(), 0, "everything acknowledged");
}

/// Publishes messages `from..from + n` at QoS 1 to `{root}/0..3` on the test Mosquitto,
/// waiting for the broker's PUBACK of each.
fn mqtt_publish(rt: &tokio::runtime::Runtime, root: &str, from: u64, n: u64) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    rt.block_on(async {
        let mut o = MqttOptions::new(fresh("flumen_producer"), "127.0.0.1", 1884);
        o.set_credentials("flumen", "flumen-test").set_inflight(200);
        let (client, mut events) = AsyncClient::new(o, 1000);
        let root = root.to_string();
        let publisher = tokio::spawn(async move {
            for i in from..from + n {
                client
                    .publish(format!("{root}/{}", i % 4), QoS::AtLeastOnce, false, payload(i))
                    .await
                    .unwrap();
            }
            client
        });
        let mut acked = 0;
        while acked < n {
            match tokio::time::timeout(std::time::Duration::from_secs(30), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    panic!("mosquitto on 127.0.0.1:1884: {e}; start it with `bash tests/services/start.sh`")
                }
                Err(_) => panic!("mosquitto acknowledged only {acked} of {n} messages in time"),
            }
        }
        let client = publisher.await.unwrap();
        client.disconnect().await.unwrap();
        while !matches!(
            events.poll().await,
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)
        ) {}
    });
}

#[test]
fn mqtt_spools_messages_and_commits_after_the_sink_commits() {
    let client_id = fresh("flumen_etl");
    let root = format!("flumen/{}", fresh("sensors"));
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let create = format!(
        "CREATE EXTERNAL TABLE src (id BIGINT, name VARCHAR, _topic VARCHAR, _offset BIGINT) STORED AS MQTT \
         LOCATION 'mqtt://flumen:flumen-test@127.0.0.1:1884' \
         OPTIONS ('topic' '{root}/+', 'client_id' '{client_id}', 'idle_timeout' '2s')"
    );
    // The first read subscribes: the broker queues messages for the session from then on.
    let first = common::flumen(
        dir.path(),
        &format!("{create};\nSELECT count(*) AS n FROM src;"),
        &["--format", "csv"],
    );
    assert_eq!(ok(&first), "n\n0\n", "a new session holds nothing");
    contract(dir.path(), &create, &|from, n| mqtt_publish(&rt, &root, from, n));

    // Topics and the spool's sequence numbers are columns; a peek moves messages into the
    // spool and commits nothing, so the write after it still gets them, once each.
    mqtt_publish(&rt, &root, 200_000, 1000);
    let peek = format!(
        "{create};\n\
         SELECT count(*) AS n, count(DISTINCT _topic) AS topics, count(DISTINCT _offset) AS offsets, \
                min(_topic) = '{root}/0' AS named FROM src;"
    );
    let expect = "n,topics,offsets,named\n1000,4,1000,true\n";
    assert_eq!(
        ok(&common::flumen(dir.path(), &peek, &["--format", "csv"])),
        expect
    );
    assert_eq!(
        ok(&common::flumen(dir.path(), &peek, &["--format", "csv"])),
        expect
    );
    let load = format!(
        "{create};\n\
         CREATE EXTERNAL TABLE out2 (id BIGINT, name VARCHAR) STORED AS PARQUET LOCATION '{}/';\n\
         INSERT INTO out2 SELECT id, name FROM src;\n",
        dir.path().join("out2").display()
    );
    assert_eq!(written(&common::flumen(dir.path(), &load, &[])), 1000);
    assert_eq!(written(&common::flumen(dir.path(), &load, &[])), 0);
    // Every committed segment was removed from the spool.
    let spool = std::fs::read_dir(dir.path().join("state/spool/mqtt"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let segments: Vec<_> = std::fs::read_dir(&spool)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("seg-"))
        .collect();
    assert!(segments.is_empty(), "{segments:?}");
}

#[test]
fn mqtt_errors_name_the_table_and_hide_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let table = |location: &str, options: &str| {
        format!(
            "CREATE EXTERNAL TABLE src (id BIGINT) STORED AS MQTT LOCATION '{location}' OPTIONS ({options});\n\
             SELECT count(*) FROM src;"
        )
    };
    let ok_options = format!("'topic' 'a/b', 'client_id' '{}'", fresh("flumen_err"));
    let e = common::fails(&common::flumen(
        dir.path(),
        &table("mqtt://flumen:not-the-password@127.0.0.1:1884", &ok_options),
        &[],
    ));
    assert!(e.contains("table src") && e.contains("refused"), "{e}");
    assert!(!e.contains("not-the-password"), "{e}");
    let e = common::fails(&common::flumen(
        dir.path(),
        &table("mqtt://127.0.0.1:1", &ok_options),
        &[],
    ));
    assert!(e.contains("table src") && e.contains("connecting"), "{e}");
    let e = common::fails(&common::flumen(
        dir.path(),
        &table(
            "mqtt://flumen:flumen-test@127.0.0.1:1884",
            "'topic' 'a/#/b', 'client_id' 'x'",
        ),
        &[],
    ));
    assert!(e.contains("topic") && e.contains("a/#/b"), "{e}");
    let e = common::fails(&common::flumen(
        dir.path(),
        &table("mqtt://flumen:flumen-test@127.0.0.1:1884", "'topic' 'a/b'"),
        &[],
    ));
    assert!(e.contains("client_id"), "{e}");
    let e = common::fails(&common::flumen(
        dir.path(),
        &table("mqtts://flumen:secret-pw@127.0.0.1:8883", &ok_options),
        &[],
    ));
    assert!(
        e.contains("LOCATION must be mqtt://") && !e.contains("secret-pw"),
        "{e}"
    );
}

#[test]
fn mqtt_a_killed_read_loses_nothing() {
    let client_id = fresh("flumen_kill");
    let root = format!("flumen/{}", fresh("kill"));
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let create = format!(
        "CREATE EXTERNAL TABLE src (id BIGINT, name VARCHAR) STORED AS MQTT \
         LOCATION 'mqtt://flumen:flumen-test@127.0.0.1:1884' \
         OPTIONS ('topic' '{root}/+', 'client_id' '{client_id}', 'idle_timeout' '2s')"
    );
    let subscribe = common::flumen(dir.path(), &format!("{create};\nSELECT count(*) FROM src;"), &[]);
    ok(&subscribe);
    let total = 30_000;
    mqtt_publish(&rt, &root, 0, total);
    // A slow sink, killed once the read has spooled (and acknowledged) part of the messages.
    let slow = dir.path().join("slow.sql");
    std::fs::write(
        &slow,
        format!(
            "{create};\n\
             CREATE EXTERNAL TABLE slow (id BIGINT, name VARCHAR) STORED AS FAULTY LOCATION '{}' \
               OPTIONS ('delay' '300ms', 'batch_rows' '1000', 'concurrency' '1');\n\
             INSERT INTO slow SELECT id, name FROM src;\n",
            dir.path().join("faulty").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["run", slow.to_str().unwrap(), "-q", "--state-dir"])
        .arg(dir.path().join("state"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let spool = dir.path().join("state/spool/mqtt");
    let spooled = || -> u64 {
        let Ok(dirs) = std::fs::read_dir(&spool) else {
            return 0;
        };
        dirs.flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .filter(|f| f.file_name().to_string_lossy().starts_with("seg-"))
            .map(|f| f.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while spooled() < 200_000 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(spooled() >= 200_000, "the read never spooled much");
    assert!(
        child.try_wait().unwrap().is_none(),
        "the slow run ended before the kill"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    // The next run delivers every message: the spooled ones first, then the broker's.
    let load = format!(
        "{create};\n\
         CREATE EXTERNAL TABLE out (id BIGINT, name VARCHAR) STORED AS PARQUET LOCATION '{}/';\n\
         INSERT INTO out SELECT id, name FROM src;\n",
        dir.path().join("out").display()
    );
    // Messages spooled but not yet acknowledged when it was killed come twice (at-least-once).
    let good = total - malformed(0, total);
    let n = written(&common::flumen(dir.path(), &load, &[]));
    assert!(n >= good, "{n} rows after the kill");
    let all = sql(&format!(
        "SELECT count(DISTINCT id) AS ids, min(id) AS first, max(id) AS last FROM '{}/'",
        dir.path().join("out").display()
    ));
    assert_eq!(all, format!("ids,first,last\n{good},0,{}\n", total - 1));
}

/// Messages whose rows were staged (the sink was down) are acknowledged: the staged parts own
/// them. `flumen resume` delivers them, and the next run reads nothing again: each row once.
#[test]
fn broker_rows_staged_for_resume_are_acknowledged_and_delivered_once() {
    let db = 13;
    redis_cli(db, &["FLUSHDB"], None);
    let dir = tempfile::tempdir().unwrap();
    let n = 30_000u64;
    let mut input = Vec::new();
    for i in 0..n {
        input.extend(resp(&[
            b"XADD",
            b"staged",
            b"*",
            b"payload",
            payload(i).as_bytes(),
        ]));
    }
    assert!(redis_cli(db, &["--pipe"], Some(&input)).contains(&format!("replies: {n}")));
    let sink = dir.path().join("sink");
    let load = format!(
        "CREATE EXTERNAL TABLE src (id BIGINT, name VARCHAR) STORED AS REDIS_STREAM \
           LOCATION 'redis://:flumen-test@127.0.0.1:6380/{db}' OPTIONS ('stream' 'staged', 'group' 'etl');\n\
         CREATE EXTERNAL TABLE down (id BIGINT, name VARCHAR) STORED AS FAULTY LOCATION '{}' \
           OPTIONS ('down' '${{SINK_DOWN:-false}}', 'max_attempts' '1', 'batch_rows' '5000');\n\
         INSERT INTO down SELECT id, name FROM src;\n",
        sink.display()
    );
    let out = common::flumen(dir.path(), &load, &["--set", "SINK_DOWN=true"]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("staged"), "{err}");
    let pending = redis_cli(db, &["XPENDING", "staged", "etl"], None);
    assert!(
        pending.starts_with("0\n"),
        "staged rows are acknowledged: {pending}"
    );
    let run = err
        .split("flumen resume ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .trim_end_matches('`')
        .to_string();
    let resumed = Command::new(env!("CARGO_BIN_EXE_flumen"))
        .args(["resume", &run, "-q", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", text(&resumed.stderr));
    assert_eq!(
        written(&common::flumen(dir.path(), &load, &[])),
        0,
        "nothing is read again"
    );
    let all = sql(&format!(
        "SELECT count(*) AS n, count(DISTINCT id) AS ids FROM '{}/'",
        sink.display()
    ));
    let good = n - malformed(0, n);
    assert_eq!(all, format!("n,ids\n{good},{good}\n"));
}
