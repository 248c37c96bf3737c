//! The small trait a backend implements to get batching, retries, staging and dead letters.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;

use super::state::RunState;
use crate::error::Result;

/// The side effects of one sink table in one run (its DDL, a table swap, a staging table): each
/// is recorded in the run's journal once done, and never done again by a replay or `flumen
/// resume` of the run.
#[derive(Debug, Clone)]
pub struct Effects {
    state: Arc<RunState>,
    table: String,
    line: usize,
}

impl Effects {
    /// The effects of sink `table`, written by the statement at `line`.
    pub fn new(state: Arc<RunState>, table: &str, line: usize) -> Self {
        Self {
            state,
            table: table.to_string(),
            line,
        }
    }

    /// Effects of a table outside any run (tests, tools).
    pub fn detached(table: &str) -> Self {
        Self::new(
            Arc::new(RunState::new(
                std::env::temp_dir().join("flumen-detached"),
                super::state::new_run_id(),
                false,
            )),
            table,
            0,
        )
    }

    fn key(&self, what: &str) -> String {
        format!("{}/{what}", self.table)
    }

    /// Whether `what` was done by this run.
    pub fn done(&self, what: &str) -> bool {
        self.state.effect_done(&self.key(what))
    }

    /// Records `what` as done (in the journal, before returning).
    pub fn record(&self, what: &str) -> Result<()> {
        self.state.record_effect(&self.key(what))
    }

    /// The run's id (names of per-run objects in the target, such as staging tables).
    pub fn run_id(&self) -> &str {
        self.state.run_id()
    }

    /// A short, stable tag of the run, for names with little room: 12 hex digits.
    pub fn run_tag(&self) -> String {
        format!(
            "{:012x}",
            xxhash_rust::xxh3::xxh3_64(self.run_id().as_bytes()) >> 16
        )
    }

    /// Whether the statement reads the same rows in a replay of the run (see
    /// [`RunState::input_repeatable`]): only then may a replay take a job an earlier attempt
    /// committed as this statement's.
    pub fn input_repeatable(&self) -> bool {
        self.state.input_repeatable()
    }

    /// A token for the whole statement, the same in every attempt of the run (a job's
    /// transaction records it, so a replay knows the job committed).
    pub fn statement_token(&self) -> String {
        format!("{}/l{}/job", self.run_id(), self.line)
    }
}

/// One attempt at sending a request.
#[derive(Debug)]
pub struct Attempt<'a> {
    /// The request's delivery token: the same on every attempt, in a replay and in `flumen
    /// resume`.
    pub token: &'a str,
    /// How long the attempt may take. The backend bounds the attempt by it and returns only
    /// once the attempt is settled: cancelled at the server, or known to have ended, so that
    /// the next attempt never runs beside it.
    pub timeout: Duration,
    /// 1 for the first attempt.
    pub number: u32,
    /// The table's side effects.
    pub effects: &'a Effects,
}

impl Attempt<'_> {
    /// Bounds a future that can be dropped without leaving work behind at the server (an
    /// HTTP or wire request whose repeat the server deduplicates by the token): no answer
    /// within the timeout is a retriable failure.
    pub async fn bounded(&self, send: impl std::future::Future<Output = Outcome>) -> Outcome {
        match tokio::time::timeout(self.timeout, send).await {
            Ok(o) => o,
            Err(_) => self.timed_out(),
        }
    }

    /// The outcome of an attempt that got no answer within the timeout.
    pub fn timed_out(&self) -> Outcome {
        Outcome::Retry {
            reason: format!("no answer within {:?}", self.timeout),
            after: None,
        }
    }
}

/// How one request went, as the backend classifies it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every row was accepted.
    Delivered,
    /// Some rows were refused and will never be accepted (bad value, per-item 4xx): they go to
    /// dead letters with the reason; `retry` rows failed transiently (per-item 429/5xx) and are
    /// sent again; every other row was accepted.
    Partial {
        /// Row index in the batch and the reason.
        rejected: Vec<(usize, String)>,
        /// Row indexes to send again.
        retry: Vec<usize>,
    },
    /// Nothing was accepted, but trying again may work (network, 5xx, 429, timeouts).
    Retry {
        /// Why, for logs and the final error.
        reason: String,
        /// How long the server asked us to wait (Retry-After).
        after: Option<Duration>,
    },
    /// Nothing was accepted and retrying cannot help (authentication, unknown table, schema).
    Fatal {
        /// Why.
        reason: String,
    },
}

/// A destination for record batches.
///
/// `encode` turns a batch into a request body once; `send` may be called several times with the
/// same request (retries), with the same token: a backend that can deduplicate by it (a delivery
/// table written in the request's transaction, an insert deduplication token, a document id)
/// makes retries, replays and `flumen resume` exactly-once.
///
/// Side effects (DDL, swaps) go through [`Attempt::effects`] so that they happen once per run;
/// none happens before the first request is sent, and [`SinkBackend::finish`] with `ok == false`
/// leaves the target as it was before the statement.
#[async_trait]
pub trait SinkBackend: Debug + Send + Sync + 'static {
    /// An encoded request.
    type Request: Send + Sync + 'static;

    /// The schema of the rows this backend accepts.
    fn schema(&self) -> SchemaRef;

    /// Encodes a batch (CPU only, no IO).
    fn encode(&self, batch: &RecordBatch) -> Result<Self::Request>;

    /// Encodes a batch knowing where its rows come from: `token` is the request's delivery
    /// token as first sent, and row `i` of `batch` is row `rows[i]` of that request (`None`: the
    /// same row). A backend whose items carry ids derives them from these, so that items sent
    /// again (a retry of only some of them, or `flumen resume`) keep their ids.
    fn encode_rows(&self, batch: &RecordBatch, _token: &str, _rows: Option<&[u32]>) -> Result<Self::Request> {
        self.encode(batch)
    }

    /// The size of an encoded request in bytes, for metrics.
    fn request_bytes(&self, request: &Self::Request) -> usize;

    /// What `explain` shows about the target: table, column types, statements run on the first
    /// write. Never a secret.
    fn describe(&self) -> String {
        String::new()
    }

    /// The write modes (`mode` option) this backend honours; declaring a table with another is
    /// an error at `CREATE EXTERNAL TABLE`.
    fn modes(&self) -> &'static [&'static str] {
        &["append"]
    }

    /// Whether requests must go one at a time. By default that is so for
    /// [`SinkBackend::all_or_nothing`] backends (one transaction is one connection); a backend
    /// whose statement is all or nothing by other means (writing to a staging table switched
    /// in at [`SinkBackend::finish`]) may send in parallel.
    fn serial(&self) -> bool {
        self.all_or_nothing()
    }

    /// Sends one request and classifies the response, within `attempt.timeout` (see
    /// [`Attempt`]).
    async fn send(&self, request: &Self::Request, attempt: &Attempt<'_>) -> Outcome;

    /// Whether the whole statement is one transaction: requests then go one at a time, nothing
    /// is staged or journaled (a failure rolls everything back, so a rerun starts over), and
    /// [`SinkBackend::finish`] commits or rolls back.
    fn all_or_nothing(&self) -> bool {
        false
    }

    /// Called once at the end of a statement's writes: `ok` when every request was delivered
    /// (commit), else after a failure (roll back, and leave the target as the statement found
    /// it: no DDL runs here then). Also where work owed to an empty input is done (an
    /// `overwrite` of zero rows still empties the table).
    async fn finish(&self, _ok: bool, _effects: &Effects) -> Result<()> {
        Ok(())
    }

    /// Whether a request with this token was applied, for requests that were in flight when a
    /// run died: `Some` if the backend can tell, `None` if not (they are then sent again).
    async fn was_delivered(&self, _token: &str) -> Option<bool> {
        None
    }
}
