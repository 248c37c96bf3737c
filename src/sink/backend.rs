//! The small trait a backend implements to get batching, retries, staging and dead letters.

use std::fmt::Debug;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;

use crate::error::Result;

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
/// same request (retries), with the same `token`: a backend that can deduplicate by it (an
/// insert deduplication token, a document id) makes retries and `flumen resume` exactly-once.
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

    /// Sends one request and classifies the response.
    async fn send(&self, request: &Self::Request, token: &str) -> Outcome;

    /// Whether the whole statement is one transaction: requests then go one at a time, nothing
    /// is staged or journaled (a failure rolls everything back, so a rerun starts over), and
    /// [`SinkBackend::finish`] commits or rolls back.
    fn all_or_nothing(&self) -> bool {
        false
    }

    /// Called once at the end of a statement's writes: `ok` when every request was delivered
    /// (commit), else after a failure (roll back). Also where work owed to an empty input is
    /// done (an `overwrite` of zero rows still empties the table).
    async fn finish(&self, _ok: bool) -> Result<()> {
        Ok(())
    }

    /// Whether a request with this token was applied, for requests that were in flight when a
    /// run died: `Some` if the backend can tell, `None` if not (they are then sent again).
    async fn was_delivered(&self, _token: &str) -> Option<bool> {
        None
    }
}
