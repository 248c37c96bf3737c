//! `STORED AS CLICKHOUSE`: read and write ClickHouse over HTTP in its Native format.
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
//! `SELECT` reads through [`source`]: columns, exact filters and LIMIT pushed into one query
//! per partition, Native decoded by [`decode`] as it streams. [`compress`] is ClickHouse's own
//! LZ4/ZSTD framing. Duplicates on retry: see the README's ClickHouse section (tokens on 22.2+,
//! none on 18.16).

pub mod client;
pub mod compress;
pub mod decode;
pub mod native;
mod sink;
pub mod source;
pub mod types;

pub use sink::ClickHouseFactory;
