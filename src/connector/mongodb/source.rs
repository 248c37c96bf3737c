//! Reading a collection: `find` with the asked columns as a projection, the filters the server
//! evaluates like SQL as a find filter, and the LIMIT; or the table's pipeline with `$match`,
//! `$project` and `$limit` stages added. Documents arrive in batches of the session's batch
//! size and go through arrow-json's decoder (one batch in memory per partition).
//!
//! Parallel reads split `_id` when it is an integer or an ObjectId (by its timestamp) into
//! `partitions` ranges found from the smallest and largest `_id` (two indexed lookups); the
//! first range also takes every `_id` of another type, so no document falls between ranges.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, RecordBatch, RecordBatchOptions};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown, expr::InList};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::scalar::ScalarValue;
use futures::TryStreamExt;
use mongodb::Client;
use mongodb::bson::{Bson, DateTime, Document, doc, oid::ObjectId};
use mongodb::options::SelectionCriteria;

use super::text;
use super::types::{Seen, column_type, merge, shape};
use crate::connector::scan::{BatchSender, Producer, StreamScanExec};
use crate::error::{Error, Result};
use crate::sink::ScanSource;

/// Field metadata marking a column whose sampled values had several types (read as text):
/// filters on it stay in DataFusion, since the server compares values by type.
const MIXED: &str = "flumen.mongodb.mixed";

/// Reads a MONGODB table.
#[derive(Debug, Clone)]
pub struct MongoReader {
    pub client: Client,
    pub db: String,
    pub collection: String,
    pub table: String,
    pub host: String,
    pub schema: SchemaRef,
    pub pipeline: Option<Vec<Document>>,
    pub read_pref: Option<SelectionCriteria>,
    pub partitions: usize,
}

/// The columns of `n` sampled documents.
pub async fn infer(
    client: &Client,
    db: &str,
    collection: &str,
    pipeline: Option<&[Document]>,
    n: u64,
    table: &str,
) -> Result<SchemaRef> {
    let coll = client.database(db).collection::<Document>(collection);
    let fail = |e: mongodb::error::Error| Error::Config(format!("sampling {db}.{collection}: {}", text(&e)));
    let mut cursor = match pipeline {
        Some(p) => {
            let mut stages = p.to_vec();
            stages.push(doc! {"$limit": n as i64});
            coll.aggregate(stages).await.map_err(fail)?
        }
        None => coll.find(doc! {}).limit(n as i64).await.map_err(fail)?,
    };
    let mut seen = Seen::Null;
    let mut count = 0;
    while let Some(d) = cursor.try_next().await.map_err(fail)? {
        seen = merge(seen, Seen::of(&Bson::Document(d)));
        count += 1;
    }
    let Seen::Doc(fields) = seen else {
        return Err(Error::Config(format!(
            "{db}.{collection} has no documents to take the columns from"
        )));
    };
    let mut mixed = Vec::new();
    let mut out = Vec::with_capacity(fields.len());
    for (k, v) in &fields {
        let before = mixed.len();
        let t = column_type(k, v, true, &mut mixed);
        let mut f = Field::new(k, t, true);
        if mixed.len() > before && matches!(v, Seen::Mixed(_)) {
            f = f.with_metadata([(MIXED.to_string(), "true".to_string())].into());
        }
        out.push(f);
    }
    if !mixed.is_empty() {
        tracing::warn!(
            "table {table}: fields with several types in {count} sampled documents are read as VARCHAR: {}",
            mixed.join(", ")
        );
    }
    Ok(Arc::new(Schema::new(out)))
}

impl MongoReader {
    /// A column the server can compare like SQL, and its type.
    fn column(&self, e: &Expr) -> Option<(String, DataType)> {
        let Expr::Column(c) = e else { return None };
        let f = self.schema.field_with_name(&c.name).ok()?;
        if f.metadata().contains_key(MIXED) {
            return None;
        }
        match f.data_type() {
            t if t.is_numeric()
                || matches!(
                    t,
                    DataType::Utf8
                        | DataType::Utf8View
                        | DataType::LargeUtf8
                        | DataType::Boolean
                        | DataType::Timestamp(..)
                        | DataType::Date32
                ) =>
            {
                Some((f.name().clone(), t.clone()))
            }
            _ => None,
        }
    }

    /// A literal as the BSON the server compares the column with; `_id` strings that are
    /// ObjectIds match either.
    fn value(&self, name: &str, v: &ScalarValue) -> Option<Vec<Bson>> {
        Some(match v {
            ScalarValue::Int8(Some(i)) => vec![Bson::Int64(*i as i64)],
            ScalarValue::Int16(Some(i)) => vec![Bson::Int64(*i as i64)],
            ScalarValue::Int32(Some(i)) => vec![Bson::Int64(*i as i64)],
            ScalarValue::Int64(Some(i)) => vec![Bson::Int64(*i)],
            ScalarValue::UInt8(Some(i)) => vec![Bson::Int64(*i as i64)],
            ScalarValue::UInt16(Some(i)) => vec![Bson::Int64(*i as i64)],
            ScalarValue::UInt32(Some(i)) => vec![Bson::Int64(*i as i64)],
            ScalarValue::Float64(Some(f)) => vec![Bson::Double(*f)],
            ScalarValue::Float32(Some(f)) => vec![Bson::Double(*f as f64)],
            ScalarValue::Boolean(Some(b)) => vec![Bson::Boolean(*b)],
            ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s)) => {
                match ObjectId::parse_str(s) {
                    Ok(o) if name == "_id" && s.len() == 24 => {
                        vec![Bson::ObjectId(o), Bson::String(s.clone())]
                    }
                    _ => vec![Bson::String(s.clone())],
                }
            }
            ScalarValue::TimestampMillisecond(Some(t), _) => vec![Bson::DateTime(DateTime::from_millis(*t))],
            ScalarValue::TimestampSecond(Some(t), _) => vec![Bson::DateTime(DateTime::from_millis(t * 1000))],
            // Dates keep milliseconds: a finer timestamp would be compared truncated.
            ScalarValue::TimestampMicrosecond(Some(t), _) if t % 1000 == 0 => {
                vec![Bson::DateTime(DateTime::from_millis(t / 1000))]
            }
            ScalarValue::TimestampNanosecond(Some(t), _) if t % 1_000_000 == 0 => {
                vec![Bson::DateTime(DateTime::from_millis(t / 1_000_000))]
            }
            ScalarValue::Date32(Some(d)) => {
                vec![Bson::DateTime(DateTime::from_millis(*d as i64 * 86_400_000))]
            }
            _ => return None,
        })
    }

    /// A filter as a find filter, when the server's answer is exactly SQL's.
    pub fn filter(&self, e: &Expr) -> Option<Document> {
        match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => match op {
                Operator::And => Some(doc! {"$and": [self.filter(left)?, self.filter(right)?]}),
                Operator::Or => Some(doc! {"$or": [self.filter(left)?, self.filter(right)?]}),
                _ => {
                    let (c, v, op) = match (left.as_ref(), right.as_ref()) {
                        (l, Expr::Literal(v, _)) => (self.column(l)?, v, *op),
                        (Expr::Literal(v, _), r) => (self.column(r)?, v, op.swap()?),
                        _ => return None,
                    };
                    let (name, _) = c;
                    let vals = self.value(&name, v)?;
                    let one = vals.first()?.clone();
                    let cond = match op {
                        Operator::Eq if vals.len() > 1 => doc! {"$in": vals},
                        Operator::Eq => doc! {"$eq": one},
                        // SQL's <> leaves NULLs out; the server's $ne would keep missing fields.
                        Operator::NotEq => {
                            let mut v = vals;
                            v.push(Bson::Null);
                            doc! {"$nin": v}
                        }
                        Operator::Lt if vals.len() == 1 => doc! {"$lt": one},
                        Operator::LtEq if vals.len() == 1 => doc! {"$lte": one},
                        Operator::Gt if vals.len() == 1 => doc! {"$gt": one},
                        Operator::GtEq if vals.len() == 1 => doc! {"$gte": one},
                        _ => return None,
                    };
                    Some(doc! {name: cond})
                }
            },
            Expr::IsNull(inner) => self.column(inner).map(|(n, _)| doc! {n: {"$eq": Bson::Null}}),
            Expr::IsNotNull(inner) => self.column(inner).map(|(n, _)| doc! {n: {"$ne": Bson::Null}}),
            Expr::InList(InList { expr, list, negated }) => {
                let (name, _) = self.column(expr)?;
                let mut vals = Vec::new();
                for i in list {
                    let Expr::Literal(v, _) = i else { return None };
                    vals.extend(self.value(&name, v)?);
                }
                if *negated {
                    vals.push(Bson::Null);
                    Some(doc! {name: {"$nin": vals}})
                } else {
                    Some(doc! {name: {"$in": vals}})
                }
            }
            _ => None,
        }
    }

    /// `_id` ranges for parallel reads; one unbounded range when `_id` cannot be split.
    async fn ranges(&self) -> Result<Vec<Document>> {
        if self.partitions <= 1 || self.pipeline.is_some() {
            return Ok(vec![Document::new()]);
        }
        let coll = self
            .client
            .database(&self.db)
            .collection::<Document>(&self.collection);
        let fail = |e: mongodb::error::Error| {
            Error::Config(format!(
                "table {}: mongodb {}: {}",
                self.table,
                self.host,
                text(&e)
            ))
        };
        let end = |dir: i32| {
            let coll = coll.clone();
            async move {
                coll.find_one(doc! {})
                    .sort(doc! {"_id": dir})
                    .projection(doc! {"_id": 1})
                    .await
                    .map(|d| d.and_then(|d| d.get("_id").cloned()))
            }
        };
        let (lo, hi) = (end(1).await.map_err(fail)?, end(-1).await.map_err(fail)?);
        let n = self.partitions as i128;
        let int = |b: &Option<Bson>| match b {
            Some(Bson::Int32(i)) => Some(*i as i128),
            Some(Bson::Int64(i)) => Some(*i as i128),
            _ => None,
        };
        let (bounds, kind): (Vec<Bson>, &str) = match (int(&lo), int(&hi), lo, hi) {
            (Some(a), Some(b), _, _) => (int_bounds(a, b, n), "number"),
            (_, _, Some(Bson::ObjectId(a)), Some(Bson::ObjectId(b))) => {
                let (ta, tb) = (
                    a.timestamp().timestamp_millis() / 1000,
                    b.timestamp().timestamp_millis() / 1000,
                );
                let step = ((tb - ta) as i128 / n).max(1);
                let mut v = Vec::new();
                for i in 1..n {
                    let t = ta as i128 + step * i;
                    if t > tb as i128 {
                        break;
                    }
                    let mut bytes = [0u8; 12];
                    bytes[..4].copy_from_slice(&(t as u32).to_be_bytes());
                    v.push(Bson::ObjectId(ObjectId::from_bytes(bytes)));
                }
                (v, "objectId")
            }
            _ => return Ok(vec![Document::new()]),
        };
        if bounds.is_empty() {
            return Ok(vec![Document::new()]);
        }
        let mut out = Vec::with_capacity(bounds.len() + 1);
        out.push(doc! {"$or": [{"_id": {"$lt": bounds[0].clone()}}, {"_id": {"$not": {"$type": kind}}}]});
        for w in bounds.windows(2) {
            out.push(doc! {"_id": {"$gte": w[0].clone(), "$lt": w[1].clone()}});
        }
        out.push(doc! {"_id": {"$gte": bounds[bounds.len() - 1].clone()}});
        Ok(out)
    }
}

fn int_bounds(lo: i128, hi: i128, n: i128) -> Vec<Bson> {
    let step = ((hi - lo) / n).max(1);
    (1..n)
        .map(|i| lo + step * i)
        .filter(|&b| b <= hi)
        .map(|b| Bson::Int64(b as i64))
        .collect()
}

#[async_trait]
impl ScanSource for MongoReader {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn pushdown(&self, filters: &[&Expr]) -> Vec<TableProviderFilterPushDown> {
        filters
            .iter()
            .map(|f| match self.filter(f) {
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
        batch_rows: usize,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let want: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..self.schema.fields().len()).collect());
        let schema = Arc::new(self.schema.project(&want)?);
        let conds: Vec<Document> = filters.iter().filter_map(|f| self.filter(f)).collect();
        let filter = match conds.len() {
            0 => Document::new(),
            1 => conds[0].clone(),
            _ => doc! {"$and": conds},
        };
        let mut proj = Document::new();
        for f in schema.fields() {
            proj.insert(f.name().clone(), 1);
        }
        if !schema.fields().iter().any(|f| f.name() == "_id") {
            proj.insert("_id", if schema.fields().is_empty() { 1 } else { 0 });
        }
        let ranges = if limit.is_some() {
            vec![Document::new()]
        } else {
            self.ranges().await?
        };
        let label = format!(
            "table={}, collection={}.{}, partitions={}, filter={}, projection={}{}",
            self.table,
            self.db,
            self.collection,
            ranges.len(),
            Bson::Document(filter.clone()).into_relaxed_extjson(),
            Bson::Document(proj.clone()).into_relaxed_extjson(),
            limit.map(|l| format!(", limit={l}")).unwrap_or_default()
        );
        let parts = ranges.len();
        let reader = self.clone();
        let out_schema = Arc::clone(&schema);
        let producer: Producer = Arc::new(move |p, tx| {
            let reader = reader.clone();
            let schema = Arc::clone(&out_schema);
            let range = ranges.get(p).cloned().unwrap_or_default();
            let filter = match (range.is_empty(), filter.is_empty()) {
                (true, _) => filter.clone(),
                (false, true) => range,
                (false, false) => doc! {"$and": [range, filter.clone()]},
            };
            let proj = proj.clone();
            Box::pin(async move {
                if let Err(e) = read(&reader, filter, proj, limit, batch_rows, &schema, &tx).await {
                    tx.send(Err(e)).await;
                }
            })
        });
        Ok(Arc::new(StreamScanExec::new(
            "MongoScanExec",
            label,
            schema,
            parts,
            producer,
        )))
    }
}

async fn read(
    r: &MongoReader,
    filter: Document,
    proj: Document,
    limit: Option<usize>,
    batch_rows: usize,
    schema: &SchemaRef,
    tx: &BatchSender,
) -> Result<()> {
    let coll = r.client.database(&r.db).collection::<Document>(&r.collection);
    let fail = |e: mongodb::error::Error| {
        Error::Config(format!("table {}: mongodb {}: {}", r.table, r.host, text(&e)))
    };
    let batch = batch_rows.clamp(1, 100_000) as u32;
    let mut cursor = match &r.pipeline {
        Some(p) => {
            let mut stages = p.clone();
            if !filter.is_empty() {
                stages.push(doc! {"$match": filter});
            }
            stages.push(doc! {"$project": proj});
            if let Some(l) = limit {
                stages.push(doc! {"$limit": l as i64});
            }
            coll.aggregate(stages)
                .batch_size(batch)
                .with_options(r.read_pref.clone().map(|s| {
                    mongodb::options::AggregateOptions::builder()
                        .selection_criteria(s)
                        .build()
                }))
                .await
                .map_err(fail)?
        }
        None => coll
            .find(filter)
            .projection(proj)
            .batch_size(batch)
            .limit(limit.map(|l| l as i64).unwrap_or(0))
            .with_options(r.read_pref.clone().map(|s| {
                mongodb::options::FindOptions::builder()
                    .selection_criteria(s)
                    .build()
            }))
            .await
            .map_err(fail)?,
    };
    let mut docs = Vec::with_capacity(batch as usize);
    loop {
        let next = cursor.try_next().await.map_err(fail)?;
        let end = next.is_none();
        if let Some(d) = next {
            docs.push(d);
        }
        if docs.len() >= batch as usize || (end && !docs.is_empty()) {
            let b = decode(r, &docs, schema)?;
            docs.clear();
            if !tx.send(Ok(b)).await {
                return Ok(());
            }
        }
        if end {
            return Ok(());
        }
    }
}

/// Documents as a batch of `schema`.
pub fn decode(r: &MongoReader, docs: &[Document], schema: &SchemaRef) -> Result<RecordBatch> {
    let json_fields: Vec<Arc<Field>> = schema
        .fields()
        .iter()
        .filter(|f| !is_binary(f.data_type()))
        .cloned()
        .collect();
    let rows = |docs: &[Document]| -> Vec<serde_json::Value> {
        docs.iter()
            .map(|d| {
                serde_json::Value::Object(
                    json_fields
                        .iter()
                        .filter_map(|f| {
                            d.get(f.name())
                                .map(|v| (f.name().clone(), shape(v, f.data_type())))
                        })
                        .collect(),
                )
            })
            .collect()
    };
    let json_schema = Arc::new(Schema::new(json_fields.clone()));
    let run = |docs: &[Document]| -> std::result::Result<Option<RecordBatch>, arrow::error::ArrowError> {
        let mut d = arrow::json::ReaderBuilder::new(Arc::clone(&json_schema))
            .with_batch_size(docs.len().max(1))
            .build_decoder()?;
        d.serialize(&rows(docs))?;
        d.flush()
    };
    let decoded = match run(docs) {
        Ok(b) => b,
        Err(e) => {
            // Name the document at fault.
            for d in docs {
                if let Err(e) = run(std::slice::from_ref(d)) {
                    let id = d
                        .get("_id")
                        .map(|v| v.clone().into_relaxed_extjson().to_string())
                        .unwrap_or_default();
                    return Err(Error::Config(format!(
                        "table {}: document _id {id}: {e}; declare the column's type to fit (VARCHAR reads anything)",
                        r.table
                    )));
                }
            }
            return Err(Error::Config(format!("table {}: {e}", r.table)));
        }
    };
    let mut cols: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    for f in schema.fields() {
        if is_binary(f.data_type()) {
            let mut b = BinaryBuilder::new();
            for d in docs {
                match d.get(f.name()) {
                    Some(Bson::Binary(bin)) => b.append_value(&bin.bytes),
                    Some(Bson::String(s)) => b.append_value(s.as_bytes()),
                    _ => b.append_null(),
                }
            }
            cols.push(arrow::compute::cast(&b.finish(), f.data_type())?);
        } else {
            let c = decoded
                .as_ref()
                .and_then(|b| b.column_by_name(f.name()))
                .cloned()
                .ok_or_else(|| {
                    Error::Config(format!(
                        "table {}: column {} missing after decoding",
                        r.table,
                        f.name()
                    ))
                })?;
            cols.push(c);
        }
    }
    let opts = RecordBatchOptions::new().with_row_count(Some(docs.len()));
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        cols,
        &opts,
    )?)
}

fn is_binary(t: &DataType) -> bool {
    matches!(t, DataType::Binary | DataType::LargeBinary | DataType::BinaryView)
}
