//! [`BatchSink`]: the DataFusion `DataSink` that drives any [`SinkBackend`], and [`SinkTable`],
//! the table whose `INSERT INTO` uses it.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow::array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray, UInt32Array, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::sink::{DataSink, DataSinkExec};
use datafusion::error::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use parquet::arrow::ArrowWriter;

use super::backend::{Attempt, Effects, Outcome, SinkBackend};
use super::journal::{SinkReplay, Slice, fingerprint};
use super::metrics::SinkMetrics;
use super::options::{OnFailure, SinkOptions};
use super::retry::Backoff;
use super::state::{Part, RunState, new_run_id};
use crate::error::{Error, Result};

/// A table backed by a [`SinkBackend`]: `INSERT INTO` goes through [`BatchSink`].
#[derive(Debug)]
pub struct SinkTable<B: SinkBackend> {
    backend: Arc<B>,
    table: String,
    options: SinkOptions,
}

impl<B: SinkBackend> SinkTable<B> {
    /// A write-only table named `table` (for messages and state paths). Refuses a `mode` the
    /// backend does not honour, so that no mode silently becomes an append.
    pub fn new(backend: B, table: impl Into<String>, options: SinkOptions) -> Result<Self> {
        let table = table.into();
        let modes = backend.modes();
        if !modes.contains(&options.mode.name()) {
            let connector = if options.connector.is_empty() {
                "this sink".to_string()
            } else {
                format!("STORED AS {}", options.connector)
            };
            return Err(Error::Option(format!(
                "table {table}: 'mode' '{}' is not available for {connector}; it honours: {}",
                options.mode.name(),
                modes.join(", ")
            )));
        }
        Ok(Self {
            backend: Arc::new(backend),
            table,
            options,
        })
    }
}

#[async_trait]
impl<B: SinkBackend> TableProvider for SinkTable<B> {
    fn schema(&self) -> SchemaRef {
        self.backend.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Err(Error::Config(format!("table {} is write-only: use INSERT INTO it", self.table)).into())
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if insert_op != InsertOp::Append {
            return Err(Error::Config(format!(
                "table {}: only INSERT INTO (append) is supported, not {insert_op}",
                self.table
            ))
            .into());
        }
        let sink = BatchSink {
            schema: self.backend.schema(),
            backend: Arc::clone(&self.backend),
            table: self.table.clone(),
            options: self.options.clone(),
        };
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}

/// Batches, sends with retries, stages what cannot be delivered, dead-letters what is refused.
pub struct BatchSink<B: SinkBackend> {
    backend: Arc<B>,
    schema: SchemaRef,
    table: String,
    options: SinkOptions,
}

impl<B: SinkBackend> fmt::Debug for BatchSink<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchSink")
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl<B: SinkBackend> DisplayAs for BatchSink<B> {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        write!(
            f,
            "BatchSink: table={}, batch_rows={}, concurrency={}, max_attempts={}, on_failure={:?}",
            self.table, o.batch_rows, o.concurrency, o.max_attempts, o.on_failure
        )?;
        let target = self.backend.describe();
        if !target.is_empty() {
            write!(f, ", {target}")?;
        }
        Ok(())
    }
}

/// What the requests of one `write_all` share.
struct Shared<B: SinkBackend> {
    /// `table@l<line>`: the journal's name for this sink.
    key: String,
    backend: Arc<B>,
    table: String,
    options: SinkOptions,
    state: Arc<RunState>,
    effects: Effects,
    metrics: Arc<SinkMetrics>,
    /// Set once a request could not be delivered: later ones go straight to staging.
    down: AtomicBool,
    staged_rows: AtomicU64,
    staged_parts: AtomicU64,
    rejected_rows: AtomicU64,
    last_failure: Mutex<Option<String>>,
    /// Requests allowed in flight now: halved when the sink asks for a retry (overloaded,
    /// throttling, failing), raised by one per delivered request, up to `concurrency`.
    allowed: AtomicU64,
}

/// One request's rows and identity.
struct Chunk {
    batch: RecordBatch,
    token: String,
    /// The input rows it carries, for the journal.
    slices: Vec<Slice>,
    /// Where its rows came from when they are a retried subset of another request (a staged
    /// part of one): that request's token and the rows' indexes in it, from which backends
    /// derive item ids.
    origin: Option<(String, Vec<u32>)>,
}

impl<B: SinkBackend> Shared<B> {
    /// Sends one chunk to the end: delivered, rejected rows dead-lettered, or staged.
    async fn deliver(self: Arc<Self>, chunk: Chunk) -> Result<u64> {
        // All-or-nothing writes journal nothing (a failure rolls everything back), and neither
        // does `flumen resume` delivering staged parts: their rows are in the journal already
        // (as staged) and in the manifests, which record their delivery.
        if self.backend.all_or_nothing() || self.state.resuming() {
            return self.deliver_chunk(&chunk).await;
        }
        let journal = self.state.journal();
        journal.send(&self.key, &chunk.token, &chunk.slices)?;
        if self.down.load(Ordering::Relaxed) && !self.state.resuming() {
            if self.options.on_failure == OnFailure::Fail {
                let reason = self
                    .last_failure
                    .lock()
                    .ok()
                    .and_then(|f| f.clone())
                    .unwrap_or_default();
                return Err(self.failure_error(&reason));
            }
            self.stage_rows(&chunk.batch, &chunk.token)?;
            journal.staged(&chunk.token)?;
            return Ok(0);
        }
        let n = self.deliver_chunk(&chunk).await?;
        Ok(n)
    }

    /// Encodes on tokio's blocking pool: encoding is CPU work, and the runtime's workers keep
    /// sending the other requests in flight meanwhile.
    async fn encode(&self, batch: &RecordBatch, token: &str, rows: Option<&[u32]>) -> Result<B::Request> {
        let backend = Arc::clone(&self.backend);
        let batch = batch.clone();
        let token = token.to_string();
        let rows = rows.map(<[u32]>::to_vec);
        tokio::task::spawn_blocking(move || backend.encode_rows(&batch, &token, rows.as_deref()))
            .await
            .map_err(|e| Error::Config(format!("table {}: encoding a request failed: {e}", self.table)))?
    }

    /// The sink asked to retry: fewer requests in flight (multiplicative decrease).
    fn congested(&self) {
        let now = self.allowed.load(Ordering::Relaxed);
        let next = (now / 2).max(1);
        if next < now
            && self
                .allowed
                .compare_exchange(now, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(table = %self.table, "the sink is pushing back: lowering concurrency to {next}");
        }
    }

    /// A request went through: one more in flight, up to the configured concurrency.
    fn relieved(&self) {
        let max = if self.backend.serial() {
            1
        } else {
            self.options.concurrency as u64
        };
        let _ = self
            .allowed
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            });
    }

    fn allowed(&self) -> usize {
        self.allowed.load(Ordering::Relaxed).max(1) as usize
    }

    /// The attempts of one chunk; journals how it ended.
    async fn deliver_chunk(&self, chunk: &Chunk) -> Result<u64> {
        let journaled = !self.backend.all_or_nothing() && !self.state.resuming();
        let journal = self.state.journal();
        let done = |token: &str| if journaled { journal.done(token) } else { Ok(()) };
        let mut batch = chunk.batch.clone();
        let mut token = chunk.token.clone();
        // Row i of `batch` is row rows[i] of request `id_token` as first sent (after partial
        // retries, or a staged subset of one).
        let (id_token, mut rows): (String, Option<Vec<u32>>) = match &chunk.origin {
            Some((t, r)) if r.len() == batch.num_rows() => (t.clone(), Some(r.clone())),
            _ => (chunk.token.clone(), None),
        };
        let mut request = self.encode(&batch, &id_token, rows.as_deref()).await?;
        // Partial answers so far: the retried subset's token counts them (not the attempts,
        // which differ between a run and its replay), so a replay resends it under the same one.
        let mut partials = 0u32;
        let seed = chunk
            .token
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
        let o = &self.options;
        let mut backoff = Backoff::new(o.retry_initial, o.retry_max, o.max_attempts, o.max_elapsed, seed);
        let started = Instant::now();
        let mut attempt = 0u32;
        let mut delivered = 0u64;
        loop {
            attempt += 1;
            self.metrics.request(attempt > 1);
            let a = Attempt {
                token: &token,
                timeout: o.timeout,
                number: attempt,
                effects: &self.effects,
            };
            // Backends bound their own attempts and settle them before they return (see
            // `Attempt`): nothing here may drop an attempt that could still apply.
            let outcome = self.backend.send(&request, &a).await;
            let (reason, after) = match outcome {
                Outcome::Delivered => {
                    self.relieved();
                    let rows = batch.num_rows() as u64;
                    self.metrics
                        .delivered(rows, self.backend.request_bytes(&request) as u64);
                    done(&chunk.token)?;
                    return Ok(delivered + rows);
                }
                Outcome::Partial { rejected, retry } => {
                    let n = batch.num_rows();
                    if rejected.iter().any(|(i, _)| *i >= n) || retry.iter().any(|i| *i >= n) {
                        return Err(Error::Config(format!(
                            "table {}: the sink named a row outside the request ({n} rows)",
                            self.table
                        )));
                    }
                    // A server may name a row twice: each row counts once, refused before retried.
                    let mut rejected = rejected;
                    rejected.sort_by_key(|(i, _)| *i);
                    rejected.dedup_by_key(|(i, _)| *i);
                    let mut retry = retry;
                    retry.sort_unstable();
                    retry.dedup();
                    retry.retain(|i| rejected.binary_search_by_key(i, |(r, _)| *r).is_err());
                    let ok_rows = n.saturating_sub(rejected.len() + retry.len()) as u64;
                    self.metrics
                        .delivered(ok_rows, self.backend.request_bytes(&request) as u64);
                    delivered += ok_rows;
                    if !rejected.is_empty() {
                        self.dead_letter(&batch, &rejected, attempt)?;
                    }
                    if retry.is_empty() {
                        self.relieved();
                        done(&chunk.token)?;
                        return Ok(delivered);
                    }
                    self.congested();
                    rows = Some(
                        retry
                            .iter()
                            .map(|i| rows.as_ref().map_or(*i as u32, |r| r[*i]))
                            .collect(),
                    );
                    let idx = UInt32Array::from(retry.iter().map(|i| *i as u32).collect::<Vec<_>>());
                    let cols = batch
                        .columns()
                        .iter()
                        .map(|c| arrow::compute::take(c, &idx, None))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    batch = RecordBatch::try_new(batch.schema(), cols)?;
                    request = self.encode(&batch, &id_token, rows.as_deref()).await?;
                    partials += 1;
                    token = format!("{}/p{partials}", chunk.token);
                    (format!("{} rows to send again", retry.len()), None)
                }
                Outcome::Retry { reason, after } => {
                    self.congested();
                    (reason, after)
                }
                Outcome::Fatal { reason } => {
                    let origin = rows.clone().map(|r| (id_token.clone(), r));
                    return self.give_up(chunk, &batch, &token, origin, &reason, delivered);
                }
            };
            match backoff.next_delay(attempt, started.elapsed(), after) {
                Some(delay) => {
                    tracing::debug!(table = %self.table, attempt, ?delay, "retrying: {reason}");
                    tokio::time::sleep(delay).await;
                }
                None => {
                    let reason = format!("{reason} (gave up after {attempt} attempts)");
                    let origin = rows.clone().map(|r| (id_token.clone(), r));
                    return self.give_up(chunk, &batch, &token, origin, &reason, delivered);
                }
            }
        }
    }

    /// A request that cannot be delivered now: its rows are staged (for `flumen resume`) and
    /// the sink counts as down, so the requests after it are staged without being tried; the
    /// statement goes on reading its input. With `on_failure` `fail`, in an all-or-nothing write
    /// and while `flumen resume` delivers staged parts, nothing is staged: the statement fails
    /// (the journal still holds the request as sent, so a resume of the run sends it again).
    fn give_up(
        &self,
        chunk: &Chunk,
        batch: &RecordBatch,
        token: &str,
        origin: Option<(String, Vec<u32>)>,
        reason: &str,
        delivered: u64,
    ) -> Result<u64> {
        self.failed(reason);
        self.down.store(true, Ordering::Relaxed);
        if self.state.resuming()
            || self.backend.all_or_nothing()
            || self.options.on_failure == OnFailure::Fail
        {
            return Err(self.failure_error(reason));
        }
        self.stage_rows_from(batch, token, origin, &chunk.token)?;
        self.state.journal().staged(&chunk.token)?;
        Ok(delivered)
    }

    fn failed(&self, reason: &str) {
        if let Ok(mut f) = self.last_failure.lock() {
            *f = Some(reason.to_string());
        }
    }

    fn failure_error(&self, reason: &str) -> Error {
        Error::Config(format!(
            "table {}: the sink refused a request: {reason}",
            self.table
        ))
    }

    /// Writes rows to staging under a delivery token and records them in the manifest.
    fn stage_rows(&self, batch: &RecordBatch, token: &str) -> Result<()> {
        self.stage_rows_from(batch, token, None, token)
    }

    /// Stages rows that are a subset of request `origin.0` (its rows `origin.1`), so that
    /// `flumen resume` sends them with the item ids they had.
    fn stage_rows_from(
        &self,
        batch: &RecordBatch,
        token: &str,
        origin: Option<(String, Vec<u32>)>,
        request: &str,
    ) -> Result<()> {
        let (path, file) = self.state.new_staging_file(&self.table);
        write_parquet(&path, batch)?;
        let rows = batch.num_rows() as u64;
        self.state.add_staged_part(
            &self.table,
            Part {
                file,
                rows,
                token: token.to_string(),
                delivered: false,
                origin,
                dropped: None,
                request: (request != token).then(|| request.to_string()),
            },
        )?;
        self.metrics.spilled(rows);
        self.staged_rows.fetch_add(rows, Ordering::Relaxed);
        self.staged_parts.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Writes refused rows with their reasons to the dead-letter directory.
    fn dead_letter(&self, batch: &RecordBatch, rejected: &[(usize, String)], attempts: u32) -> Result<()> {
        write_dead_letters(&self.state, &self.table, batch, rejected, attempts)?;
        let n = rejected.len();
        self.metrics.rejected(n as u64);
        self.rejected_rows.fetch_add(n as u64, Ordering::Relaxed);
        Ok(())
    }
}

/// Writes rows `rejected` of `batch` (index, reason) to `table`'s dead letters as one Parquet
/// part: the rows' columns, then `_error`, `_attempts` and `_at`.
pub(crate) fn write_dead_letters(
    state: &RunState,
    table: &str,
    batch: &RecordBatch,
    rejected: &[(usize, String)],
    attempts: u32,
) -> Result<()> {
    let idx = UInt64Array::from(rejected.iter().map(|(i, _)| *i as u64).collect::<Vec<_>>());
    let mut cols: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| arrow::compute::take(c, &idx, None))
        .collect::<std::result::Result<_, _>>()?;
    let n = rejected.len();
    let at = chrono::Utc::now().timestamp_micros();
    cols.push(Arc::new(StringArray::from_iter_values(
        rejected.iter().map(|(_, r)| r.as_str()),
    )));
    cols.push(Arc::new(UInt32Array::from(vec![attempts; n])));
    cols.push(Arc::new(
        TimestampMicrosecondArray::from(vec![at; n]).with_timezone("UTC"),
    ));
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new("_error", DataType::Utf8, false));
    fields.push(Field::new("_attempts", DataType::UInt32, false));
    fields.push(Field::new(
        "_at",
        DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        false,
    ));
    let out = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols)?;
    let path = state.new_dead_letter_file(table, "part");
    write_parquet(&path, &out)?;
    Ok(())
}

/// Writes one batch as a Parquet file, creating its directory. The file appears whole or not at
/// all: it is written under a hidden temporary name, then renamed.
pub(crate) fn write_parquet(path: &std::path::Path, batch: &RecordBatch) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    super::state::private_dir(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let file = super::state::private_file_options()
        .truncate(true)
        .open(&tmp)
        .map_err(|e| Error::io(format!("creating {}", tmp.display()), e))?;
    let mut w = ArrowWriter::try_new(file, batch.schema(), None)?;
    w.write(batch)?;
    w.close()?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// Rows waiting in the batcher, with where they came from (for the journal).
struct Piece {
    batch: RecordBatch,
    /// Fingerprint and occurrence of the input batch, and the first row's index in it.
    origin: Option<(u64, u32, u32)>,
}

/// Collects input rows into requests of `batch_rows` rows (or `batch_bytes` bytes).
struct Batcher {
    schema: SchemaRef,
    buf: VecDeque<Piece>,
    rows: usize,
    bytes: usize,
    since: Option<Instant>,
}

impl Batcher {
    fn push(&mut self, p: Piece) {
        self.rows += p.batch.num_rows();
        self.bytes += p.batch.get_array_memory_size();
        self.since.get_or_insert_with(Instant::now);
        self.buf.push_back(p);
    }

    fn full(&self, o: &SinkOptions) -> bool {
        self.rows >= o.batch_rows || self.bytes >= o.batch_bytes
    }

    /// Takes requests of exactly `batch_rows` rows, keeping the rest buffered; with `all`
    /// (end of input, linger, or the byte limit reached) the rest goes too.
    fn take(&mut self, o: &SinkOptions, all: bool) -> Result<Vec<(RecordBatch, Vec<Slice>)>> {
        let mut out = Vec::new();
        while self.rows >= o.batch_rows {
            out.push(self.take_rows(o.batch_rows)?);
        }
        if self.rows > 0 && (all || self.bytes >= o.batch_bytes) {
            out.push(self.take_rows(self.rows)?);
        }
        if self.rows == 0 {
            self.since = None;
        }
        Ok(out)
    }

    fn take_rows(&mut self, n: usize) -> Result<(RecordBatch, Vec<Slice>)> {
        let mut parts = Vec::new();
        let mut slices = Vec::new();
        let mut need = n;
        while need > 0 {
            let Some(front) = self.buf.front_mut() else { break };
            let k = front.batch.num_rows();
            let take = k.min(need);
            if let Some((hash, occ, start)) = front.origin {
                slices.push(Slice {
                    hash,
                    occ,
                    start,
                    len: take as u32,
                });
            }
            if take == k {
                if let Some(p) = self.buf.pop_front() {
                    parts.push(p.batch);
                }
            } else {
                parts.push(front.batch.slice(0, take));
                front.batch = front.batch.slice(take, k - take);
                if let Some((_, _, start)) = front.origin.as_mut() {
                    *start += take as u32;
                }
            }
            need -= take;
        }
        self.rows -= n - need;
        self.bytes = self.buf.iter().map(|p| p.batch.get_array_memory_size()).sum();
        let batch = match parts.len() {
            // One piece: no copy.
            1 => parts.swap_remove(0),
            _ => arrow::compute::concat_batches(&self.schema, &parts)?,
        };
        Ok((batch, slices))
    }
}

#[async_trait]
impl<B: SinkBackend> DataSink for BatchSink<B> {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(
        &self,
        mut data: SendableRecordBatchStream,
        context: &Arc<TaskContext>,
    ) -> DfResult<u64> {
        let state = context
            .session_config()
            .get_extension::<RunState>()
            .unwrap_or_else(|| Arc::new(RunState::new(".flumen", new_run_id(), false)));
        let metrics = state.metrics_for(&self.table);
        let key = format!("{}@l{}", self.table, state.statement());
        let effects = Effects::new(Arc::clone(&state), &self.table, state.statement());
        let mut replay = state.replay_for(&key);
        // Requests that were in flight when an earlier attempt died: accounted for if the
        // backend can tell they were applied, else sent again with their own token and rows.
        let mut resends = Resends::default();
        if let Some(r) = replay.as_mut() {
            // A request killed between staging its rows and journaling so: its part owns them.
            let staged = state.staged_tokens(&self.table)?;
            for (token, slices) in std::mem::take(&mut r.in_flight) {
                if staged.contains(&token) || self.backend.was_delivered(&token).await == Some(true) {
                    r.account(&slices);
                } else {
                    resends.add(token, slices);
                }
            }
        }
        let mut occurrences: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        // Occurrences of input batches with rule-breaking rows (before the rules filter them).
        let mut input_occurrences: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        if !state.resuming() {
            state.write_ledger(super::state::RunStatus::Running, None)?;
        }
        let shared = Arc::new(Shared {
            key,
            backend: Arc::clone(&self.backend),
            table: self.table.clone(),
            options: self.options.clone(),
            metrics,
            state: Arc::clone(&state),
            effects: effects.clone(),
            down: AtomicBool::new(false),
            staged_rows: AtomicU64::new(0),
            staged_parts: AtomicU64::new(0),
            rejected_rows: AtomicU64::new(0),
            last_failure: Mutex::new(None),
            allowed: AtomicU64::new(if self.backend.serial() {
                1
            } else {
                self.options.concurrency as u64
            }),
        });
        // A staged part goes whole, as one request, as it was staged: its token and its rows'
        // origin are the request's.
        let whole;
        let o = if state.resuming() {
            whole = SinkOptions {
                batch_rows: usize::MAX,
                batch_bytes: usize::MAX,
                linger: std::time::Duration::from_secs(24 * 3600),
                ..self.options.clone()
            };
            &whole
        } else {
            &self.options
        };
        let scope = state.scope();
        let mut batcher = Batcher {
            schema: data.schema(),
            buf: VecDeque::new(),
            rows: 0,
            bytes: 0,
            since: None,
        };
        let mut in_flight = FuturesUnordered::new();
        let mut seen = 0u64;
        let mut rules = super::validate::Rules::new(&self.table, &o.rules, &batcher.schema)?;
        let pipeline = async {
            let mut seq = 0u64;
            let mut delivered = 0u64;
            let mut done = false;
            while !done {
                // Wait for the next batch, but no longer than the linger time of what is buffered.
                let next = match batcher.since {
                    None => data.next().await,
                    Some(since) => {
                        let wait = o.linger.saturating_sub(since.elapsed());
                        match tokio::time::timeout(wait, data.next()).await {
                            Ok(next) => next,
                            // Lingered long enough: an empty batch makes the buffered rows go out now.
                            Err(_) => Some(Ok(RecordBatch::new_empty(Arc::clone(&batcher.schema)))),
                        }
                    }
                };
                let mut ready: Vec<Chunk> = Vec::new();
                let (flush, all) = match next {
                    Some(batch) => {
                        let batch = batch?;
                        let lingered = batcher.since.is_some_and(|s| s.elapsed() >= o.linger);
                        seen += batch.num_rows() as u64;
                        // Rows that break a validation rule go to dead letters, never to the backend;
                        // a replay does not write again those an earlier attempt wrote.
                        let batch = match rules.as_mut() {
                            Some(r) if batch.num_rows() > 0 => {
                                let (passed, broken) = r.check(&batch)?;
                                if !broken.rows.is_empty() {
                                    let input = fingerprint(&batch).map(|h| {
                                        let n = input_occurrences.entry(h).or_insert(0u32);
                                        *n += 1;
                                        (h, *n - 1)
                                    });
                                    let written = match (&replay, input) {
                                        (Some(r), Some((h, occ))) => r.rejections_written(h, occ),
                                        _ => false,
                                    };
                                    if !written {
                                        shared.dead_letter(&batch, &broken.rows, 0)?;
                                        for (rule, n) in &broken.by_rule {
                                            shared.metrics.rejected_by(rule, *n);
                                        }
                                        if let Some((h, occ)) =
                                            input.filter(|_| !self.backend.all_or_nothing())
                                        {
                                            state.journal().rejected(&shared.key, h, occ)?;
                                        }
                                    }
                                }
                                passed
                            }
                            _ => batch,
                        };
                        let rows = batch.num_rows();
                        match fingerprint(&batch).filter(|_| rows > 0) {
                            Some(hash) => {
                                let seen_before = occurrences.entry(hash).or_insert(0u32);
                                let occ = *seen_before;
                                *seen_before += 1;
                                // In a replay, only the rows no earlier attempt accounted for; the
                                // rows of requests in flight then are gathered to be sent as they were.
                                let ranges = match &replay {
                                    Some(r) => resends.take(&batch, hash, occ, r, &mut ready)?,
                                    None => vec![(0, rows as u32)],
                                };
                                for (start, len) in ranges {
                                    batcher.push(Piece {
                                        batch: batch.slice(start as usize, len as usize),
                                        origin: Some((hash, occ, start)),
                                    });
                                }
                            }
                            None if rows > 0 => batcher.push(Piece { batch, origin: None }),
                            None => {}
                        }
                        (batcher.full(o) || lingered, lingered)
                    }
                    None => {
                        done = true;
                        // Requests in flight before whose rows did not all come again (the
                        // statement's batches differ in this run): their rows go as new requests.
                        for piece in resends.leftovers(&self.table) {
                            batcher.push(piece);
                        }
                        (true, true)
                    }
                };
                if flush {
                    for (batch, slices) in batcher.take(o, all)? {
                        let token = if state.resuming() && seq == 0 {
                            scope.clone()
                        } else {
                            format!("{scope}/{seq}")
                        };
                        // A staged part goes as it was staged: its token, and where its rows came from.
                        let origin = if state.resuming() && seq == 0 {
                            state.origin()
                        } else {
                            None
                        };
                        seq += 1;
                        ready.push(Chunk {
                            batch,
                            token,
                            slices,
                            origin,
                        });
                    }
                }
                for chunk in ready {
                    while in_flight.len() >= shared.allowed() {
                        if let Some(r) = in_flight.next().await {
                            delivered += joined(r)?;
                        }
                    }
                    let task = tokio::spawn(Arc::clone(&shared).deliver(chunk));
                    in_flight.push(task);
                    if let super::options::RejectLimit::Count(_) = o.max_rejected {
                        self.check_rejected(&shared, seen)?;
                    }
                }
            }
            while let Some(r) = in_flight.next().await {
                delivered += joined(r)?;
            }
            Ok::<u64, Error>(delivered)
        }
        .await;
        // On an error, let the requests already in flight end (delivered or staged) before the
        // statement fails, so that no request is left half done behind the error.
        if pipeline.is_err() {
            while in_flight.next().await.is_some() {}
        }
        let checked = pipeline.and_then(|n| self.check_rejected(&shared, seen).map(|_| n));
        let staged = shared.staged_rows.load(Ordering::Relaxed);
        let finished = self
            .backend
            .finish(checked.is_ok() && staged == 0, &effects)
            .await;
        let delivered = checked?;
        if staged > 0 {
            // The rows are staged whatever the end of the write said (a sink that is down
            // cannot roll anything back either): the staged outcome is the one to act on.
            if let Err(e) = finished {
                tracing::warn!(table = %self.table, "ending the write: {e}");
            }
            let reason = shared
                .last_failure
                .lock()
                .ok()
                .and_then(|f| f.clone())
                .unwrap_or_default();
            return Err(Error::Staged {
                table: self.table.clone(),
                rows: staged,
                parts: shared.staged_parts.load(Ordering::Relaxed),
                reason,
                dir: state.staging_dir(&self.table),
                resume: resume_command(&state),
            }
            .into());
        }
        finished?;
        Ok(delivered)
    }
}

/// The command that continues a run: `flumen resume <run-id>`, with the state directory when
/// it is not the default one.
pub fn resume_command(state: &RunState) -> String {
    let dir = state.dir();
    if dir == std::path::Path::new(".flumen") {
        format!("flumen resume {}", state.run_id())
    } else {
        format!("flumen resume {} --state-dir {}", state.run_id(), dir.display())
    }
}

/// A request that was in flight when an earlier attempt died, gathered again from the replay's
/// input to be sent with its own token and rows.
struct Resend {
    token: String,
    slices: Vec<Slice>,
    pieces: Vec<Option<RecordBatch>>,
}

/// The requests to send again, by the input batches that hold their rows.
#[derive(Default)]
struct Resends {
    reqs: Vec<Option<Resend>>,
    by_input: std::collections::HashMap<(u64, u32), Vec<(usize, usize)>>,
}

impl Resends {
    fn add(&mut self, token: String, slices: Vec<Slice>) {
        let i = self.reqs.len();
        for (j, s) in slices.iter().enumerate() {
            self.by_input.entry((s.hash, s.occ)).or_default().push((i, j));
        }
        self.reqs.push(Some(Resend {
            token,
            pieces: vec![None; slices.len()],
            slices,
        }));
    }

    /// Takes the rows of requests in flight out of input batch (`hash`, `occ`), moving the
    /// requests they complete to `ready`; returns the row ranges left to send as new requests.
    fn take(
        &mut self,
        batch: &RecordBatch,
        hash: u64,
        occ: u32,
        replay: &SinkReplay,
        ready: &mut Vec<Chunk>,
    ) -> Result<Vec<(u32, u32)>> {
        let rows = batch.num_rows() as u32;
        let mut ranges = replay.remaining(hash, occ, rows);
        let Some(wanted) = self.by_input.remove(&(hash, occ)) else {
            return Ok(ranges);
        };
        for (i, j) in wanted {
            let Some(Some(req)) = self.reqs.get_mut(i) else {
                continue;
            };
            let s = req.slices[j];
            if s.start.saturating_add(s.len) > rows {
                continue;
            }
            req.pieces[j] = Some(batch.slice(s.start as usize, s.len as usize));
            ranges = subtract(&ranges, s.start, s.len);
            if req.pieces.iter().all(Option::is_some)
                && let Some(req) = self.reqs[i].take()
            {
                let parts: Vec<RecordBatch> = req.pieces.into_iter().flatten().collect();
                let batch = arrow::compute::concat_batches(&batch.schema(), &parts)?;
                ready.push(Chunk {
                    batch,
                    token: req.token,
                    slices: req.slices,
                    origin: None,
                });
            }
        }
        Ok(ranges)
    }

    /// The rows gathered for requests that could not be completed, as pieces for new requests.
    fn leftovers(&mut self, table: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut rows = 0;
        for req in self.reqs.drain(..).flatten() {
            for (s, p) in req.slices.iter().zip(req.pieces) {
                if let Some(batch) = p {
                    rows += batch.num_rows();
                    out.push(Piece {
                        batch,
                        origin: Some((s.hash, s.occ, s.start)),
                    });
                }
            }
        }
        if rows > 0 {
            tracing::warn!(
                table,
                "{rows} rows of requests in flight when the earlier attempt died came back in other batches: \
                 they are sent again under new tokens (a sink that cannot tell will hold them twice)"
            );
        }
        out
    }
}

/// `ranges` without rows `start..start+len`.
fn subtract(ranges: &[(u32, u32)], start: u32, len: u32) -> Vec<(u32, u32)> {
    let end = start + len;
    let mut out = Vec::new();
    for &(a, n) in ranges {
        let b = a + n;
        if b <= start || a >= end {
            out.push((a, n));
            continue;
        }
        if a < start {
            out.push((a, start - a));
        }
        if b > end {
            out.push((end, b - end));
        }
    }
    out
}

impl<B: SinkBackend> BatchSink<B> {
    fn check_rejected(&self, shared: &Shared<B>, seen: u64) -> Result<()> {
        let rejected = shared.rejected_rows.load(Ordering::Relaxed);
        if rejected > 0 && self.options.max_rejected.exceeded(rejected, seen) {
            return Err(Error::Config(format!(
                "table {}: {rejected} of {seen} rows were rejected, more than max_rejected ({}); \
                 the rejected rows and reasons are in {}",
                self.table,
                self.options.max_rejected,
                shared.state.dead_letter_dir(&self.table).display()
            )));
        }
        Ok(())
    }
}

fn joined(r: std::result::Result<Result<u64>, tokio::task::JoinError>) -> Result<u64> {
    match r {
        Ok(r) => r,
        Err(e) => Err(Error::Config(format!("a sink request task failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::subtract;

    #[test]
    fn cutting_row_ranges() {
        assert_eq!(subtract(&[(0, 10)], 3, 4), vec![(0, 3), (7, 3)]);
        assert_eq!(subtract(&[(0, 10)], 0, 10), vec![]);
        assert_eq!(subtract(&[(0, 5), (8, 4)], 4, 6), vec![(0, 4), (10, 2)]);
        assert_eq!(subtract(&[(5, 5)], 0, 2), vec![(5, 5)]);
    }
}
