//! Materialized views and cubes: prototyped locally in SQL, kept in the warehouse.
//!
//! [`statement`] parses the statements DataFusion lacks; [`mv`] keeps the views; [`model`]
//! defines cubes and answers queries on them.

pub mod clickhouse;
pub mod model;
pub mod mv;
pub mod statement;
