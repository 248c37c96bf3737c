//! Reading a ClickHouse table: `SELECT` pushes its columns, the filters ClickHouse evaluates
//! the same way, and `LIMIT` into one query per partition; each answer is streamed as Native
//! (optionally in ClickHouse's compressed frames) and decoded block by block on a blocking
//! thread while the next bytes arrive, so memory is a few blocks per partition.
//!
//! With `OPTIONS ('partition_on' 'id', 'partitions' '4')` the key's range is found by one
//! `min`/`max` query (under the same filters) and cut into contiguous ranges, one query each;
//! the first and last ranges are open-ended (and the last takes NULL keys), so a row written
//! between the two queries is still read by exactly one partition.

use std::fmt;
use std::io::Read;
use std::sync::Arc;

use arrow::datatypes::{DataType, Schema, SchemaRef};
use bytes::Bytes;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::error::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{
    Between, BinaryExpr, Cast, Expr, Operator, TableProviderFilterPushDown, expr::InList,
};
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::{RecordBatchReceiverStreamBuilder, RecordBatchStreamAdapter};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::client::{Client, quote_ident};
use super::compress::{Decompress, Method};
use super::decode::BlockReader;
use super::types::ChType;
use crate::connector::scan::{caught, caught_blocking};
use crate::error::{Error, Result};
use crate::sink::ScanSource;

/// What reading one ClickHouse table needs.
#[derive(Debug, Clone)]
pub struct Reader {
    pub client: Client,
    /// `db`.`table`, quoted.
    pub table_sql: String,
    /// Reads say `FINAL` (option `final`).
    pub final_read: bool,
    pub schema: SchemaRef,
    pub types: Vec<ChType>,
    /// Column (index) whose range splits the read, and into how many parts.
    pub partition_on: Option<usize>,
    pub partitions: usize,
    /// Ask for the answer in ClickHouse's compressed frames.
    pub compression: Option<Method>,
}

#[async_trait::async_trait]
impl ScanSource for Reader {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// Whether a filter can go to ClickHouse as it is (it then need not be checked again).
    fn pushdown(&self, filters: &[&Expr]) -> Vec<TableProviderFilterPushDown> {
        filters
            .iter()
            .map(|f| {
                if to_sql(f, &self.schema).is_some() {
                    TableProviderFilterPushDown::Exact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect()
    }

    /// Plans the queries of a scan.
    async fn scan(
        &self,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
        block_rows: usize,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&indices)?);
        let select = if indices.is_empty() {
            // Only the row count matters (count(*)): one byte per row.
            "1".to_string()
        } else {
            indices
                .iter()
                .map(|i| quote_ident(self.schema.field(*i).name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut conds = Vec::new();
        for f in filters {
            conds.push(to_sql(f, &self.schema).ok_or_else(|| {
                Error::Config(format!(
                    "filter {f} cannot be sent to ClickHouse (flumen planned it as pushed)"
                ))
            })?);
        }
        let ranges = match self.partition_on {
            Some(col) if self.partitions > 1 => self.ranges(col, &conds).await?,
            _ => vec![None],
        };
        let queries = ranges
            .into_iter()
            .map(|range| {
                let mut c = conds.clone();
                c.extend(range);
                let mut q = format!("SELECT {select} FROM {}", self.read_from());
                if !c.is_empty() {
                    q.push_str(&format!(" WHERE {}", c.join(" AND ")));
                }
                if let Some(n) = limit {
                    q.push_str(&format!(" LIMIT {n}"));
                }
                q.push_str(" FORMAT Native");
                q
            })
            .collect();
        Ok(Arc::new(ClickHouseScanExec::new(
            self.clone(),
            schema,
            queries,
            block_rows,
        )))
    }
}

impl Reader {
    /// The table as read: with `FINAL` when asked (a ReplacingMergeTree's rows merged by key at
    /// read time, so that an upserted table reads as one row per key).
    fn read_from(&self) -> String {
        if self.final_read {
            format!("{} FINAL", self.table_sql)
        } else {
            self.table_sql.clone()
        }
    }

    /// Cuts the key's `[min, max]` (under the filters) into `partitions` ranges.
    async fn ranges(&self, col: usize, conds: &[String]) -> Result<Vec<Option<String>>> {
        let name = quote_ident(self.schema.field(col).name());
        let ty = &self.types[col];
        let (nullable, base) = match ty {
            ChType::Nullable(t) => (true, t.as_ref()),
            t => (false, t),
        };
        let key = match base {
            ChType::Int(8..=64) | ChType::UInt(8..=64) => name.clone(),
            _ => format!("toInt64({name})"),
        };
        let mut q = format!(
            "SELECT toString(min({key})), toString(max({key})) FROM {}",
            self.read_from()
        );
        if !conds.is_empty() {
            q.push_str(&format!(" WHERE {}", conds.join(" AND ")));
        }
        q.push_str(" FORMAT TabSeparated");
        let text = self.client.query(&q).await.map_err(|e| {
            Error::Config(format!(
                "ClickHouse {}: finding the range of {name}: {e}",
                self.table_sql
            ))
        })?;
        let mut parts = text.trim().split('\t').map(|v| v.parse::<i128>());
        let (Some(Ok(lo)), Some(Ok(hi))) = (parts.next(), parts.next()) else {
            return Err(Error::Config(format!(
                "ClickHouse {}: the range of {name} came back as '{}'",
                self.table_sql,
                text.trim()
            )));
        };
        Ok(split_range(&key, lo, hi, self.partitions, nullable))
    }
}

/// `n` conditions that together take every row exactly once: `key < b1`, `b1 <= key < b2`, ...,
/// `key >= b(n-1)` (plus NULL keys in the last).
fn split_range(key: &str, lo: i128, hi: i128, n: usize, nullable: bool) -> Vec<Option<String>> {
    let span = (hi - lo + 1).max(1);
    let n = (n as i128).min(span).max(1);
    let step = (span + n - 1) / n;
    let bounds: Vec<i128> = (1..n).map(|i| lo + i * step).filter(|b| *b <= hi).collect();
    if bounds.is_empty() {
        return vec![None];
    }
    let mut out = Vec::with_capacity(bounds.len() + 1);
    out.push(Some(format!("{key} < {}", bounds[0])));
    for w in bounds.windows(2) {
        out.push(Some(format!("({key} >= {} AND {key} < {})", w[0], w[1])));
    }
    let last = bounds[bounds.len() - 1];
    out.push(Some(if nullable {
        format!("({key} >= {last} OR {key} IS NULL)")
    } else {
        format!("{key} >= {last}")
    }));
    out
}

/// A filter in ClickHouse SQL, when ClickHouse evaluates it exactly as DataFusion would:
/// comparisons, AND/OR/NOT, IS [NOT] NULL, IN lists and BETWEEN over columns and number,
/// string or boolean literals. Anything else (functions, dates, LIKE) stays in DataFusion.
pub fn to_sql(e: &Expr, schema: &Schema) -> Option<String> {
    Some(match e {
        Expr::Column(c) => {
            schema.field_with_name(&c.name).ok()?;
            quote_ident(&c.name)
        }
        Expr::Literal(v, _) => literal(v)?,
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let op = match op {
                Operator::Eq => "=",
                Operator::NotEq => "!=",
                Operator::Lt => "<",
                Operator::LtEq => "<=",
                Operator::Gt => ">",
                Operator::GtEq => ">=",
                Operator::And => "AND",
                Operator::Or => "OR",
                _ => return None,
            };
            format!("({} {op} {})", to_sql(left, schema)?, to_sql(right, schema)?)
        }
        Expr::Not(inner) => format!("(NOT {})", to_sql(inner, schema)?),
        Expr::IsNull(inner) => format!("({} IS NULL)", to_sql(inner, schema)?),
        Expr::IsNotNull(inner) => format!("({} IS NOT NULL)", to_sql(inner, schema)?),
        Expr::InList(InList { expr, list, negated }) => {
            let items = list
                .iter()
                .map(|i| match i {
                    Expr::Literal(v, _) => literal(v),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()?;
            if items.is_empty() {
                return None;
            }
            format!(
                "({} {}IN ({}))",
                to_sql(expr, schema)?,
                if *negated { "NOT " } else { "" },
                items.join(", ")
            )
        }
        Expr::Between(Between {
            expr,
            negated,
            low,
            high,
        }) => format!(
            "({} {}BETWEEN {} AND {})",
            to_sql(expr, schema)?,
            if *negated { "NOT " } else { "" },
            to_sql(low, schema)?,
            to_sql(high, schema)?
        ),
        // DataFusion widens a column to compare it with a literal; ClickHouse compares mixed
        // numbers exactly, so the column goes as it is.
        Expr::Cast(Cast { expr, field }) => match expr.as_ref() {
            Expr::Column(c) => {
                let from = schema.field_with_name(&c.name).ok()?.data_type();
                let widening = (from.is_integer() || from.is_floating())
                    && matches!(field.data_type(), DataType::Int64 | DataType::Float64)
                    && !matches!(from, DataType::UInt64);
                if !widening {
                    return None;
                }
                to_sql(expr, schema)?
            }
            _ => return None,
        },
        _ => return None,
    })
}

fn literal(v: &ScalarValue) -> Option<String> {
    Some(match v {
        ScalarValue::Int8(Some(x)) => x.to_string(),
        ScalarValue::Int16(Some(x)) => x.to_string(),
        ScalarValue::Int32(Some(x)) => x.to_string(),
        ScalarValue::Int64(Some(x)) => x.to_string(),
        ScalarValue::UInt8(Some(x)) => x.to_string(),
        ScalarValue::UInt16(Some(x)) => x.to_string(),
        ScalarValue::UInt32(Some(x)) => x.to_string(),
        ScalarValue::UInt64(Some(x)) => x.to_string(),
        ScalarValue::Float32(Some(x)) if x.is_finite() => format!("{x:?}"),
        ScalarValue::Float64(Some(x)) if x.is_finite() => format!("{x:?}"),
        ScalarValue::Boolean(Some(b)) => u8::from(*b).to_string(),
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => {
            super::client::quote_str(s)
        }
        // A `DateTime` column's value (seconds): the same instant whatever the server's zone,
        // on every version (an incremental watermark on a timestamp column).
        ScalarValue::TimestampSecond(Some(x), _) if *x >= 0 && *x <= i64::from(u32::MAX) => {
            format!("toDateTime({x})")
        }
        // A `DateTime64(3/6/9)` column's value: the instant as UTC text at the unit's precision
        // (ClickHouse 20.1+, the servers that have DateTime64).
        ScalarValue::TimestampMillisecond(Some(x), _) => datetime64(*x, 3)?,
        ScalarValue::TimestampMicrosecond(Some(x), _) => datetime64(*x, 6)?,
        ScalarValue::TimestampNanosecond(Some(x), _) => datetime64(*x, 9)?,
        _ => return None,
    })
}

/// `toDateTime64('YYYY-MM-DD hh:mm:ss.f', p, 'UTC')` for `ticks` of 10^-p seconds since the
/// epoch; `None` before 1900 or after 2299 (DateTime64's range).
fn datetime64(ticks: i64, p: u32) -> Option<String> {
    let per = 10i64.pow(p);
    let secs = ticks.div_euclid(per);
    let frac = ticks.rem_euclid(per);
    let t = chrono::DateTime::from_timestamp(secs, 0)?;
    if !(1900..=2299).contains(&chrono::Datelike::year(&t)) {
        return None;
    }
    Some(format!(
        "toDateTime64('{}.{frac:0width$}', {p}, 'UTC')",
        t.format("%Y-%m-%d %H:%M:%S"),
        width = p as usize
    ))
}

/// One ClickHouse query per partition, streamed and decoded.
#[derive(Debug)]
pub struct ClickHouseScanExec {
    reader: Reader,
    schema: SchemaRef,
    queries: Vec<String>,
    block_rows: usize,
    metrics: ExecutionPlanMetricsSet,
    properties: Arc<PlanProperties>,
}

impl ClickHouseScanExec {
    fn new(reader: Reader, schema: SchemaRef, queries: Vec<String>, block_rows: usize) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(queries.len()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            reader,
            schema,
            queries,
            block_rows,
            metrics: ExecutionPlanMetricsSet::new(),
            properties,
        }
    }

    /// The queries, one per partition.
    pub fn queries(&self) -> &[String] {
        &self.queries
    }
}

impl DisplayAs for ClickHouseScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "ClickHouseScanExec: partitions={}{}, query={}",
            self.queries.len(),
            match self.reader.compression {
                Some(Method::Lz4) => ", lz4",
                Some(Method::Zstd) => ", zstd",
                None => "",
            },
            self.queries.join(" | ")
        )
    }
}

impl ExecutionPlan for ClickHouseScanExec {
    fn name(&self) -> &'static str {
        "ClickHouseScanExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, _ctx: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let query = self
            .queries
            .get(partition)
            .cloned()
            .ok_or_else(|| DataFusionError::Internal(format!("no ClickHouse partition {partition}")))?;
        // Both tasks belong to the stream: a panic is the query's error (never a clean end, as
        // if the table were complete), and dropping the stream aborts the network task (the
        // decoder then stops at its next send).
        let mut builder = RecordBatchReceiverStreamBuilder::new(Arc::clone(&self.schema), 2);
        let tx = builder.tx();
        let (btx, brx) = mpsc::channel::<std::result::Result<Bytes, String>>(16);
        let reader = self.reader.clone();
        let block_rows = self.block_rows.max(1).to_string();
        let table = reader.table_sql.clone();
        // Network: bytes as they arrive, until the decoder stops wanting them.
        let network = async move {
            let mut params = vec![("max_block_size", block_rows.as_str())];
            if reader.compression.is_some() {
                params.push(("compress", "1"));
            }
            let mut resp = reader
                .client
                .stream(&query, &params)
                .await
                .map_err(|e| DataFusionError::from(Error::Config(format!("ClickHouse {table}: {e}"))))?;
            loop {
                let next = match resp.chunk().await {
                    Ok(Some(b)) => Ok(b),
                    Ok(None) => break,
                    Err(e) => Err(format!("the connection broke while reading: {e}")),
                };
                let failed = next.is_err();
                if btx.send(next).await.is_err() || failed {
                    break;
                }
            }
            Ok::<(), DataFusionError>(())
        };
        builder.spawn(caught(partition, network));
        // Decoding: on a blocking thread, block by block.
        let schema = Arc::clone(&self.schema);
        let compression = self.reader.compression;
        let table = self.reader.table_sql.clone();
        let decode = move || {
            let input = ChannelReader::new(brx);
            let tail = input.tail.clone();
            let body: Box<dyn Read> = match compression {
                Some(_) => Box::new(Decompress::new(input)),
                None => Box::new(input),
            };
            // Buffered: the decoder reads values a few bytes at a time.
            let mut blocks = BlockReader::new(std::io::BufReader::with_capacity(1 << 18, body), schema);
            loop {
                match blocks.next_batch() {
                    Ok(Some(b)) => {
                        if tx.blocking_send(Ok(b)).is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let e = match server_exception(&tail.lock().map(|t| t.clone()).unwrap_or_default()) {
                            Some(text) => {
                                Error::Config(format!("ClickHouse {table} stopped the answer: {text}"))
                            }
                            None => Error::Config(format!("ClickHouse {table}: {e}")),
                        };
                        return Err(DataFusionError::from(e));
                    }
                }
            }
        };
        builder.spawn_blocking(move || caught_blocking(partition, decode));
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let stream = builder.build().inspect(move |r| {
            if let Ok(b) = r {
                baseline.record_output(b.num_rows());
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            Arc::clone(&self.schema),
            stream,
        )))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// ClickHouse reports an error that happens after the answer began inside the body, as text.
fn server_exception(tail: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(tail);
    let at = text.find("Code: ")?;
    Some(text[at..].trim().chars().take(500).collect())
}

/// Blocking reads over the chunks the network task receives; keeps the last bytes read so a
/// server-side exception written into the body can be shown.
struct ChannelReader {
    rx: mpsc::Receiver<std::result::Result<Bytes, String>>,
    cur: Bytes,
    tail: Arc<std::sync::Mutex<Vec<u8>>>,
}

const TAIL: usize = 4096;

impl ChannelReader {
    fn new(rx: mpsc::Receiver<std::result::Result<Bytes, String>>) -> Self {
        Self {
            rx,
            cur: Bytes::new(),
            tail: Arc::new(std::sync::Mutex::new(Vec::new())),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Err(e)) => return Err(std::io::Error::other(e)),
                Some(Ok(b)) => {
                    if let Ok(mut t) = self.tail.lock() {
                        t.extend_from_slice(&b[b.len().saturating_sub(TAIL)..]);
                        let excess = t.len().saturating_sub(TAIL);
                        t.drain(..excess);
                    }
                    self.cur = b;
                }
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Field;
    use datafusion::prelude::{col, lit};

    #[test]
    fn ranges_cover_every_key_once() {
        let r = split_range("`id`", 1, 100, 4, false);
        assert_eq!(
            r,
            vec![
                Some("`id` < 26".to_string()),
                Some("(`id` >= 26 AND `id` < 51)".to_string()),
                Some("(`id` >= 51 AND `id` < 76)".to_string()),
                Some("`id` >= 76".to_string()),
            ]
        );
        assert_eq!(split_range("k", 5, 5, 4, false), vec![None]);
        assert_eq!(split_range("k", 1, 2, 8, true).len(), 2);
        assert!(
            split_range("k", 1, 2, 8, true)[1]
                .as_ref()
                .unwrap()
                .contains("IS NULL")
        );
    }

    #[test]
    fn filters_become_clickhouse_sql_or_stay() {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int32, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("ts", DataType::Date32, true),
        ]);
        let f = col("id")
            .gt(lit(5))
            .and(col("name").eq(lit("it's; DROP TABLE x")));
        assert_eq!(
            to_sql(&f, &schema).unwrap(),
            "((`id` > 5) AND (`name` = 'it\\'s; DROP TABLE x'))"
        );
        assert_eq!(
            to_sql(&col("name").in_list(vec![lit("a"), lit("b")], true), &schema).unwrap(),
            "(`name` NOT IN ('a', 'b'))"
        );
        assert_eq!(
            to_sql(&col("name").is_null(), &schema).unwrap(),
            "(`name` IS NULL)"
        );
        assert!(to_sql(&col("name").like(lit("a%")), &schema).is_none());
        assert!(to_sql(&col("missing").eq(lit(1)), &schema).is_none());
        assert!(to_sql(&col("id").eq(lit(ScalarValue::Int32(None))), &schema).is_none());
        let dt = Schema::new(vec![Field::new(
            "at",
            DataType::Timestamp(arrow::datatypes::TimeUnit::Second, None),
            false,
        )]);
        assert_eq!(
            to_sql(
                &col("at").gt(lit(ScalarValue::TimestampSecond(Some(1_772_409_600), None))),
                &dt
            )
            .unwrap(),
            "(`at` > toDateTime(1772409600))"
        );
    }

    #[test]
    fn datetime64_bounds_are_utc_text() {
        assert_eq!(
            super::datetime64(1_772_409_600_123, 3).unwrap(),
            "toDateTime64('2026-03-02 00:00:00.123', 3, 'UTC')"
        );
        assert_eq!(
            super::datetime64(-1, 6).unwrap(),
            "toDateTime64('1969-12-31 23:59:59.999999', 6, 'UTC')"
        );
        assert!(super::datetime64(i64::MAX, 3).is_none());
    }
}
