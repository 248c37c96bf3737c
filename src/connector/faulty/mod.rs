//! `STORED AS FAULTY`: a sink for tests that stores what it accepts as Parquet files in a local
//! directory and can be told to misbehave. Compiled only with the `test-backends` feature.
//!
//! ```sql
//! CREATE EXTERNAL TABLE t (id BIGINT, v VARCHAR) STORED AS FAULTY LOCATION '/tmp/sink'
//!   OPTIONS ('fail_ratio' '0.3', 'reject_every' '100', 'max_attempts' '20');
//! ```
//!
//! Each accepted request becomes `LOCATION/<token>.parquet`; a request sent again with the same
//! token replaces its file, so the backend deduplicates by token like a real idempotent sink.

mod backend;

pub use backend::FaultyFactory;
