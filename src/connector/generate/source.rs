//! The GENERATE table factory and provider.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::error::Result;
use datafusion::logical_expr::{CreateExternalTable, Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;

use super::exec::GenerateExec;

use crate::connector::options::{OptionSpec, TableOptions};
use crate::datagen::{Dataset, GenSpec, Nested};
use crate::error::Error;

const OPTIONS: &[OptionSpec] = &[
    OptionSpec::new("rows", "rows in the table (10k, 10M, ...); default 1M"),
    OptionSpec::new("seed", "seed of the generator; default 42"),
    OptionSpec::new(
        "users",
        "distinct user ids referenced by orders and events; default 1M",
    ),
    OptionSpec::new("nested", "events payload as 'struct' (default) or 'json' text"),
    OptionSpec::new(
        "partitions",
        "parallel partitions; default the session's target_partitions",
    ),
    OptionSpec::new("batch_rows", "rows per batch; default 8192"),
    OptionSpec::new(
        "rate",
        "rows per second, to pace the data like a live source (load tests, demos); default as fast as it goes",
    ),
];

/// Builds GENERATE tables from `CREATE EXTERNAL TABLE`.
#[derive(Debug, Default)]
pub struct GenerateFactory;

#[async_trait]
impl TableProviderFactory for GenerateFactory {
    async fn create(&self, state: &dyn Session, cmd: &CreateExternalTable) -> Result<Arc<dyn TableProvider>> {
        let table = cmd.name.to_string();
        let opts = TableOptions::parse("GENERATE", &table, &cmd.options, OPTIONS)?;
        let location = cmd.locations.first().map(String::as_str).unwrap_or_default();
        let dataset = Dataset::parse(location).map_err(|_| {
            Error::Option(format!(
                "table {table}: GENERATE LOCATION '{location}' is not a data set; use one of {}",
                Dataset::NAMES.join(", ")
            ))
        })?;
        let mut spec = GenSpec::new(dataset, opts.count_or("rows", 1_000_000)?);
        spec.seed = opts.parse_or("seed", spec.seed)?;
        spec.users = opts.count_or("users", spec.users)?;
        spec.nested = match opts.choice_or("nested", &["struct", "json"], "struct")? {
            "json" => Nested::JsonText,
            _ => Nested::Struct,
        };
        spec.batch_rows = opts
            .count_or("batch_rows", spec.batch_rows as u64)?
            .clamp(1, 1 << 20) as usize;
        let partitions = opts
            .count_or("partitions", state.config().target_partitions() as u64)?
            .clamp(1, 1024);
        if !cmd.schema.fields().is_empty() {
            return Err(Error::Option(format!(
                "table {table}: GENERATE tables have a fixed schema; remove the column list"
            ))
            .into());
        }
        let rate = match opts.get("rate") {
            None => None,
            Some(r) => Some(
                r.parse::<f64>()
                    .ok()
                    .filter(|r| r.is_finite() && *r > 0.0)
                    .ok_or_else(|| {
                        opts.bad_value("rate", r, "expected rows per second, a positive number")
                    })?,
            ),
        };
        Ok(Arc::new(GenerateTable {
            spec: Arc::new(spec),
            partitions: partitions as usize,
            rate,
        }))
    }
}

/// A GENERATE table: its data set spec and how many partitions a scan uses.
#[derive(Debug)]
struct GenerateTable {
    spec: Arc<GenSpec>,
    partitions: usize,
    rate: Option<f64>,
}

#[async_trait]
impl TableProvider for GenerateTable {
    fn schema(&self) -> SchemaRef {
        self.spec.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(
            GenerateExec::try_new(
                Arc::clone(&self.spec),
                projection.cloned(),
                self.partitions,
                limit,
            )?
            .with_rate(self.rate),
        ))
    }
}
