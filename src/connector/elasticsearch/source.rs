//! Reading an index (or a pattern): `SELECT` becomes a search whose `_source` holds only the
//! columns asked for, whose query holds the filters the server evaluates exactly (term, terms,
//! range, exists, bool over numbers, booleans and keyword strings; `ids` for `_id`), and whose
//! size stops at the LIMIT. Hits are streamed page by page, each page decoded by arrow-json's
//! decoder into one batch, by one of two pagers the API Elasticsearch 7/8 and OpenSearch share:
//!
//! - **scroll** (default): one sliced scroll per partition;
//! - **search_after** (`OPTIONS ('search_after' 'col')`): sorted by a column holding a distinct
//!   value per document, partitions split that column's range when it is an integer. Pages are
//!   checked as they go: a sort value shared by more documents than the page holds, or documents
//!   lacking the column, stop the read with an error (search_after would skip them silently).
//!
//! A column named `_id` reads the document id. Values the mapping cannot foresee are handled
//! per document, only for pages where the fast decode fails: a single value in a list column
//! reads as a one-element list, a one-element array in a scalar column as its value, an object or
//! array in a string column as its JSON text; an array of several values in a scalar column is
//! an error naming the document and the column.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BinaryBuilder, RecordBatch, RecordBatchOptions, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::json::ReaderBuilder;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DataFusionError, ScalarValue};
use datafusion::error::Result as DfResult;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown, expr::InList};
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties};
use serde_json::{Value, json};

use super::sink::Client;
use crate::connector::http::error_text;
use crate::error::{Error, Result};
use crate::sink::ScanSource;

/// What reading needs.
#[derive(Debug, Clone)]
pub struct EsReader {
    pub client: Client,
    /// Index, alias or pattern searched.
    pub index: String,
    pub schema: SchemaRef,
    /// String fields mapped as keyword (exact): only these take pushed filters.
    pub exact_strings: HashSet<String>,
    /// A query from `OPTIONS ('query' '{...}')`, ANDed with the pushed filters.
    pub base_query: Option<Value>,
    /// Parallel slices (scroll) or ranges (search_after).
    pub partitions: usize,
    /// Page with search_after sorted by this column instead of scrolling.
    pub search_after: Option<String>,
    /// The columns written as the document id and routing: read back from `_id` and
    /// `_routing`, not `_source`.
    pub id_column: Option<String>,
    pub routing_column: Option<String>,
}

/// The document id column's name.
pub const ID: &str = "_id";

#[async_trait::async_trait]
impl ScanSource for EsReader {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn pushdown(&self, filters: &[&Expr]) -> Vec<TableProviderFilterPushDown> {
        filters
            .iter()
            .map(|f| match self.to_query(f) {
                Some(_) => TableProviderFilterPushDown::Exact,
                None => TableProviderFilterPushDown::Unsupported,
            })
            .collect()
    }

    async fn scan(
        &self,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
        page: usize,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let indices: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.fields().len()).collect(),
        };
        let schema = Arc::new(self.schema.project(&indices)?);
        let layout = Layout::new(&schema, self.id_column.as_deref(), self.routing_column.as_deref())?;
        let mut must: Vec<Value> = self.base_query.iter().cloned().collect();
        for f in filters {
            must.push(
                self.to_query(f)
                    .ok_or_else(|| Error::Config(format!("filter {f} cannot go to the search server")))?,
            );
        }
        let query = and(must);
        let source = if layout.source.fields().is_empty() {
            json!(false)
        } else {
            json!({"includes": layout.source.fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>()})
        };
        let page = match limit {
            Some(n) => page.min(n.max(1)),
            None => page,
        }
        .clamp(1, 10_000);
        let partitions = if limit.is_some() {
            1
        } else {
            self.partitions.max(1)
        };
        let bodies: Vec<Value> = match &self.search_after {
            None => (0..partitions)
                .map(|i| {
                    let mut b = json!({"size": page, "_source": source, "sort": ["_doc"], "query": query});
                    if partitions > 1 {
                        b["slice"] = json!({"id": i, "max": partitions});
                    }
                    b
                })
                .collect(),
            Some(col) => {
                let ranges = if partitions > 1 {
                    self.split_range(col, &query, partitions).await?
                } else {
                    vec![None]
                };
                ranges
                    .into_iter()
                    .map(|r| {
                        let q = match r {
                            Some(r) => and(vec![query.clone(), r]),
                            None => query.clone(),
                        };
                        json!({"size": page, "_source": source, "sort": [{col.clone(): "asc"}], "query": q})
                    })
                    .collect()
            }
        };
        Ok(Arc::new(EsScanExec::new(
            self.clone(),
            schema,
            layout,
            query,
            bodies,
            limit,
        )))
    }
}

fn and(mut must: Vec<Value>) -> Value {
    match must.len() {
        0 => json!({"match_all": {}}),
        1 => must.remove(0),
        _ => json!({"bool": {"filter": must}}),
    }
}

/// How a page's hits become the projected columns: from `_source` (decoded with binaries as
/// their base64 text), or from the hit's `_id` or `_routing` (as text, cast to the column's
/// type).
#[derive(Debug, Clone)]
struct Layout {
    /// What `_source` is decoded into.
    source: SchemaRef,
    /// Per output column, where it comes from.
    columns: Vec<From>,
}

#[derive(Debug, Clone, Copy)]
enum From {
    Id,
    Routing,
    Source(usize),
}

impl Layout {
    fn new(schema: &Schema, id: Option<&str>, routing: Option<&str>) -> Result<Self> {
        let mut source = Vec::new();
        let mut columns = Vec::new();
        for f in schema.fields() {
            let meta = if f.name() == ID || Some(f.name().as_str()) == id {
                Some(From::Id)
            } else if Some(f.name().as_str()) == routing {
                Some(From::Routing)
            } else {
                None
            };
            if let Some(m) = meta {
                if !arrow::compute::can_cast_types(&DataType::Utf8, f.data_type()) {
                    return Err(Error::Config(format!(
                        "column {} is read from the document's {} and cannot be {}",
                        f.name(),
                        if matches!(m, From::Id) { "_id" } else { "_routing" },
                        f.data_type()
                    )));
                }
                columns.push(m);
                continue;
            }
            if has_nested_binary(f.data_type()) {
                return Err(Error::Config(format!(
                    "column {}: binary values inside lists or structs cannot be read back; declare them VARCHAR to read their base64 text",
                    f.name()
                )));
            }
            columns.push(From::Source(source.len()));
            source.push(match f.data_type() {
                t if is_binary(t) => Field::new(f.name(), DataType::Utf8, true),
                _ => f.as_ref().clone(),
            });
        }
        Ok(Self {
            source: Arc::new(Schema::new(source)),
            columns,
        })
    }
}

fn is_binary(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_)
    )
}

fn has_nested_binary(t: &DataType) -> bool {
    fn any(t: &DataType) -> bool {
        is_binary(t)
            || match t {
                DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                    any(f.data_type())
                }
                DataType::Struct(fs) => fs.iter().any(|f| any(f.data_type())),
                _ => false,
            }
    }
    !is_binary(t) && any(t)
}

impl EsReader {
    /// Integer ranges of `col` splitting the documents `query` matches into `n` partitions
    /// (min and max from an aggregation), each a range query; one unbounded partition when the
    /// column is not an integer or nothing matches.
    async fn split_range(&self, col: &str, query: &Value, n: usize) -> Result<Vec<Option<Value>>> {
        let integer = self
            .schema
            .field_with_name(col)
            .is_ok_and(|f| f.data_type().is_integer());
        if !integer {
            return Err(Error::Config(format!(
                "index {}: 'partitions' with 'search_after' splits the range of the column, which needs an integer column; '{col}' is not one (use scroll, or one partition)",
                self.index
            )));
        }
        let body = json!({"size": 0, "query": query, "aggs": {
            "lo": {"min": {"field": col}}, "hi": {"max": {"field": col}}}});
        let v: Value = post_json(
            &self.client,
            &self.index,
            &format!("{}/_search", self.index),
            &body,
        )
        .await?;
        let bound = |k: &str| {
            v.pointer(&format!("/aggregations/{k}/value"))
                .and_then(Value::as_f64)
        };
        let (Some(lo), Some(hi)) = (bound("lo"), bound("hi")) else {
            return Ok(vec![None]);
        };
        // Aggregations answer doubles; integers beyond 2^53 may be off by a little, so the
        // outer partitions are open-ended.
        let (lo, hi) = (lo as i128, hi as i128);
        let n = (n as i128).min(hi - lo + 1).max(1);
        let step = (hi - lo + n) / n;
        Ok((0..n)
            .map(|i| {
                let mut r = serde_json::Map::new();
                if i > 0 {
                    r.insert("gte".into(), json!((lo + i * step) as i64));
                }
                if i < n - 1 {
                    r.insert("lt".into(), json!((lo + (i + 1) * step) as i64));
                }
                Some(if r.is_empty() {
                    json!({"match_all": {}})
                } else {
                    json!({"range": {col: r}})
                })
            })
            .collect())
    }

    /// A filter as query DSL, when the server evaluates it exactly as DataFusion would.
    fn to_query(&self, e: &Expr) -> Option<Value> {
        Some(match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
                Operator::And => json!({"bool": {"filter": [self.to_query(left)?, self.to_query(right)?]}}),
                Operator::Or => {
                    json!({"bool": {"should": [self.to_query(left)?, self.to_query(right)?], "minimum_should_match": 1}})
                }
                _ => {
                    let (col, value, op) = match (left.as_ref(), right.as_ref()) {
                        (Expr::Column(c), Expr::Literal(v, _)) => (c, v, *op),
                        (Expr::Literal(v, _), Expr::Column(c)) => (c, v, op.swap()?),
                        _ => return None,
                    };
                    let v = self.literal(&col.name, value)?;
                    let name = &col.name;
                    if self.is_id(name) {
                        // The id is no field of the document: only `ids` finds it.
                        let ids = json!({"ids": {"values": [v]}});
                        return match op {
                            Operator::Eq => Some(ids),
                            Operator::NotEq => Some(json!({"bool": {"must_not": [ids]}})),
                            _ => None,
                        };
                    }
                    let time = matches!(
                        value,
                        ScalarValue::TimestampSecond(..)
                            | ScalarValue::TimestampMillisecond(..)
                            | ScalarValue::TimestampMicrosecond(..)
                            | ScalarValue::TimestampNanosecond(..)
                    );
                    match op {
                        // Dates only as range bounds (a term on a date depends on its format).
                        Operator::Eq | Operator::NotEq if time => return None,
                        Operator::Eq => json!({"term": {name: v}}),
                        Operator::NotEq => {
                            json!({"bool": {"must": [{"exists": {"field": name}}], "must_not": [{"term": {name: v}}]}})
                        }
                        Operator::Lt | Operator::LtEq | Operator::Gt | Operator::GtEq => {
                            let key = match op {
                                Operator::Lt => "lt",
                                Operator::LtEq => "lte",
                                Operator::Gt => "gt",
                                _ => "gte",
                            };
                            // A date bound goes as epoch milliseconds, whatever the field's format.
                            if time {
                                json!({"range": {name: {key: v, "format": "epoch_millis"}}})
                            } else {
                                json!({"range": {name: {key: v}}})
                            }
                        }
                        _ => return None,
                    }
                }
            },
            Expr::Not(inner) => json!({"bool": {"must_not": [self.to_query(inner)?]}}),
            Expr::ScalarFunction(f) if f.func.name() == "match" => match f.args.as_slice() {
                [
                    Expr::Column(c),
                    Expr::Literal(ScalarValue::Utf8(Some(w)) | ScalarValue::Utf8View(Some(w)), _),
                ] if self.schema.field_with_name(&c.name).is_ok() => {
                    json!({"match": {c.name.clone(): w}})
                }
                _ => return None,
            },
            Expr::IsNotNull(inner) => match inner.as_ref() {
                Expr::Column(c) if self.schema.field_with_name(&c.name).is_ok() => {
                    json!({"exists": {"field": c.name}})
                }
                _ => return None,
            },
            Expr::IsNull(inner) => match inner.as_ref() {
                Expr::Column(c) if self.schema.field_with_name(&c.name).is_ok() => {
                    json!({"bool": {"must_not": [{"exists": {"field": c.name}}]}})
                }
                _ => return None,
            },
            Expr::InList(InList { expr, list, negated }) => {
                let Expr::Column(c) = expr.as_ref() else {
                    return None;
                };
                let values = list
                    .iter()
                    .map(|i| match i {
                        Expr::Literal(v, _) => self.literal(&c.name, v),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()?;
                let terms = if self.is_id(&c.name) {
                    json!({"ids": {"values": values}})
                } else {
                    json!({"terms": {c.name.clone(): values}})
                };
                if *negated {
                    json!({"bool": {"must": [{"exists": {"field": c.name}}], "must_not": [terms]}})
                } else {
                    terms
                }
            }
            _ => return None,
        })
    }

    /// Whether a column is read from `_id`.
    fn is_id(&self, name: &str) -> bool {
        name == ID || self.id_column.as_deref() == Some(name)
    }

    /// A literal compared with a field, when the comparison is exact on the server: numbers and
    /// booleans with numeric/boolean fields, strings with keyword fields; for the id, the text
    /// of integers and strings (as the id was written).
    fn literal(&self, field: &str, v: &ScalarValue) -> Option<Value> {
        let ty = self.schema.field_with_name(field).ok()?.data_type();
        if self.is_id(field) {
            let exact =
                ty.is_integer() || matches!(ty, DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8);
            return match v {
                _ if !exact || v.is_null() || !(v.data_type().is_integer() || v.data_type() == *ty) => None,
                ScalarValue::Utf8(Some(s))
                | ScalarValue::Utf8View(Some(s))
                | ScalarValue::LargeUtf8(Some(s)) => Some(json!(s)),
                _ if ty.is_integer() => Some(json!(v.to_string())),
                _ => None,
            };
        }
        let numeric = ty.is_integer() || ty.is_floating();
        let time = matches!(ty, DataType::Timestamp(..));
        Some(match v {
            ScalarValue::Int8(Some(x)) if numeric => json!(x),
            ScalarValue::Int16(Some(x)) if numeric => json!(x),
            ScalarValue::Int32(Some(x)) if numeric => json!(x),
            ScalarValue::Int64(Some(x)) if numeric => json!(x),
            ScalarValue::UInt8(Some(x)) if numeric => json!(x),
            ScalarValue::UInt16(Some(x)) if numeric => json!(x),
            ScalarValue::UInt32(Some(x)) if numeric => json!(x),
            ScalarValue::UInt64(Some(x)) if numeric => json!(x),
            ScalarValue::Float64(Some(x)) if numeric && x.is_finite() => json!(x),
            ScalarValue::Boolean(Some(b)) if *ty == DataType::Boolean => json!(b),
            // A date field holds milliseconds: a bound with a finer part would round on the server.
            ScalarValue::TimestampSecond(Some(x), _) if time => json!(x.checked_mul(1000)?),
            ScalarValue::TimestampMillisecond(Some(x), _) if time => json!(x),
            ScalarValue::TimestampMicrosecond(Some(x), _) if time && x % 1000 == 0 => json!(x / 1000),
            ScalarValue::TimestampNanosecond(Some(x), _) if time && x % 1_000_000 == 0 => {
                json!(x / 1_000_000)
            }
            ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s))
                if self.exact_strings.contains(field) =>
            {
                json!(s)
            }
            _ => return None,
        })
    }
}

/// POSTs a JSON body to the cluster and reads a JSON answer; errors name the index.
async fn post_json<T: serde::de::DeserializeOwned>(
    client: &Client,
    index: &str,
    path: &str,
    body: &Value,
) -> Result<T> {
    let url = client.url(path)?;
    let resp = client
        .request(reqwest::Method::POST, url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| Error::Config(format!("cannot reach {}: {}", client.base(), error_text(&e))))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| Error::Config(format!("reading a search answer: {e}")))?;
    if !(200..300).contains(&status) {
        return Err(Error::Config(format!(
            "searching {index}: HTTP {status}: {}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(500)])
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Config(format!("searching {index}: not a search answer: {e}")))
}

/// One pager per partition: a scroll slice or a search_after range.
#[derive(Debug)]
pub struct EsScanExec {
    reader: EsReader,
    schema: SchemaRef,
    layout: Layout,
    /// The query before partitioning (for the search_after checks).
    query: Value,
    bodies: Vec<Value>,
    limit: Option<usize>,
    metrics: ExecutionPlanMetricsSet,
    properties: Arc<PlanProperties>,
}

impl EsScanExec {
    fn new(
        reader: EsReader,
        schema: SchemaRef,
        layout: Layout,
        query: Value,
        bodies: Vec<Value>,
        limit: Option<usize>,
    ) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(bodies.len()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            reader,
            schema,
            layout,
            query,
            bodies,
            limit,
            metrics: ExecutionPlanMetricsSet::new(),
            properties,
        }
    }
}

impl DisplayAs for EsScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let pager = match &self.reader.search_after {
            Some(c) => format!("search_after({c}) ranges"),
            None => "scroll slices".to_string(),
        };
        write!(
            f,
            "ElasticsearchScanExec: index={}, {pager}={}, search={}",
            self.reader.index,
            self.bodies.len(),
            self.bodies.first().map(|b| b.to_string()).unwrap_or_default()
        )
    }
}

/// A page: the scroll id (scroll) and the hits with their `_source` as raw JSON.
#[derive(serde::Deserialize)]
struct Page {
    #[serde(rename = "_scroll_id")]
    scroll_id: Option<String>,
    hits: Hits,
}

#[derive(serde::Deserialize)]
struct Hits {
    hits: Vec<Hit>,
}

#[derive(serde::Deserialize)]
struct Hit {
    #[serde(rename = "_id")]
    id: Option<String>,
    #[serde(rename = "_routing")]
    routing: Option<String>,
    #[serde(rename = "_source")]
    source: Option<Box<serde_json::value::RawValue>>,
    sort: Option<Vec<Value>>,
}

#[derive(serde::Deserialize)]
struct Count {
    count: u64,
}

struct PageState {
    reader: EsReader,
    schema: SchemaRef,
    layout: Layout,
    query: Value,
    partition: usize,
    /// The next search (first page of a scroll, every page of search_after).
    body: Option<Value>,
    scroll_id: Option<String>,
    left: Option<usize>,
    done: bool,
}

impl PageState {
    async fn post<T: serde::de::DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T> {
        post_json(&self.reader.client, &self.reader.index, path, body).await
    }

    async fn count(&self, query: Value) -> Result<u64> {
        let c: Count = self
            .post(&format!("{}/_count", self.reader.index), &json!({"query": query}))
            .await?;
        Ok(c.count)
    }

    /// The next page's hits; empty at the end.
    async fn fetch(&mut self) -> Result<Vec<Hit>> {
        let index = self.reader.index.clone();
        let Some(col) = self.reader.search_after.clone() else {
            let page: Page = match (self.body.take(), &self.scroll_id) {
                (Some(body), _) => self.post(&format!("{index}/_search?scroll=2m"), &body).await?,
                (None, Some(id)) => {
                    self.post("_search/scroll", &json!({"scroll": "2m", "scroll_id": id}))
                        .await?
                }
                (None, None) => return Ok(vec![]),
            };
            if page.scroll_id.is_some() {
                self.scroll_id = page.scroll_id;
            }
            return Ok(page.hits.hits);
        };
        let Some(mut body) = self.body.take() else {
            return Ok(vec![]);
        };
        if self.partition == 0 && body.get("search_after").is_none() {
            let lacking = self
                .count(json!({"bool": {"filter": [self.query], "must_not": [{"exists": {"field": col}}]}}))
                .await?;
            if lacking > 0 {
                return Err(Error::Config(format!(
                    "index {index}: {lacking} documents have no '{col}', the search_after column; they cannot be paged by it (leave 'search_after' out to scroll)"
                )));
            }
        }
        let page: Page = self.post(&format!("{index}/_search"), &body).await?;
        let hits = page.hits.hits;
        let size = body.get("size").and_then(Value::as_u64).unwrap_or(0) as usize;
        if hits.len() < size || hits.is_empty() {
            return Ok(hits);
        }
        let Some(last) = hits.last().and_then(|h| h.sort.clone()) else {
            return Err(Error::Config(format!(
                "index {index}: the server answered a sorted search without sort values"
            )));
        };
        // Documents sharing the page's last sort value beyond this page would be skipped by
        // the next search_after: make sure there are none.
        let seen = hits
            .iter()
            .rev()
            .take_while(|h| h.sort.as_ref() == Some(&last))
            .count();
        let value = last.first().cloned().unwrap_or(Value::Null);
        let total = self
            .count(json!({"bool": {"filter": [body["query"], {"term": {col.as_str(): value}}]}}))
            .await?;
        if total > seen as u64 {
            return Err(Error::Config(format!(
                "index {index}: '{col}' is not unique ({value} is in {total} documents), so search_after would skip documents; name a column with a distinct value per document, or leave 'search_after' out to scroll"
            )));
        }
        body["search_after"] = Value::Array(last);
        self.body = Some(body);
        Ok(hits)
    }

    /// The next page as a batch; `None` at the end (a scroll is then released).
    async fn next(&mut self) -> Result<Option<RecordBatch>> {
        if self.done {
            return Ok(None);
        }
        let mut hits = self.fetch().await?;
        if let Some(left) = self.left {
            hits.truncate(left);
            self.left = Some(left - hits.len());
        }
        if hits.is_empty() || self.left == Some(0) {
            self.done = true;
            self.release().await;
            if hits.is_empty() {
                return Ok(None);
            }
        }
        self.decode(&hits).map(Some)
    }

    /// Hits as a batch of the projected columns.
    fn decode(&self, hits: &[Hit]) -> Result<RecordBatch> {
        let rows = hits.len();
        let source = if self.layout.source.fields().is_empty() {
            vec![]
        } else {
            match decode_fast(&self.layout.source, hits) {
                Ok(b) => b.columns().to_vec(),
                Err(_) => self.decode_slow(hits)?.columns().to_vec(),
            }
        };
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(self.schema.fields().len());
        for (f, c) in self.schema.fields().iter().zip(&self.layout.columns) {
            let col = match c {
                From::Id | From::Routing => {
                    let text = StringArray::from_iter(hits.iter().map(|h| match c {
                        From::Id => h.id.as_deref(),
                        _ => h.routing.as_deref(),
                    }));
                    meta_column(&text, f, &self.reader.index)?
                }
                From::Source(i) if is_binary(f.data_type()) => {
                    let b = unbase64(&source[*i], f.name(), hits, &self.reader.index)?;
                    arrow::compute::cast(&b, f.data_type())?
                }
                From::Source(i) => Arc::clone(&source[*i]),
            };
            columns.push(col);
        }
        let opts = RecordBatchOptions::new().with_row_count(Some(rows));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(&self.schema),
            columns,
            &opts,
        )?)
    }

    /// Document by document, each `_source` shaped to the columns first; errors name the
    /// document.
    fn decode_slow(&self, hits: &[Hit]) -> Result<RecordBatch> {
        let mut decoder = decoder(&self.layout.source, hits.len())?;
        for h in hits {
            let id = h.id.as_deref().unwrap_or("?");
            let at = |e: String| Error::Config(format!("index {} document {id}: {e}", self.reader.index));
            let mut doc: Value = match &h.source {
                Some(s) => serde_json::from_str(s.get()).map_err(|e| at(e.to_string()))?,
                None => json!({}),
            };
            if let Value::Object(o) = &mut doc {
                for f in self.layout.source.fields() {
                    if let Some(v) = o.get_mut(f.name()) {
                        shape(v, f.data_type()).map_err(|e| at(format!("column {}{e}", f.name())))?;
                    }
                }
            }
            decoder
                .decode(doc.to_string().as_bytes())
                .map_err(|e| at(format!("does not fit the table's columns: {e}")))?;
            decoder.decode(b"\n")?;
        }
        decoder
            .flush()?
            .ok_or_else(|| Error::Config("no rows decoded".into()))
    }

    async fn release(&mut self) {
        if let Some(id) = self.scroll_id.take()
            && let Ok(url) = self.reader.client.url("_search/scroll")
        {
            let _ = self
                .reader
                .client
                .request(reqwest::Method::DELETE, url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(json!({"scroll_id": id}).to_string())
                .send()
                .await;
        }
    }
}

fn decoder(schema: &SchemaRef, rows: usize) -> Result<arrow::json::reader::Decoder> {
    Ok(ReaderBuilder::new(Arc::clone(schema))
        .with_batch_size(rows.max(1))
        // _source keeps what was sent: a number in a keyword field reads as its text.
        .with_coerce_primitive(true)
        .build_decoder()?)
}

/// The whole page at once, straight from the raw `_source` texts.
fn decode_fast(schema: &SchemaRef, hits: &[Hit]) -> Result<RecordBatch> {
    let mut decoder = decoder(schema, hits.len())?;
    for h in hits {
        decoder.decode(h.source.as_ref().map_or("{}", |s| s.get()).as_bytes())?;
        decoder.decode(b"\n")?;
    }
    decoder
        .flush()?
        .ok_or_else(|| Error::Config("no rows decoded".into()))
}

/// Shapes a value to a column type: lists from single values, single values from one-element
/// arrays, JSON text for objects and arrays in string columns. Errors say what is wrong after
/// the column's name (a path inside structs).
fn shape(v: &mut Value, t: &DataType) -> std::result::Result<(), String> {
    match (t, &mut *v) {
        (_, Value::Null) => {}
        (DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View, Value::Object(_) | Value::Array(_)) => {
            *v = Value::String(v.to_string());
        }
        (DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _), Value::Array(items)) => {
            for i in items {
                shape(i, f.data_type())?;
            }
        }
        (DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _), _) => {
            let mut one = v.take();
            shape(&mut one, f.data_type())?;
            *v = Value::Array(vec![one]);
        }
        (DataType::Struct(fields), Value::Object(o)) => {
            for f in fields {
                if let Some(x) = o.get_mut(f.name()) {
                    shape(x, f.data_type()).map_err(|e| format!(".{}{e}", f.name()))?;
                }
            }
        }
        (_, Value::Array(items)) => match items.len() {
            0 => *v = Value::Null,
            1 => {
                let mut one = items.remove(0);
                shape(&mut one, t)?;
                *v = one;
            }
            n => {
                return Err(format!(
                    " holds {n} values but is declared {t}; declare it as a list (e.g. {}[])",
                    sql_name(t)
                ));
            }
        },
        _ => {}
    }
    Ok(())
}

fn sql_name(t: &DataType) -> &'static str {
    match t {
        DataType::Int8 => "TINYINT",
        DataType::Int16 => "SMALLINT",
        DataType::Int32 => "INT",
        DataType::Int64 | DataType::UInt64 => "BIGINT",
        DataType::Float32 => "FLOAT",
        DataType::Float64 => "DOUBLE",
        DataType::Boolean => "BOOLEAN",
        DataType::Timestamp(..) => "TIMESTAMP",
        DataType::Date32 | DataType::Date64 => "DATE",
        DataType::Struct(_) => "STRUCT<...>",
        _ => "VARCHAR",
    }
}

/// A column written as `_id` or `_routing`, from the hits' text: cast strictly, so an id that
/// is not a value of the column's type is an error naming the document.
fn meta_column(text: &StringArray, f: &Field, index: &str) -> Result<ArrayRef> {
    let opts = arrow::compute::CastOptions {
        safe: true,
        ..Default::default()
    };
    let out = arrow::compute::cast_with_options(text, f.data_type(), &opts)?;
    if out.null_count() != text.null_count() {
        let row = (0..text.len())
            .find(|r| text.is_valid(*r) && out.is_null(*r))
            .unwrap_or(0);
        return Err(Error::Config(format!(
            "index {index} document {}: column {} cannot hold it as {}",
            text.value(row),
            f.name(),
            f.data_type()
        )));
    }
    Ok(out)
}

/// Base64 text (the `binary` field type) as bytes; errors name the column and the document.
fn unbase64(text: &ArrayRef, column: &str, hits: &[Hit], index: &str) -> Result<ArrayRef> {
    use arrow::array::AsArray;
    use base64::Engine as _;
    let text = text.as_string::<i32>();
    let mut out = BinaryBuilder::with_capacity(text.len(), text.value_data().len());
    let mut buf = Vec::new();
    for (row, v) in text.iter().enumerate() {
        match v {
            None => out.append_null(),
            Some(s) => {
                buf.clear();
                base64::engine::general_purpose::STANDARD
                    .decode_vec(s, &mut buf)
                    .map_err(|e| {
                        Error::Config(format!(
                            "index {index} document {}: column {column} is not base64: {e}",
                            hits.get(row).and_then(|h| h.id.as_deref()).unwrap_or("?")
                        ))
                    })?;
                out.append_value(&buf);
            }
        }
    }
    Ok(Arc::new(out.finish()))
}

impl ExecutionPlan for EsScanExec {
    fn name(&self) -> &'static str {
        "ElasticsearchScanExec"
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
        let body = self
            .bodies
            .get(partition)
            .cloned()
            .ok_or_else(|| DataFusionError::Internal(format!("no search partition {partition}")))?;
        let state = PageState {
            reader: self.reader.clone(),
            schema: Arc::clone(&self.schema),
            layout: self.layout.clone(),
            query: self.query.clone(),
            partition,
            body: Some(body),
            scroll_id: None,
            left: self.limit,
            done: false,
        };
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let stream = futures::stream::unfold((state, baseline), |(mut state, baseline)| async move {
            match state.next().await {
                Ok(Some(b)) => {
                    baseline.record_output(b.num_rows());
                    Some((Ok(b), (state, baseline)))
                }
                Ok(None) => None,
                Err(e) => {
                    state.done = true;
                    state.release().await;
                    Some((Err(DataFusionError::from(e)), (state, baseline)))
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_shaped_to_their_columns() {
        let list = DataType::List(Arc::new(Field::new("item", DataType::Int64, true)));
        let mut v = json!(5);
        shape(&mut v, &list).unwrap();
        assert_eq!(v, json!([5]));
        let mut v = json!([7]);
        shape(&mut v, &DataType::Int64).unwrap();
        assert_eq!(v, json!(7));
        let mut v = json!([]);
        shape(&mut v, &DataType::Int64).unwrap();
        assert_eq!(v, Value::Null);
        let mut v = json!({"a": [1, "x"]});
        shape(&mut v, &DataType::Utf8).unwrap();
        assert_eq!(v, json!(r#"{"a":[1,"x"]}"#));
        let st = DataType::Struct(vec![Field::new("n", DataType::Int32, true)].into());
        let mut v = json!([{"n": [1, 2]}]);
        assert_eq!(
            shape(&mut v, &st).unwrap_err(),
            ".n holds 2 values but is declared Int32; declare it as a list (e.g. INT[])"
        );
    }
}
