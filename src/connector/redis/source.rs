//! Reading keys as rows: one SCAN per node (every master of a cluster, in parallel), each page
//! of keys fetched with one pipeline, values parsed as their columns' types. A partition holds
//! one page of keys and its values; keys SCAN returns twice (it may while the keyspace is
//! resized) are dropped by remembering a 128-bit hash of each key read.

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, GenericListArray, RecordBatch, RecordBatchOptions, StringArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator, TableProviderFilterPushDown, expr::InList};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::scalar::ScalarValue;
use redis::Value;
use redis::aio::MultiplexedConnection;

use super::conn::{Redis, slot, text};
use super::{Kind, Layout, Seg};
use crate::connector::scan::{BatchSender, Producer, StreamScanExec};
use crate::error::{Error, Result};
use crate::sink::ScanSource;

/// Reads a REDIS table.
#[derive(Debug, Clone)]
pub struct RedisReader {
    pub redis: Redis,
    pub layout: Arc<Layout>,
}

impl RedisReader {
    /// The keys a filter names exactly: `key_column = 'k'` or `key_column IN (...)`.
    fn key_filter(&self, e: &Expr) -> Option<Vec<Vec<u8>>> {
        let key = self
            .layout
            .key_col
            .map(|i| self.layout.schema.field(i).name().clone())?;
        let is_key = |e: &Expr| matches!(e, Expr::Column(c) if *c.name == key);
        let text = |e: &Expr| match e {
            Expr::Literal(ScalarValue::Utf8(Some(s)), _)
            | Expr::Literal(ScalarValue::Utf8View(Some(s)), _)
            | Expr::Literal(ScalarValue::LargeUtf8(Some(s)), _) => Some(s.as_bytes().to_vec()),
            _ => None,
        };
        match e {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) if *op == Operator::Eq => {
                if is_key(left) {
                    text(right).map(|k| vec![k])
                } else if is_key(right) {
                    text(left).map(|k| vec![k])
                } else {
                    None
                }
            }
            Expr::InList(InList { expr, list, negated }) if !negated && is_key(expr) => {
                list.iter().map(text).collect()
            }
            _ => None,
        }
    }
}

#[async_trait]
impl ScanSource for RedisReader {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.layout.schema)
    }

    fn pushdown(&self, filters: &[&Expr]) -> Vec<TableProviderFilterPushDown> {
        filters
            .iter()
            .map(|f| match self.key_filter(f) {
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
        // Several key filters: the keys all of them name.
        let mut keys: Option<Vec<Vec<u8>>> = None;
        for f in filters {
            if let Some(k) = self.key_filter(f) {
                keys = Some(match keys {
                    None => k,
                    Some(prev) => prev.into_iter().filter(|p| k.contains(p)).collect(),
                });
            }
        }
        let topo = self.redis.topology().await?;
        let nodes = topo.nodes.clone();
        let parts = nodes.len();
        let per_node: Option<Vec<Vec<Vec<u8>>>> = keys.as_ref().map(|keys| {
            let mut v = vec![Vec::new(); nodes.len()];
            let mut seen = HashSet::new();
            for k in keys {
                if seen.insert(k.clone()) {
                    v[topo.node_of(slot(k))].push(k.clone());
                }
            }
            v
        });
        let l = &self.layout;
        let want: Vec<usize> = projection
            .cloned()
            .unwrap_or_else(|| (0..l.schema.fields().len()).collect());
        let schema = Arc::new(l.schema.project(&want)?);
        let label = format!(
            "table={}, type={}, {}, nodes={}",
            l.table,
            l.kind.redis_type(),
            match &keys {
                Some(k) => format!("keys={}", k.len()),
                None => format!("pattern={}", l.pattern),
            },
            nodes.len()
        );
        let reader = self.clone();
        let out_schema = Arc::clone(&schema);
        let producer: Producer = Arc::new(move |p, tx| {
            let reader = reader.clone();
            let node = nodes.get(p).cloned().unwrap_or_default();
            let keys = per_node.as_ref().map(|v| v.get(p).cloned().unwrap_or_default());
            let want = want.clone();
            let schema = Arc::clone(&out_schema);
            Box::pin(async move {
                let r = read_node(&reader, &node, keys, &want, &schema, limit, batch_rows, &tx).await;
                if let Err(e) = r {
                    tx.send(Err(e)).await;
                }
            })
        });
        Ok(Arc::new(StreamScanExec::new(
            "RedisScanExec",
            label,
            schema,
            parts,
            producer,
        )))
    }
}

fn fail(l: &Layout, node: &str, what: &str, e: redis::RedisError) -> Error {
    Error::Config(format!("table {}: redis {node}: {what}: {}", l.table, text(&e)))
}

/// The hasher of a set of [`h128`] values: they are hashes already.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }

    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

/// A 128-bit hash of a key, for dropping repeats.
fn h128(k: &[u8]) -> u128 {
    let mut a = std::collections::hash_map::DefaultHasher::new();
    k.hash(&mut a);
    let mut b = std::collections::hash_map::DefaultHasher::new();
    0xf1u8.hash(&mut b);
    k.hash(&mut b);
    ((a.finish() as u128) << 64) | b.finish() as u128
}

#[allow(clippy::too_many_arguments)]
async fn read_node(
    r: &RedisReader,
    node: &str,
    keys: Option<Vec<Vec<u8>>>,
    want: &[usize],
    schema: &SchemaRef,
    limit: Option<usize>,
    batch_rows: usize,
    tx: &BatchSender,
) -> Result<()> {
    let l = &r.layout;
    let mut conn = r.redis.connect(node).await?;
    let mut seen: HashSet<u128, std::hash::BuildHasherDefault<Prehashed>> = HashSet::default();
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut cursor: u64 = 0;
    let mut sent = 0usize;
    let mut explicit = keys;
    let batch_rows = batch_rows.max(1);
    let mut inflight = Fetches::new();
    loop {
        let done = if let Some(k) = explicit.take() {
            pending.extend(k);
            true
        } else {
            let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&l.pattern)
                .arg("COUNT")
                .arg(l.scan_count)
                .arg("TYPE")
                .arg(l.kind.redis_type())
                .query_async(&mut conn)
                .await
                .map_err(|e| fail(l, node, "SCAN", e))?;
            for k in page {
                if !l.dedupe || seen.insert(h128(&k)) {
                    pending.push(k);
                }
            }
            cursor = next;
            next == 0
        };
        while pending.len() >= batch_rows || (done && !pending.is_empty()) {
            let n = pending.len().min(batch_rows);
            let page: Vec<Vec<u8>> = pending.drain(..n).collect();
            // Pages are fetched and decoded as tasks of their own, FETCHES_IN_FLIGHT at a time,
            // while the scan goes on; batches are sent in page order.
            let (layout, mut c, node) = (Arc::clone(&r.layout), conn.clone(), node.to_string());
            let (want, schema) = (want.to_vec(), Arc::clone(schema));
            inflight.push_back(tokio::spawn(async move {
                fetch(&layout, &mut c, &node, page, &want, &schema, batch_rows).await
            }));
            if inflight.len() >= FETCHES_IN_FLIGHT && !emit(&mut inflight, &mut sent, limit, tx).await? {
                return Ok(());
            }
        }
        if done {
            while !inflight.is_empty() {
                if !emit(&mut inflight, &mut sent, limit, tx).await? {
                    return Ok(());
                }
            }
            return Ok(());
        }
    }
}

/// Pages of keys fetched at once per partition.
const FETCHES_IN_FLIGHT: usize = 3;

type Fetches = futures::stream::FuturesOrdered<tokio::task::JoinHandle<Result<Vec<RecordBatch>>>>;

/// Sends the batches of the oldest fetch in flight; false once the consumer is gone or the
/// limit is reached.
async fn emit(
    inflight: &mut Fetches,
    sent: &mut usize,
    limit: Option<usize>,
    tx: &BatchSender,
) -> Result<bool> {
    use futures::StreamExt;
    let Some(done) = inflight.next().await else {
        return Ok(true);
    };
    let batches = done.map_err(|e| Error::Config(format!("redis fetch task failed: {e}")))??;
    for batch in batches {
        let batch = match limit {
            Some(lim) if *sent + batch.num_rows() > lim => batch.slice(0, lim - *sent),
            _ => batch,
        };
        *sent += batch.num_rows();
        if batch.num_rows() > 0 && !tx.send(Ok(batch)).await {
            return Ok(false);
        }
        if limit.is_some_and(|lim| *sent >= lim) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One cell before it is typed.
#[derive(Debug, Clone)]
enum Cell {
    Null,
    One(Vec<u8>),
    Many(Vec<Vec<u8>>),
}

/// Rows being gathered: one cell per column, and the key each row came from.
struct Rows<'a> {
    l: &'a Layout,
    cells: Vec<Vec<Cell>>,
    keys: Vec<Vec<u8>>,
}

impl<'a> Rows<'a> {
    fn new(l: &'a Layout) -> Self {
        Self {
            l,
            cells: vec![Vec::new(); l.schema.fields().len()],
            keys: Vec::new(),
        }
    }

    /// Adds a row: the key, and the cells a function gives per column. The key column and,
    /// where the row has no value for them, the key template's columns come from the key.
    fn push(&mut self, key: &[u8], mut cell: impl FnMut(usize) -> Cell) {
        let mut from_key: Option<Vec<(usize, Vec<u8>)>> = None;
        for (i, col) in self.cells.iter_mut().enumerate() {
            let mut c = if Some(i) == self.l.key_col {
                Cell::One(key.to_vec())
            } else {
                cell(i)
            };
            if matches!(c, Cell::Null) && self.l.template.as_ref().is_some_and(|t| t.contains(&Seg::Col(i))) {
                let parts = from_key.get_or_insert_with(|| {
                    self.l
                        .template
                        .as_deref()
                        .map(|t| unkey(t, key))
                        .unwrap_or_default()
                });
                if let Some((_, v)) = parts.iter().find(|(c, _)| *c == i) {
                    c = Cell::One(v.clone());
                }
            }
            col.push(c);
        }
        self.keys.push(key.to_vec());
    }

    fn len(&self) -> usize {
        self.keys.len()
    }

    fn finish(self, want: &[usize], schema: &SchemaRef) -> Result<RecordBatch> {
        let n = self.keys.len();
        let mut cols = Vec::with_capacity(want.len());
        for &i in want {
            let f = self.l.schema.field(i);
            cols.push(typed(self.l, f, &self.cells[i], &self.keys)?);
        }
        let opts = RecordBatchOptions::new().with_row_count(Some(n));
        Ok(RecordBatch::try_new_with_options(
            Arc::clone(schema),
            cols,
            &opts,
        )?)
    }
}

/// Moves a value out when `yes`.
fn take_if(yes: bool, v: &mut Option<Vec<u8>>) -> Cell {
    match v.take_if(|_| yes) {
        Some(v) => Cell::One(v),
        None => Cell::Null,
    }
}

/// The template columns' values in a key (`user:{id}:{region}` and `user:7:eu` give id 7 and
/// region eu); empty when the key does not fit the template. Each column takes the text up to
/// the next literal part.
pub fn unkey(t: &[Seg], key: &[u8]) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    let mut rest = key;
    let mut pending: Option<usize> = None;
    for s in t {
        match s {
            Seg::Lit(lit) => {
                let lit = lit.as_bytes();
                match pending.take() {
                    None => match rest.strip_prefix(lit) {
                        Some(r) => rest = r,
                        None => return Vec::new(),
                    },
                    Some(c) => match rest.windows(lit.len().max(1)).position(|w| w == lit) {
                        Some(p) if !lit.is_empty() => {
                            out.push((c, rest[..p].to_vec()));
                            rest = &rest[p + lit.len()..];
                        }
                        _ => return Vec::new(),
                    },
                }
            }
            Seg::Col(c) => {
                if pending.is_some() {
                    // Two columns with nothing between them cannot be told apart.
                    return Vec::new();
                }
                pending = Some(*c);
            }
        }
    }
    match pending {
        Some(c) => out.push((c, rest.to_vec())),
        None if !rest.is_empty() => return Vec::new(),
        None => {}
    }
    out
}

fn shown(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(60).collect::<String>())
    } else {
        s.into_owned()
    }
}

/// Strings as a Utf8 array; a value that is not UTF-8 is an error naming its key.
fn utf8<'c>(
    l: &Layout,
    f: &Field,
    values: impl Iterator<Item = (Option<&'c [u8]>, usize)>,
    keys: &[Vec<u8>],
) -> Result<StringArray> {
    let mut b = arrow::array::StringBuilder::new();
    for (v, row) in values {
        match v {
            None => b.append_null(),
            Some(v) => match std::str::from_utf8(v) {
                Ok(s) => b.append_value(s),
                Err(_) => {
                    return Err(Error::Config(format!(
                        "table {}: key '{}': {} is not UTF-8 text; declare the column BYTEA to read bytes",
                        l.table,
                        shown(&keys[row]),
                        f.name()
                    )));
                }
            },
        }
    }
    Ok(b.finish())
}

/// Text parsed as a type; a value that does not parse is an error naming its key and field.
fn parse(
    l: &Layout,
    name: &str,
    s: &StringArray,
    t: &DataType,
    rows: &[usize],
    keys: &[Vec<u8>],
) -> Result<ArrayRef> {
    if *t == DataType::Utf8 {
        return Ok(Arc::new(s.clone()));
    }
    let opts = CastOptions {
        safe: true,
        ..Default::default()
    };
    let out = cast_with_options(s, t, &opts)?;
    if out.null_count() != s.null_count() {
        for i in 0..s.len() {
            if s.is_valid(i) && out.is_null(i) {
                return Err(Error::Config(format!(
                    "table {}: key '{}' {name} holds '{}', which is not {t}; declare the column VARCHAR, or fix the value",
                    l.table,
                    shown(&keys[rows[i]]),
                    shown(s.value(i).as_bytes()),
                )));
            }
        }
    }
    Ok(out)
}

/// A column's cells as its type.
fn typed(l: &Layout, f: &Field, cells: &[Cell], keys: &[Vec<u8>]) -> Result<ArrayRef> {
    fn one(c: &Cell) -> Option<&[u8]> {
        match c {
            Cell::One(v) => Some(v.as_slice()),
            _ => None,
        }
    }
    let rows: Vec<usize> = (0..cells.len()).collect();
    match f.data_type() {
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            let a = BinaryArray::from_iter(cells.iter().map(one));
            Ok(arrow::compute::cast(&a, f.data_type())?)
        }
        DataType::List(item) => {
            let mut offsets = vec![0i32];
            let mut flat: Vec<(Option<&[u8]>, usize)> = Vec::new();
            let mut valid = Vec::with_capacity(cells.len());
            for (row, c) in cells.iter().enumerate() {
                match c {
                    Cell::Many(vs) => {
                        flat.extend(vs.iter().map(|v| (Some(v.as_slice()), row)));
                        valid.push(true);
                    }
                    Cell::One(v) => {
                        flat.push((Some(v.as_slice()), row));
                        valid.push(true);
                    }
                    Cell::Null => valid.push(false),
                }
                offsets.push(i32::try_from(flat.len()).map_err(|_| {
                    Error::Config(format!(
                        "table {}: more than 2^31 list items in one batch",
                        l.table
                    ))
                })?);
            }
            let item_rows: Vec<usize> = flat.iter().map(|(_, r)| *r).collect();
            let values: ArrayRef = if matches!(item.data_type(), DataType::Binary) {
                Arc::new(BinaryArray::from_iter(flat.iter().map(|(v, _)| *v)))
            } else {
                let s = utf8(l, f, flat.iter().copied(), keys)?;
                parse(
                    l,
                    &format!("item of {}", f.name()),
                    &s,
                    item.data_type(),
                    &item_rows,
                    keys,
                )?
            };
            Ok(Arc::new(GenericListArray::<i32>::try_new(
                Arc::clone(item),
                OffsetBuffer::new(offsets.into()),
                values,
                Some(NullBuffer::from(valid)),
            )?))
        }
        t => {
            let s = utf8(l, f, cells.iter().map(one).zip(0..), keys)?;
            parse(l, &format!("field {}", f.name()), &s, t, &rows, keys)
        }
    }
}

/// Bytes of a reply that is a string.
fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Double(d) => Some(d.to_string().into_bytes()),
        Value::Okay => Some(b"OK".to_vec()),
        _ => None,
    }
}

/// A reply of pairs: a RESP3 map, or a flat RESP2 array of field, value, field, value.
fn pairs(v: Value) -> Vec<(Vec<u8>, Vec<u8>)> {
    match v {
        Value::Map(m) => m
            .into_iter()
            .filter_map(|(k, v)| Some((bytes(k)?, bytes(v)?)))
            .collect(),
        Value::Array(a) => {
            if a.iter().all(|x| matches!(x, Value::Array(_))) {
                // RESP3 pairs as arrays (ZRANGE WITHSCORES).
                a.into_iter()
                    .filter_map(|p| match p {
                        Value::Array(mut kv) if kv.len() == 2 => {
                            let v = kv.pop()?;
                            let k = kv.pop()?;
                            Some((bytes(k)?, bytes(v)?))
                        }
                        _ => None,
                    })
                    .collect()
            } else {
                let mut out = Vec::with_capacity(a.len() / 2);
                let mut it = a.into_iter();
                while let (Some(k), Some(v)) = (it.next(), it.next()) {
                    if let (Some(k), Some(v)) = (bytes(k), bytes(v)) {
                        out.push((k, v));
                    }
                }
                out
            }
        }
        _ => Vec::new(),
    }
}

fn members(v: Value) -> Vec<Vec<u8>> {
    match v {
        Value::Array(a) | Value::Set(a) => a.into_iter().filter_map(bytes).collect(),
        _ => Vec::new(),
    }
}

/// A hash's or a stream entry's field-value pairs.
type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// Stream entries of an XRANGE reply: (id, fields).
fn entries(v: Value) -> Vec<(Vec<u8>, Fields)> {
    match v {
        Value::Array(a) => a
            .into_iter()
            .filter_map(|e| match e {
                Value::Array(mut e) if e.len() == 2 => {
                    let fields = e.pop()?;
                    let id = bytes(e.pop()?)?;
                    Some((id, pairs(fields)))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The command reading one key: for a hash, the asked fields (`hash_fields`), or whether it
/// exists when none is asked.
fn read_cmd(l: &Layout, key: &[u8], count: usize, hash_fields: &[usize]) -> redis::Cmd {
    match l.kind {
        Kind::Hash if hash_fields.is_empty() => redis::cmd("EXISTS").arg(key).clone(),
        Kind::Hash => {
            let mut c = redis::cmd("HMGET");
            c.arg(key);
            for &i in hash_fields {
                c.arg(l.schema.field(i).name().as_bytes());
            }
            c
        }
        Kind::String | Kind::Json => redis::cmd("GET").arg(key).clone(),
        Kind::List => redis::cmd("LRANGE").arg(key).arg(0).arg(-1).clone(),
        Kind::Set => redis::cmd("SMEMBERS").arg(key).clone(),
        Kind::ZSet => redis::cmd("ZRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .clone(),
        Kind::Stream => redis::cmd("XRANGE")
            .arg(key)
            .arg(&l.stream_range.0)
            .arg(&l.stream_range.1)
            .arg("COUNT")
            .arg(count)
            .clone(),
    }
}

/// Fetches a page of keys with one pipeline and turns them into batches of at most
/// `batch_rows` rows. Keys gone (or of another type) since SCAN are skipped.
async fn fetch(
    l: &Layout,
    conn: &mut MultiplexedConnection,
    node: &str,
    page: Vec<Vec<u8>>,
    want: &[usize],
    schema: &SchemaRef,
    batch_rows: usize,
) -> Result<Vec<RecordBatch>> {
    // Hashes: only the asked fields (HMGET; EXISTS when none is asked), so a wide hash costs
    // what is read of it.
    let hash_fields: Vec<usize> = l.fields.iter().copied().filter(|i| want.contains(i)).collect();
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for k in &page {
        pipe.add_command(read_cmd(l, k, batch_rows, &hash_fields));
    }
    let replies: Vec<Value> = pipe
        .query_async(conn)
        .await
        .map_err(|e| fail(l, node, "fetching keys", e))?;
    let mut out = Vec::new();
    // Hashes with none of the asked fields: rows if the key still exists.
    let mut recheck: Vec<Vec<u8>> = Vec::new();
    if l.kind == Kind::Json {
        let docs: Vec<(Vec<u8>, Vec<u8>)> = page
            .into_iter()
            .zip(replies)
            .filter_map(|(k, v)| bytes(v).map(|d| (k, d)))
            .collect();
        for chunk in docs.chunks(batch_rows) {
            out.push(json_batch(l, chunk, want, schema)?);
        }
        return Ok(out);
    }
    let name_of: BTreeMap<&[u8], usize> = l
        .fields
        .iter()
        .map(|&i| (l.schema.field(i).name().as_bytes(), i))
        .collect();
    let list_value = l
        .value_col
        .is_some_and(|i| matches!(l.schema.field(i).data_type(), DataType::List(_)));
    let mut rows = Rows::new(l);
    for (key, reply) in page.into_iter().zip(replies) {
        if let Value::ServerError(e) = &reply {
            if e.code() == "WRONGTYPE" {
                continue;
            }
            return Err(Error::Config(format!(
                "table {}: redis {node}: key '{}': {} {}",
                l.table,
                shown(&key),
                e.code(),
                e.details().unwrap_or_default()
            )));
        }
        match l.kind {
            Kind::Hash => match reply {
                Value::Int(n) if n > 0 => rows.push(&key, |_| Cell::Null),
                Value::Array(values) => {
                    if values.iter().all(|v| matches!(v, Value::Nil)) {
                        recheck.push(key);
                        continue;
                    }
                    // Values come in the order of hash_fields, which follows the columns.
                    let mut values = hash_fields.iter().copied().zip(values).peekable();
                    rows.push(&key, |i| match values.next_if(|(c, _)| *c == i) {
                        Some((_, v)) => bytes(v).map_or(Cell::Null, Cell::One),
                        None => Cell::Null,
                    });
                }
                _ => {}
            },
            Kind::String => {
                let Some(v) = bytes(reply) else { continue };
                let mut v = Some(v);
                rows.push(&key, |i| take_if(Some(i) == l.value_col, &mut v));
            }
            Kind::List | Kind::Set => {
                let items = members(reply);
                if items.is_empty() {
                    continue;
                }
                if list_value {
                    let mut items = Some(items);
                    rows.push(&key, |i| match items.take_if(|_| Some(i) == l.value_col) {
                        Some(v) => Cell::Many(v),
                        None => Cell::Null,
                    });
                } else {
                    for item in items {
                        let mut item = Some(item);
                        rows.push(&key, |i| take_if(Some(i) == l.value_col, &mut item));
                    }
                }
            }
            Kind::ZSet => {
                for (member, score) in pairs(reply) {
                    let (mut m, mut s) = (Some(member), Some(score));
                    rows.push(&key, |i| {
                        if Some(i) == l.value_col {
                            take_if(true, &mut m)
                        } else {
                            take_if(Some(i) == l.score_col, &mut s)
                        }
                    });
                }
            }
            Kind::Stream => {
                let mut batch = entries(reply);
                loop {
                    let full = batch.len() >= batch_rows;
                    let last = batch.last().map(|(id, _)| id.clone());
                    for (id, fields) in batch {
                        let mut by_col: Vec<Cell> = vec![Cell::Null; l.schema.fields().len()];
                        for (f, v) in fields {
                            if let Some(&i) = name_of.get(f.as_slice()) {
                                by_col[i] = Cell::One(v);
                            }
                        }
                        if let Some(i) = l.id_col {
                            by_col[i] = Cell::One(id);
                        }
                        rows.push(&key, |i| std::mem::replace(&mut by_col[i], Cell::Null));
                    }
                    if rows.len() >= batch_rows {
                        out.push(std::mem::replace(&mut rows, Rows::new(l)).finish(want, schema)?);
                    }
                    // A long stream is read in pages of batch_rows entries.
                    let (true, Some(last)) = (full, last) else { break };
                    let mut start = b"(".to_vec();
                    start.extend_from_slice(&last);
                    let next: Value = redis::cmd("XRANGE")
                        .arg(&key)
                        .arg(start)
                        .arg(&l.stream_range.1)
                        .arg("COUNT")
                        .arg(batch_rows)
                        .query_async(conn)
                        .await
                        .map_err(|e| fail(l, node, "XRANGE", e))?;
                    batch = entries(next);
                }
            }
            Kind::Json => {}
        }
        if rows.len() >= batch_rows {
            out.push(std::mem::replace(&mut rows, Rows::new(l)).finish(want, schema)?);
        }
    }
    if !recheck.is_empty() {
        let mut pipe = redis::pipe();
        for k in &recheck {
            pipe.add_command(redis::cmd("EXISTS").arg(k).clone());
        }
        let exists: Vec<i64> = pipe
            .query_async(conn)
            .await
            .map_err(|e| fail(l, node, "EXISTS", e))?;
        for (key, n) in recheck.into_iter().zip(exists) {
            if n > 0 {
                rows.push(&key, |_| Cell::Null);
            }
            if rows.len() >= batch_rows {
                out.push(std::mem::replace(&mut rows, Rows::new(l)).finish(want, schema)?);
            }
        }
    }
    if rows.len() > 0 {
        out.push(rows.finish(want, schema)?);
    }
    Ok(out)
}

/// JSON documents decoded with arrow-json into the columns; the key column added.
fn json_batch(
    l: &Layout,
    docs: &[(Vec<u8>, Vec<u8>)],
    want: &[usize],
    schema: &SchemaRef,
) -> Result<RecordBatch> {
    let fields: Vec<Arc<Field>> = l
        .fields
        .iter()
        .map(|&i| Arc::new(l.schema.field(i).clone()))
        .collect();
    let json_schema = Arc::new(Schema::new(fields));
    let decode = |docs: &[(Vec<u8>, Vec<u8>)]| -> std::result::Result<Option<RecordBatch>, String> {
        let mut d = arrow::json::ReaderBuilder::new(Arc::clone(&json_schema))
            .with_batch_size(docs.len().max(1))
            .build_decoder()
            .map_err(|e| e.to_string())?;
        for (_, doc) in docs {
            d.decode(doc).map_err(|e| e.to_string())?;
            d.decode(b"\n").map_err(|e| e.to_string())?;
        }
        d.flush().map_err(|e| e.to_string())
    };
    let decoded = match decode(docs) {
        Ok(Some(b)) if b.num_rows() == docs.len() => b,
        Ok(_) | Err(_) => {
            // Find the document at fault.
            for (k, doc) in docs {
                match decode(std::slice::from_ref(&(k.clone(), doc.clone()))) {
                    Ok(Some(b)) if b.num_rows() == 1 => {}
                    Ok(_) => {
                        return Err(Error::Config(format!(
                            "table {}: key '{}' holds '{}', which is not one JSON object",
                            l.table,
                            shown(k),
                            shown(doc)
                        )));
                    }
                    Err(e) => {
                        return Err(Error::Config(format!(
                            "table {}: key '{}': {e} (value '{}')",
                            l.table,
                            shown(k),
                            shown(doc)
                        )));
                    }
                }
            }
            return Err(Error::Config(format!(
                "table {}: the JSON values of {} keys do not decode together",
                l.table,
                docs.len()
            )));
        }
    };
    let keys: Vec<Vec<u8>> = docs.iter().map(|(k, _)| k.clone()).collect();
    let mut cols = Vec::with_capacity(want.len());
    for &i in want {
        let f = l.schema.field(i);
        if Some(i) == l.key_col {
            let cells: Vec<Cell> = keys.iter().map(|k| Cell::One(k.clone())).collect();
            cols.push(typed(l, f, &cells, &keys)?);
        } else {
            cols.push(Arc::clone(decoded.column_by_name(f.name()).ok_or_else(|| {
                Error::Config(format!(
                    "table {}: column {} missing after decoding",
                    l.table,
                    f.name()
                ))
            })?));
        }
    }
    let opts = RecordBatchOptions::new().with_row_count(Some(docs.len()));
    Ok(RecordBatch::try_new_with_options(
        Arc::clone(schema),
        cols,
        &opts,
    )?)
}

/// The type a field's sampled values suggest: BIGINT, DOUBLE or BOOLEAN when every value is one
/// (written the way flumen writes it: no leading zeros or signs that would be lost), else
/// VARCHAR, or BYTEA when a value is not UTF-8.
fn infer(values: &[Vec<u8>]) -> DataType {
    let Ok(strs) = values
        .iter()
        .map(|v| std::str::from_utf8(v))
        .collect::<std::result::Result<Vec<_>, _>>()
    else {
        return DataType::Binary;
    };
    if strs.is_empty() {
        return DataType::Utf8;
    }
    let canonical_num = |s: &str| {
        let digits = s.strip_prefix('-').unwrap_or(s);
        !digits.is_empty()
            && digits.as_bytes()[0].is_ascii_digit()
            && !(digits.len() > 1 && digits.starts_with('0') && !digits.starts_with("0."))
    };
    if strs.iter().all(|s| canonical_num(s) && s.parse::<i64>().is_ok()) {
        DataType::Int64
    } else if strs
        .iter()
        .all(|s| canonical_num(s) && s.parse::<f64>().is_ok_and(f64::is_finite))
    {
        DataType::Float64
    } else if strs.iter().all(|s| *s == "true" || *s == "false") {
        DataType::Boolean
    } else {
        DataType::Utf8
    }
}

/// The columns of up to `n` sampled keys (from each node in turn).
pub async fn sample(
    redis: &Redis,
    kind: Kind,
    pattern: &str,
    n: usize,
    key_name: &str,
    value_name: &str,
    range: &(String, String),
) -> Result<SchemaRef> {
    let topo = redis.topology().await?;
    let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
    for node in &topo.nodes {
        let mut c = redis.connect(node).await?;
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg(kind.redis_type())
                .query_async(&mut c)
                .await
                .map_err(|e| Error::Config(format!("redis {node}: SCAN: {}", text(&e))))?;
            keys.extend(page.into_iter().map(|k| (node.clone(), k)));
            cursor = next;
            if cursor == 0 || keys.len() >= n {
                break;
            }
        }
        if keys.len() >= n {
            break;
        }
    }
    keys.truncate(n);
    if keys.is_empty() {
        return Err(Error::Config(format!(
            "no {} keys match '{pattern}' to take the columns from",
            kind.redis_type()
        )));
    }
    let mut replies = Vec::with_capacity(keys.len());
    for node in &topo.nodes {
        let mine: Vec<&Vec<u8>> = keys.iter().filter(|(n, _)| n == node).map(|(_, k)| k).collect();
        if mine.is_empty() {
            continue;
        }
        let mut c = redis.connect(node).await?;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for k in &mine {
            let cmd = match kind {
                Kind::Hash => redis::cmd("HGETALL").arg(k.as_slice()).clone(),
                Kind::String | Kind::Json => redis::cmd("GET").arg(k.as_slice()).clone(),
                Kind::List => redis::cmd("LRANGE").arg(k.as_slice()).arg(0).arg(99).clone(),
                Kind::Set => redis::cmd("SRANDMEMBER").arg(k.as_slice()).arg(100).clone(),
                Kind::ZSet => redis::cmd("ZRANGE").arg(k.as_slice()).arg(0).arg(0).clone(),
                Kind::Stream => redis::cmd("XRANGE")
                    .arg(k.as_slice())
                    .arg(&range.0)
                    .arg(&range.1)
                    .arg("COUNT")
                    .arg(10)
                    .clone(),
            };
            pipe.add_command(cmd);
        }
        let r: Vec<Value> = pipe
            .query_async(&mut c)
            .await
            .map_err(|e| Error::Config(format!("redis {node}: {}", text(&e))))?;
        replies.extend(r);
    }
    let mut fields: Vec<Field> = vec![Field::new(key_name, DataType::Utf8, true)];
    match kind {
        Kind::Hash | Kind::Stream => {
            let mut seen: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
            let mut add = |fv: Vec<(Vec<u8>, Vec<u8>)>| {
                for (f, v) in fv {
                    seen.entry(f).or_default().push(v);
                }
            };
            for r in replies {
                if kind == Kind::Hash {
                    add(pairs(r));
                } else {
                    for (_, fv) in entries(r) {
                        add(fv);
                    }
                }
            }
            if kind == Kind::Stream {
                fields.push(Field::new("_id", DataType::Utf8, true));
            }
            for (f, vs) in seen {
                let name = String::from_utf8_lossy(&f).into_owned();
                if name == key_name || (kind == Kind::Stream && name == "_id") {
                    continue;
                }
                fields.push(Field::new(name, infer(&vs), true));
            }
        }
        Kind::String => {
            let vs: Vec<Vec<u8>> = replies.into_iter().filter_map(bytes).collect();
            fields.push(Field::new(value_name, infer(&vs), true));
        }
        Kind::Json => {
            let docs: Vec<std::result::Result<serde_json::Value, arrow::error::ArrowError>> = replies
                .into_iter()
                .filter_map(bytes)
                .map(|d| {
                    serde_json::from_slice::<serde_json::Value>(&d)
                        .map_err(|e| arrow::error::ArrowError::JsonError(format!("{e}: '{}'", shown(&d))))
                        .and_then(|v| {
                            if v.is_object() {
                                Ok(v)
                            } else {
                                Err(arrow::error::ArrowError::JsonError(format!(
                                    "'{}' is not a JSON object",
                                    shown(&d)
                                )))
                            }
                        })
                })
                .collect();
            let s = arrow::json::reader::infer_json_schema_from_iterator(docs.into_iter())?;
            for f in s.fields() {
                if f.name() != key_name {
                    fields.push(Field::new(f.name(), f.data_type().clone(), true));
                }
            }
        }
        Kind::List | Kind::Set => {
            let vs: Vec<Vec<u8>> = replies.into_iter().flat_map(members).collect();
            let item = Field::new("item", infer(&vs), true);
            fields.push(Field::new(value_name, DataType::List(Arc::new(item)), true));
        }
        Kind::ZSet => {
            fields.push(Field::new("member", DataType::Utf8, true));
            fields.push(Field::new("score", DataType::Float64, true));
        }
    }
    Ok(Arc::new(Schema::new(fields)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inference_keeps_what_a_number_would_lose() {
        let v = |s: &[&str]| s.iter().map(|x| x.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(infer(&v(&["1", "-20", "0"])), DataType::Int64);
        assert_eq!(infer(&v(&["1.5", "2", "0.25"])), DataType::Float64);
        assert_eq!(infer(&v(&["007", "1"])), DataType::Utf8);
        assert_eq!(infer(&v(&["+1"])), DataType::Utf8);
        assert_eq!(infer(&v(&["true", "false"])), DataType::Boolean);
        assert_eq!(infer(&v(&["x", "1"])), DataType::Utf8);
        assert_eq!(infer(&[vec![0xff, 0xfe]]), DataType::Binary);
    }

    #[test]
    fn keys_give_back_their_template_columns() {
        let t = vec![
            Seg::Lit("user:".into()),
            Seg::Col(0),
            Seg::Lit(":".into()),
            Seg::Col(2),
        ];
        assert_eq!(
            unkey(&t, b"user:7:eu"),
            vec![(0, b"7".to_vec()), (2, b"eu".to_vec())]
        );
        assert_eq!(
            unkey(&t, b"user:7:eu:x"),
            vec![(0, b"7".to_vec()), (2, b"eu:x".to_vec())]
        );
        assert!(unkey(&t, b"other:7:eu").is_empty());
        assert!(unkey(&[Seg::Col(0), Seg::Col(1)], b"ab").is_empty());
        assert_eq!(
            unkey(&[Seg::Col(0), Seg::Lit("!".into())], b"ab!"),
            vec![(0, b"ab".to_vec())]
        );
    }

    #[test]
    fn replies_as_pairs() {
        let b = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let flat = Value::Array(vec![b("a"), b("1"), b("b"), b("2")]);
        assert_eq!(pairs(flat).len(), 2);
        let map = Value::Map(vec![(b("a"), b("1"))]);
        assert_eq!(pairs(map), vec![(b"a".to_vec(), b"1".to_vec())]);
    }
}
