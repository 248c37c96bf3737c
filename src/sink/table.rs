//! A table that is both read and written: `SELECT` through a connector's [`ScanSource`],
//! `INSERT INTO` through the shared sink machinery ([`SinkTable`]).

use std::fmt::Debug;
use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;

use super::backend::SinkBackend;
use super::datasink::SinkTable;
use crate::error::Result;

/// How a connector reads its table.
#[async_trait]
pub trait ScanSource: Debug + Send + Sync + 'static {
    /// The table's columns.
    fn schema(&self) -> SchemaRef;

    /// Which filters the source applies exactly (they then leave DataFusion's plan).
    fn pushdown(&self, filters: &[&Expr]) -> Vec<TableProviderFilterPushDown>;

    /// The scan of the asked columns under the pushed filters and limit; `batch_rows` is the
    /// session's batch size.
    async fn scan(
        &self,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
        batch_rows: usize,
    ) -> Result<Arc<dyn ExecutionPlan>>;
}

/// A readable and writable connector table.
#[derive(Debug)]
pub struct SourceSinkTable<S: ScanSource, B: SinkBackend> {
    source: S,
    sink: SinkTable<B>,
}

impl<S: ScanSource, B: SinkBackend> SourceSinkTable<S, B> {
    pub fn new(source: S, sink: SinkTable<B>) -> Self {
        Self { source, sink }
    }
}

#[async_trait]
impl<S: ScanSource, B: SinkBackend> TableProvider for SourceSinkTable<S, B> {
    fn schema(&self) -> SchemaRef {
        self.source.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(self.source.pushdown(filters))
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let rows = state.config().batch_size();
        Ok(self.source.scan(projection, filters, limit, rows).await?)
    }

    async fn insert_into(
        &self,
        state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.sink.insert_into(state, input, insert_op).await
    }
}
