//! Bulk request bodies built from Arrow columns, and bulk responses read item by item.
//!
//! Documents are written by arrow-json's encoders straight from the arrays (strings escaped,
//! decimals as exact JSON numbers, timestamps as ISO-8601 with their offset, structs as objects,
//! lists as arrays, NULL fields left out); flumen writes the action lines around them.

use std::fmt::Write as _;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StructArray};
use arrow::datatypes::{DataType, Field, FieldRef};
use arrow::json::writer::{Encoder, EncoderFactory, EncoderOptions, NullableEncoder, make_encoder};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::error::{Error, Result};

/// The bulk operation written for every row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Index,
    Create,
    Update,
    Upsert,
    Delete,
}

impl Op {
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "index" => Op::Index,
            "create" => Op::Create,
            "update" => Op::Update,
            "upsert" => Op::Upsert,
            "delete" => Op::Delete,
            _ => return None,
        })
    }

    fn action(self) -> &'static str {
        match self {
            Op::Index => "index",
            Op::Create => "create",
            Op::Update | Op::Upsert => "update",
            Op::Delete => "delete",
        }
    }

    /// Whether the operation needs a document id from the rows.
    pub fn needs_id(self) -> bool {
        matches!(self, Op::Update | Op::Upsert | Op::Delete)
    }
}

/// One piece of an index name: text, a column's value, or a column's date formatted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexPart {
    Text(String),
    Column(usize),
    Date(usize, String),
}

/// Parses `logs-{ts:%Y.%m.%d}` or `by-{city}` against the table's columns.
pub fn parse_index(template: &str, fields: &[Arc<Field>]) -> Result<Vec<IndexPart>> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        if start > 0 {
            parts.push(IndexPart::Text(rest[..start].to_string()));
        }
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| Error::Option(format!("index '{template}': '{{' without '}}'")))?
            + start;
        let inner = &rest[start + 1..end];
        let (col, fmt) = match inner.split_once(':') {
            Some((c, f)) => (c, Some(f)),
            None => (inner, None),
        };
        let i = fields.iter().position(|f| f.name() == col).ok_or_else(|| {
            Error::Option(format!(
                "index '{template}': {{{col}}} is not a column of the table"
            ))
        })?;
        parts.push(match fmt {
            Some(f) => {
                if !fields[i].data_type().is_temporal() {
                    return Err(Error::Option(format!(
                        "index '{template}': {{{col}:{f}}} needs a date or timestamp column"
                    )));
                }
                IndexPart::Date(i, f.to_string())
            }
            None => IndexPart::Column(i),
        });
        rest = &rest[end + 1..];
    }
    if !rest.is_empty() {
        parts.push(IndexPart::Text(rest.to_string()));
    }
    if parts.is_empty() {
        return Err(Error::Option("option 'index' is empty".into()));
    }
    if let [IndexPart::Text(t)] = parts.as_slice() {
        check_index_name(t)?;
    }
    Ok(parts)
}

/// Elasticsearch's and OpenSearch's rules for index names.
pub fn check_index_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.starts_with(['-', '_', '+'])
        || name == "."
        || name == ".."
        || name.chars().any(|c| {
            c.is_ascii_uppercase()
                || matches!(
                    c,
                    '\\' | '/' | '*' | '?' | '"' | '<' | '>' | '|' | ' ' | ',' | '#' | ':'
                )
        });
    if bad {
        return Err(Error::Option(format!(
            "'{name}' is not a valid index name: lowercase, no spaces or \\/*?\"<>|,#:, not starting with -, _ or +"
        )));
    }
    Ok(())
}

/// How rows become bulk lines.
#[derive(Debug, Clone)]
pub struct BulkSpec {
    pub index: Vec<IndexPart>,
    pub op: Op,
    pub id_column: Option<usize>,
    pub routing_column: Option<usize>,
    /// Timestamp/date columns written as epoch milliseconds (their mapping's format says so).
    pub epoch_millis: Vec<usize>,
}

/// A request: the NDJSON body, its item count (to read the answer) and the distinct indices it
/// writes, in order of first use (to create them).
#[derive(Debug)]
pub struct BulkBody {
    pub body: Vec<u8>,
    pub items: usize,
    pub indices: Vec<String>,
}

/// Writes `s` as a JSON string.
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&[u8]> = match b {
            b'"' => Some(b"\\\""),
            b'\\' => Some(b"\\\\"),
            b'\n' => Some(b"\\n"),
            b'\r' => Some(b"\\r"),
            b'\t' => Some(b"\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        match esc {
            Some(e) => out.extend_from_slice(e),
            None => out.extend_from_slice(format!("\\u{b:04x}").as_bytes()),
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

/// The document columns: everything but the id and routing columns (they go to the action).
fn document_columns(batch: &RecordBatch, spec: &BulkSpec) -> Result<(Vec<Arc<Field>>, Vec<ArrayRef>)> {
    let skip = |i: usize| Some(i) == spec.id_column || Some(i) == spec.routing_column;
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (i, (f, c)) in batch.schema().fields().iter().zip(batch.columns()).enumerate() {
        if skip(i) {
            continue;
        }
        if spec.epoch_millis.contains(&i) {
            let ms = arrow::compute::cast(
                c,
                &DataType::Timestamp(arrow::datatypes::TimeUnit::Millisecond, None),
            )?;
            let ms = arrow::compute::cast(&ms, &DataType::Int64)?;
            fields.push(Arc::new(Field::new(f.name(), DataType::Int64, true)));
            columns.push(ms);
        } else {
            fields.push(Arc::clone(f));
            columns.push(Arc::clone(c));
        }
    }
    Ok((fields, columns))
}

/// Binary values as base64 strings, the form the `binary` field type takes (arrow-json alone
/// would write hex, which the server would store as different bytes), at any depth.
#[derive(Debug)]
struct Base64Binary;

struct Base64Encoder<'a>(&'a dyn Array);

impl Encoder for Base64Encoder<'_> {
    fn encode(&mut self, idx: usize, out: &mut Vec<u8>) {
        use arrow::array::AsArray;
        use base64::Engine as _;
        let a = self.0;
        let bytes: &[u8] = match a.data_type() {
            DataType::Binary => a.as_binary::<i32>().value(idx),
            DataType::LargeBinary => a.as_binary::<i64>().value(idx),
            DataType::BinaryView => a.as_binary_view().value(idx),
            DataType::FixedSizeBinary(_) => a.as_fixed_size_binary().value(idx),
            _ => &[],
        };
        out.push(b'"');
        let start = out.len();
        out.resize(start + bytes.len().div_ceil(3) * 4, 0);
        let n = base64::engine::general_purpose::STANDARD
            .encode_slice(bytes, &mut out[start..])
            .unwrap_or(0);
        out.truncate(start + n);
        out.push(b'"');
    }
}

impl EncoderFactory for Base64Binary {
    fn make_default_encoder<'a>(
        &self,
        _field: &'a FieldRef,
        array: &'a dyn Array,
        _options: &'a EncoderOptions,
    ) -> std::result::Result<Option<NullableEncoder<'a>>, arrow::error::ArrowError> {
        Ok(match array.data_type() {
            DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
            | DataType::FixedSizeBinary(_) => Some(NullableEncoder::new(
                Box::new(Base64Encoder(array)),
                array.logical_nulls(),
            )),
            _ => None,
        })
    }
}

/// The columns whose explicit mapping stores dates as epoch milliseconds (`"format":
/// "epoch_millis"` first among its formats).
pub fn epoch_millis_columns(mapping: &serde_json::Value, fields: &[Arc<Field>]) -> Vec<usize> {
    fields
        .iter()
        .enumerate()
        .filter(|(_, f)| f.data_type().is_temporal())
        .filter(|(_, f)| {
            mapping
                .pointer(&format!(
                    "/properties/{}/format",
                    f.name().replace('~', "~0").replace('/', "~1")
                ))
                .and_then(|v| v.as_str())
                .is_some_and(|fmt| fmt.split("||").next() == Some("epoch_millis"))
        })
        .map(|(i, _)| i)
        .collect()
}

/// Encodes a batch as one bulk body. `default_id(row)` gives the id of rows without an id
/// column (deterministic, so a request sent again overwrites instead of duplicating).
pub fn encode(
    batch: &RecordBatch,
    spec: &BulkSpec,
    default_id: &dyn Fn(usize) -> String,
) -> Result<BulkBody> {
    let (fields, columns) = document_columns(batch, spec)?;
    let docs = StructArray::try_new(fields.clone().into(), columns, None)?;
    let doc_field = Arc::new(Field::new("doc", DataType::Struct(fields.into()), false));
    // Timestamps without a zone are UTC in flumen (as in DataFusion): written with `Z`, so the
    // server never guesses.
    let opts = EncoderOptions::default()
        .with_timestamp_format("%Y-%m-%dT%H:%M:%S%.fZ".to_string())
        .with_encoder_factory(Arc::new(Base64Binary));
    let mut doc = make_encoder(&doc_field, &docs, &opts)?;
    let fmt_opts = FormatOptions::default();
    let text = |i: usize| -> Result<ArrayFormatter<'_>> {
        Ok(ArrayFormatter::try_new(batch.column(i).as_ref(), &fmt_opts)?)
    };
    let id_fmt = spec.id_column.map(text).transpose()?;
    let routing_fmt = spec.routing_column.map(text).transpose()?;
    let index_fmts: Vec<Option<ArrayFormatter<'_>>> = spec
        .index
        .iter()
        .map(|p| match p {
            IndexPart::Column(i) => text(*i).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<_>>()?;
    let rows = batch.num_rows();
    let mut out = Vec::with_capacity(batch.get_array_memory_size() * 2 + rows * 64);
    let mut indices: Vec<String> = Vec::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut name = String::new();
    let mut value = String::new();
    for row in 0..rows {
        name.clear();
        for (part, f) in spec.index.iter().zip(&index_fmts) {
            match (part, f) {
                (IndexPart::Text(t), _) => name.push_str(t),
                (IndexPart::Column(i), Some(f)) => {
                    if batch.column(*i).is_null(row) {
                        return Err(row_err(batch, *i, row, "is NULL and names the index"));
                    }
                    let _ = write!(name, "{}", f.value(row));
                }
                (IndexPart::Date(i, fmt), _) => {
                    name.push_str(&format_date(batch.column(*i), row, fmt).ok_or_else(|| {
                        row_err(batch, *i, row, "is NULL or not a date and names the index")
                    })?)
                }
                _ => {}
            }
        }
        if spec.index.len() > 1 || !matches!(spec.index.first(), Some(IndexPart::Text(_))) {
            name = name.to_lowercase();
            check_index_name(&name).map_err(|e| Error::Config(format!("row {}: {e}", row + 1)))?;
        }
        out.extend_from_slice(b"{\"");
        out.extend_from_slice(spec.op.action().as_bytes());
        out.extend_from_slice(b"\":{\"_index\":");
        json_str(&mut out, &name);
        value.clear();
        match (&id_fmt, spec.id_column) {
            (Some(f), Some(i)) => {
                if batch.column(i).is_null(row) {
                    return Err(row_err(batch, i, row, "is NULL and is the document id"));
                }
                let _ = write!(value, "{}", f.value(row));
            }
            _ => value.push_str(&default_id(row)),
        }
        out.extend_from_slice(b",\"_id\":");
        json_str(&mut out, &value);
        if let (Some(f), Some(i)) = (&routing_fmt, spec.routing_column)
            && !batch.column(i).is_null(row)
        {
            value.clear();
            let _ = write!(value, "{}", f.value(row));
            out.extend_from_slice(b",\"routing\":");
            json_str(&mut out, &value);
        }
        out.extend_from_slice(b"}}\n");
        match spec.op {
            Op::Delete => {}
            Op::Index | Op::Create => {
                doc.encode(row, &mut out);
                out.push(b'\n');
            }
            Op::Update => {
                out.extend_from_slice(b"{\"doc\":");
                doc.encode(row, &mut out);
                out.extend_from_slice(b"}\n");
            }
            Op::Upsert => {
                out.extend_from_slice(b"{\"doc\":");
                doc.encode(row, &mut out);
                out.extend_from_slice(b",\"doc_as_upsert\":true}\n");
            }
        }
        if indices.last() != Some(&name) && seen.insert(name.clone()) {
            indices.push(name.clone());
        }
    }
    Ok(BulkBody {
        body: out,
        items: rows,
        indices,
    })
}

fn row_err(batch: &RecordBatch, col: usize, row: usize, what: &str) -> Error {
    Error::Config(format!(
        "column {} row {}: {what}",
        batch.schema().field(col).name(),
        row + 1
    ))
}

/// A date or timestamp value formatted with a strftime pattern (for time-based indices).
fn format_date(a: &ArrayRef, row: usize, fmt: &str) -> Option<String> {
    use arrow::array::AsArray;
    use arrow::datatypes::{
        Date32Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType, TimestampNanosecondType,
        TimestampSecondType,
    };
    if a.is_null(row) {
        return None;
    }
    let micros: i64 = match a.data_type() {
        // Out of range (overflowing i64 microseconds): no name, the row's error says so.
        DataType::Date32 => {
            i64::from(a.as_primitive::<Date32Type>().value(row)).checked_mul(86_400_000_000)?
        }
        DataType::Timestamp(TimeUnit::Second, _) => a
            .as_primitive::<TimestampSecondType>()
            .value(row)
            .checked_mul(1_000_000)?,
        DataType::Timestamp(TimeUnit::Millisecond, _) => a
            .as_primitive::<TimestampMillisecondType>()
            .value(row)
            .checked_mul(1000)?,
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            a.as_primitive::<TimestampMicrosecondType>().value(row)
        }
        DataType::Timestamp(TimeUnit::Nanosecond, _) => {
            a.as_primitive::<TimestampNanosecondType>().value(row) / 1000
        }
        _ => return None,
    };
    let t = chrono::DateTime::from_timestamp_micros(micros)?;
    let mut s = String::new();
    write!(s, "{}", t.format(fmt)).ok()?;
    Some(s)
}

/// What the server said about one item of a bulk request.
#[derive(Debug, PartialEq, Eq)]
pub enum ItemOutcome {
    Done,
    /// 429 or 5xx: send again.
    Retry(String),
    /// Refused (mapping conflict, bad value, ...): the server's reason.
    Rejected(String),
}

/// Reads a bulk response's items in order. `created_ok`: a 409 on `create` means an earlier
/// attempt of this very request created the document (flumen's deterministic ids).
pub fn read_response(body: &[u8], items: usize, op: Op, created_ok: bool) -> Result<Vec<ItemOutcome>> {
    #[derive(serde::Deserialize)]
    struct Resp {
        #[serde(default)]
        errors: bool,
        #[serde(default)]
        items: Vec<std::collections::HashMap<String, Item>>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        status: u16,
        #[serde(default)]
        error: Option<serde_json::Value>,
    }
    let r: Resp = serde_json::from_slice(body).map_err(|e| {
        Error::Config(format!(
            "the bulk answer is not JSON ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        ))
    })?;
    if !r.errors && r.items.len() == items {
        return Ok((0..items).map(|_| ItemOutcome::Done).collect());
    }
    if r.items.len() != items {
        return Err(Error::Config(format!(
            "the bulk answer has {} items for {items} documents",
            r.items.len()
        )));
    }
    Ok(r.items
        .into_iter()
        .map(|m| {
            let Some(item) = m.into_values().next() else {
                return ItemOutcome::Retry("an empty item in the bulk answer".into());
            };
            let reason = || {
                let e = item.error.as_ref();
                let ty = e
                    .and_then(|e| e.get("type"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("error");
                let why = e
                    .and_then(|e| e.get("reason"))
                    .and_then(|t| t.as_str())
                    .unwrap_or("");
                let cause = e
                    .and_then(|e| e.get("caused_by"))
                    .and_then(|c| c.get("reason"))
                    .and_then(|t| t.as_str())
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default();
                format!("HTTP {}: {ty}: {why}{cause}", item.status)
            };
            match item.status {
                200..=299 => ItemOutcome::Done,
                404 if op == Op::Delete => ItemOutcome::Done,
                409 if op == Op::Create && created_ok => ItemOutcome::Done,
                429 | 500..=599 => ItemOutcome::Retry(reason()),
                _ => ItemOutcome::Rejected(reason()),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Decimal128Array, Int64Array, ListArray, StringArray, TimestampMillisecondArray};
    use arrow::datatypes::Int32Type;

    #[test]
    fn an_index_date_past_i64_microseconds_is_none() {
        let a: ArrayRef = Arc::new(arrow::array::TimestampSecondArray::from(vec![i64::MAX / 2]));
        assert_eq!(format_date(&a, 0, "%Y"), None);
        let a: ArrayRef = Arc::new(arrow::array::TimestampSecondArray::from(vec![1_700_000_000]));
        assert_eq!(format_date(&a, 0, "%Y").as_deref(), Some("2023"));
    }

    fn batch() -> RecordBatch {
        RecordBatch::try_from_iter([
            ("id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
            (
                "name",
                Arc::new(StringArray::from(vec![Some("a \"q\"\n\u{1}é"), None])) as ArrayRef,
            ),
            (
                "price",
                Arc::new(
                    Decimal128Array::from(vec![Some(123456789012345678), None])
                        .with_precision_and_scale(20, 4)
                        .unwrap(),
                ) as ArrayRef,
            ),
            (
                "ts",
                Arc::new(TimestampMillisecondArray::from(vec![0, 1_700_000_000_123]).with_timezone("+02:00"))
                    as ArrayRef,
            ),
            (
                "tags",
                Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![
                    Some(vec![Some(1), None]),
                    None,
                ])) as ArrayRef,
            ),
        ])
        .unwrap()
    }

    #[test]
    fn bodies_escape_keep_decimals_and_omit_nulls() {
        let b = batch();
        let spec = BulkSpec {
            index: parse_index("logs-{ts:%Y.%m}", b.schema().fields()).unwrap(),
            op: Op::Index,
            id_column: Some(0),
            routing_column: None,
            epoch_millis: Vec::new(),
        };
        let body = encode(&b, &spec, &|r| format!("x{r}")).unwrap();
        let text = String::from_utf8(body.body).unwrap();
        assert_eq!(
            text,
            "{\"index\":{\"_index\":\"logs-1970.01\",\"_id\":\"1\"}}\n\
             {\"name\":\"a \\\"q\\\"\\n\\u0001é\",\"price\":12345678901234.5678,\"ts\":\"1970-01-01T02:00:00+02:00\",\"tags\":[1,null]}\n\
             {\"index\":{\"_index\":\"logs-2023.11\",\"_id\":\"2\"}}\n\
             {\"ts\":\"2023-11-15T00:13:20.123+02:00\"}\n"
        );
        assert_eq!(body.indices, vec!["logs-1970.01", "logs-2023.11"]);
    }

    #[test]
    fn upserts_deletes_and_default_ids() {
        let b = batch();
        let mut spec = BulkSpec {
            index: parse_index("items", b.schema().fields()).unwrap(),
            op: Op::Upsert,
            id_column: None,
            routing_column: Some(0),
            epoch_millis: vec![3],
        };
        let text = String::from_utf8(encode(&b, &spec, &|r| format!("t-{r}")).unwrap().body).unwrap();
        assert!(text.starts_with(
            "{\"update\":{\"_index\":\"items\",\"_id\":\"t-0\",\"routing\":\"1\"}}\n{\"doc\":{\"name\""
        ));
        assert!(text.contains(",\"doc_as_upsert\":true}\n"));
        assert!(text.contains("\"ts\":1700000000123"), "epoch millis: {text}");
        let mapping = serde_json::json!({"properties": {"ts": {"type": "date", "format": "epoch_millis||strict_date"}}});
        assert_eq!(epoch_millis_columns(&mapping, b.schema().fields()), vec![3]);
        spec.op = Op::Delete;
        let text = String::from_utf8(encode(&b, &spec, &|r| format!("t-{r}")).unwrap().body).unwrap();
        assert_eq!(text.lines().count(), 2);
    }

    #[test]
    fn index_names_are_checked() {
        let fields = batch().schema().fields().to_vec();
        assert!(parse_index("Bad Index", &fields).is_err());
        assert!(parse_index("x-{nope}", &fields).is_err());
        assert!(parse_index("x-{name:%Y}", &fields).is_err());
        assert_eq!(
            parse_index("a-{name}", &fields).unwrap(),
            vec![IndexPart::Text("a-".into()), IndexPart::Column(1)]
        );
    }

    #[test]
    fn responses_are_read_item_by_item() {
        let body = br#"{"errors":true,"items":[{"index":{"status":201}},{"index":{"status":429,"error":{"type":"es_rejected_execution_exception","reason":"busy"}}},{"index":{"status":400,"error":{"type":"mapper_parsing_exception","reason":"failed to parse field [n]","caused_by":{"reason":"For input string"}}}}]}"#;
        let r = read_response(body, 3, Op::Index, false).unwrap();
        assert_eq!(r[0], ItemOutcome::Done);
        assert!(matches!(&r[1], ItemOutcome::Retry(m) if m.contains("429")));
        assert_eq!(
            r[2],
            ItemOutcome::Rejected(
                "HTTP 400: mapper_parsing_exception: failed to parse field [n] (For input string)".into()
            )
        );
        assert!(read_response(b"{\"errors\":false,\"items\":[]}", 2, Op::Index, false).is_err());
    }
}
