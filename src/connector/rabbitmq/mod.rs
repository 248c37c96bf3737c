//! `STORED AS RABBITMQ`: a queue read with manual acknowledgements, acknowledged only after the
//! statement that read the messages has committed.
//!
//! ```sql
//! CREATE EXTERNAL TABLE orders (id BIGINT, amount DOUBLE, _topic VARCHAR)
//!   STORED AS RABBITMQ LOCATION 'amqp://etl:${RABBIT_PASSWORD}@mq:5672/%2f'
//!   OPTIONS ('queue' 'orders');
//! ```
//!
//! The read takes as many messages as the queue held when it began (or `max_messages`). Every
//! delivery stays unacknowledged on the channel until the write commits, then one
//! `basic.ack(multiple)` acknowledges them all; a failed write NACKs them back into the queue
//! (and a killed process's connection closing does the same). Decision: the channel has no
//! prefetch limit, since a limit would stall a read that cannot acknowledge before it ends; the
//! broker therefore sends as fast as flumen takes messages, and a large queue is best read in
//! pieces with `max_messages`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

use crate::connector::broker::decode::MessageDecoder;
use crate::connector::broker::{BROKER_OPTIONS, Bounds, Broker, BrokerTable, Consumer, Message};
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};

const OPTIONS: &[OptionSpec] = &[OptionSpec::new(
    "queue",
    "the queue to read (required; it must exist)",
)];

#[derive(Debug)]
struct RabbitBroker {
    table: String,
    uri: String,
    shown: String,
    queue: String,
    idle: Duration,
}

impl RabbitBroker {
    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "table {}: rabbitmq {} queue {}: {what}: {e}",
            self.table, self.shown, self.queue
        ))
    }
}

#[async_trait]
impl Broker for RabbitBroker {
    fn name(&self) -> &'static str {
        "RABBITMQ"
    }

    async fn partitions(&self) -> Result<usize> {
        Ok(1)
    }

    async fn open(&self, _p: usize, _run: Option<&Arc<crate::sink::RunState>>) -> Result<Box<dyn Consumer>> {
        let conn = Connection::connect(&self.uri, ConnectionProperties::default())
            .await
            .map_err(|e| self.fail("connecting", e))?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| self.fail("opening a channel", e))?;
        let q = channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.fail("looking the queue up (does it exist?)", e))?;
        let target = q.message_count() as u64;
        channel
            .basic_qos(0, BasicQosOptions::default())
            .await
            .map_err(|e| self.fail("setting the prefetch", e))?;
        let consumer = if target > 0 {
            Some(
                channel
                    .basic_consume(
                        self.queue.as_str().into(),
                        "flumen".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|e| self.fail("consuming", e))?,
            )
        } else {
            None
        };
        Ok(Box::new(RabbitConsumer {
            conn,
            channel,
            consumer,
            queue: self.queue.clone(),
            target,
            received: 0,
            last_tag: None,
            idle: self.idle,
        }))
    }

    fn describe(&self) -> String {
        format!("server={}, queue={}", self.shown, self.queue)
    }
}

struct RabbitConsumer {
    /// Kept open until the outcome: closing it would requeue every delivery.
    conn: Connection,
    channel: Channel,
    consumer: Option<lapin::Consumer>,
    queue: String,
    /// Ready messages when the read began.
    target: u64,
    received: u64,
    last_tag: Option<u64>,
    idle: Duration,
}

impl RabbitConsumer {
    /// Closes the channel and the connection and waits for the broker to confirm: frames sent
    /// before (the ack) are then processed, not lost with a process that exits at once.
    async fn close(&mut self) -> Result<()> {
        self.consumer = None;
        let fail = |e: lapin::Error| Error::Config(format!("rabbitmq queue {}: closing: {e}", self.queue));
        if self.channel.status().connected() {
            self.channel.close(200, "done".into()).await.map_err(fail)?;
        }
        if self.conn.status().connected() {
            self.conn.close(200, "done".into()).await.map_err(fail)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for RabbitConsumer {
    async fn next(&mut self, max: usize) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        let Some(consumer) = self.consumer.as_mut() else {
            return Ok(out);
        };
        while self.received < self.target && out.len() < max {
            let d = match tokio::time::timeout(self.idle, consumer.next()).await {
                Err(_) | Ok(None) => {
                    // Nothing more arrives (another reader took the rest): caught up.
                    self.target = self.received;
                    break;
                }
                Ok(Some(d)) => d.map_err(|e| Error::Config(format!("rabbitmq queue {}: {e}", self.queue)))?,
            };
            self.last_tag = Some(d.delivery_tag);
            self.received += 1;
            let p = &d.properties;
            let headers = p
                .headers()
                .as_ref()
                .map(|h| {
                    h.inner()
                        .iter()
                        .map(|(k, v)| {
                            let text = match v {
                                lapin::types::AMQPValue::LongString(s) => s.to_string(),
                                lapin::types::AMQPValue::ShortString(s) => s.to_string(),
                                other => format!("{other:?}"),
                            };
                            (k.to_string(), bytes::Bytes::from(text))
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push(Message {
                payload: bytes::Bytes::from(d.data),
                topic: Some(d.routing_key.to_string()),
                offset: Some(d.delivery_tag as i64),
                id: p.message_id().as_ref().map(|s| s.to_string()),
                timestamp_ms: p.timestamp().map(|t| (t as i64) * 1000),
                headers,
                ..Message::default()
            });
        }
        Ok(out)
    }

    async fn commit(&mut self) -> Result<()> {
        if let Some(tag) = self.last_tag.take() {
            self.channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(|e| Error::Config(format!("rabbitmq queue {}: acknowledging: {e}", self.queue)))?;
        }
        self.close().await
    }

    async fn release(&mut self) -> Result<()> {
        if let Some(tag) = self.last_tag.take() {
            self.channel
                .basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(|e| Error::Config(format!("rabbitmq queue {}: requeueing: {e}", self.queue)))?;
        }
        self.close().await
    }

    fn describe(&self) -> String {
        format!("rabbitmq queue {} ({} deliveries)", self.queue, self.received)
    }
}

/// Builds RABBITMQ tables.
#[derive(Debug)]
pub struct RabbitFactory;

#[async_trait]
impl TableProviderFactory for RabbitFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(BROKER_OPTIONS).copied().collect();
        let o = TableOptions::parse("RABBITMQ", &name, &cmd.options, &specs)?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let u = url::Url::parse(&location)
            .ok()
            .filter(|u| u.scheme() == "amqp")
            .ok_or_else(|| {
                Error::Option(format!(
                    "table {name}: LOCATION must be amqp://user:password@host:5672/vhost (vhost / is %2f)"
                ))
            })?;
        let shown = crate::engine::Redactor::default().redact(u.as_str());
        let decoder = MessageDecoder::from_options(&name, &o, Arc::new(cmd.schema.as_arrow().clone()))?;
        let bounds = Bounds::from_options(&o)?;
        let broker = RabbitBroker {
            table: name.clone(),
            uri: location.clone(),
            shown,
            queue: o.required("queue")?.to_string(),
            idle: bounds.idle,
        };
        Ok(BrokerTable::new(name, broker, decoder, bounds))
    }
}
