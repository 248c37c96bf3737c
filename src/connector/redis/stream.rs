//! `STORED AS REDIS_STREAM`: a consumer group's reads of Redis streams, acknowledged (XACK)
//! only after the statement that read them has committed.
//!
//! ```sql
//! CREATE EXTERNAL TABLE events (id BIGINT, kind VARCHAR, _id VARCHAR)
//!   STORED AS REDIS_STREAM LOCATION 'redis://:${REDIS_PASSWORD}@cache:6379/0'
//!   OPTIONS ('stream' 'events', 'group' 'etl', 'payload_field' 'payload');
//! ```
//!
//! Each stream is a partition. A read first takes the consumer's own pending entries (read
//! before, never acknowledged: an earlier run failed), then new entries (`XREADGROUP ... >`) up
//! to the last entry the stream held when the read began. The group is created (`MKSTREAM`)
//! at the stream's start (`'start' 'earliest'`, default) or end (`'latest'`) if missing.
//! Decision: the consumer name is stable (default `flumen`), so a rerun finds the entries a
//! failed run left pending; runs of one job must not overlap.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use redis::Value;
use redis::aio::MultiplexedConnection;

use super::conn::{ClusterMode, Redis, slot, text};
use crate::connector::broker::decode::MessageDecoder;
use crate::connector::broker::{BROKER_OPTIONS, Bounds, Broker, BrokerTable, Consumer, Message};
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("stream", "the stream key(s) to read, comma-separated (required)"),
    OptionSpec::new("group", "the consumer group (required; created if missing)"),
    OptionSpec::new("consumer", "this reader's name in the group (default flumen)"),
    OptionSpec::new(
        "start",
        "where a new group starts: earliest (default: every entry) or latest (only new entries)",
    ),
    OptionSpec::new(
        "payload_field",
        "the entry field holding the payload (default payload)",
    ),
];

#[derive(Debug)]
struct StreamBroker {
    redis: Redis,
    streams: Vec<String>,
    group: String,
    consumer: String,
    start: &'static str,
    payload_field: Vec<u8>,
}

#[async_trait]
impl Broker for StreamBroker {
    fn name(&self) -> &'static str {
        "REDIS_STREAM"
    }

    async fn partitions(&self) -> Result<usize> {
        Ok(self.streams.len())
    }

    async fn open(&self, p: usize, _run: Option<&Arc<crate::sink::RunState>>) -> Result<Box<dyn Consumer>> {
        let key = self.streams[p].clone();
        let topo = self.redis.topology().await?;
        let node = topo.nodes[topo.node_of(slot(key.as_bytes()))].clone();
        let mut conn = self.redis.connect(&node).await?;
        let fail = |what: &str, e: redis::RedisError| {
            Error::Config(format!("redis stream {key} on {node}: {what}: {}", text(&e)))
        };
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&key)
            .arg(&self.group)
            .arg(if self.start == "latest" { "$" } else { "0" })
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(fail(&format!("creating group {}", self.group), e));
        }
        // The last entry now: new entries past it are left for the next run.
        let last: Value = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(|e| fail("reading its last entry", e))?;
        let last = entries(last).into_iter().next().map(|(id, _)| parse_id(&id));
        Ok(Box::new(StreamConsumer {
            conn,
            key,
            group: self.group.clone(),
            consumer: self.consumer.clone(),
            payload_field: self.payload_field.clone(),
            last,
            pending_from: Some("0".into()),
            read: Vec::new(),
            done: false,
        }))
    }

    fn describe(&self) -> String {
        format!(
            "server={}, streams={}, group={}, consumer={}",
            self.redis.address,
            self.streams.join(","),
            self.group,
            self.consumer
        )
    }
}

struct StreamConsumer {
    conn: MultiplexedConnection,
    key: String,
    group: String,
    consumer: String,
    payload_field: Vec<u8>,
    /// The stream's last entry when the read began.
    last: Option<(u64, u64)>,
    /// While reading this consumer's pending entries: the id after which to continue.
    pending_from: Option<String>,
    /// Entry ids returned, to XACK.
    read: Vec<String>,
    done: bool,
}

fn parse_id(id: &[u8]) -> (u64, u64) {
    let s = String::from_utf8_lossy(id);
    let (ms, seq) = s.split_once('-').unwrap_or((&s, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// A stream entry: its id, and its field-value pairs (none for a pending entry deleted since).
type Entry = (Vec<u8>, Option<Vec<(Vec<u8>, Vec<u8>)>>);

/// Entries of an XRANGE reply, or of one stream of an XREADGROUP reply: (id, fields or nil).
fn entries(v: Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|e| match e {
            Value::Array(mut e) if e.len() == 2 => {
                let fields = e.pop()?;
                let id = match e.pop()? {
                    Value::BulkString(b) => b,
                    Value::SimpleString(s) => s.into_bytes(),
                    _ => return None,
                };
                let fields = match fields {
                    Value::Nil => None,
                    Value::Array(a) => Some(
                        a.chunks(2)
                            .filter_map(|kv| match kv {
                                [Value::BulkString(k), Value::BulkString(v)] => Some((k.clone(), v.clone())),
                                _ => None,
                            })
                            .collect(),
                    ),
                    Value::Map(m) => Some(
                        m.into_iter()
                            .filter_map(|(k, v)| match (k, v) {
                                (Value::BulkString(k), Value::BulkString(v)) => Some((k, v)),
                                _ => None,
                            })
                            .collect(),
                    ),
                    _ => None,
                };
                Some((id, fields))
            }
            _ => None,
        })
        .collect()
}

/// The entries of an XREADGROUP reply (one stream asked).
fn group_entries(v: Value) -> Vec<Entry> {
    match v {
        Value::Array(streams) => streams
            .into_iter()
            .flat_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => kv.pop().map(entries).unwrap_or_default(),
                _ => Vec::new(),
            })
            .collect(),
        Value::Map(m) => m.into_iter().flat_map(|(_, v)| entries(v)).collect(),
        _ => Vec::new(),
    }
}

#[async_trait]
impl Consumer for StreamConsumer {
    async fn next(&mut self, max: usize) -> Result<Vec<Message>> {
        loop {
            if self.done {
                return Ok(Vec::new());
            }
            let from = self.pending_from.clone().unwrap_or_else(|| ">".into());
            let reply: Value = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(max.max(1))
                .arg("STREAMS")
                .arg(&self.key)
                .arg(&from)
                .query_async(&mut self.conn)
                .await
                .map_err(|e| Error::Config(format!("redis stream {}: XREADGROUP: {}", self.key, text(&e))))?;
            let got = group_entries(reply);
            if got.is_empty() {
                if self.pending_from.take().is_some() {
                    // The pending entries are done: now the new ones.
                    continue;
                }
                self.done = true;
                return Ok(Vec::new());
            }
            if self.pending_from.is_some()
                && let Some((id, _)) = got.last()
            {
                self.pending_from = Some(String::from_utf8_lossy(id).into_owned());
            }
            let mut out = Vec::with_capacity(got.len());
            for (id, fields) in got {
                let id_text = String::from_utf8_lossy(&id).into_owned();
                let parsed = parse_id(&id);
                if self.pending_from.is_none() && self.last.is_none_or(|l| parsed > l) {
                    // Past what the stream held when the read began: this is the last chunk.
                    self.done = true;
                }
                self.read.push(id_text.clone());
                // A pending entry deleted since (nil fields) is only acknowledged.
                let Some(fields) = fields else { continue };
                let payload = fields
                    .into_iter()
                    .find(|(k, _)| *k == self.payload_field)
                    .map(|(_, v)| Bytes::from(v))
                    .unwrap_or_default();
                out.push(Message {
                    payload,
                    topic: Some(self.key.clone()),
                    id: Some(id_text),
                    timestamp_ms: Some(parsed.0 as i64),
                    ..Message::default()
                });
            }
            if out.is_empty() {
                continue;
            }
            return Ok(out);
        }
    }

    async fn commit(&mut self) -> Result<()> {
        for ids in self.read.chunks(10_000) {
            let _: i64 = redis::cmd("XACK")
                .arg(&self.key)
                .arg(&self.group)
                .arg(ids)
                .query_async(&mut self.conn)
                .await
                .map_err(|e| Error::Config(format!("redis stream {}: XACK: {}", self.key, text(&e))))?;
        }
        self.read.clear();
        Ok(())
    }

    async fn release(&mut self) -> Result<()> {
        // The entries stay in this consumer's pending list; the next read starts with them.
        self.read.clear();
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "stream {} ({} entries, group {})",
            self.key,
            self.read.len(),
            self.group
        )
    }
}

/// Builds REDIS_STREAM tables.
#[derive(Debug)]
pub struct RedisStreamFactory;

#[async_trait]
impl TableProviderFactory for RedisStreamFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(BROKER_OPTIONS).copied().collect();
        let o = TableOptions::parse("REDIS_STREAM", &name, &cmd.options, &specs)?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let redis = Redis::new(
            &location,
            ClusterMode::Auto,
            1,
            std::time::Duration::from_secs(30),
            None,
        )
        .map_err(|e| Error::Option(format!("table {name}: {e}")))?;
        let streams: Vec<String> = o
            .required("stream")?
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let decoder = MessageDecoder::from_options(&name, &o, Arc::new(cmd.schema.as_arrow().clone()))?;
        let broker = StreamBroker {
            redis,
            streams,
            group: o.required("group")?.to_string(),
            consumer: o.get("consumer").unwrap_or("flumen").to_string(),
            start: o.choice_or("start", &["earliest", "latest"], "earliest")?,
            payload_field: o.get("payload_field").unwrap_or("payload").as_bytes().to_vec(),
        };
        Ok(BrokerTable::new(name, broker, decoder, Bounds::from_options(&o)?))
    }
}
