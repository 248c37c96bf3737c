//! `STORED AS NATS`: a JetStream stream read through a durable pull consumer, acknowledged only
//! after the statement that read the messages has committed.
//!
//! ```sql
//! CREATE EXTERNAL TABLE orders (id BIGINT, amount DOUBLE, _topic VARCHAR, _offset BIGINT)
//!   STORED AS NATS LOCATION 'nats://127.0.0.1:4222/ORDERS'
//!   OPTIONS ('consumer' 'etl-orders', 'subject' 'orders.>');
//! ```
//!
//! The consumer is created if missing (ack policy `all`, no limit on pending acks, `ack_wait`
//! default 30m) and read until the server reports nothing pending. Commit acknowledges the last
//! message (which acknowledges all before it); a failed statement NAKs what it read so a rerun
//! gets it at once. Each message read keeps its reply subject (about 100 bytes) until then.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::Acker;
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use futures::StreamExt;

use crate::connector::broker::decode::MessageDecoder;
use crate::connector::broker::{BROKER_OPTIONS, Bounds, Broker, BrokerTable, Consumer, Message};
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};
use crate::sink::parse_duration;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "consumer",
        "the durable consumer's name (required; created if missing)",
    ),
    OptionSpec::new(
        "subject",
        "only messages of this subject filter (default: the whole stream)",
    ),
    OptionSpec::new(
        "start",
        "where a new consumer starts: earliest (default: every message) or latest (only new ones)",
    ),
    OptionSpec::new(
        "ack_wait",
        "how long the server waits for the acknowledgement before redelivering (default 30m)",
    ),
];

#[derive(Debug)]
struct NatsBroker {
    table: String,
    /// The server URL without the stream (credentials never shown).
    url: String,
    shown: String,
    stream: String,
    consumer: String,
    subject: Option<String>,
    start: &'static str,
    ack_wait: Duration,
    idle: Duration,
}

impl NatsBroker {
    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "table {}: nats {} stream {}: {what}: {e}",
            self.table, self.shown, self.stream
        ))
    }
}

#[async_trait]
impl Broker for NatsBroker {
    fn name(&self) -> &'static str {
        "NATS"
    }

    async fn partitions(&self) -> Result<usize> {
        Ok(1)
    }

    async fn open(&self, _p: usize, _run: Option<&Arc<crate::sink::RunState>>) -> Result<Box<dyn Consumer>> {
        let client = async_nats::connect(&self.url)
            .await
            .map_err(|e| self.fail("connecting", e))?;
        let js = jetstream::new(client.clone());
        let stream = js
            .get_stream(&self.stream)
            .await
            .map_err(|e| self.fail("opening the stream (does it exist?)", e))?;
        let config = pull::Config {
            durable_name: Some(self.consumer.clone()),
            ack_policy: AckPolicy::All,
            ack_wait: self.ack_wait,
            max_ack_pending: -1,
            deliver_policy: if self.start == "latest" {
                DeliverPolicy::New
            } else {
                DeliverPolicy::All
            },
            filter_subject: self.subject.clone().unwrap_or_default(),
            ..Default::default()
        };
        let mut consumer: PullConsumer = stream
            .get_or_create_consumer(&self.consumer, config)
            .await
            .map_err(|e| self.fail(&format!("opening consumer {}", self.consumer), e))?;
        let info = consumer
            .info()
            .await
            .map_err(|e| self.fail(&format!("consumer {}", self.consumer), e))?;
        // What is there now: undelivered messages, and those a failed run left unacknowledged.
        let target = info.num_pending + info.num_ack_pending as u64;
        Ok(Box::new(NatsConsumer {
            client,
            consumer,
            name: self.consumer.clone(),
            target,
            received: 0,
            read: Vec::new(),
            idle: self.idle,
        }))
    }

    fn describe(&self) -> String {
        format!(
            "server={}, stream={}, consumer={}{}",
            self.shown,
            self.stream,
            self.consumer,
            self.subject
                .as_ref()
                .map(|s| format!(", subject={s}"))
                .unwrap_or_default()
        )
    }
}

struct NatsConsumer {
    client: async_nats::Client,
    consumer: PullConsumer,
    name: String,
    /// Messages pending when the read began.
    target: u64,
    received: u64,
    /// The acknowledgement handles of what was read, in order.
    read: Vec<Acker>,
    idle: Duration,
}

#[async_trait]
impl Consumer for NatsConsumer {
    async fn next(&mut self, max: usize) -> Result<Vec<Message>> {
        let left = self.target.saturating_sub(self.received);
        if left == 0 {
            return Ok(Vec::new());
        }
        let want = (max as u64).min(left) as usize;
        let mut batch = self
            .consumer
            .batch()
            .max_messages(want)
            .expires(self.idle.max(Duration::from_millis(500)))
            .messages()
            .await
            .map_err(|e| Error::Config(format!("nats consumer {}: fetching: {e}", self.name)))?;
        let mut out = Vec::with_capacity(want);
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| Error::Config(format!("nats consumer {}: {e}", self.name)))?;
            let (seq, published) = match m.info() {
                Ok(i) => (
                    Some(i.stream_sequence as i64),
                    Some((i.published.unix_timestamp_nanos() / 1_000_000) as i64),
                ),
                Err(_) => (None, None),
            };
            let (msg, acker) = m.split();
            self.read.push(acker);
            let headers: Vec<(String, bytes::Bytes)> = msg
                .headers
                .as_ref()
                .map(|h| {
                    h.iter()
                        .flat_map(|(k, vs)| {
                            vs.iter()
                                .map(move |v| (k.to_string(), bytes::Bytes::from(v.as_str().to_string())))
                        })
                        .collect()
                })
                .unwrap_or_default();
            let id = headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("Nats-Msg-Id"))
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned());
            out.push(Message {
                payload: msg.payload,
                topic: Some(msg.subject.to_string()),
                offset: seq,
                id,
                timestamp_ms: published,
                headers,
                ..Message::default()
            });
            self.received += 1;
        }
        if out.is_empty() {
            // Nothing arrived within the wait: caught up.
            self.target = self.received;
        }
        Ok(out)
    }

    async fn commit(&mut self) -> Result<()> {
        // Ack policy `all`: acknowledging the last acknowledges everything before it.
        if let Some(last) = self.read.last() {
            last.double_ack()
                .await
                .map_err(|e| Error::Config(format!("nats consumer {}: acknowledging: {e}", self.name)))?;
        }
        self.read.clear();
        Ok(())
    }

    async fn release(&mut self) -> Result<()> {
        for a in self.read.drain(..) {
            let _ = a.ack_with(AckKind::Nak(None)).await;
        }
        // The NAKs are published without waiting: send them before the connection goes.
        self.client
            .flush()
            .await
            .map_err(|e| Error::Config(format!("nats consumer {}: sending NAKs: {e}", self.name)))
    }

    fn describe(&self) -> String {
        format!("nats consumer {} ({} messages)", self.name, self.read.len())
    }
}

/// Builds NATS tables.
#[derive(Debug)]
pub struct NatsFactory;

#[async_trait]
impl TableProviderFactory for NatsFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(BROKER_OPTIONS).copied().collect();
        let o = TableOptions::parse("NATS", &name, &cmd.options, &specs)?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let bad = || {
            Error::Option(format!(
                "table {name}: LOCATION must be nats://[user:password@]host:4222/STREAM"
            ))
        };
        let u = url::Url::parse(&location).map_err(|_| bad())?;
        if !matches!(u.scheme(), "nats" | "tls") {
            return Err(bad().into());
        }
        let stream = u.path().trim_matches('/').to_string();
        if stream.is_empty() || stream.contains('/') {
            return Err(bad().into());
        }
        let mut server = u.clone();
        server.set_path("");
        let shown = crate::engine::Redactor::default().redact(server.as_str());
        let decoder = MessageDecoder::from_options(&name, &o, Arc::new(cmd.schema.as_arrow().clone()))?;
        let bounds = Bounds::from_options(&o)?;
        let ack_wait = o
            .get("ack_wait")
            .map(|v| parse_duration(v).map_err(|e| o.bad_value("ack_wait", v, &e)))
            .transpose()?
            .unwrap_or(Duration::from_secs(30 * 60));
        let broker = NatsBroker {
            table: name.clone(),
            url: server.as_str().trim_end_matches('/').to_string(),
            shown: shown.trim_end_matches('/').to_string(),
            stream,
            consumer: o.required("consumer")?.to_string(),
            subject: o.get("subject").map(str::to_string),
            start: o.choice_or("start", &["earliest", "latest"], "earliest")?,
            ack_wait,
            idle: bounds.idle,
        };
        Ok(BrokerTable::new(name, broker, decoder, bounds))
    }
}
