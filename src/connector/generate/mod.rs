//! `STORED AS GENERATE`: a source of deterministic, realistic rows, generated in parallel.
//!
//! ```sql
//! CREATE EXTERNAL TABLE orders STORED AS GENERATE LOCATION 'orders'
//!   OPTIONS ('rows' '10M', 'seed' '42', 'users' '1M');
//! ```
//!
//! `LOCATION` names the data set (`users`, `orders`, `events`; see [`crate::datagen`]). The table is
//! read-only. It is how benchmarks and bounded-memory tests get large inputs without files.

mod exec;
mod source;

pub use source::GenerateFactory;
