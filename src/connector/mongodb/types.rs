//! BSON and Arrow: the columns a sample of documents suggests, documents shaped for arrow-json's
//! decoder, and rows turned back into documents.
//!
//! | BSON                  | column                       | written back as              |
//! |-----------------------|------------------------------|------------------------------|
//! | int32 / int64         | INT / BIGINT (mixed: BIGINT) | int32 / int64                |
//! | double (with ints)    | DOUBLE                       | double                       |
//! | string                | VARCHAR                      | string                       |
//! | bool                  | BOOLEAN                      | bool                         |
//! | date                  | TIMESTAMP(ms, UTC)           | date (also DATE, TIMESTAMP)  |
//! | objectId              | VARCHAR (24 hex digits)      | objectId for `_id`, else string |
//! | decimal128            | DECIMAL(34, s), s the largest scale sampled (VARCHAR past 20) | decimal128 |
//! | binary                | BYTEA (top level; base64 text when nested) | binary (generic)  |
//! | embedded document     | STRUCT                       | document                     |
//! | array                 | LIST of the merged item type | array                        |
//! | several of the above  | VARCHAR (values as relaxed extended JSON), with a warning | string |
//!
//! A missing field and a `null` both read as NULL; NULLs are written as missing fields.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Date64Type, Decimal128Type, DecimalType, Field, Fields, Float32Type, Float64Type,
    Int8Type, Int16Type, Int32Type, Int64Type, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use base64::Engine;
use mongodb::bson::{Binary, Bson, DateTime, Decimal128, Document, oid::ObjectId, spec::BinarySubtype};
use serde_json::Value;

/// A type seen in sampled documents.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Null,
    Bool,
    Int32,
    Int64,
    Double,
    Str,
    Date,
    Oid,
    /// Decimal128 with this many fraction digits.
    Dec(u32),
    Bin,
    Doc(Vec<(String, Seen)>),
    Arr(Box<Seen>),
    /// Several kinds: read as text. The kinds, for the warning.
    Mixed(Vec<&'static str>),
}

impl Seen {
    fn kind(&self) -> &'static str {
        match self {
            Seen::Null => "null",
            Seen::Bool => "bool",
            Seen::Int32 => "int",
            Seen::Int64 => "long",
            Seen::Double => "double",
            Seen::Str => "string",
            Seen::Date => "date",
            Seen::Oid => "objectId",
            Seen::Dec(_) => "decimal",
            Seen::Bin => "binData",
            Seen::Doc(_) => "object",
            Seen::Arr(_) => "array",
            Seen::Mixed(_) => "mixed",
        }
    }

    pub fn of(b: &Bson) -> Seen {
        match b {
            Bson::Null | Bson::Undefined => Seen::Null,
            Bson::Boolean(_) => Seen::Bool,
            Bson::Int32(_) => Seen::Int32,
            Bson::Int64(_) => Seen::Int64,
            Bson::Double(_) => Seen::Double,
            Bson::String(_) | Bson::Symbol(_) => Seen::Str,
            Bson::DateTime(_) => Seen::Date,
            Bson::ObjectId(_) => Seen::Oid,
            Bson::Decimal128(d) => match plain_decimal(&d.to_string()) {
                Some(p) => Seen::Dec(p.split_once('.').map_or(0, |(_, f)| f.len() as u32)),
                None => Seen::Mixed(vec!["decimal"]),
            },
            Bson::Binary(_) => Seen::Bin,
            Bson::Document(d) => Seen::Doc(d.iter().map(|(k, v)| (k.clone(), Seen::of(v))).collect()),
            Bson::Array(a) => Seen::Arr(Box::new(a.iter().map(Seen::of).fold(Seen::Null, merge))),
            _ => Seen::Mixed(vec!["other"]),
        }
    }
}

/// Two observations of one field as one type.
pub fn merge(a: Seen, b: Seen) -> Seen {
    use Seen::*;
    match (a, b) {
        (Null, x) | (x, Null) => x,
        (Int32, Int64) | (Int64, Int32) => Int64,
        (Int32 | Int64, Double) | (Double, Int32 | Int64) => Double,
        (Dec(a), Dec(b)) => Dec(a.max(b)),
        (Doc(mut a), Doc(b)) => {
            for (k, v) in b {
                match a.iter_mut().find(|(n, _)| *n == k) {
                    Some((_, t)) => *t = merge(std::mem::replace(t, Null), v),
                    None => a.push((k, v)),
                }
            }
            Doc(a)
        }
        (Arr(a), Arr(b)) => Arr(Box::new(merge(*a, *b))),
        (a, b) if a == b => a,
        (Mixed(mut k), b) | (b, Mixed(mut k)) => {
            if !k.contains(&b.kind()) {
                k.push(b.kind());
            }
            Mixed(k)
        }
        (a, b) => Mixed(vec![a.kind(), b.kind()]),
    }
}

/// The column type of a sampled field; `mixed` collects the paths read as text.
pub fn column_type(path: &str, s: &Seen, top: bool, mixed: &mut Vec<String>) -> DataType {
    match s {
        Seen::Null | Seen::Str | Seen::Oid => DataType::Utf8,
        Seen::Bool => DataType::Boolean,
        Seen::Int32 => DataType::Int32,
        Seen::Int64 => DataType::Int64,
        Seen::Double => DataType::Float64,
        Seen::Date => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        Seen::Dec(s) if *s <= 20 => DataType::Decimal128(34, *s as i8),
        Seen::Dec(_) => {
            mixed.push(format!("{path} (decimals with more than 20 fraction digits)"));
            DataType::Utf8
        }
        Seen::Bin if top => DataType::Binary,
        Seen::Bin => DataType::Utf8,
        Seen::Doc(fields) if fields.is_empty() => DataType::Utf8,
        Seen::Doc(fields) => DataType::Struct(Fields::from(
            fields
                .iter()
                .map(|(k, v)| Field::new(k, column_type(&format!("{path}.{k}"), v, false, mixed), true))
                .collect::<Vec<_>>(),
        )),
        Seen::Arr(item) => DataType::List(Arc::new(Field::new(
            "item",
            column_type(&format!("{path}[]"), item, false, mixed),
            true,
        ))),
        Seen::Mixed(kinds) => {
            mixed.push(format!("{path} ({})", kinds.join(", ")));
            DataType::Utf8
        }
    }
}

/// A decimal's text without an exponent ("1.25E+3" -> "1250"); None for NaN and infinities.
pub fn plain_decimal(s: &str) -> Option<String> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (mant, exp) = match s.find(['E', 'e']) {
        Some(i) => (&s[..i], s[i + 1..].parse::<i64>().ok()?),
        None => (s, 0),
    };
    let (int, frac) = mant.split_once('.').unwrap_or((mant, ""));
    if int.is_empty() && frac.is_empty() || !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
        return None;
    }
    let digits = format!("{int}{frac}");
    let point = int.len() as i64 + exp;
    if !(-80..=80).contains(&point) {
        return None;
    }
    let (i, f) = if point <= 0 {
        (
            "0".to_string(),
            format!("{}{digits}", "0".repeat((-point) as usize)),
        )
    } else if point as usize >= digits.len() {
        (
            format!("{digits}{}", "0".repeat(point as usize - digits.len())),
            String::new(),
        )
    } else {
        (
            digits[..point as usize].to_string(),
            digits[point as usize..].to_string(),
        )
    };
    let i = i.trim_start_matches('0');
    let i = if i.is_empty() { "0" } else { i };
    let sign = if neg { "-" } else { "" };
    Some(if f.is_empty() {
        format!("{sign}{i}")
    } else {
        format!("{sign}{i}.{f}")
    })
}

/// A BSON value as the JSON arrow-json decodes into a column of type `t`. Values of another
/// kind are passed on as they are (the decoder then names the problem).
pub fn shape(b: &Bson, t: &DataType) -> Value {
    let t = match t {
        DataType::Utf8View | DataType::LargeUtf8 => &DataType::Utf8,
        t => t,
    };
    match (t, b) {
        (_, Bson::Null | Bson::Undefined) => Value::Null,
        (DataType::Utf8, Bson::String(s)) => Value::String(s.clone()),
        (DataType::Utf8, Bson::ObjectId(o)) => Value::String(o.to_hex()),
        (DataType::Utf8, Bson::Binary(bin)) => {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&bin.bytes))
        }
        (DataType::Utf8, Bson::Decimal128(d)) => {
            Value::String(plain_decimal(&d.to_string()).unwrap_or_else(|| d.to_string()))
        }
        (DataType::Utf8, Bson::Document(_) | Bson::Array(_)) | (DataType::Utf8, _) => match b {
            Bson::Document(_) | Bson::Array(_) => Value::String(b.clone().into_relaxed_extjson().to_string()),
            Bson::DateTime(d) => Value::String(d.try_to_rfc3339_string().unwrap_or_else(|_| d.to_string())),
            other => match other.clone().into_relaxed_extjson() {
                Value::String(s) => Value::String(s),
                v => Value::String(v.to_string()),
            },
        },
        (DataType::Timestamp(..), Bson::DateTime(d)) => Value::from(d.timestamp_millis()),
        (DataType::Decimal128(..), Bson::Decimal128(d)) => {
            Value::String(plain_decimal(&d.to_string()).unwrap_or_else(|| d.to_string()))
        }
        (DataType::Struct(fields), Bson::Document(doc)) => Value::Object(
            fields
                .iter()
                .filter_map(|f| {
                    doc.get(f.name())
                        .map(|v| (f.name().clone(), shape(v, f.data_type())))
                })
                .collect(),
        ),
        (DataType::List(item) | DataType::LargeList(item), Bson::Array(a)) => {
            Value::Array(a.iter().map(|v| shape(v, item.data_type())).collect())
        }
        (DataType::Binary, Bson::Binary(_)) => Value::Null,
        (_, Bson::Int32(i)) => Value::from(*i),
        (_, Bson::Int64(i)) => Value::from(*i),
        (_, Bson::Double(f)) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        (_, Bson::Boolean(v)) => Value::Bool(*v),
        (_, other) => other.clone().into_relaxed_extjson(),
    }
}

/// Row `r` of a column as BSON; None for NULL (written as a missing field). `object_id` turns
/// 24-hex-digit strings into ObjectIds (for `_id`).
/// Why value `r` of `a` cannot be a BSON value, if it cannot (a timestamp in seconds past
/// the milliseconds a BSON date holds).
pub fn out_of_range(a: &ArrayRef, r: usize) -> Option<String> {
    match a.data_type() {
        DataType::Timestamp(TimeUnit::Second, _) if !a.is_null(r) => {
            let s = a.as_primitive::<TimestampSecondType>().value(r);
            s.checked_mul(1000)
                .is_none()
                .then(|| format!("{s} seconds since 1970 is out of a BSON date's range"))
        }
        _ => None,
    }
}

pub fn to_bson(a: &ArrayRef, r: usize, object_id: bool) -> Option<Bson> {
    if a.is_null(r) {
        return None;
    }
    Some(match a.data_type() {
        DataType::Boolean => Bson::Boolean(a.as_boolean().value(r)),
        DataType::Int8 => Bson::Int32(a.as_primitive::<Int8Type>().value(r) as i32),
        DataType::Int16 => Bson::Int32(a.as_primitive::<Int16Type>().value(r) as i32),
        DataType::Int32 => Bson::Int32(a.as_primitive::<Int32Type>().value(r)),
        DataType::Int64 => Bson::Int64(a.as_primitive::<Int64Type>().value(r)),
        DataType::UInt8 => Bson::Int32(a.as_primitive::<UInt8Type>().value(r) as i32),
        DataType::UInt16 => Bson::Int32(a.as_primitive::<UInt16Type>().value(r) as i32),
        DataType::UInt32 => Bson::Int64(a.as_primitive::<UInt32Type>().value(r) as i64),
        DataType::UInt64 => {
            let v = a.as_primitive::<UInt64Type>().value(r);
            i64::try_from(v).map_or_else(|_| Bson::Decimal128(dec(&v.to_string())), Bson::Int64)
        }
        DataType::Float32 => Bson::Double(a.as_primitive::<Float32Type>().value(r) as f64),
        DataType::Float64 => Bson::Double(a.as_primitive::<Float64Type>().value(r)),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            let s = match a.data_type() {
                DataType::Utf8 => a.as_string::<i32>().value(r),
                DataType::LargeUtf8 => a.as_string::<i64>().value(r),
                _ => a.as_string_view().value(r),
            };
            match (object_id, ObjectId::parse_str(s)) {
                (true, Ok(o)) if s.len() == 24 => Bson::ObjectId(o),
                _ => Bson::String(s.to_string()),
            }
        }
        DataType::Binary => binary(a.as_binary::<i32>().value(r)),
        DataType::LargeBinary => binary(a.as_binary::<i64>().value(r)),
        DataType::BinaryView => binary(a.as_binary_view().value(r)),
        DataType::FixedSizeBinary(_) => binary(a.as_fixed_size_binary().value(r)),
        DataType::Date32 => Bson::DateTime(DateTime::from_millis(
            a.as_primitive::<Date32Type>().value(r) as i64 * 86_400_000,
        )),
        DataType::Date64 => Bson::DateTime(DateTime::from_millis(a.as_primitive::<Date64Type>().value(r))),
        DataType::Timestamp(unit, _) => {
            let ms = match unit {
                // Out of a BSON date's range: refused before ([`out_of_range`]).
                TimeUnit::Second => a
                    .as_primitive::<TimestampSecondType>()
                    .value(r)
                    .saturating_mul(1000),
                TimeUnit::Millisecond => a.as_primitive::<TimestampMillisecondType>().value(r),
                TimeUnit::Microsecond => a
                    .as_primitive::<TimestampMicrosecondType>()
                    .value(r)
                    .div_euclid(1000),
                TimeUnit::Nanosecond => a
                    .as_primitive::<TimestampNanosecondType>()
                    .value(r)
                    .div_euclid(1_000_000),
            };
            Bson::DateTime(DateTime::from_millis(ms))
        }
        DataType::Decimal128(_, s) => {
            let v = a.as_primitive::<Decimal128Type>().value(r);
            Bson::Decimal128(dec(&Decimal128Type::format_decimal(v, 38, *s)))
        }
        DataType::Struct(fields) => {
            let s = a.as_struct();
            let mut d = Document::new();
            for (f, c) in fields.iter().zip(s.columns()) {
                if let Some(v) = to_bson(c, r, false) {
                    d.insert(f.name().clone(), v);
                }
            }
            Bson::Document(d)
        }
        DataType::List(_) => {
            let l = a.as_list::<i32>();
            let v = l.value(r);
            Bson::Array(
                (0..v.len())
                    .map(|i| to_bson(&v, i, false).unwrap_or(Bson::Null))
                    .collect(),
            )
        }
        DataType::LargeList(_) => {
            let l = a.as_list::<i64>();
            let v = l.value(r);
            Bson::Array(
                (0..v.len())
                    .map(|i| to_bson(&v, i, false).unwrap_or(Bson::Null))
                    .collect(),
            )
        }
        _ => {
            // Anything else (times, intervals, maps, ...) as its text.
            let s = arrow::util::display::array_value_to_string(a, r).unwrap_or_default();
            Bson::String(s)
        }
    })
}

fn binary(b: &[u8]) -> Bson {
    Bson::Binary(Binary {
        subtype: BinarySubtype::Generic,
        bytes: b.to_vec(),
    })
}

fn dec(s: &str) -> Decimal128 {
    s.parse::<Decimal128>()
        .unwrap_or_else(|_| Decimal128::from_bytes([0; 16]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::bson::doc;

    #[test]
    fn a_timestamp_past_a_bson_date_is_refused_not_wrapped() {
        let a: ArrayRef = Arc::new(arrow::array::TimestampSecondArray::from(vec![
            1_700_000_000,
            i64::MAX / 10,
        ]));
        assert_eq!(out_of_range(&a, 0), None);
        assert!(out_of_range(&a, 1).is_some_and(|w| w.contains("out of a BSON date's range")));
    }

    #[test]
    fn decimals_lose_their_exponent() {
        assert_eq!(plain_decimal("1.25E+3").as_deref(), Some("1250"));
        assert_eq!(plain_decimal("-1.25E-3").as_deref(), Some("-0.00125"));
        assert_eq!(plain_decimal("0.10").as_deref(), Some("0.10"));
        assert_eq!(plain_decimal("12").as_deref(), Some("12"));
        assert_eq!(plain_decimal("NaN"), None);
        let d: Decimal128 = "123.4500".parse().unwrap();
        assert_eq!(plain_decimal(&d.to_string()).as_deref(), Some("123.4500"));
    }

    #[test]
    fn sampled_types_merge() {
        let a = Seen::of(&Bson::Document(
            doc! {"n": 1i32, "x": "a", "sub": {"a": 1i32}, "l": [1i32]},
        ));
        let b = Seen::of(&Bson::Document(
            doc! {"n": 2i64, "x": 3.5, "sub": {"b": true}, "l": [2.5]},
        ));
        let Seen::Doc(m) = merge(a, b) else { panic!() };
        let mut mixed = Vec::new();
        let t: Vec<(String, DataType)> = m
            .iter()
            .map(|(k, v)| (k.clone(), column_type(k, v, true, &mut mixed)))
            .collect();
        assert_eq!(t[0].1, DataType::Int64);
        assert_eq!(t[1].1, DataType::Utf8);
        assert!(matches!(&t[2].1, DataType::Struct(f) if f.len() == 2));
        assert!(matches!(&t[3].1, DataType::List(f) if *f.data_type() == DataType::Float64));
        assert_eq!(mixed, vec!["x (string, double)".to_string()]);
    }
}
