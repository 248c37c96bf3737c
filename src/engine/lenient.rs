//! CSV values that do not fit their column become rejections, not failed reads. arrow-csv
//! fails the whole read at the first value it cannot parse, such as `abc` in a BIGINT column,
//! so flumen reads a CSV table's typed columns as text and casts them itself. A row with a
//! value that does not cast goes to the table's dead letters
//! (`<state>/dead_letter/<run>/<table>/`): its columns as text, and `_error` naming the column
//! and the value. It is counted in the summary as `source <table>: N rows rejected`. The other
//! rows go on. `OPTIONS ('strict' 'true')` keeps arrow-csv's typed reader, and its first bad
//! value fails the read.
//!
//! An empty field is NULL, as in the typed reader. Only the columns a query reads are cast, so
//! a bad value in a column the query does not use does not reject its row.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::listing::{ListingTable, ListingTableConfig};
use datafusion::error::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::sink::RunState;

/// The text type a typed column is read as.
fn is_text(t: &DataType) -> bool {
    matches!(t, DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8)
}

/// A CSV table whose typed columns are read as text and cast by flumen.
#[derive(Debug)]
pub struct LenientTable {
    name: String,
    /// The same files with every typed column as text.
    text: Arc<dyn TableProvider>,
    /// The table as declared (or inferred); writes go to it.
    typed: Arc<dyn TableProvider>,
    schema: SchemaRef,
}

impl LenientTable {
    /// `None` when every column is text already (nothing can fail to cast). `by_time`: the
    /// text table also gets the files' modification time ([`super::modified`]).
    pub fn wrap(
        name: &str,
        typed: Arc<dyn TableProvider>,
        listing: &ListingTable,
        by_time: bool,
    ) -> Result<Option<Self>> {
        let mut schema = typed.schema();
        if schema.fields().iter().all(|f| is_text(f.data_type())) {
            return Ok(None);
        }
        let text_fields: Vec<Field> = schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), DataType::Utf8, true))
            .collect();
        let config = ListingTableConfig::new_with_multi_paths(listing.table_paths().clone())
            .with_listing_options(listing.options().clone())
            .with_schema(Arc::new(Schema::new(text_fields)));
        let text = Arc::new(
            ListingTable::try_new(config)
                .map_err(|e| Error::Config(format!("table {name}: reading its columns as text: {e}")))?,
        );
        let text: Arc<dyn TableProvider> = if by_time {
            let t = super::modified::ModifiedTable::wrap(name, text)?;
            let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
            fields.extend(t.schema().fields().iter().last().cloned());
            schema = Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone()));
            Arc::new(t)
        } else {
            text
        };
        Ok(Some(Self {
            name: name.to_string(),
            text,
            typed,
            schema,
        }))
    }
}

#[async_trait]
impl TableProvider for LenientTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Filters and limits apply after the cast (a rejected row must not count toward a limit).
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = self.text.scan(state, projection, &[], None).await?;
        let schema = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        Ok(Arc::new(CoerceExec::new(self.name.clone(), input, schema)))
    }

    async fn insert_into(
        &self,
        state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.typed.insert_into(state, input, insert_op).await
    }
}

/// Casts text columns to their types; rows with a value that does not cast go to dead letters.
#[derive(Debug)]
struct CoerceExec {
    table: String,
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    properties: Arc<PlanProperties>,
}

impl CoerceExec {
    fn new(table: String, input: Arc<dyn ExecutionPlan>, schema: SchemaRef) -> Self {
        let input_props = input.properties();
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            input_props.output_partitioning().clone(),
            input_props.emission_type,
            input_props.boundedness,
        ));
        Self {
            table,
            input,
            schema,
            properties,
        }
    }
}

impl DisplayAs for CoerceExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CoerceExec: table={}, text cast to the columns' types, rows that do not fit to dead letters",
            self.table
        )
    }
}

impl ExecutionPlan for CoerceExec {
    fn name(&self) -> &'static str {
        "CoerceExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = children.into_iter().next().ok_or_else(|| {
            datafusion::error::DataFusionError::Internal("CoerceExec takes one input".into())
        })?;
        Ok(Arc::new(CoerceExec::new(
            self.table.clone(),
            input,
            Arc::clone(&self.schema),
        )))
    }

    fn execute(&self, partition: usize, ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let state = ctx
            .session_config()
            .get_extension::<RunState>()
            .unwrap_or_else(|| Arc::new(RunState::new(".flumen", crate::sink::new_run_id(), false)));
        let input = self.input.execute(partition, ctx)?;
        let schema = Arc::clone(&self.schema);
        let table = self.table.clone();
        let out = input.map(move |batch| {
            let batch = batch?;
            coerce(&table, &state, &batch, &schema).map_err(Into::into)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            out,
        )))
    }
}

/// The metrics key of a source table's rejections (the summary prints it as `source <table>`).
pub fn metrics_key(table: &str) -> String {
    format!("source {table}")
}

/// One batch cast to `schema`; rows with a value that does not fit are dead-lettered.
fn coerce(table: &str, state: &RunState, batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    let n = batch.num_rows();
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    // The first column at fault of each row.
    let mut fault: Vec<Option<usize>> = vec![None; n];
    let mut any = false;
    let options = CastOptions {
        safe: true,
        ..Default::default()
    };
    for (i, (field, text)) in schema.fields().iter().zip(batch.columns()).enumerate() {
        if text.data_type() == field.data_type() {
            cols.push(Arc::clone(text));
            continue;
        }
        let cast = cast_with_options(text, field.data_type(), &options)?;
        if cast.null_count() > text.null_count() {
            for (r, f) in fault.iter_mut().enumerate() {
                if f.is_none() && cast.is_null(r) && text.is_valid(r) {
                    *f = Some(i);
                    any = true;
                }
            }
        }
        cols.push(cast);
    }
    let out = RecordBatch::try_new(Arc::clone(schema), cols)?;
    if !any {
        return Ok(out);
    }
    let rejected: Vec<(usize, String)> = fault
        .iter()
        .enumerate()
        .filter_map(|(r, f)| {
            let i = (*f)?;
            let value = arrow::util::display::array_value_to_string(batch.column(i), r).unwrap_or_default();
            let field = schema.field(i);
            Some((
                r,
                format!(
                    "column {}: '{}' is not a {}",
                    field.name(),
                    value.chars().take(200).collect::<String>(),
                    field.data_type()
                ),
            ))
        })
        .collect();
    crate::sink::write_dead_letters(state, table, batch, &rejected, 0)?;
    let metrics = state.metrics_for(&metrics_key(table));
    metrics.rejected(rejected.len() as u64);
    metrics.rejected_by("type", rejected.len() as u64);
    let keep = BooleanArray::from(fault.iter().map(Option::is_none).collect::<Vec<_>>());
    Ok(arrow::compute::filter_record_batch(&out, &keep)?)
}
