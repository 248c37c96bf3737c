//! A new connector plugs in with one registry line and is reachable from
//! `CREATE EXTERNAL TABLE`, `SELECT` and `INSERT INTO`.

use std::sync::Arc;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{Int64Type, UInt64Type};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::datasource::MemTable;
use datafusion::logical_expr::CreateExternalTable;
use flumen::connector::Registry;
use flumen::connector::options::{OptionSpec, TableOptions};
use flumen::{Config, Flumen};

/// An in-memory table with one option, `rows_hint`, validated by the shared helper.
#[derive(Debug)]
struct MemoryFactory;

#[async_trait]
impl TableProviderFactory for MemoryFactory {
    async fn create(
        &self,
        _state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> datafusion::error::Result<Arc<dyn TableProvider>> {
        let opts = TableOptions::parse(
            "TESTMEM",
            &cmd.name.to_string(),
            &cmd.options,
            &[OptionSpec::new("rows_hint", "expected rows")],
        )?;
        opts.count_or("rows_hint", 0)?;
        let schema = Arc::new(cmd.schema.as_arrow().clone());
        Ok(Arc::new(MemTable::try_new(schema, vec![vec![]])?))
    }
}

fn engine() -> Flumen {
    let mut registry = Registry::builtin();
    registry.register("TESTMEM", Arc::new(MemoryFactory)); // the one line
    Flumen::new(Config {
        registry: Some(registry),
        ..Config::default()
    })
    .unwrap()
}

fn first_u64(b: &[RecordBatch]) -> u64 {
    b[0].column(0).as_primitive::<UInt64Type>().value(0)
}

#[tokio::test]
async fn plugged_in_factory_serves_create_insert_and_select() {
    let f = engine();
    f.sql("CREATE EXTERNAL TABLE t (id BIGINT, name VARCHAR) STORED AS testmem LOCATION 'mem' OPTIONS ('rows_hint' '10')")
        .await
        .unwrap();
    let inserted = f
        .sql(&format!(
            "INSERT INTO t SELECT user_id, name FROM '{}/data/users.csv' WHERE user_id <= 25",
            env!("CARGO_MANIFEST_DIR")
        ))
        .await
        .unwrap();
    assert_eq!(first_u64(&inserted.batches), 25);
    let out = f.sql("SELECT sum(id) FROM t").await.unwrap();
    assert_eq!(
        out.batches[0].column(0).as_primitive::<Int64Type>().value(0),
        (1..=25).sum::<i64>()
    );
}

#[tokio::test]
async fn plugged_in_factory_options_are_validated() {
    let f = engine();
    let err = f
        .sql("CREATE EXTERNAL TABLE t (id BIGINT) STORED AS TESTMEM LOCATION 'mem' OPTIONS ('row_hint' '10')")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unknown TESTMEM option 'row_hint' (did you mean 'rows_hint'?)"),
        "{err}"
    );
}

#[tokio::test]
async fn without_the_line_the_name_is_unknown() {
    let f = Flumen::new(Config::default()).unwrap();
    let err = f
        .sql("CREATE EXTERNAL TABLE t (id BIGINT) STORED AS TESTMEM LOCATION 'mem'")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown STORED AS name 'TESTMEM'"), "{err}");
}
