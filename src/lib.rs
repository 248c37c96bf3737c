//! flumen: a SQL-first, columnar ETL engine on Apache Arrow and Apache DataFusion.
//!
//! A job is a SQL script. Sources are tables (`CREATE EXTERNAL TABLE ... STORED AS ...`), reading
//! is `SELECT`, writing is `INSERT INTO` or `COPY ... TO`. [`Flumen`] runs such scripts:
//!
//! ```no_run
//! # async fn demo() -> flumen::Result<()> {
//! let engine = flumen::Flumen::new(flumen::Config::default())?;
//! let batches = engine.sql("SELECT 1 + 1 AS two").await?;
//! # Ok(()) }
//! ```

#[cfg(feature = "cluster")]
pub mod cluster;
pub mod connector;
pub mod cube;
pub mod datagen;
pub mod engine;
pub mod error;
pub mod output;
pub mod progress;
pub mod sink;

pub use engine::{Config, Flumen, Mode, RunOptions};
pub use error::{Error, Result};
