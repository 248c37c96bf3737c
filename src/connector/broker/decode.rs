//! Messages to rows: payloads decoded as JSON objects (arrow-json), CSV records (arrow-csv) or
//! kept raw, metadata columns filled from the message, and payloads that do not decode set
//! aside as dead letters with the reason.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, Int32Array, Int64Array, RecordBatch, RecordBatchOptions, StringArray,
    TimestampMillisecondArray,
};
use arrow::compute::{cast, concat_batches};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;

use super::Message;
use crate::connector::options::TableOptions;
use crate::error::{Error, Result};
use crate::sink::RunState;

/// How a payload holds its row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// One JSON object per message; its fields are the columns.
    Json,
    /// One CSV record (no header) per message, columns in declared order.
    Csv,
    /// The payload itself, as `_payload`.
    Raw,
}

/// The metadata columns, by name.
pub const META: &[&str] = &[
    "_topic",
    "_key",
    "_partition",
    "_offset",
    "_id",
    "_timestamp",
    "_headers",
    "_payload",
];

/// Messages that do not decode: (index, reason).
pub type Rejected = Vec<(usize, String)>;

/// Decodes the messages of one table.
#[derive(Debug)]
pub struct MessageDecoder {
    table: String,
    format: PayloadFormat,
    /// The declared columns.
    schema: SchemaRef,
    /// The declared columns that come from the payload (all of them are decoded whatever the
    /// projection, so what is a dead letter does not depend on the query).
    payload_schema: SchemaRef,
    /// The scan's columns (indices into `schema`).
    projection: Vec<usize>,
}

impl MessageDecoder {
    /// Checks the declared columns against the format.
    pub fn new(table: &str, format: PayloadFormat, schema: SchemaRef) -> Result<Self> {
        let payload: Vec<Arc<Field>> = schema
            .fields()
            .iter()
            .filter(|f| !META.contains(&f.name().as_str()))
            .cloned()
            .collect();
        if format == PayloadFormat::Raw && !payload.is_empty() {
            return Err(Error::Option(format!(
                "table {table}: format raw gives only _payload and the metadata columns ({}); {} would be empty (use format json or csv)",
                META.join(", "),
                payload
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if schema.fields().is_empty() {
            return Err(Error::Option(format!(
                "table {table}: declare the columns of the messages, e.g. CREATE EXTERNAL TABLE {table} (id BIGINT, name VARCHAR, _offset BIGINT) ... (metadata columns: {})",
                META.join(", ")
            )));
        }
        for f in schema
            .fields()
            .iter()
            .filter(|f| META.contains(&f.name().as_str()))
        {
            let ok = match f.name().as_str() {
                "_key" | "_payload" => matches!(
                    f.data_type(),
                    DataType::Utf8
                        | DataType::LargeUtf8
                        | DataType::Utf8View
                        | DataType::Binary
                        | DataType::LargeBinary
                        | DataType::BinaryView
                ),
                "_partition" | "_offset" => f.data_type().is_integer(),
                "_timestamp" => matches!(f.data_type(), DataType::Timestamp(..) | DataType::Int64),
                _ => matches!(
                    f.data_type(),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                ),
            };
            if !ok {
                return Err(Error::Option(format!(
                    "table {table}: metadata column {} cannot be {} (see the broker column table in the README)",
                    f.name(),
                    f.data_type()
                )));
            }
        }
        Ok(Self {
            table: table.to_string(),
            format,
            payload_schema: Arc::new(Schema::new(payload)),
            projection: (0..schema.fields().len()).collect(),
            schema,
        })
    }

    /// The decoder of a broker table's declared columns, in its `format` option's format.
    pub fn from_options(table: &str, o: &TableOptions, schema: SchemaRef) -> Result<Self> {
        let format = match o.choice_or("format", &["json", "csv", "raw"], "json")? {
            "csv" => PayloadFormat::Csv,
            "raw" => PayloadFormat::Raw,
            _ => PayloadFormat::Json,
        };
        Self::new(table, format, schema)
    }

    /// The same decoder giving only the `projection`ed columns.
    pub fn project(&self, projection: Option<&Vec<usize>>) -> Self {
        Self {
            table: self.table.clone(),
            format: self.format,
            schema: Arc::clone(&self.schema),
            payload_schema: Arc::clone(&self.payload_schema),
            projection: projection
                .cloned()
                .unwrap_or_else(|| (0..self.schema.fields().len()).collect()),
        }
    }

    pub fn output_schema(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.projection
                .iter()
                .map(|&i| self.schema.fields()[i].clone())
                .collect::<Vec<_>>(),
        ))
    }

    pub fn format_name(&self) -> &'static str {
        match self.format {
            PayloadFormat::Json => "json",
            PayloadFormat::Csv => "csv",
            PayloadFormat::Raw => "raw",
        }
    }

    /// The rows of `messages`, and the (index, reason) of those that do not decode.
    pub fn decode(&self, messages: &[Message]) -> Result<(RecordBatch, Rejected)> {
        let (payload, rejected) = self.decode_payloads(messages)?;
        let accepted: Vec<&Message> = if rejected.is_empty() {
            messages.iter().collect()
        } else {
            let mut bad = rejected.iter().map(|(i, _)| *i).peekable();
            messages
                .iter()
                .enumerate()
                .filter(|(i, _)| {
                    if bad.peek() == Some(i) {
                        bad.next();
                        false
                    } else {
                        true
                    }
                })
                .map(|(_, m)| m)
                .collect()
        };
        let out = self.output_schema();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(out.fields().len());
        for f in out.fields() {
            let col = match f.name().as_str() {
                name if META.contains(&name) => meta_column(name, &accepted, f.data_type())?,
                name => match payload.as_ref().and_then(|p| p.column_by_name(name)) {
                    Some(c) => Arc::clone(c),
                    None => arrow::array::new_null_array(f.data_type(), accepted.len()),
                },
            };
            columns.push(col);
        }
        let batch = RecordBatch::try_new_with_options(
            out,
            columns,
            &RecordBatchOptions::new().with_row_count(Some(accepted.len())),
        )?;
        Ok((batch, rejected))
    }

    /// The payload columns of the messages that decode (in order), and the rest with reasons.
    fn decode_payloads(&self, messages: &[Message]) -> Result<(Option<RecordBatch>, Rejected)> {
        if self.format == PayloadFormat::Raw
            || self.payload_schema.fields().is_empty() && self.format == PayloadFormat::Csv
        {
            return Ok((None, Vec::new()));
        }
        // Fast path: the whole chunk at once.
        let mut joined = Vec::with_capacity(messages.iter().map(|m| m.payload.len() + 1).sum());
        for m in messages {
            joined.extend_from_slice(&m.payload);
            joined.push(b'\n');
        }
        if let Ok(b) = self.decode_bytes(&joined, messages.len())
            && b.num_rows() == messages.len()
            && messages
                .iter()
                .all(|m| !m.payload.iter().all(u8::is_ascii_whitespace))
        {
            return Ok((Some(b), Vec::new()));
        }
        // Some payload is bad: one at a time, to name it.
        let mut good = Vec::new();
        let mut rejected = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.payload.iter().all(u8::is_ascii_whitespace) {
                rejected.push((i, "the payload is empty".to_string()));
                continue;
            }
            let mut one = m.payload.to_vec();
            one.push(b'\n');
            match self.decode_bytes(&one, 1) {
                Ok(b) if b.num_rows() == 1 => good.push(b),
                Ok(b) => rejected.push((i, format!("the payload holds {} records, not one", b.num_rows()))),
                Err(e) => rejected.push((i, e)),
            }
        }
        let batch = concat_batches(&self.payload_schema, &good)?;
        Ok((Some(batch), rejected))
    }

    fn decode_bytes(&self, bytes: &[u8], rows: usize) -> std::result::Result<RecordBatch, String> {
        let schema = Arc::clone(&self.payload_schema);
        let batches: Vec<RecordBatch> = match self.format {
            PayloadFormat::Json => {
                let mut d = arrow::json::ReaderBuilder::new(schema)
                    .with_batch_size(rows.max(1) + 1)
                    .with_coerce_primitive(true)
                    .build_decoder()
                    .map_err(|e| e.to_string())?;
                let mut buf = bytes;
                let mut out = Vec::new();
                while !buf.is_empty() {
                    let n = d.decode(buf).map_err(|e| json_error(&e.to_string()))?;
                    if n == 0 {
                        break;
                    }
                    buf = &buf[n..];
                    if !buf.is_empty()
                        && let Some(b) = d.flush().map_err(|e| json_error(&e.to_string()))?
                    {
                        out.push(b);
                    }
                }
                if let Some(b) = d.flush().map_err(|e| json_error(&e.to_string()))? {
                    out.push(b);
                }
                out
            }
            PayloadFormat::Csv => arrow::csv::ReaderBuilder::new(schema)
                .with_header(false)
                .with_batch_size(rows.max(1))
                .build(Cursor::new(bytes))
                .map_err(|e| e.to_string())?
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?,
            PayloadFormat::Raw => Vec::new(),
        };
        concat_batches(&self.payload_schema, &batches).map_err(|e| e.to_string())
    }
}

fn json_error(e: &str) -> String {
    format!("not a JSON object of the declared columns: {e}")
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A metadata column for the accepted messages, cast to the declared type.
fn meta_column(name: &str, msgs: &[&Message], to: &DataType) -> Result<ArrayRef> {
    let bytes_or_text = |get: &dyn Fn(&Message) -> Option<Bytes>| -> ArrayRef {
        if matches!(
            to,
            DataType::Binary | DataType::LargeBinary | DataType::BinaryView
        ) {
            Arc::new(BinaryArray::from_iter(msgs.iter().map(|m| get(m))))
        } else {
            Arc::new(StringArray::from_iter(
                msgs.iter().map(|m| get(m).map(|b| text_of(&b))),
            ))
        }
    };
    let natural: ArrayRef = match name {
        "_topic" => Arc::new(StringArray::from_iter(msgs.iter().map(|m| m.topic.clone()))),
        "_key" => bytes_or_text(&|m| m.key.clone()),
        "_payload" => bytes_or_text(&|m| Some(m.payload.clone())),
        "_partition" => Arc::new(Int32Array::from_iter(msgs.iter().map(|m| m.partition))),
        "_offset" => Arc::new(Int64Array::from_iter(msgs.iter().map(|m| m.offset))),
        "_id" => Arc::new(StringArray::from_iter(msgs.iter().map(|m| m.id.clone()))),
        "_timestamp" => Arc::new(TimestampMillisecondArray::from_iter(
            msgs.iter().map(|m| m.timestamp_ms),
        )),
        "_headers" => Arc::new(StringArray::from_iter(msgs.iter().map(|m| {
            (!m.headers.is_empty()).then(|| {
                let map: serde_json::Map<String, serde_json::Value> = m
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(text_of(v))))
                    .collect();
                serde_json::Value::Object(map).to_string()
            })
        }))),
        other => return Err(Error::Config(format!("{other} is not a metadata column"))),
    };
    if natural.data_type() == to {
        return Ok(natural);
    }
    Ok(cast(&natural, to)?)
}

/// The dead letters of one table's read: `dead_letter/<run>/<table>/part-N.parquet` with the raw
/// payload, where it came from and why it was set aside.
pub struct DeadLetters {
    table: String,
    run: Option<Arc<RunState>>,
}

impl DeadLetters {
    pub fn new(table: &str, run: Option<Arc<RunState>>) -> Self {
        Self {
            table: table.to_string(),
            run,
        }
    }

    /// Keeps `rejected` (indices into `messages`, with reasons). Without run state the read
    /// fails instead: a rejected message must go somewhere.
    pub fn write(&mut self, messages: &[Message], rejected: &[(usize, String)]) -> Result<()> {
        let Some(run) = &self.run else {
            let (i, why) = &rejected[0];
            return Err(Error::Config(format!(
                "table {}: message {} does not decode: {why}",
                self.table,
                describe(&messages[*i])
            )));
        };
        let picked: Vec<&Message> = rejected.iter().map(|(i, _)| &messages[*i]).collect();
        let fields = vec![
            Field::new("_topic", DataType::Utf8, true),
            Field::new("_partition", DataType::Int32, true),
            Field::new("_offset", DataType::Int64, true),
            Field::new("_id", DataType::Utf8, true),
            Field::new("_key", DataType::Utf8, true),
            Field::new("_payload", DataType::Utf8, false),
            Field::new("_error", DataType::Utf8, false),
            Field::new(
                "_at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                false,
            ),
        ];
        let now = chrono::Utc::now().timestamp_micros();
        let columns: Vec<ArrayRef> = vec![
            meta_column("_topic", &picked, &DataType::Utf8)?,
            meta_column("_partition", &picked, &DataType::Int32)?,
            meta_column("_offset", &picked, &DataType::Int64)?,
            meta_column("_id", &picked, &DataType::Utf8)?,
            meta_column("_key", &picked, &DataType::Utf8)?,
            meta_column("_payload", &picked, &DataType::Utf8)?,
            Arc::new(StringArray::from_iter_values(
                rejected.iter().map(|(_, w)| w.as_str()),
            )),
            Arc::new(
                arrow::array::TimestampMicrosecondArray::from(vec![now; picked.len()]).with_timezone("UTC"),
            ),
        ];
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        let dir = run.dead_letter_dir(&self.table);
        crate::sink::write_parquet(&run.new_dead_letter_file(&self.table, "src-part"), &batch)?;
        tracing::warn!(
            "table {}: {} message(s) did not decode and went to {} (first: {}: {})",
            self.table,
            rejected.len(),
            dir.display(),
            describe(picked[0]),
            rejected[0].1
        );
        Ok(())
    }
}

/// Where a message came from, for messages.
pub fn describe(m: &Message) -> String {
    let mut parts = Vec::new();
    if let Some(t) = &m.topic {
        parts.push(t.clone());
    }
    if let Some(p) = m.partition {
        parts.push(format!("partition {p}"));
    }
    if let Some(o) = m.offset {
        parts.push(format!("offset {o}"));
    }
    if let Some(i) = &m.id {
        parts.push(format!("id {i}"));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: i64, payload: &str) -> Message {
        Message {
            payload: Bytes::from(payload.to_string()),
            topic: Some("t".into()),
            partition: Some(0),
            offset: Some(i),
            ..Message::default()
        }
    }

    #[test]
    fn json_with_bad_payloads_set_aside() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
            Field::new("_offset", DataType::Int64, true),
        ]));
        let d = MessageDecoder::new("t", PayloadFormat::Json, schema).unwrap();
        let msgs = vec![
            msg(10, r#"{"id": 1, "name": "a"}"#),
            msg(11, r#"{"id": 2, "name": "#),
            msg(12, ""),
            msg(13, r#"{"id": "x"}"#),
            msg(14, r#"{"id": 5, "extra": [1]}"#),
        ];
        let (b, rejected) = d.decode(&msgs).unwrap();
        assert_eq!(b.num_rows(), 2);
        assert_eq!(rejected.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2, 3]);
        let offsets = b.column(2).as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(offsets.values(), &[10, 14]);
        // The fast path: all good.
        let (b, rejected) = d.decode(&msgs[..1]).unwrap();
        assert_eq!((b.num_rows(), rejected.len()), (1, 0));
        // A projection of metadata only still sets the bad payloads aside.
        let p = d.project(Some(&vec![2]));
        let (b, rejected) = p.decode(&msgs).unwrap();
        assert_eq!((b.num_rows(), b.num_columns(), rejected.len()), (2, 1, 3));
    }

    #[test]
    fn csv_and_raw() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, true),
            Field::new("name", DataType::Utf8, true),
        ]));
        let d = MessageDecoder::new("t", PayloadFormat::Csv, schema).unwrap();
        let (b, rejected) = d
            .decode(&[msg(0, "1,a"), msg(1, "x,b"), msg(2, "3,\"c,d\"")])
            .unwrap();
        assert_eq!((b.num_rows(), rejected.len()), (2, 1));
        let raw = Arc::new(Schema::new(vec![
            Field::new("_payload", DataType::Utf8, true),
            Field::new("_partition", DataType::Int64, true),
        ]));
        let d = MessageDecoder::new("t", PayloadFormat::Raw, raw).unwrap();
        let (b, _) = d.decode(&[msg(0, "anything")]).unwrap();
        assert_eq!(b.num_rows(), 1);
        assert!(
            MessageDecoder::new(
                "t",
                PayloadFormat::Raw,
                Arc::new(Schema::new(vec![Field::new("x", DataType::Utf8, true)]))
            )
            .is_err()
        );
    }
}
