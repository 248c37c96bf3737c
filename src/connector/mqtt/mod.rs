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
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::logical_expr::CreateExternalTable;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, Publish, QoS,
    SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::{oneshot, watch};

use self::spool::{Record, Spool, SpoolWriter};
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
    OptionSpec::new("keep_alive", "seconds between keep-alive pings (default 30)"),
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

/// The spool's folder name: anything but letters, digits, `_`, `-`, `.` becomes `_`. Kept as
/// it was when spools were first written (a new mapping would orphan the spools already on
/// disk, whose messages are acknowledged to the broker); one path component, never `.` or `..`.
fn spool_name(id: &str) -> String {
    let name: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.chars().all(|c| c == '.') {
        name.replace('.', "_")
    } else {
        name
    }
}

impl MqttBroker {
    fn fail(&self, what: &str, e: impl std::fmt::Display) -> Error {
        Error::Config(format!(
            "table {}: mqtt {} client {}: {what}: {e}",
            self.table, self.shown, self.client_id
        ))
    }

    fn spool_dir(&self, run: &RunState) -> PathBuf {
        run.dir().join("spool").join("mqtt").join(spool_name(&format!(
            "{}_{}_{}",
            self.host, self.port, self.client_id
        )))
    }

    /// Connects with the persistent session, its messages going into `writer`, and subscribes
    /// where the session does not hold the subscriptions yet.
    async fn connect(&self, spool_dir: &std::path::Path, writer: SpoolWriter) -> Result<Connection> {
        let mut o = MqttOptions::new(&self.client_id, &self.host, self.port);
        o.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(self.keep_alive)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some((u, p)) = &self.credentials {
            o.set_credentials(u, p);
        }
        let (client, events) = AsyncClient::new(o, REQUESTS);
        let (progress_tx, mut progress) = watch::channel(Progress::default());
        let (done_tx, done) = oneshot::channel();
        let stopped = Arc::new(Mutex::new(false));
        let driver = Driver {
            client: client.clone(),
            writer,
            progress: progress_tx,
            stopped: Arc::clone(&stopped),
        };
        std::thread::Builder::new()
            .name("flumen-mqtt".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
                if let Ok(rt) = rt {
                    rt.block_on(driver.run(events));
                }
                let _ = done_tx.send(());
            })
            .map_err(|e| self.fail("starting the connection's thread", e))?;
        let mut conn = Connection {
            client,
            progress: progress.clone(),
            stopped,
            done: Some(done),
        };
        let outcome = match tokio::time::timeout(
            Duration::from_secs(15),
            progress.wait_for(|p| p.session_present.is_some() || p.error.is_some()),
        )
        .await
        {
            Err(_) => Err("no answer in 15 s".to_string()),
            Ok(Err(_)) => Err("the connection's thread stopped".to_string()),
            Ok(Ok(p)) => p.error.clone().map_or(Ok(p.session_present == Some(true)), Err),
        };
        let session_present = match outcome {
            Ok(present) => present,
            Err(e) => {
                conn.close().await;
                return Err(self.fail("connecting", e));
            }
        };
        // The subscriptions the session holds (a session the broker lost has none).
        let topics_path = spool_dir.join("topics.json");
        let subscribed: Vec<String> = if session_present && topics_path.exists() {
            crate::sink::read_json(&topics_path)?
        } else {
            Vec::new()
        };
        if subscribed != self.topics {
            if let Err(e) = conn.subscribe(self).await {
                conn.close().await;
                return Err(e);
            }
            let text =
                serde_json::to_vec(&self.topics).map_err(|e| self.fail("recording the subscription", e))?;
            std::fs::write(&topics_path, text)
                .map_err(|e| Error::io(format!("writing {}", topics_path.display()), e))?;
        }
        Ok(conn)
    }
}

/// Capacity of the client's request channel (acknowledgements and the disconnect).
const REQUESTS: usize = 1 << 16;

/// What the connection's thread has done so far.
#[derive(Debug, Default, Clone)]
struct Progress {
    /// Set once the broker accepted the connection.
    session_present: Option<bool>,
    /// Where the live segment's synced records end.
    synced: u64,
    suback: Option<Vec<SubscribeReasonCode>>,
    /// Why the connection ended, if it failed.
    error: Option<String>,
}

/// The connection's thread: polls the connection until it is disconnected or fails, appends
/// each batch of messages the socket delivered to the spool, syncs it, and only then queues
/// their acknowledgements. It never waits for the reader, so keep-alives go on however slowly
/// the statement consumes the spool, and memory holds one socket batch at most.
struct Driver {
    client: AsyncClient,
    writer: SpoolWriter,
    progress: watch::Sender<Progress>,
    /// Set (with the disconnect queued) by [`Connection::close`]; spooling and queueing acks
    /// happen under the same lock, so no acknowledgement is queued after the disconnect.
    stopped: Arc<Mutex<bool>>,
}

impl Driver {
    /// Decision: acknowledgements go through the client's request channel without waiting (this
    /// thread is the one that empties it). Should it be full (64k unsent acks, only with a
    /// broker that sends without a window), the rest wait here, and a disconnect before they
    /// go out means the broker delivers those messages again: duplicates at worst, never a loss.
    async fn run(mut self, mut events: EventLoop) {
        let mut batch: Vec<(String, bytes::Bytes, bool)> = Vec::new();
        let mut to_ack: Vec<Publish> = Vec::new();
        let mut unsent: std::collections::VecDeque<Publish> = Default::default();
        loop {
            while let Some(p) = unsent.front() {
                if self.client.try_ack(p).is_err() {
                    break;
                }
                unsent.pop_front();
            }
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(c))) => {
                    self.progress
                        .send_modify(|p| p.session_present = Some(c.session_present));
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    batch.push((p.topic.clone(), p.payload.clone(), p.retain));
                    // Only the packet id and QoS are needed to acknowledge it.
                    let mut ack = Publish::new("", p.qos, Vec::new());
                    ack.pkid = p.pkid;
                    to_ack.push(ack);
                }
                Ok(Event::Incoming(Packet::SubAck(s))) => {
                    self.progress.send_modify(|p| p.suback = Some(s.return_codes));
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return,
                Ok(_) => {}
                Err(ConnectionError::ConnectionRefused(code)) => {
                    return self.fail(format!("the broker refused the connection: {code:?}"));
                }
                Err(e) => return self.fail(e.to_string()),
            }
            // Sync once the socket's batch is handed over (fewer syncs than messages).
            if !batch.is_empty() && events.state.events.is_empty() {
                let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
                if *stopped {
                    // Read over: unacknowledged, the broker delivers these again.
                    batch.clear();
                    to_ack.clear();
                    continue;
                }
                match self.writer.append(&batch) {
                    Ok(end) => {
                        batch.clear();
                        for p in to_ack.drain(..) {
                            if !unsent.is_empty() || self.client.try_ack(&p).is_err() {
                                unsent.push_back(p);
                            }
                        }
                        drop(stopped);
                        self.progress.send_modify(|p| p.synced = end);
                    }
                    Err(e) => {
                        drop(stopped);
                        return self.fail(format!("spooling: {e}"));
                    }
                }
            }
        }
    }

    fn fail(&self, e: String) {
        self.progress.send_modify(|p| p.error = Some(e));
    }
}

/// A live connection of one read, driven by its own thread.
struct Connection {
    client: AsyncClient,
    progress: watch::Receiver<Progress>,
    stopped: Arc<Mutex<bool>>,
    /// Fires when the connection's thread ends.
    done: Option<oneshot::Receiver<()>>,
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
        let p = match tokio::time::timeout(
            Duration::from_secs(15),
            self.progress
                .wait_for(|p| p.suback.is_some() || p.error.is_some()),
        )
        .await
        {
            Err(_) => return Err(b.fail("subscribing", "no answer in 15 s")),
            Ok(Err(_)) => return Err(b.fail("subscribing", "the connection closed")),
            Ok(Ok(p)) => p.clone(),
        };
        if let Some(e) = p.error {
            return Err(b.fail("subscribing", e));
        }
        let codes = p.suback.unwrap_or_default();
        if let Some(i) = codes.iter().position(|c| *c == SubscribeReasonCode::Failure) {
            return Err(b.fail(
                "subscribing",
                format!(
                    "the broker refused topic filter '{}' (not allowed, or not a valid filter)",
                    b.topics.get(i).map_or("?", |t| t.as_str())
                ),
            ));
        }
        Ok(())
    }

    /// Disconnects after the acknowledgements queued so far (the session stays on the broker)
    /// and waits for the connection's thread to end: the live segment no longer grows after.
    async fn close(&mut self) {
        {
            let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
            if !*stopped {
                *stopped = true;
                let _ = self.client.try_disconnect();
            }
        }
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
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

/// How long a read waits for more messages to fill a batch once it holds some.
const LINGER: Duration = Duration::from_millis(20);

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

    /// Runs `f` on the spool on a blocking thread (it reads files).
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

    /// New messages the connection has spooled: up to `max`, waiting up to the idle timeout for
    /// the first and a moment for more.
    async fn read_new(&mut self, max: usize) -> Result<Vec<Message>> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(conn) = self.conn.as_mut() else { break };
            let (synced, error) = {
                let p = conn.progress.borrow_and_update();
                (p.synced, p.error.clone())
            };
            let want = max - out.len();
            let got = self.with_spool(move |s| s.read_live(want, synced)).await?;
            if !got.is_empty() {
                self.received += got.len() as u64;
                out.extend(got.into_iter().map(message));
                continue;
            }
            if let Some(e) = error {
                // What it spooled was read; the rest stays unacknowledged on the broker.
                return Err(self.fail("reading", e));
            }
            let wait = if out.is_empty() { self.idle } else { LINGER };
            let Some(conn) = self.conn.as_mut() else { break };
            match tokio::time::timeout(wait, conn.progress.changed()).await {
                Ok(Ok(())) => {}
                // The thread ended: what it synced is read on the next turn, then the error.
                Ok(Err(_)) if conn.progress.borrow().error.is_some() => {}
                Ok(Err(_)) => return Err(self.fail("reading", "the connection ended")),
                Err(_) if out.is_empty() => {
                    self.caught_up = true;
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(out)
    }

    async fn disconnect(&mut self) {
        if let Some(mut c) = self.conn.take() {
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
        if self.caught_up {
            return Ok(Vec::new());
        }
        let out = self.read_new(max).await?;
        if self.caught_up {
            // Messages spooled after this point stay in the spool for the next read.
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
        self.with_spool(|s| s.discard_empty_live()).await
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
        let (spool, writer) = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || {
                let mut spool = Spool::open(&dir)?;
                let writer = spool.start_live()?;
                Ok::<_, Error>((spool, writer))
            })
            .await
            .map_err(|e| self.fail("spool task", e))??
        };
        let conn = self.connect(&dir, writer).await?;
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
        let credentials =
            (!u.username().is_empty()).then(|| (decode(u.username()), decode(u.password().unwrap_or(""))));
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
            return Err(o
                .bad_value("client_id", &client_id, "1 to 65535 characters")
                .into());
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
