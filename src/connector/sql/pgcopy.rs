//! PostgreSQL's binary COPY format written straight from Arrow arrays, one encoder per target
//! column type (read from the catalog), no per-row values in between.
//!
//! | PostgreSQL | from Arrow |
//! |---|---|
//! | int2 / int4 / int8 | any integer (range-checked), decimals with scale 0 |
//! | float4 / float8 | floats, integers |
//! | numeric | decimals (exact), integers, floats (shortest text) |
//! | text, varchar, bpchar, name, citext, json | strings (any cast to text) |
//! | jsonb | strings; structs, lists and maps as JSON |
//! | bytea | binary |
//! | bool | boolean |
//! | date / time / timestamp / timestamptz | date, time, timestamp (zone-less = UTC) |
//! | uuid | 36- or 32-character text, or 16 bytes |
//! | one-dimensional arrays of int2/int4/int8/float4/float8/text/varchar/bool | lists |

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{
    DataType, Date32Type, Field, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    Time64MicrosecondType, TimeUnit, TimestampMicrosecondType,
};
use arrow::json::writer::{EncoderOptions, make_encoder};

use crate::error::{Error, Result};

/// Microseconds between 1970-01-01 and PostgreSQL's epoch 2000-01-01.
const PG_EPOCH_US: i64 = 946_684_800_000_000;
const PG_EPOCH_DAYS: i32 = 10_957;

/// A target column: its name and PostgreSQL type name (`int4`, `_text`, ...).
#[derive(Debug, Clone)]
pub struct PgColumn {
    pub name: String,
    pub ty: String,
}

/// The COPY header.
pub fn header(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes());
}

/// The end-of-data marker.
pub fn trailer(out: &mut Vec<u8>) {
    out.extend_from_slice(&(-1i16).to_be_bytes());
}

enum Enc {
    I16(ArrayRef),
    I32(ArrayRef),
    I64(ArrayRef),
    F32(ArrayRef),
    F64(ArrayRef),
    Bool(ArrayRef),
    Text(ArrayRef),
    /// JSON text; `jsonb` adds its version byte.
    Json(ArrayRef, bool),
    Bytes(ArrayRef),
    Date(ArrayRef),
    Time(ArrayRef),
    Ts(ArrayRef),
    Numeric(ArrayRef),
    Uuid(ArrayRef),
    /// A list and its element encoding's OID.
    Array(ArrayRef, u32, Box<dyn Fn(ArrayRef) -> Enc + Send>),
}

/// Casts with a check: a value the target cannot hold is an error naming column and row.
fn cast(a: &ArrayRef, to: &DataType, col: &str, pg: &str) -> Result<ArrayRef> {
    if a.data_type() == to {
        return Ok(Arc::clone(a));
    }
    let out = arrow::compute::cast(a, to).map_err(|e| {
        Error::Config(format!(
            "column {col}: {} cannot be written as {pg}: {e}",
            a.data_type()
        ))
    })?;
    if out.null_count() != a.null_count() {
        let row = (0..a.len())
            .find(|r| a.is_valid(*r) && out.is_null(*r))
            .unwrap_or(0);
        return Err(Error::Config(format!(
            "column {col} row {}: the value does not fit {pg}",
            row + 1
        )));
    }
    Ok(out)
}

fn elem(ty: &str) -> Option<(u32, &'static str)> {
    Some(match ty {
        "int2" => (21, "int2"),
        "int4" => (23, "int4"),
        "int8" => (20, "int8"),
        "float4" => (700, "float4"),
        "float8" => (701, "float8"),
        "text" => (25, "text"),
        "varchar" => (1043, "varchar"),
        "bool" => (16, "bool"),
        _ => return None,
    })
}

fn encoder(a: &ArrayRef, ty: &str, col: &str) -> Result<Enc> {
    let c = |to: DataType| cast(a, &to, col, ty);
    Ok(match ty {
        "int2" => Enc::I16(c(DataType::Int16)?),
        "int4" => Enc::I32(c(DataType::Int32)?),
        "int8" => Enc::I64(c(DataType::Int64)?),
        "float4" => Enc::F32(c(DataType::Float32)?),
        "float8" => Enc::F64(c(DataType::Float64)?),
        "bool" => Enc::Bool(c(DataType::Boolean)?),
        "text" | "varchar" | "bpchar" | "name" | "citext" | "json" | "xml" => match a.data_type() {
            DataType::Struct(_) | DataType::List(_) | DataType::LargeList(_) | DataType::Map(..) => {
                Enc::Json(Arc::clone(a), false)
            }
            _ => Enc::Text(c(DataType::Utf8)?),
        },
        "jsonb" => Enc::Json(Arc::clone(a), true),
        "bytea" => Enc::Bytes(c(DataType::Binary)?),
        "date" => Enc::Date(c(DataType::Date32)?),
        "time" => Enc::Time(c(DataType::Time64(TimeUnit::Microsecond))?),
        "timestamp" | "timestamptz" => Enc::Ts(c(DataType::Timestamp(TimeUnit::Microsecond, None))?),
        "numeric" => Enc::Numeric(c(DataType::Utf8)?),
        "uuid" => match a.data_type() {
            DataType::FixedSizeBinary(16) => Enc::Uuid(Arc::clone(a)),
            _ => Enc::Uuid(c(DataType::Utf8)?),
        },
        t if t.starts_with('_') => {
            let Some((oid, inner)) = elem(&t[1..]) else {
                return Err(Error::Config(format!(
                    "column {col}: PostgreSQL type {t} is not written by flumen"
                )));
            };
            let list = match a.data_type() {
                DataType::List(_) => Arc::clone(a),
                DataType::LargeList(f) | DataType::FixedSizeList(f, _) => c(DataType::List(Arc::new(
                    Field::new("item", f.data_type().clone(), true),
                )))?,
                other => {
                    return Err(Error::Config(format!(
                        "column {col}: {other} cannot be written as {t}"
                    )));
                }
            };
            // Check the elements once, here, so that encoding cannot fail.
            let values = list.as_list::<i32>().values().clone();
            encoder(&values, inner, col)?;
            let inner = inner.to_string();
            let col = col.to_string();
            Enc::Array(
                list,
                oid,
                Box::new(move |v| encoder(&v, &inner, &col).unwrap_or(Enc::Text(v))),
            )
        }
        other => {
            return Err(Error::Config(format!(
                "column {col}: PostgreSQL type {other} is not written by flumen; cast it in the table or write to a text column"
            )));
        }
    })
}

/// Writes field `row` (not NULL) of an encoder: length and bytes.
fn field(e: &Enc, row: usize, out: &mut Vec<u8>, json: &mut Vec<u8>) -> Result<()> {
    let put = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as i32).to_be_bytes());
        out.extend_from_slice(b);
    };
    match e {
        Enc::I16(a) => put(out, &a.as_primitive::<Int16Type>().value(row).to_be_bytes()),
        Enc::I32(a) => put(out, &a.as_primitive::<Int32Type>().value(row).to_be_bytes()),
        Enc::I64(a) => put(out, &a.as_primitive::<Int64Type>().value(row).to_be_bytes()),
        Enc::F32(a) => put(out, &a.as_primitive::<Float32Type>().value(row).to_be_bytes()),
        Enc::F64(a) => put(out, &a.as_primitive::<Float64Type>().value(row).to_be_bytes()),
        Enc::Bool(a) => put(out, &[u8::from(a.as_boolean().value(row))]),
        Enc::Text(a) => put(out, a.as_string::<i32>().value(row).as_bytes()),
        Enc::Bytes(a) => put(out, a.as_binary::<i32>().value(row)),
        Enc::Date(a) => {
            let d = a.as_primitive::<Date32Type>().value(row);
            let v = d.checked_sub(PG_EPOCH_DAYS).ok_or_else(|| {
                Error::Config(format!("date {d} (days since 1970) is out of PostgreSQL's range"))
            })?;
            put(out, &v.to_be_bytes())
        }
        Enc::Time(a) => put(
            out,
            &a.as_primitive::<Time64MicrosecondType>().value(row).to_be_bytes(),
        ),
        Enc::Ts(a) => {
            let t = a.as_primitive::<TimestampMicrosecondType>().value(row);
            let v = t.checked_sub(PG_EPOCH_US).ok_or_else(|| {
                Error::Config(format!(
                    "timestamp {t} (µs since 1970) is out of PostgreSQL's range"
                ))
            })?;
            put(out, &v.to_be_bytes())
        }
        Enc::Numeric(a) => {
            let s = a.as_string::<i32>().value(row);
            let n = numeric(s).ok_or_else(|| Error::Config(format!("'{s}' is not a number")))?;
            put(out, &n)
        }
        Enc::Uuid(a) => {
            let b: Vec<u8> = match a.data_type() {
                DataType::FixedSizeBinary(_) => a.as_fixed_size_binary().value(row).to_vec(),
                _ => {
                    let s = a.as_string::<i32>().value(row);
                    uuid(s)
                        .ok_or_else(|| Error::Config(format!("'{s}' is not a UUID")))?
                        .to_vec()
                }
            };
            put(out, &b)
        }
        Enc::Json(a, jsonb) => {
            json.clear();
            if *jsonb {
                json.push(1);
            }
            match a.data_type() {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                    let s = arrow::compute::cast(&a.slice(row, 1), &DataType::Utf8)?;
                    json.extend_from_slice(s.as_string::<i32>().value(0).as_bytes());
                }
                _ => {
                    let f = Arc::new(Field::new("v", a.data_type().clone(), true));
                    let opts = EncoderOptions::default();
                    let mut enc = make_encoder(&f, a.as_ref(), &opts)?;
                    enc.encode(row, json);
                }
            }
            put(out, json)
        }
        Enc::Array(list, oid, make) => {
            let l = list.as_list::<i32>();
            let items = l.value(row);
            let inner = make(Arc::clone(&items));
            let start = out.len();
            out.extend_from_slice(&0i32.to_be_bytes());
            out.extend_from_slice(&1i32.to_be_bytes());
            out.extend_from_slice(&i32::from(items.null_count() > 0).to_be_bytes());
            out.extend_from_slice(&oid.to_be_bytes());
            out.extend_from_slice(&(items.len() as i32).to_be_bytes());
            out.extend_from_slice(&1i32.to_be_bytes());
            let mut scratch = Vec::new();
            for i in 0..items.len() {
                if items.is_null(i) {
                    out.extend_from_slice(&(-1i32).to_be_bytes());
                } else {
                    field(&inner, i, out, &mut scratch)?;
                }
            }
            let len = (out.len() - start - 4) as i32;
            out[start..start + 4].copy_from_slice(&len.to_be_bytes());
        }
    }
    Ok(())
}

/// Appends a batch's rows in COPY binary format (without header or trailer).
pub fn encode_rows(batch: &RecordBatch, targets: &[PgColumn], out: &mut Vec<u8>) -> Result<()> {
    let encs = batch
        .columns()
        .iter()
        .zip(targets)
        .map(|(a, t)| encoder(a, &t.ty, &t.name))
        .collect::<Result<Vec<_>>>()?;
    let ncols = encs.len() as i16;
    let mut json = Vec::new();
    for row in 0..batch.num_rows() {
        out.extend_from_slice(&ncols.to_be_bytes());
        for ((e, a), t) in encs.iter().zip(batch.columns()).zip(targets) {
            if a.is_null(row) {
                out.extend_from_slice(&(-1i32).to_be_bytes());
            } else {
                field(e, row, out, &mut json)
                    .map_err(|err| Error::Config(format!("column {} row {}: {err}", t.name, row + 1)))?;
            }
        }
    }
    Ok(())
}

/// A decimal text (`-12.340`, `1e5` not accepted) as PostgreSQL's binary numeric: base-10000
/// digits, weight, sign, display scale.
fn numeric(s: &str) -> Option<Vec<u8>> {
    let s = s.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    if s.eq_ignore_ascii_case("nan") {
        let mut out = Vec::new();
        for v in [0i16, 0, 0xC000u16 as i16, 0] {
            out.extend_from_slice(&v.to_be_bytes());
        }
        return Some(out);
    }
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty()
        || s.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let dscale = frac.len() as i16;
    let int = int.trim_start_matches('0');
    // Pad the integer part on the left and the fraction on the right to groups of 4.
    let ipad = (4 - int.len() % 4) % 4;
    let fpad = (4 - frac.len() % 4) % 4;
    let digits: String = "0".repeat(ipad) + int + frac + &"0".repeat(fpad);
    let groups: Vec<i16> = digits
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |a, d| a * 10 + i16::from(d - b'0')))
        .collect();
    let int_groups = (int.len() + ipad) / 4;
    let mut weight = int_groups as i16 - 1;
    let mut g: &[i16] = &groups;
    while let [0, rest @ ..] = g {
        g = rest;
        weight -= 1;
    }
    while let [rest @ .., 0] = g {
        g = rest;
    }
    if g.is_empty() {
        weight = 0;
    }
    let mut out = Vec::with_capacity(8 + g.len() * 2);
    out.extend_from_slice(&(g.len() as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    let sign: u16 = if neg && !g.is_empty() { 0x4000 } else { 0 };
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&dscale.to_be_bytes());
    for d in g {
        out.extend_from_slice(&d.to_be_bytes());
    }
    Some(out)
}

fn uuid(s: &str) -> Option<[u8; 16]> {
    let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let h = |b: u8| (b as char).to_digit(16);
        out[i] = (h(pair[0])? * 16 + h(pair[1])?) as u8;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_past_postgres_epoch_arithmetic_are_errors() {
        let a: ArrayRef = Arc::new(arrow::array::TimestampMicrosecondArray::from(vec![i64::MIN + 5]));
        let e = field(&Enc::Ts(a), 0, &mut Vec::new(), &mut Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("out of PostgreSQL's range"), "{e}");
    }

    fn words(b: &[u8]) -> Vec<i16> {
        b.chunks(2).map(|c| i16::from_be_bytes([c[0], c[1]])).collect()
    }

    #[test]
    fn numerics_in_base_10000() {
        // 12345.678 = 1|2345 . 6780: ndigits 3, weight 1, scale 3.
        assert_eq!(
            words(&numeric("12345.678").unwrap()),
            vec![3, 1, 0, 3, 1, 2345, 6780]
        );
        assert_eq!(words(&numeric("-0.0001").unwrap()), vec![1, -1, 0x4000, 4, 1]);
        assert_eq!(words(&numeric("0").unwrap()), vec![0, 0, 0, 0]);
        assert_eq!(words(&numeric("10000").unwrap()), vec![1, 1, 0, 0, 1]);
        assert!(numeric("1e5").is_none());
        assert_eq!(uuid("00112233-4455-6677-8899-aabbccddeeff").unwrap()[15], 0xff);
    }
}
