//! Reading a table or a query: `SELECT` becomes SQL with only the columns asked for, the filters
//! the database evaluates like DataFusion, and the LIMIT; rows come through ConnectorX.
//!
//! With `partition_on` (an integer column) the key range — `partition_range`, or one
//! `SELECT MIN, MAX` — is split into `partitions` ranges read in parallel, and each range into
//! chunks of `chunk_keys` key values read one after another: one chunk's rows are the most a
//! partition holds in memory (ConnectorX's own channel is unbounded). Rows whose key is NULL are
//! read by the first partition. Without `partition_on` the query is read as one stream.

use std::sync::Arc;

use arrow::array::{Array, RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, SchemaRef};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown, expr::InList};
use datafusion::physical_plan::ExecutionPlan;

use super::cx::{self, Conn};
use super::dialect::Dialect;
use crate::connector::scan::{BatchSender, Producer, StreamScanExec};
use crate::error::{Error, Result};
use crate::sink::ScanSource;

/// What reading needs.
#[derive(Debug, Clone)]
pub struct SqlReader {
    pub dialect: Dialect,
    pub conn: Conn,
    /// The table's name in flumen, for messages.
    pub name: String,
    /// What follows FROM: a quoted table, or `(query) AS flumen_q`.
    pub from: String,
    pub schema: SchemaRef,
    pub partition_on: Option<String>,
    pub partitions: usize,
    pub partition_range: Option<(i64, i64)>,
    pub chunk_keys: u64,
}

#[async_trait::async_trait]
impl ScanSource for SqlReader {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn pushdown(&self, filters: &[&Expr]) -> Vec<TableProviderFilterPushDown> {
        filters
            .iter()
            .map(|f| match self.to_sql(f) {
                Some((_, true)) => TableProviderFilterPushDown::Exact,
                Some((_, false)) => TableProviderFilterPushDown::Inexact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect()
    }

    async fn scan(
        &self,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
        batch_rows: usize,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&indices)?);
        let d = self.dialect;
        let select = if indices.is_empty() {
            "1".to_string()
        } else {
            schema
                .fields()
                .iter()
                .map(|f| d.ident(f.name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let conds: Vec<String> = filters
            .iter()
            .filter_map(|f| self.to_sql(f).map(|(s, _)| s))
            .collect();
        let query = |extra: Option<String>| {
            let all: Vec<&str> = conds.iter().map(String::as_str).chain(extra.as_deref()).collect();
            let mut q = format!("SELECT {select} FROM {}", self.from);
            if !all.is_empty() {
                q.push_str(" WHERE ");
                q.push_str(&all.join(" AND "));
            }
            if let Some(n) = limit {
                q.push_str(&d.limit(n));
            }
            q
        };
        let parts: Vec<Vec<String>> = match (&self.partition_on, limit) {
            (Some(col), None) => {
                let c = d.ident(col);
                let range = match self.partition_range {
                    Some(r) => Some(r),
                    None => self.min_max(&c, &conds).await?,
                };
                match range {
                    None => vec![vec![query(None)]],
                    Some((lo, hi)) => split(lo, hi, self.partitions, self.chunk_keys)
                        .into_iter()
                        .enumerate()
                        .map(|(i, chunks)| {
                            let mut qs: Vec<String> = chunks
                                .into_iter()
                                .map(|(a, b)| query(Some(format!("{c} BETWEEN {a} AND {b}"))))
                                .collect();
                            if i == 0 {
                                qs.push(query(Some(format!("{c} IS NULL"))));
                                // Keys outside a given `partition_range` are read too.
                                if self.partition_range.is_some() {
                                    qs.push(query(Some(format!("({c} < {lo} OR {c} > {hi})"))));
                                }
                            }
                            qs
                        })
                        .collect(),
                }
            }
            _ => vec![vec![query(None)]],
        };
        Ok(Arc::new(scan_exec(
            self.clone(),
            schema,
            parts,
            batch_rows.max(1),
        )))
    }
}

/// `[lo, hi]` as `n` ranges, each as chunks of at most `chunk` keys (inclusive bounds).
fn split(lo: i64, hi: i64, n: usize, chunk: u64) -> Vec<Vec<(i64, i64)>> {
    let (lo, hi) = (i128::from(lo), i128::from(hi.max(lo)));
    let total = hi - lo + 1;
    let n = (n.max(1) as i128).min(total);
    let step = (total + n - 1) / n;
    let chunk = i128::from(chunk.max(1));
    (0..n)
        .map(|i| {
            let a = lo + i * step;
            let b = (a + step - 1).min(hi);
            let mut out = Vec::new();
            let mut s = a;
            while s <= b {
                let e = (s + chunk - 1).min(b);
                out.push((s as i64, e as i64));
                s = e + 1;
            }
            out
        })
        .filter(|c| !c.is_empty())
        .collect()
}

impl SqlReader {
    /// MIN and MAX of the partition column under the filters (one row).
    async fn min_max(&self, col: &str, conds: &[String]) -> Result<Option<(i64, i64)>> {
        let mut q = format!("SELECT MIN({col}), MAX({col}) FROM {}", self.from);
        if !conds.is_empty() {
            q.push_str(" WHERE ");
            q.push_str(&conds.join(" AND "));
        }
        let conn = self.conn.clone();
        let name = self.name.clone();
        let batches = tokio::task::spawn_blocking(move || {
            let out = Arc::new(std::sync::Mutex::new(Vec::new()));
            let sink = Arc::clone(&out);
            cx::read(&conn, q, 16, move |b| sink.lock().map(|mut v| v.push(b)).is_ok())?;
            let v = std::mem::take(&mut *out.lock().map_err(|_| Error::Config("reader state".into()))?);
            Ok::<_, Error>(v)
        })
        .await
        .map_err(|e| Error::Config(format!("table {name}: {e}")))?
        .map_err(|e| Error::Config(format!("table {}: finding the range of {col}: {e}", self.name)))?;
        let Some(b) = batches.into_iter().find(|b| b.num_rows() > 0) else {
            return Ok(None);
        };
        let int = |i: usize| -> Result<Option<i64>> {
            let c = arrow::compute::cast(b.column(i), &DataType::Int64).map_err(|_| {
                Error::Option(format!(
                    "table {}: 'partition_on' {col} is {}, not an integer column",
                    self.name,
                    b.column(i).data_type()
                ))
            })?;
            let c = c.as_any().downcast_ref::<arrow::array::Int64Array>();
            Ok(c.and_then(|c| c.is_valid(0).then(|| c.value(0))))
        };
        Ok(match (int(0)?, int(1)?) {
            (Some(lo), Some(hi)) => Some((lo, hi)),
            _ => None,
        })
    }

    /// A filter as SQL: `(sql, exact)`; `None` when the database would not evaluate it as
    /// DataFusion does.
    fn to_sql(&self, e: &Expr) -> Option<(String, bool)> {
        let d = self.dialect;
        let column = |e: &Expr| match e {
            Expr::Column(c) => self
                .schema
                .field_with_name(&c.name)
                .ok()
                .map(|f| (d.ident(&c.name), f.data_type().clone())),
            _ => None,
        };
        match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
                Operator::And => {
                    let (l, le) = self.to_sql(left)?;
                    let (r, re) = self.to_sql(right)?;
                    Some((format!("({l} AND {r})"), le && re))
                }
                Operator::Or => {
                    let (l, le) = self.to_sql(left)?;
                    let (r, re) = self.to_sql(right)?;
                    Some((format!("({l} OR {r})"), le && re))
                }
                _ => {
                    let (col, value, op) = match (left.as_ref(), right.as_ref()) {
                        (c @ Expr::Column(_), Expr::Literal(v, _)) => (c, v, *op),
                        (Expr::Literal(v, _), c @ Expr::Column(_)) => (c, v, op.swap()?),
                        _ => return None,
                    };
                    let (name, ty) = column(col)?;
                    let sym = match op {
                        Operator::Eq => "=",
                        Operator::NotEq => "<>",
                        Operator::Lt => "<",
                        Operator::LtEq => "<=",
                        Operator::Gt => ">",
                        Operator::GtEq => ">=",
                        _ => return None,
                    };
                    let (lit, exact) = d.literal(&ty, value, matches!(op, Operator::Eq | Operator::NotEq))?;
                    if op == Operator::NotEq && !exact {
                        return None;
                    }
                    Some((format!("{name} {sym} {lit}"), exact))
                }
            },
            Expr::Not(inner) => match self.to_sql(inner)? {
                (s, true) => Some((format!("NOT ({s})"), true)),
                _ => None,
            },
            Expr::IsNull(inner) => column(inner).map(|(n, _)| (format!("{n} IS NULL"), true)),
            Expr::IsNotNull(inner) => column(inner).map(|(n, _)| (format!("{n} IS NOT NULL"), true)),
            Expr::InList(InList { expr, list, negated }) => {
                let (name, ty) = column(expr)?;
                let mut exact = true;
                let mut values = Vec::new();
                for i in list {
                    let Expr::Literal(v, _) = i else { return None };
                    let (lit, e) = d.literal(&ty, v, true)?;
                    exact &= e;
                    values.push(lit);
                }
                if values.is_empty() || (*negated && !exact) {
                    return None;
                }
                let not = if *negated { "NOT " } else { "" };
                Some((format!("{name} {not}IN ({})", values.join(", ")), exact))
            }
            _ => None,
        }
    }
}

/// The scan: one partition per key range, each reading its queries (chunks) one after another
/// on a blocking thread (ConnectorX is synchronous), into the shared bounded channel.
fn scan_exec(
    reader: SqlReader,
    schema: SchemaRef,
    parts: Vec<Vec<String>>,
    batch_rows: usize,
) -> StreamScanExec {
    let chunks: usize = parts.iter().map(Vec::len).sum();
    let label = format!(
        "table={}, partitions={}, queries={chunks}, sql={}",
        reader.name,
        parts.len(),
        parts.first().and_then(|p| p.first()).cloned().unwrap_or_default()
    );
    let name = match reader.dialect {
        Dialect::MySql => "MySqlScanExec",
        Dialect::Postgres => "PostgresScanExec",
        Dialect::Sqlite => "SqliteScanExec",
    };
    let count = parts.len();
    let out_schema = Arc::clone(&schema);
    let producer: Producer = Arc::new(move |p, tx| {
        let queries = parts.get(p).cloned().unwrap_or_default();
        let (reader, schema) = (reader.clone(), Arc::clone(&schema));
        Box::pin(async move {
            let sender = tx.clone();
            let read = tokio::task::spawn_blocking(move || {
                read_queries(&reader, &schema, queries, batch_rows, &sender)
            });
            if let Err(e) = read.await {
                tx.send(Err(Error::Config(format!("reading partition {p} failed: {e}"))))
                    .await;
            }
        })
    });
    StreamScanExec::new(name, label, out_schema, count, producer)
}

/// Reads a partition's queries in turn; stops at the first error (sent on) or when the consumer
/// is gone.
fn read_queries(
    reader: &SqlReader,
    schema: &SchemaRef,
    queries: Vec<String>,
    batch_rows: usize,
    tx: &BatchSender,
) {
    for q in queries {
        let tx2 = tx.clone();
        let schema2 = Arc::clone(schema);
        let name = reader.name.clone();
        let r = cx::read(&reader.conn, q, batch_rows, move |b| {
            let out = if schema2.fields().is_empty() {
                let opts = RecordBatchOptions::new().with_row_count(Some(b.num_rows()));
                RecordBatch::try_new_with_options(Arc::clone(&schema2), vec![], &opts).map_err(Error::from)
            } else {
                cx::conform(&b, &schema2, &name)
            };
            let failed = out.is_err();
            tx2.blocking_send(out) && !failed
        });
        if let Err(e) = r {
            let e = e.to_string();
            // ConnectorX names a column by its position in the query: add its name.
            let column = e
                .split("FromSql(")
                .nth(1)
                .and_then(|r| r.split(')').next())
                .and_then(|i| i.parse::<usize>().ok())
                .and_then(|i| schema.fields().get(i))
                .map(|f| format!(" (column {} cannot be read as {})", f.name(), f.data_type()))
                .unwrap_or_default();
            tx.blocking_send(Err(Error::Config(format!("table {}{column}: {e}", reader.name))));
            return;
        }
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_split_into_partitions_and_chunks() {
        assert_eq!(
            split(1, 10, 2, 3),
            vec![vec![(1, 3), (4, 5)], vec![(6, 8), (9, 10)]]
        );
        assert_eq!(split(5, 5, 4, 100), vec![vec![(5, 5)]]);
        assert_eq!(split(i64::MIN, i64::MAX, 2, u64::MAX).len(), 2);
    }
}
