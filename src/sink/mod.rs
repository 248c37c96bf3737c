//! What every sink shares: batching, concurrency, retries with backoff, Parquet staging when a
//! sink is down, dead letters for rejected rows, per-sink metrics and the run's state on disk.
//!
//! A backend implements [`SinkBackend`] (encode a batch, send it, classify the outcome);
//! [`SinkTable`] turns it into a table whose `INSERT INTO` runs through [`BatchSink`], the one
//! DataFusion `DataSink` that drives every backend:
//!
//! ```text
//! input batches ─> batcher (batch_rows / batch_bytes / linger) ─> encode ─> send, `concurrency` in flight
//!     ok ─> delivered          retry ─> backoff (full jitter, Retry-After) ─> send again
//!     rows rejected ─> dead letters (+ max_rejected)     retries exhausted / fatal ─> staging (on_failure = spill)
//! ```

mod backend;
mod datasink;
mod journal;
mod metrics;
mod options;
mod retry;
pub(crate) mod state;
mod table;
mod validate;

pub use backend::{Attempt, Effects, Outcome, SinkBackend};
// Shared with the broker sources' dead letters and the FAULTY test backend.
pub use datasink::resume_command;
pub(crate) use datasink::write_dead_letters;
pub(crate) use datasink::write_parquet;
pub use datasink::{BatchSink, SinkTable};
pub use journal::{FINGERPRINT, JOURNAL_FORMAT, Replay, SinkReplay, Slice, fingerprint};
pub use metrics::{SinkMetrics, SinkMetricsSnapshot, prometheus};
pub use options::{OnFailure, RejectLimit, SINK_OPTIONS, SinkOptions, WriteMode, parse_duration};
pub use retry::Backoff;
pub use state::{
    Manifest, Part, RunLedger, RunState, RunStatus, list_runs, mark_delivered, new_run_id, read_json,
    run_is_locked, run_manifests, staged_rows,
};
pub(crate) use state::{private_dir, safe_name};
pub use table::{ScanSource, SourceSinkTable};
pub use validate::{RuleOptions, Rules};
