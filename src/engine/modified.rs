//! Files read incrementally by modification time: a file table declared with
//! `OPTIONS ('incremental_column' '_modified')` gets a column `_modified` (TIMESTAMP, UTC) holding
//! each row's file's last modification time, as the object store reports it. A bound
//! `_modified > t` (the watermark) is answered by listing: files modified at or before `t` are
//! never opened. The watermark machinery (`super::incremental`) then works as for any column.
//!
//! Files are listed once per scan (their metadata only). A file rewritten in place gets a newer
//! time and is read again whole; make the target an upsert if files are rewritten. Hive-style
//! partition directories are not supported together with `_modified`.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::listing::{ListingTable, PartitionedFile};
use datafusion::datasource::physical_plan::{FileGroup, FileScanConfigBuilder};
use datafusion::datasource::table_schema::TableSchema;
use datafusion::error::Result as DfResult;
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown, TableType};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::empty::EmptyExec;
use futures::TryStreamExt;

use crate::error::{Error, Result};

/// The column's name.
pub const COLUMN: &str = "_modified";

fn utc() -> Option<Arc<str>> {
    Some("UTC".into())
}

/// A file table with its files' modification time as a column.
#[derive(Debug)]
pub struct ModifiedTable {
    inner: Arc<ListingTable>,
    schema: SchemaRef,
}

impl ModifiedTable {
    /// Wraps a file table `name`; an error if it already has a `_modified` column or has
    /// partition directories.
    pub fn wrap(name: &str, inner: Arc<ListingTable>) -> Result<Self> {
        let schema = inner.schema();
        if schema.field_with_name(COLUMN).is_ok() {
            return Err(Error::Option(format!(
                "table {name}: 'incremental_column' '{COLUMN}' adds the files' modification time as column {COLUMN}, and the files already have a column of that name"
            )));
        }
        if !inner.options().table_partition_cols.is_empty() {
            return Err(Error::Option(format!(
                "table {name}: 'incremental_column' '{COLUMN}' does not work with PARTITIONED BY directories"
            )));
        }
        let mut fields: Vec<Arc<Field>> = schema.fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(
            COLUMN,
            DataType::Timestamp(TimeUnit::Microsecond, utc()),
            false,
        )));
        Ok(Self {
            inner,
            schema: Arc::new(Schema::new_with_metadata(fields, schema.metadata().clone())),
        })
    }

    /// The lowest modification time a file must be past (microseconds, and whether equal
    /// passes), from filters `_modified > t` / `_modified >= t`.
    fn lower_bound(filters: &[Expr]) -> Option<(i64, bool)> {
        let mut best: Option<(i64, bool)> = None;
        for f in filters {
            let Some((micros, inclusive)) = bound_of(f) else {
                continue;
            };
            let tighter = match best {
                None => true,
                Some((b, inc)) => micros > b || (micros == b && inc && !inclusive),
            };
            if tighter {
                best = Some((micros, inclusive));
            }
        }
        best
    }
}

/// `_modified > lit` or `_modified >= lit` (either side), as microseconds.
fn bound_of(e: &Expr) -> Option<(i64, bool)> {
    let Expr::BinaryExpr(b) = e else {
        return None;
    };
    let is_col = |e: &Expr| matches!(e, Expr::Column(c) if c.name == COLUMN);
    let (value, op) = match (&*b.left, &*b.right) {
        (l, Expr::Literal(v, _)) if is_col(l) => (v, b.op),
        (Expr::Literal(v, _), r) if is_col(r) => (v, b.op.swap()?),
        _ => return None,
    };
    let inclusive = match op {
        Operator::Gt => false,
        Operator::GtEq => true,
        _ => return None,
    };
    match value
        .cast_to(&DataType::Timestamp(TimeUnit::Microsecond, utc()))
        .ok()?
    {
        ScalarValue::TimestampMicrosecond(Some(v), _) => Some((v, inclusive)),
        _ => None,
    }
}

#[async_trait]
impl TableProvider for ModifiedTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    /// Bounds on `_modified` prune files (and are checked again above); other filters are
    /// applied above the scan.
    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|f| {
                if bound_of(f).is_some() {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let low = Self::lower_bound(filters);
        let options = self.inner.options();
        let mut files: Vec<PartitionedFile> = Vec::new();
        for url in self.inner.table_paths() {
            let store = state.runtime_env().object_store(url)?;
            let listed: Vec<_> = url
                .list_all_files(state, store.as_ref(), &options.file_extension)
                .await?
                .try_collect()
                .await?;
            for meta in listed {
                let t = meta.last_modified.timestamp_micros();
                let wanted = match low {
                    None => true,
                    Some((b, true)) => t >= b,
                    Some((b, false)) => t > b,
                };
                if wanted {
                    files.push(
                        PartitionedFile::from(meta)
                            .with_partition_values(vec![ScalarValue::TimestampMicrosecond(Some(t), utc())]),
                    );
                }
            }
        }
        files.sort_by(|a, b| a.object_meta.location.cmp(&b.object_meta.location));
        let projected = match projection {
            Some(p) => Arc::new(self.schema.project(p)?),
            None => Arc::clone(&self.schema),
        };
        let Some(url) = self.inner.table_paths().first().filter(|_| !files.is_empty()) else {
            return Ok(Arc::new(EmptyExec::new(projected)));
        };
        // As many groups as the session's target partitions, files dealt round-robin.
        let n = state.config().target_partitions().max(1).min(files.len());
        let mut groups: Vec<Vec<PartitionedFile>> = (0..n).map(|_| Vec::new()).collect();
        for (i, f) in files.into_iter().enumerate() {
            groups[i % n].push(f);
        }
        let table_schema = TableSchema::builder(self.inner.schema())
            .with_table_partition_cols(vec![Arc::clone(
                &self.schema.fields()[self.schema.fields().len() - 1],
            )])
            .build();
        let source = options.format.file_source(table_schema);
        let config = FileScanConfigBuilder::new(url.object_store(), source)
            .with_file_groups(groups.into_iter().map(FileGroup::new).collect())
            .with_projection_indices(projection.cloned())?
            .with_limit(limit)
            .build();
        options.format.create_physical_plan(state, config).await
    }
}
