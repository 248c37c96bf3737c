//! `STORED AS MQTT`: a persistent QoS 1 subscription read as a bounded batch through a local
//! spool, so that no message is lost when the write fails.
//!
//! ```sql
//! CREATE EXTERNAL TABLE readings (device VARCHAR, value DOUBLE, _topic VARCHAR, _offset BIGINT)
//!   STORED AS MQTT LOCATION 'mqtt://etl:${MQTT_PASSWORD}@broker:1883'
//!   OPTIONS ('topic' 'sensors/+/readings', 'client_id' 'flumen-readings');
//! ```
//!
//! The table's `client_id` is a persistent session (clean session off): between runs the broker
//! queues the messages of the subscribed topics for it, and each run takes what arrives until
//! nothing has come for `idle_timeout` (MQTT cannot say how many messages are queued), or
//! `max_messages`, or `max_duration`. The first run subscribes; messages published before that
//! were never meant for this client and are not read (retained ones excepted). Later runs
//! subscribe again only if the `topic` option changed, so retained messages are not read twice.
//!
//! Decision: a broker lets a subscriber hold only a few unacknowledged messages (Mosquitto's
//! `max_inflight_messages`, 20 by default), so the messages cannot stay unacknowledged until the
//! write commits as they do for Kafka or NATS. Each message is instead appended to a spool in the
//! state directory and synced to disk before its PUBACK ([`spool`]); the statement's commit moves
//! the spool's cursor past them, and a failed or killed run leaves them there for the next run,
//! which delivers them before any new message. A run killed after the sync but before the PUBACK
//! reached the broker gets the message again from the broker: at-least-once, as for every broker.
//! A plain `SELECT` moves what it reads into the spool and commits nothing, so the next write
//! still gets those messages.
//!
//! Brokers drop messages they cannot queue for an offline session (Mosquitto:
//! `max_queued_messages`, 1000 by default, and QoS 0 messages unless `queue_qos0_messages`);
//! raise that limit for a subscriber that is read in batches. flumen cannot see such a loss.
//!
//! Columns: `_topic` (the message's topic), `_offset` (the spool's sequence number, increasing
//! per client id), `_timestamp` (when flumen received it: MQTT 3.1.1 carries no time) and
//! `_payload`.

pub mod spool;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::mpsc;

use self::spool::{Record, Spool};
use crate::connector::broker::decode::MessageDecoder;
use crate::connector::broker::{BROKER_OPTIONS, Bounds, Broker, BrokerTable, Consumer, Message};
use crate::connector::options::{OptionSpec, TableOptions};
use crate::error::{Error, Result};
use crate::sink::RunState;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "topic",
        "the topic filter(s) to subscribe to, comma-separated (+ and # wildcards; required)",
    ),
    OptionSpec::new(
        "client_id",
        "the persistent session's client id: the broker queues messages for it between runs (required)",
    ),
    OptionSpec::new(
        "keep_alive",
        "seconds between keep-alive pings (default 30)",
    ),
];

/// The largest packet MQTT allows (256 MiB).
const MAX_PACKET: usize = 268_435_455;

#[derive(Debug)]
struct MqttBroker {
    table: String,
    host: String,
    port: u16,
    /// `host:port`, for messages (credentials never shown).
    shown: String,
    credentials: Option<(String, String)>,
    client_id: String,
    topics: Vec<String>,
    keep_alive: Duration,
    idle: Duration,
}

impl MqttBroker {
    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "table {}: mqtt {} client {}: {what}: {e}",
            self.table, self.shown, self.client_id
        ))
    }

    fn spool_dir(&self, run: &RunState) -> PathBuf {
        run.dir().join("spool").join("mqtt").join(crate::sink::safe_name(&format!(
            "{}_{}_{}",
            self.host, self.port, self.client_id
        )))
    }

    /// Connects with the persistent session, subscribes where needed, and starts the task that
    /// drives the connection.
    async fn connect(&self, spool_dir: &std::path::Path) -> Result<Connection> {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_request_channel_capacity(1024);
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u, p);
        }
        let (client, mut events) = AsyncClient::new(o, 1024);
        let session_present = match tokio::time::timeout(Duration::from_secs(15), events.poll()).await {
            Err(_) => return Err(self.fail("connecting", "no answer in 15 s")),
            Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                return Err(self.fail("the broker refused the connection", format!("{code:?}")));
            }
            Ok(Err(e)) => return Err(self.fail("connecting", e)),
            Ok(Ok(Event::Incoming(Packet::ConnAck(c)))) => c.session_present,
            Ok(Ok(other)) => return Err(self.fail("connecting", format!("unexpected {other:?}"))),
        };
        let (tx, rx) = mpsc::channel(1024);
        let driver = tokio::spawn(drive(events, tx));
        let mut conn = Connection {
            client,
            rx: Some(rx),
            driver: Some(driver),
            early: Vec::new(),
        };
        // The subscriptions the session holds (a session the broker lost has none).
        let topics_path = spool_dir.join("topics.json");
        let subscribed: Vec<String> = if session_present && topics_path.exists() {
            crate::sink::read_json(&topics_path)?
        } else {
            Vec::new()
        };
        if subscribed != self.topics {
            conn.subscribe(self).await?;
            let text = serde_json::to_vec(&self.topics)
                .map_err(|e| self.fail("recording the subscription", e))?;
            std::fs::write(&topics_path, text)
                .map_err(|e| Error::io(format!("writing {}", topics_path.display()), e))?;
        }
        Ok(conn)
    }
}

/// What the connection's task hands over.
enum Ev {
    Publish(Publish),
    SubAck(Vec<SubscribeReasonCode>),
    Failed(String),
}

/// Polls the connection until it is disconnected or fails. It goes on (dropping messages, which
/// stay unacknowledged) once the reader is gone, so that acknowledgements queued before the
/// disconnect are still sent.
async fn drive(mut events: EventLoop, tx: mpsc::Sender<Ev>) {
    loop {
        let ev = match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => Ev::Publish(p),
            Ok(Event::Incoming(Packet::SubAck(s))) => Ev::SubAck(s.return_codes),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
            Ok(_) => continue,
            Err(e) => {
                let _ = tx.send(Ev::Failed(e.to_string())).await;
                return;
            }
        };
        let _ = tx.send(ev).await;
    }
}

/// A live connection of one read.
struct Connection {
    client: AsyncClient,
    rx: Option<mpsc::Receiver<Ev>>,
    driver: Option<tokio::task::JoinHandle<()>>,
    /// Messages that arrived while subscribing.
    early: Vec<Publish>,
}

impl Connection {
    async fn subscribe(&mut self, b: &MqttBroker) -> Result<()> {
        let filters = b
            .topics
            .iter()
            .map(|t| SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        self.client
            .subscribe_many(filters)
            .await
            .map_err(|e| b.fail("subscribing", e))?;
        let Some(rx) = self.rx.as_mut() else {
            return Err(b.fail("subscribing", "the connection is closed"));
        };
        loop {
            match tokio::time::timeout(Duration::from_secs(15), rx.recv()).await {
                Err(_) => return Err(b.fail("subscribing", "no answer in 15 s")),
                Ok(None) => return Err(b.fail("subscribing", "the connection closed")),
                Ok(Some(Ev::Failed(e))) => return Err(b.fail("subscribing", e)),
                Ok(Some(Ev::Publish(p))) => self.early.push(p),
                Ok(Some(Ev::SubAck(codes))) => {
                    if let Some(i) = codes.iter().position(|c| *c == SubscribeReasonCode::Failure) {
                        return Err(b.fail(
                            "subscribing",
                            format!(
                                "the broker refused topic filter '{}' (not allowed, or not a valid filter)",
                                b.topics.get(i).map_or("?", |t| t.as_str())
                            ),
                        ));
                    }
                    return Ok(());
                }
            }
        }
    }

    /// Sends the acknowledgements queued so far, then disconnects (the session stays on the
    /// broker) and waits for the connection's task to finish.
    async fn close(mut self) {
        // Unblocks the task if it waits to hand a message over.
        self.rx = None;
        let _ = self.client.disconnect().await;
        if let Some(d) = self.driver.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), d).await;
        }
    }
}

struct MqttConsumer {
    table: String,
    shown: String,
    client_id: String,
    /// In an `Option` only while a blocking task uses it.
    spool: Option<Spool>,
    conn: Option<Connection>,
    old_done: bool,
    caught_up: bool,
    idle: Duration,
    spooled: u64,
    received: u64,
}

fn message(r: Record) -> Message {
    Message {
        payload: r.payload,
        topic: Some(r.topic),
        offset: i64::try_from(r.seq).ok(),
        timestamp_ms: Some(r.received_ms),
        ..Message::default()
    }
}

impl MqttConsumer {
    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "table {}: mqtt {} client {}: {what}: {e}",
            self.table, self.shown, self.client_id
        ))
    }

    /// Runs `f` on the spool on a blocking thread (it reads files and syncs them).
    async fn with_spool<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Spool) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let Some(mut spool) = self.spool.take() else {
            return Err(self.fail("spool", "in use"));
        };
        let (spool, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut spool);
            (spool, r)
        })
        .await
        .map_err(|e| self.fail("spool task", e))?;
        self.spool = Some(spool);
        r
    }

    /// One round of new messages: those already here (at least one, waiting up to the idle
    /// timeout for it), spooled and synced, then acknowledged.
    async fn round(&mut self, max: usize) -> Result<Vec<Message>> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Vec::new());
        };
        let mut got: Vec<Publish> = std::mem::take(&mut conn.early);
        let Some(rx) = conn.rx.as_mut() else {
            return Ok(Vec::new());
        };
        let mut failed = None;
        if got.is_empty() {
            match tokio::time::timeout(self.idle, rx.recv()).await {
                Err(_) => self.caught_up = true,
                Ok(None) => failed = Some("the connection closed".to_string()),
                Ok(Some(Ev::Publish(p))) => got.push(p),
                Ok(Some(Ev::SubAck(_))) => {}
                Ok(Some(Ev::Failed(e))) => failed = Some(e),
            }
        }
        while got.len() < max && failed.is_none() {
            match rx.try_recv() {
                Ok(Ev::Publish(p)) => got.push(p),
                Ok(Ev::SubAck(_)) => {}
                Ok(Ev::Failed(e)) => failed = Some(e),
                Err(_) => break,
            }
        }
        if let Some(e) = failed {
            // What this round holds is unacknowledged: the broker delivers it again.
            return Err(self.fail("reading", e));
        }
        if got.is_empty() {
            return Ok(Vec::new());
        }
        let items: Vec<(String, bytes::Bytes, bool)> = got
            .iter()
            .map(|p| (p.topic.clone(), p.payload.clone(), p.retain))
            .collect();
        let records = self.with_spool(move |s| s.append(items)).await?;
        // Synced: only now may the broker forget them.
        if let Some(conn) = self.conn.as_ref() {
            for p in &got {
                conn.client
                    .ack(p)
                    .await
                    .map_err(|e| self.fail("acknowledging", e))?;
            }
        }
        self.received += records.len() as u64;
        Ok(records.into_iter().map(message).collect())
    }

    async fn disconnect(&mut self) {
        if let Some(c) = self.conn.take() {
            c.close().await;
        }
    }
}

#[async_trait]
impl Consumer for MqttConsumer {
    async fn next(&mut self, max: usize) -> Result<Vec<Message>> {
        if !self.old_done {
            let old = self.with_spool(move |s| s.read_old(max)).await?;
            if !old.is_empty() {
                self.spooled += old.len() as u64;
                return Ok(old.into_iter().map(message).collect());
            }
            self.old_done = true;
        }
        let mut out = Vec::new();
        while out.len() < max && !self.caught_up && self.conn.is_some() {
            let got = self.round(max - out.len()).await?;
            out.extend(got);
        }
        if self.caught_up {
            self.disconnect().await;
        }
        Ok(out)
    }

    async fn commit(&mut self) -> Result<()> {
        self.disconnect().await;
        self.with_spool(|s| s.commit()).await
    }

    async fn release(&mut self) -> Result<()> {
        // The spool keeps everything read: the next read delivers it first.
        self.disconnect().await;
        Ok(())
    }

    fn describe(&self) -> String {
        format!(
            "mqtt {} client {} ({} from the spool, {} new)",
            self.shown, self.client_id, self.spooled, self.received
        )
    }
}

#[async_trait]
impl Broker for MqttBroker {
    fn name(&self) -> &'static str {
        "MQTT"
    }

    async fn partitions(&self) -> Result<usize> {
        Ok(1)
    }

    async fn open(&self, _p: usize, run: Option<&Arc<RunState>>) -> Result<Box<dyn Consumer>> {
        let Some(run) = run else {
            return Err(self.fail(
                "reading",
                "MQTT tables need flumen's state directory for their spool (run them with flumen run or flumen sql)",
            ));
        };
        let dir = self.spool_dir(run);
        let spool = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || Spool::open(&dir))
                .await
                .map_err(|e| self.fail("spool task", e))??
        };
        let conn = self.connect(&dir).await?;
        Ok(Box::new(MqttConsumer {
            table: self.table.clone(),
            shown: self.shown.clone(),
            client_id: self.client_id.clone(),
            spool: Some(spool),
            conn: Some(conn),
            old_done: false,
            caught_up: false,
            idle: self.idle,
            spooled: 0,
            received: 0,
        }))
    }

    fn describe(&self) -> String {
        format!(
            "server={}, client_id={}, topic={}",
            self.shown,
            self.client_id,
            self.topics.join(",")
        )
    }
}

/// Builds MQTT tables.
#[derive(Debug)]
pub struct MqttFactory;

#[async_trait]
impl TableProviderFactory for MqttFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let name = cmd.name.to_string();
        let specs: Vec<OptionSpec> = OPTIONS.iter().chain(BROKER_OPTIONS).copied().collect();
        let o = TableOptions::parse("MQTT", &name, &cmd.options, &specs)?;
        let location = cmd.locations.first().cloned().unwrap_or_default();
        let bad_location = || {
            Error::Option(format!(
                "table {name}: LOCATION must be mqtt://[user:password@]host[:1883] (TLS is not supported yet), not '{}'",
                crate::engine::Redactor::default().redact(&location)
            ))
        };
        let u = url::Url::parse(&location)
            .ok()
            .filter(|u| matches!(u.scheme(), "mqtt" | "tcp") && u.path().trim_matches('/').is_empty())
            .ok_or_else(bad_location)?;
        let host = u.host_str().filter(|h| !h.is_empty()).ok_or_else(bad_location)?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let port = u.port().unwrap_or(1883);
        let decode = crate::connector::http::decode;
        let credentials = (!u.username().is_empty())
            .then(|| (decode(u.username()), decode(u.password().unwrap_or(""))));
        let topics: Vec<String> = o
            .required("topic")?
            .split(',')
            .map(|t| t.trim().to_string())
            .collect();
        if let Some(t) = topics.iter().find(|t| !valid_filter(t)) {
            return Err(o
                .bad_value(
                    "topic",
                    t,
                    "a topic filter is not empty, and + and # stand alone between slashes (# only last)",
                )
                .into());
        }
        let client_id = o.required("client_id")?.to_string();
        if client_id.is_empty() || client_id.len() > 65_535 {
            return Err(o.bad_value("client_id", &client_id, "1 to 65535 characters").into());
        }
        let keep_alive = match o.count_or("keep_alive", 30)? {
            0 => return Err(o.bad_value("keep_alive", "0", "at least 1 second").into()),
            s => Duration::from_secs(s),
        };
        let decoder = MessageDecoder::from_options(&name, &o, Arc::new(cmd.schema.as_arrow().clone()))?;
        let bounds = Bounds::from_options(&o)?;
        let broker = MqttBroker {
            table: name.clone(),
            shown: format!("{host}:{port}"),
            host,
            port,
            credentials,
            client_id,
            topics,
            keep_alive,
            idle: bounds.idle,
        };
        Ok(BrokerTable::new(name, broker, decoder, bounds))
    }
}

/// An MQTT topic filter: levels split by `/`, `+` a whole level, `#` a whole last level.
fn valid_filter(t: &str) -> bool {
    if t.is_empty() || t.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = t.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| match *l {
        "+" => true,
        "#" => i == levels.len() - 1,
        l => !l.contains('+') && !l.contains('#'),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_filters() {
        for ok in ["a", "a/b", "a/+/c", "#", "a/#", "+", "+/+", "/a"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a+", "a/b#", "#/a"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }
}
