//! What the message-broker sources share: bounded reads, payload decoding with dead letters,
//! and acknowledgement only after the statement that consumed the messages has committed.
//!
//! A broker table is read as a bounded batch: each partition reads until it is caught up with
//! what the broker held when the read began, or `max_messages` (over all partitions), or
//! `max_duration`. The messages stay unacknowledged (offsets uncommitted) while the statement
//! runs; [`Pending`] keeps each partition's [`Consumer`] in the run's state, and the engine calls
//! [`Consumer::commit`] once the `INSERT`/`COPY` has committed to its sink, or
//! [`Consumer::release`] when it failed. So a failed or killed run loses nothing: the next run
//! reads the same messages again (at-least-once; exactly-once where the sink is idempotent on a
//! key derived from the message, e.g. an upsert on `(_partition, _offset)`).
//!
//! Decisions:
//! - A plain `SELECT` (or `CREATE TABLE AS`) from a broker table is a peek: nothing is
//!   acknowledged. Only a write that reads the broker table directly acknowledges.
//! - A read cut short by a `LIMIT` acknowledges nothing (rows already in flight to a dropped
//!   stream cannot be accounted for); use `max_messages` to bound a read.
//! - A message whose payload does not decode goes to the table's dead letters
//!   (`dead_letter/<run>/<table>/`) with its raw payload, where it came from and the error; it is
//!   acknowledged with the rest, as it is safely kept.
//!
//! Columns: the payload's fields (JSON objects, or CSV records in column order) plus any of the
//! metadata columns below, declared by name; `format` 'raw' gives the payload itself.
//!
//! | column       | type             | Kafka     | NATS          | RabbitMQ     | MQTT           | Redis Streams |
//! |--------------|------------------|-----------|---------------|--------------|----------------|---------------|
//! | `_topic`     | VARCHAR          | topic     | subject       | routing key  | topic          | stream key    |
//! | `_key`       | VARCHAR          | key       |               |              |                |               |
//! | `_partition` | INT              | partition |               |              |                |               |
//! | `_offset`    | BIGINT           | offset    | stream seq.   | delivery tag | spool sequence |               |
//! | `_id`        | VARCHAR          |           | msg id header | message id   |                | entry id      |
//! | `_timestamp` | TIMESTAMP        | timestamp | published     | timestamp    | received       | entry time    |
//! | `_headers`   | VARCHAR (JSON)   | headers   | headers       | headers      |                |               |
//! | `_payload`   | VARCHAR or BYTEA | value     | data          | body         | payload        | payload field |
//!
//! MQTT acknowledges each message to the broker once it is synced to flumen's spool, and the
//! statement's commit consumes the spool instead (see `crate::connector::mqtt`).

pub mod decode;

use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use bytes::Bytes;
use datafusion::catalog::{Session, TableProvider};
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use self::decode::{DeadLetters, MessageDecoder};
use crate::connector::options::{OptionSpec, TableOptions};
use crate::connector::scan::{BatchSender, Producer, StreamScanExec};
use crate::error::{Error, Result};
use crate::sink::{RunState, parse_duration};

/// One message as a broker delivered it.
#[derive(Debug, Clone, Default)]
pub struct Message {
    pub payload: Bytes,
    pub topic: Option<String>,
    pub key: Option<Bytes>,
    pub partition: Option<i32>,
    pub offset: Option<i64>,
    pub id: Option<String>,
    /// Milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(String, Bytes)>,
}

/// One partition's reader. Everything [`Consumer::next`] returned is acknowledged by
/// [`Consumer::commit`] or given back by [`Consumer::release`].
#[async_trait]
pub trait Consumer: Send {
    /// Up to `max` more messages; an empty vector once caught up (or the broker's limit ended the
    /// read).
    async fn next(&mut self, max: usize) -> Result<Vec<Message>>;
    /// Acknowledges (commits the offsets of) everything returned.
    async fn commit(&mut self) -> Result<()>;
    /// Makes everything returned deliverable again at once, where the broker allows (else it
    /// is redelivered when the connection closes or the ack deadline passes).
    async fn release(&mut self) -> Result<()>;
    /// What it read, for messages: `topic partition 3 offsets 100..250`.
    fn describe(&self) -> String;
}

/// Opens the consumers of one broker table.
#[async_trait]
pub trait Broker: Debug + Send + Sync + 'static {
    /// `STORED AS` name, for messages.
    fn name(&self) -> &'static str;
    /// How many partitions a scan reads in parallel (asks the broker where it must).
    async fn partitions(&self) -> Result<usize>;
    /// A consumer of partition `p`; `run` is the run's state (where a broker may keep a spool).
    async fn open(&self, p: usize, run: Option<&Arc<RunState>>) -> Result<Box<dyn Consumer>>;
    /// Shown by `explain` (no credentials).
    fn describe(&self) -> String;
}

/// A consumer whose messages went into a statement, waiting for its outcome.
struct Held {
    table: String,
    consumer: Box<dyn Consumer>,
    /// False when the read was cut short (the consumer of the rows went away): never committed.
    complete: bool,
}

/// A partition's read in progress: its consumer goes to the statement's outcome however the
/// read ends. Dropped with the consumer still inside (the scan was dropped and its task
/// aborted), the consumer is held as cut short, so the statement's end gives its messages back.
struct Reading {
    run: Option<Arc<RunState>>,
    table: String,
    consumer: Option<Box<dyn Consumer>>,
}

impl Reading {
    fn hand_over(&self, consumer: Box<dyn Consumer>, complete: bool) {
        if let Some(r) = &self.run {
            r.pending().hold(Held {
                table: self.table.clone(),
                consumer,
                complete,
            });
        }
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        if let Some(c) = self.consumer.take() {
            self.hand_over(c, false);
        }
        if let Some(r) = &self.run {
            r.pending().reading.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The consumers of the running statement (one per partition read), kept in the run state.
#[derive(Default)]
pub struct Pending {
    held: Mutex<Vec<Held>>,
    /// Partitions still reading: a failed statement's producers may still be stopping.
    reading: AtomicU64,
}

impl Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.held.lock().map(|h| h.len()).unwrap_or(0);
        write!(f, "Pending({n} consumers)")
    }
}

impl Pending {
    /// Whether the running statement reads a broker (its messages may differ in a replay).
    pub fn any(&self) -> bool {
        self.reading.load(Ordering::SeqCst) > 0 || self.held.lock().map(|h| !h.is_empty()).unwrap_or(true)
    }

    fn hold(&self, h: Held) {
        if let Ok(mut v) = self.held.lock() {
            v.push(h);
        }
    }

    /// Everything held, once every partition still reading has stopped and handed its consumer
    /// over (after a failure they stop at their next batch; waits at most a minute).
    async fn take(&self) -> Vec<Held> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.reading.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.held
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    /// The statement committed: acknowledge what complete reads consumed; give back the rest.
    pub async fn commit(&self) -> Result<()> {
        let mut first_error = None;
        for mut h in self.take().await {
            let r = if h.complete {
                h.consumer.commit().await
            } else {
                tracing::warn!(
                    "table {}: the read of {} was cut short (LIMIT?): nothing acknowledged, the messages will be read again",
                    h.table,
                    h.consumer.describe()
                );
                h.consumer.release().await
            };
            if let Err(e) = r {
                tracing::error!("table {}: acknowledging {}: {e}", h.table, h.consumer.describe());
                first_error.get_or_insert(Error::Config(format!(
                    "table {}: the rows were written, but acknowledging {} failed: {e}; those messages will be delivered again",
                    h.table,
                    h.consumer.describe()
                )));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The statement failed or only peeked: give everything back.
    pub async fn release(&self) {
        for mut h in self.take().await {
            if let Err(e) = h.consumer.release().await {
                tracing::warn!("table {}: releasing {}: {e}", h.table, h.consumer.describe());
            }
        }
    }
}

/// Options every broker table takes.
pub const BROKER_OPTIONS: &[OptionSpec] = &[
    OptionSpec::new(
        "format",
        "json (default), csv or raw: how a payload holds its row",
    ),
    OptionSpec::new(
        "max_messages",
        "stop after this many messages (over all partitions; default: until caught up)",
    ),
    OptionSpec::new(
        "max_duration",
        "stop reading after this long (e.g. 5m; default: until caught up)",
    ),
    OptionSpec::new(
        "idle_timeout",
        "caught up when no message arrives for this long, where the broker cannot say (default 1s)",
    ),
];

/// How a read is bounded.
#[derive(Debug, Clone)]
pub struct Bounds {
    pub max_messages: Option<u64>,
    pub max_duration: Option<Duration>,
    pub idle: Duration,
}

impl Bounds {
    pub fn from_options(o: &TableOptions) -> Result<Self> {
        let dur = |name: &str| {
            o.get(name)
                .map(|v| parse_duration(v).map_err(|e| o.bad_value(name, v, &e)))
                .transpose()
        };
        Ok(Self {
            max_messages: o
                .get("max_messages")
                .map(|_| o.count_or("max_messages", 0))
                .transpose()?,
            max_duration: dur("max_duration")?,
            idle: dur("idle_timeout")?.unwrap_or(Duration::from_secs(1)),
        })
    }
}

/// A broker table's scan: one producer per partition, decoding payloads into rows, dead
/// letters for those that do not decode, consumers held for the statement's outcome.
#[allow(clippy::too_many_arguments)]
pub fn scan(
    broker: Arc<dyn Broker>,
    table: &str,
    decoder: Arc<MessageDecoder>,
    partitions: usize,
    bounds: Bounds,
    run: Option<Arc<RunState>>,
    limit: Option<usize>,
    batch_rows: usize,
) -> Result<Arc<dyn ExecutionPlan>> {
    let schema: SchemaRef = decoder.output_schema();
    let mut label = format!(
        "table={table}, {}, partitions={partitions}, format={}",
        broker.describe(),
        decoder.format_name()
    );
    if let Some(m) = bounds.max_messages {
        label.push_str(&format!(", max_messages={m}"));
    }
    if let Some(d) = bounds.max_duration {
        label.push_str(&format!(", max_duration={}s", d.as_secs_f64()));
    }
    let budget = Arc::new(AtomicU64::new(bounds.max_messages.unwrap_or(u64::MAX)));
    let started = Arc::new(Mutex::new(None::<Instant>));
    let table = table.to_string();
    let sent_rows = Arc::new(AtomicU64::new(0));
    let producer: Producer = Arc::new(move |p, tx: BatchSender| {
        let broker = Arc::clone(&broker);
        let decoder = Arc::clone(&decoder);
        let bounds = bounds.clone();
        let budget = Arc::clone(&budget);
        let run = run.clone();
        let table = table.clone();
        let sent_rows = Arc::clone(&sent_rows);
        let started = {
            let mut s = started.lock().unwrap_or_else(|e| e.into_inner());
            *s.get_or_insert_with(Instant::now)
        };
        let errors = tx.clone();
        let table2 = table.clone();
        // Counts this partition as reading from now (the scan's start, before its task first
        // runs) until it hands its consumer over, also when it panics.
        let mut guard = Reading {
            run: run.clone(),
            table: table.clone(),
            consumer: None,
        };
        if let Some(r) = &run {
            r.pending().reading.fetch_add(1, Ordering::SeqCst);
        }
        let body = async move {
            let opened = broker.open(p, run.as_ref()).await;
            let consumer = match opened {
                Ok(c) => guard.consumer.insert(c),
                Err(e) => {
                    drop(guard);
                    tx.send(Err(e)).await;
                    return;
                }
            };
            let cut_short = AtomicBool::new(false);
            let mut dead = DeadLetters::new(&table, run.clone());
            let r = read_partition(
                consumer.as_mut(),
                &decoder,
                &bounds,
                &budget,
                started,
                limit,
                &sent_rows,
                batch_rows,
                &mut dead,
                &tx,
                &cut_short,
            )
            .await;
            let complete = r.is_ok() && !cut_short.load(Ordering::Relaxed);
            match guard.consumer.take() {
                Some(consumer) if run.is_some() => guard.hand_over(consumer, complete),
                Some(mut consumer) => {
                    // No run state (a bare session): nothing can acknowledge later.
                    let _ = consumer.release().await;
                }
                None => {}
            }
            drop(guard);
            if let Err(e) = r {
                tx.send(Err(e)).await;
            }
        };
        Box::pin(async move {
            // The read runs as a task of its own that the scan's end does not abort: a consumer
            // stopped at an arbitrary await (in the middle of a fetch) would lose track of the
            // messages it was handed, which the broker then holds until its ack timeout. It
            // stops at its next batch once the scan is gone, and the statement's end waits for
            // it (`Pending::take`) before acknowledging or giving back.
            if let Err(e) = tokio::spawn(body).await {
                errors
                    .send(Err(Error::Config(format!(
                        "table {table2}: reading partition {p} failed: {e}"
                    ))))
                    .await;
            }
        })
    });
    Ok(Arc::new(StreamScanExec::new(
        "BrokerScanExec",
        label,
        schema,
        partitions,
        producer,
    )))
}

#[allow(clippy::too_many_arguments)]
async fn read_partition(
    consumer: &mut dyn Consumer,
    decoder: &MessageDecoder,
    bounds: &Bounds,
    budget: &AtomicU64,
    started: Instant,
    limit: Option<usize>,
    sent_rows: &AtomicU64,
    batch_rows: usize,
    dead: &mut DeadLetters,
    tx: &BatchSender,
    cut_short: &AtomicBool,
) -> Result<()> {
    loop {
        if bounds.max_duration.is_some_and(|d| started.elapsed() >= d) {
            return Ok(());
        }
        // Take this chunk's share of max_messages.
        let want = batch_rows.max(1) as u64;
        let granted = budget
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| {
                Some(left - left.min(want))
            })
            .map(|left| left.min(want))
            .unwrap_or(0);
        if granted == 0 {
            return Ok(());
        }
        let messages = consumer.next(granted as usize).await?;
        if (messages.len() as u64) < granted {
            budget.fetch_add(granted - messages.len() as u64, Ordering::SeqCst);
        }
        if messages.is_empty() {
            return Ok(());
        }
        let (batch, rejected) = decoder.decode(&messages)?;
        if !rejected.is_empty() {
            dead.write(&messages, &rejected)?;
        }
        if batch.num_rows() > 0 {
            let total =
                sent_rows.fetch_add(batch.num_rows() as u64, Ordering::SeqCst) + batch.num_rows() as u64;
            if !tx.send(Ok(batch)).await {
                cut_short.store(true, Ordering::Relaxed);
                return Ok(());
            }
            if limit.is_some_and(|l| total >= l as u64) {
                // The LIMIT is satisfied: downstream stops reading; what it dropped is unknown.
                cut_short.store(true, Ordering::Relaxed);
                return Ok(());
            }
        }
    }
}

/// A read-only broker table.
#[derive(Debug)]
pub struct BrokerTable {
    pub name: String,
    pub broker: Arc<dyn Broker>,
    pub decoder: Arc<MessageDecoder>,
    pub bounds: Bounds,
}

impl BrokerTable {
    pub fn new(name: String, broker: impl Broker, decoder: MessageDecoder, bounds: Bounds) -> Arc<Self> {
        Arc::new(Self {
            name,
            broker: Arc::new(broker),
            decoder: Arc::new(decoder),
            bounds,
        })
    }
}

#[async_trait]
impl TableProvider for BrokerTable {
    fn schema(&self) -> arrow::datatypes::SchemaRef {
        self.decoder.output_schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let run = state.config().get_extension::<RunState>();
        let partitions = self.broker.partitions().await?;
        Ok(scan(
            Arc::clone(&self.broker),
            &self.name,
            Arc::new(self.decoder.project(projection)),
            partitions,
            self.bounds.clone(),
            run,
            limit,
            state.config().batch_size(),
        )?)
    }
}
