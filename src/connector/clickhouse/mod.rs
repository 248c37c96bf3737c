//! `STORED AS CLICKHOUSE`: write to ClickHouse over HTTP in its Native format.
//!
//! ```sql
//! CREATE EXTERNAL TABLE daily (day DATE, city VARCHAR, revenue DECIMAL(18,2)) STORED AS CLICKHOUSE
//!   LOCATION 'http://etl:${CH_PASSWORD}@127.0.0.1:8123/analytics'
//!   OPTIONS ('table' 'orders_daily', 'create' 'if_not_exists', 'order_by' 'day, city');
//! INSERT INTO daily SELECT ...;
//! ```
//!
//! The target's column types come from `system.columns` (parsed by [`types::ChType::parse`]);
//! every batch is encoded column by column into a Native block ([`native`]) and sent through the
//! shared sink machinery (batching, retries, staging, dead letters). Credentials travel in
//! headers, never in URLs or messages. A table flumen creates uses [`types::ChType::from_arrow`]'s
//! map (narrowed for servers before 20: no DateTime64, Date32, Bool or Map).
//!
//! Retries and `flumen resume` on ClickHouse 18.16: a request whose answer was lost (the server
//! died after committing it) is sent again, and 18.16 has no insert deduplication token for
//! MergeTree, so up to `concurrency × batch_rows` rows can be repeated (the test
//! `a_server_killed_mid_load_loses_nothing_after_resume` sees it: one 20k-row request, sometimes).
//! A ReplacingMergeTree keyed on the rows' id removes such repeats at merge time.
//!
//! Not yet: reading (`SELECT` from ClickHouse), compression, LowCardinality-specific encoding,
//! deduplication tokens on servers that have them.

pub mod client;
pub mod compress;
pub mod decode;
pub mod native;
mod sink;
pub mod source;
pub mod types;

pub use sink::ClickHouseFactory;
