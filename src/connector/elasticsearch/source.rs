//! Reading an index (or a pattern): `SELECT` becomes a search whose `_source` holds only the
//! columns asked for, whose query holds the filters the server evaluates exactly (term, terms,
//! range, exists, bool over numbers, booleans and keyword strings), and whose size stops at the
//! LIMIT. Hits are streamed with a (sliced) scroll — the API Elasticsearch 7/8 and OpenSearch
//! share — one slice per partition, each page decoded by arrow-json's decoder into one batch.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arrow::array::{RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, SchemaRef};
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
    /// Parallel slices.
    pub partitions: usize,
}

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
        let mut must: Vec<Value> = self.base_query.iter().cloned().collect();
        for f in filters {
            must.push(
                self.to_query(f)
                    .ok_or_else(|| Error::Config(format!("filter {f} cannot go to the search server")))?,
            );
        }
        let query = match must.len() {
            0 => json!({"match_all": {}}),
            1 => must.remove(0),
            _ => json!({"bool": {"filter": must}}),
        };
        let source = if indices.is_empty() {
            json!(false)
        } else {
            json!({"includes": schema.fields().iter().map(|f| f.name().clone()).collect::<Vec<_>>()})
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
        let bodies = (0..partitions)
            .map(|i| {
                let mut b = json!({"size": page, "_source": source, "sort": ["_doc"], "query": query});
                if partitions > 1 {
                    b["slice"] = json!({"id": i, "max": partitions});
                }
                b
            })
            .collect();
        Ok(Arc::new(EsScanExec::new(self.clone(), schema, bodies, limit)))
    }
}

impl EsReader {
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
                    match op {
                        Operator::Eq => json!({"term": {name: v}}),
                        Operator::NotEq => {
                            json!({"bool": {"must": [{"exists": {"field": name}}], "must_not": [{"term": {name: v}}]}})
                        }
                        Operator::Lt => json!({"range": {name: {"lt": v}}}),
                        Operator::LtEq => json!({"range": {name: {"lte": v}}}),
                        Operator::Gt => json!({"range": {name: {"gt": v}}}),
                        Operator::GtEq => json!({"range": {name: {"gte": v}}}),
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
                let terms = json!({"terms": {c.name.clone(): values}});
                if *negated {
                    json!({"bool": {"must": [{"exists": {"field": c.name}}], "must_not": [terms]}})
                } else {
                    terms
                }
            }
            _ => return None,
        })
    }

    /// A literal compared with a field, when the comparison is exact on the server: numbers and
    /// booleans with numeric/boolean fields, strings with keyword fields.
    fn literal(&self, field: &str, v: &ScalarValue) -> Option<Value> {
        let ty = self.schema.field_with_name(field).ok()?.data_type();
        let numeric = ty.is_integer() || ty.is_floating();
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
            ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s))
                if self.exact_strings.contains(field) =>
            {
                json!(s)
            }
            _ => return None,
        })
    }
}

/// One scroll per partition (slice).
#[derive(Debug)]
pub struct EsScanExec {
    reader: EsReader,
    schema: SchemaRef,
    bodies: Vec<Value>,
    limit: Option<usize>,
    metrics: ExecutionPlanMetricsSet,
    properties: Arc<PlanProperties>,
}

impl EsScanExec {
    fn new(reader: EsReader, schema: SchemaRef, bodies: Vec<Value>, limit: Option<usize>) -> Self {
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(Arc::clone(&schema)),
            Partitioning::UnknownPartitioning(bodies.len()),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        Self {
            reader,
            schema,
            bodies,
            limit,
            metrics: ExecutionPlanMetricsSet::new(),
            properties,
        }
    }
}

impl DisplayAs for EsScanExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "ElasticsearchScanExec: index={}, slices={}, search={}",
            self.reader.index,
            self.bodies.len(),
            self.bodies.first().map(|b| b.to_string()).unwrap_or_default()
        )
    }
}

/// A page of a scroll: its id and the hits' `_source` as raw JSON.
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
    #[serde(rename = "_source")]
    source: Option<Box<serde_json::value::RawValue>>,
}

struct ScrollState {
    reader: EsReader,
    schema: SchemaRef,
    body: Option<Value>,
    scroll_id: Option<String>,
    left: Option<usize>,
    done: bool,
}

impl ScrollState {
    async fn post(&self, path: &str, body: &Value) -> Result<Page> {
        let url = self.reader.client.url(path)?;
        let resp = self
            .reader
            .client
            .request(reqwest::Method::POST, url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| {
                Error::Config(format!(
                    "cannot reach {}: {}",
                    self.reader.client.base(),
                    error_text(&e)
                ))
            })?;
        let status = resp.status().as_u16();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Error::Config(format!("reading a search answer: {e}")))?;
        if !(200..300).contains(&status) {
            return Err(Error::Config(format!(
                "searching {}: HTTP {status}: {}",
                self.reader.index,
                String::from_utf8_lossy(&bytes[..bytes.len().min(500)])
            )));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::Config(format!(
                "searching {}: not a search answer: {e}",
                self.reader.index
            ))
        })
    }

    /// The next page as a batch; `None` at the end (the scroll is then released).
    async fn next(&mut self) -> Result<Option<RecordBatch>> {
        if self.done {
            return Ok(None);
        }
        let page = match (self.body.take(), &self.scroll_id) {
            (Some(body), _) => {
                self.post(&format!("{}/_search?scroll=2m", self.reader.index), &body)
                    .await?
            }
            (None, Some(id)) => {
                self.post("_search/scroll", &json!({"scroll": "2m", "scroll_id": id}))
                    .await?
            }
            (None, None) => return Ok(None),
        };
        if page.scroll_id.is_some() {
            self.scroll_id = page.scroll_id;
        }
        let mut hits = page.hits.hits;
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
        let rows = hits.len();
        if self.schema.fields().is_empty() {
            let opts = RecordBatchOptions::new().with_row_count(Some(rows));
            return Ok(Some(RecordBatch::try_new_with_options(
                Arc::clone(&self.schema),
                vec![],
                &opts,
            )?));
        }
        let mut decoder = ReaderBuilder::new(Arc::clone(&self.schema))
            .with_batch_size(rows.max(1))
            // _source keeps what was sent: a number in a keyword field reads as its text.
            .with_coerce_primitive(true)
            .build_decoder()?;
        for h in &hits {
            let text = h.source.as_ref().map_or("{}", |s| s.get());
            decoder.decode(text.as_bytes()).map_err(|e| {
                Error::Config(format!(
                    "index {}: a document does not fit the table's columns: {e}",
                    self.reader.index
                ))
            })?;
            decoder.decode(b"\n")?;
        }
        Ok(decoder.flush()?)
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
            .ok_or_else(|| DataFusionError::Internal(format!("no search slice {partition}")))?;
        let state = ScrollState {
            reader: self.reader.clone(),
            schema: Arc::clone(&self.schema),
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
