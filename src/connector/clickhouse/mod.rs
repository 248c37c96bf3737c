//! ClickHouse: the columnar Arrow → Native encoder and the type map (the connector's table
//! factory, sink and reader build on these).
//!
//! Work in progress: the encoder and type parser are done and checked against ClickHouse itself
//! (chdb); `STORED AS CLICKHOUSE` is not registered yet.

pub mod native;
pub mod types;
