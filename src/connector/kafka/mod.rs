//! `STORED AS KAFKA`: a topic read as a bounded batch, partitions in parallel, offsets committed
//! for the consumer group only after the statement that read them has committed.
//!
//! ```sql
//! CREATE EXTERNAL TABLE events (id BIGINT, kind VARCHAR, _partition INT, _offset BIGINT)
//!   STORED AS KAFKA LOCATION 'kafka://broker1:9092,broker2:9092/events'
//!   OPTIONS ('group_id' 'etl-events', 'start' 'committed');
//! ```
//!
//! Each partition is read by a consumer of its own (librdkafka, assigned, not subscribed: no
//! rebalances) from its start position to the end of the partition (librdkafka's partition EOF,
//! once past the high watermark the read began with), or `max_messages`/`max_duration`. `start`: `committed` (default) continues from the group's committed offsets (a new
//! group starts at the earliest message), `earliest` and `latest` ignore them. Offsets are
//! committed (offset of the last message + 1) when the write commits; a failed run commits
//! nothing, so the next run reads the same messages.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message as _};
use rdkafka::{Offset, TopicPartitionList};

use crate::connector::broker::decode::MessageDecoder;
use crate::connector::broker::{BROKER_OPTIONS, Bounds, Broker, BrokerTable, Consumer, Message};
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "group_id",
        "the consumer group whose offsets are read and committed (required)",
    ),
    OptionSpec::new(
        "start",
        "committed (default: the group's offsets; earliest for a new group), earliest or latest",
    ),
    OptionSpec::new(
        "properties",
        "more librdkafka settings, e.g. 'security.protocol=SASL_SSL; sasl.mechanism=PLAIN'",
    ),
];

/// librdkafka's callbacks: partition EOF (how a read learns it is caught up) is not an error.
struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        );
        if !eof {
            tracing::warn!("kafka: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Quiet {}

#[derive(Debug)]
struct KafkaBroker {
    table: String,
    servers: String,
    topic: String,
    group: String,
    start: &'static str,
    /// Extra settings (values may be secrets: never shown).
    properties: Vec<(String, String)>,
    idle: Duration,
}

impl KafkaBroker {
    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.servers)
            .set("group.id", &self.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set(
                "auto.offset.reset",
                if self.start == "latest" {
                    "latest"
                } else {
                    "earliest"
                },
            )
            .set("socket.timeout.ms", "30000")
            .set("session.timeout.ms", "30000")
            .set("fetch.wait.max.ms", "100");
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c
    }

    fn fail(&self, what: &str, e: KafkaError) -> Error {
        Error::Config(format!(
            "table {}: kafka {} topic {}: {what}: {e}",
            self.table, self.servers, self.topic
        ))
    }
}

#[async_trait]
impl Broker for KafkaBroker {
    fn name(&self) -> &'static str {
        "KAFKA"
    }

    async fn partitions(&self) -> Result<usize> {
        let config = self.config();
        let topic = self.topic.clone();
        let md = tokio::task::spawn_blocking(move || {
            let c: BaseConsumer = config.create()?;
            c.fetch_metadata(Some(&topic), Duration::from_secs(20))
        })
        .await
        .map_err(|e| Error::Config(format!("kafka metadata task: {e}")))?
        .map_err(|e| self.fail("reading the topic's metadata", e))?;
        let t = md
            .topics()
            .iter()
            .find(|t| t.name() == self.topic)
            .ok_or_else(|| {
                Error::Config(format!(
                    "table {}: kafka topic {} not found",
                    self.table, self.topic
                ))
            })?;
        if let Some(e) = t.error() {
            return Err(Error::Config(format!(
                "table {}: kafka topic {}: {:?} (does it exist?)",
                self.table, self.topic, e
            )));
        }
        Ok(t.partitions().len().max(1))
    }

    async fn open(&self, p: usize, _run: Option<&Arc<crate::sink::RunState>>) -> Result<Box<dyn Consumer>> {
        let partition = p as i32;
        let consumer: StreamConsumer<Quiet> = self
            .config()
            .create_with_context(Quiet)
            .map_err(|e| self.fail("creating a consumer", e))?;
        let consumer = Arc::new(consumer);
        let (c, topic) = (Arc::clone(&consumer), self.topic.clone());
        let (low, high) = tokio::task::spawn_blocking(move || {
            c.fetch_watermarks(&topic, partition, Duration::from_secs(20))
        })
        .await
        .map_err(|e| Error::Config(format!("kafka watermark task: {e}")))?
        .map_err(|e| self.fail(&format!("partition {partition}: reading its offsets"), e))?;
        let mut tpl = TopicPartitionList::new();
        let offset = match self.start {
            "earliest" => Offset::Beginning,
            "latest" => Offset::End,
            _ => Offset::Stored,
        };
        tpl.add_partition_offset(&self.topic, partition, offset)
            .map_err(|e| self.fail("assigning", e))?;
        consumer.assign(&tpl).map_err(|e| self.fail("assigning", e))?;
        Ok(Box::new(KafkaConsumer {
            consumer,
            topic: self.topic.clone(),
            partition,
            end: high,
            first: None,
            last: None,
            done: high <= low || self.start == "latest",
            idle: self.idle,
            // A 'latest' read takes nothing now; committing the end makes later 'committed'
            // reads start there.
            commit_end: self.start == "latest",
        }))
    }

    fn describe(&self) -> String {
        format!(
            "servers={}, topic={}, group_id={}, start={}",
            self.servers, self.topic, self.group, self.start
        )
    }
}

struct KafkaConsumer {
    consumer: Arc<StreamConsumer<Quiet>>,
    topic: String,
    partition: i32,
    /// The high watermark when the read began: the read goes at least this far, and on to the
    /// end of the partition (Tansu's watermarks lag behind what a fetch returns).
    end: i64,
    first: Option<i64>,
    /// The offset of the last message returned.
    last: Option<i64>,
    done: bool,
    idle: Duration,
    commit_end: bool,
}

#[async_trait]
impl Consumer for KafkaConsumer {
    async fn next(&mut self, max: usize) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        while !self.done && out.len() < max {
            let got = match tokio::time::timeout(self.idle.max(Duration::from_secs(5)), self.consumer.recv())
                .await
            {
                Err(_) => {
                    // Nothing for a while: caught up as far as the broker will say.
                    self.done = true;
                    break;
                }
                Ok(r) => r,
            };
            match got {
                Ok(m) => {
                    let offset = m.offset();
                    self.first.get_or_insert(offset);
                    self.last = Some(offset);
                    out.push(Message {
                        payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
                        topic: Some(self.topic.clone()),
                        key: m.key().map(Bytes::copy_from_slice),
                        partition: Some(m.partition()),
                        offset: Some(offset),
                        id: None,
                        timestamp_ms: m.timestamp().to_millis(),
                        headers: m
                            .headers()
                            .map(|h| {
                                h.iter()
                                    .map(|h| {
                                        (
                                            h.key.to_string(),
                                            h.value.map(Bytes::copy_from_slice).unwrap_or_default(),
                                        )
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                }
                Err(KafkaError::PartitionEOF(_)) => {
                    // The end of what the broker has fetched so far; done only once it is the
                    // end the read began with (some brokers signal it per fetch).
                    let position = match self.last {
                        Some(l) => Some(l + 1),
                        None => self.consumer.position().ok().and_then(|tpl| {
                            tpl.find_partition(&self.topic, self.partition)
                                .and_then(|e| match e.offset() {
                                    Offset::Offset(o) => Some(o),
                                    _ => None,
                                })
                        }),
                    };
                    if position.is_none_or(|p| p >= self.end) {
                        self.done = true;
                    }
                }
                Err(e) => {
                    return Err(Error::Config(format!(
                        "kafka topic {} partition {}: {e}",
                        self.topic, self.partition
                    )));
                }
            }
        }
        Ok(out)
    }

    async fn commit(&mut self) -> Result<()> {
        let last = match (self.last, self.commit_end) {
            (Some(l), _) => l,
            (None, true) => self.end - 1,
            (None, false) => return Ok(()),
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(last + 1))
            .map_err(|e| Error::Config(format!("kafka commit: {e}")))?;
        let c = Arc::clone(&self.consumer);
        tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync))
            .await
            .map_err(|e| Error::Config(format!("kafka commit task: {e}")))?
            .map_err(|e| {
                Error::Config(format!(
                    "kafka topic {} partition {}: committing offset {}: {e}",
                    self.topic,
                    self.partition,
                    last + 1
                ))
            })?;
        self.first = None;
        self.last = None;
        Ok(())
    }

    async fn release(&mut self) -> Result<()> {
        // Nothing committed: the group's offset stays where it was.
        self.first = None;
        self.last = None;
        Ok(())
    }

    fn describe(&self) -> String {
        match (self.first, self.last) {
            (Some(f), Some(l)) => format!(
                "topic {} partition {} offsets {f}..={l}",
                self.topic, self.partition
            ),
            _ => format!("topic {} partition {} (nothing read)", self.topic, self.partition),
        }
    }
}

/// Builds KAFKA tables.
#[derive(Debug)]
pub struct KafkaFactory;

#[async_trait]
impl TableProviderFactory for KafkaFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(BROKER_OPTIONS).copied().collect();
        let o = TableOptions::parse("KAFKA", &name, &cmd.options, &specs)?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let (servers, topic) = location
            .strip_prefix("kafka://")
            .and_then(|r| r.split_once('/'))
            .filter(|(s, t)| !s.is_empty() && !t.is_empty() && !t.contains('/'))
            .ok_or_else(|| {
                Error::Option(format!(
                    "table {name}: LOCATION must be kafka://host:9092[,host2:9092]/topic, not '{location}'"
                ))
            })?;
        let properties = o
            .get("properties")
            .map(|p| {
                crate::connector::options::parse_pairs(p, '=').map_err(|e| o.bad_value("properties", p, &e))
            })
            .transpose()?
            .unwrap_or_default();
        let decoder = MessageDecoder::from_options(&name, &o, Arc::new(cmd.schema.as_arrow().clone()))?;
        let bounds = Bounds::from_options(&o)?;
        let broker = KafkaBroker {
            table: name.clone(),
            servers: servers.to_string(),
            topic: topic.to_string(),
            group: o.required("group_id")?.to_string(),
            start: o.choice_or("start", &["committed", "earliest", "latest"], "committed")?,
            properties,
            idle: bounds.idle,
        };
        Ok(BrokerTable::new(name, broker, decoder, bounds))
    }
}
