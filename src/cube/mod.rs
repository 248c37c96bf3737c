//! Materialized views (and, to come, cubes): prototyped locally in SQL, kept in the warehouse.
//!
//! [`statement`] parses the statements DataFusion lacks; [`mv`] keeps the views.

pub mod mv;
pub mod statement;
