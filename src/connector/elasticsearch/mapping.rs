//! Index mappings derived from an Arrow schema (the documented type map).
//!
//! | Arrow | mapping |
//! |---|---|
//! | Int8, Int16, Int32, Int64, UInt8..UInt32 | byte, short, integer, long (unsigned widened) |
//! | UInt64 | unsigned_long |
//! | Float16/32, Float64 | float, double |
//! | Decimal(P, S) | scaled_float (factor 10^S) when P <= 15, else keyword (`'decimals' 'keyword'` always) |
//! | Utf8 / LargeUtf8 / Utf8View | keyword (`'strings' 'text'`: text; `'text_keyword'`: text + .keyword) |
//! | Binary | binary |
//! | Boolean | boolean |
//! | Date32/Date64 | date (strict_date_optional_time) |
//! | Timestamp (any unit) | date (milliseconds kept; explicit `mappings` for date_nanos) |
//! | List / LargeList / FixedSizeList of T | the mapping of T (arrays are implicit) |
//! | Struct | object with properties (`'nested' 'true'`: nested) |
//! | Map | object, dynamic |

use arrow::datatypes::{DataType, Field, TimeUnit};
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// Choices that shape a derived mapping.
#[derive(Debug, Clone)]
pub struct MappingStyle {
    /// `keyword`, `text` or `text_keyword`.
    pub strings: String,
    /// `scaled_float` (default, exact up to 15 digits) or `keyword`.
    pub decimals: String,
    /// Structs as `nested` instead of `object`.
    pub nested: bool,
}

/// `{"properties": {...}}` for the fields.
pub fn derive<'a>(fields: impl IntoIterator<Item = &'a Field>, style: &MappingStyle) -> Result<Value> {
    let mut props = Map::new();
    for f in fields {
        props.insert(f.name().clone(), field_mapping(f.data_type(), style, f.name())?);
    }
    Ok(json!({ "properties": props }))
}

fn field_mapping(t: &DataType, style: &MappingStyle, name: &str) -> Result<Value> {
    Ok(match t {
        DataType::Int8 => json!({"type": "byte"}),
        DataType::Int16 | DataType::UInt8 => json!({"type": "short"}),
        DataType::Int32 | DataType::UInt16 => json!({"type": "integer"}),
        DataType::Int64 | DataType::UInt32 => json!({"type": "long"}),
        DataType::UInt64 => json!({"type": "unsigned_long"}),
        DataType::Float16 | DataType::Float32 => json!({"type": "float"}),
        DataType::Float64 => json!({"type": "double"}),
        DataType::Decimal32(p, s)
        | DataType::Decimal64(p, s)
        | DataType::Decimal128(p, s)
        | DataType::Decimal256(p, s) => {
            if style.decimals == "keyword" || *p > 15 || *s < 0 {
                json!({"type": "keyword"})
            } else {
                json!({"type": "scaled_float", "scaling_factor": 10f64.powi(i32::from(*s))})
            }
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => match style.strings.as_str() {
            "text" => json!({"type": "text"}),
            "text_keyword" => {
                json!({"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}})
            }
            _ => json!({"type": "keyword"}),
        },
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView | DataType::FixedSizeBinary(_) => {
            json!({"type": "binary"})
        }
        DataType::Boolean => json!({"type": "boolean"}),
        DataType::Date32 | DataType::Date64 => json!({"type": "date"}),
        // `date` for every unit: date_nanos cannot hold instants before 1970, and SQL's TIMESTAMP
        // is nanoseconds in DataFusion. ES keeps milliseconds; map to date_nanos explicitly
        // (`mappings`) where nanoseconds matter.
        DataType::Timestamp(..) => json!({"type": "date"}),
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
            field_mapping(f.data_type(), style, name)?
        }
        DataType::Struct(fields) => {
            let mut m = derive(fields.iter().map(|f| f.as_ref()), style)?;
            if style.nested {
                m["type"] = json!("nested");
            }
            m
        }
        DataType::Map(..) => json!({"type": "object", "dynamic": true}),
        DataType::Dictionary(_, v) => field_mapping(v, style, name)?,
        other => {
            return Err(Error::Config(format!(
                "column {name}: Arrow type {other} has no index mapping; cast it in the query"
            )));
        }
    })
}

/// The field names and types of an index's mapping (`GET index/_mapping`), flattened to the
/// top-level properties, as Arrow fields (every field nullable: any document may lack it).
/// Columns are in name order, whatever order the server's JSON has.
pub fn to_arrow(properties: &Map<String, Value>) -> Vec<Field> {
    let mut fields: Vec<Field> = properties
        .iter()
        .map(|(name, m)| Field::new(name, arrow_type(m), true))
        .collect();
    fields.sort_by(|a, b| a.name().cmp(b.name()));
    fields
}

fn arrow_type(m: &Value) -> DataType {
    let ty = m.get("type").and_then(Value::as_str).unwrap_or("object");
    match ty {
        "byte" => DataType::Int8,
        "short" => DataType::Int16,
        "integer" => DataType::Int32,
        "long" => DataType::Int64,
        "unsigned_long" => DataType::UInt64,
        "float" | "half_float" => DataType::Float32,
        "double" | "scaled_float" => DataType::Float64,
        "boolean" => DataType::Boolean,
        "date" => DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        "date_nanos" => DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
        "object" | "nested" => match m.get("properties").and_then(Value::as_object) {
            Some(p) => DataType::Struct(to_arrow(p).into()),
            None => DataType::Utf8,
        },
        // keyword, text, binary (base64), ip, geo_point, ...: as text.
        _ => DataType::Utf8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn mappings_follow_the_type_map() {
        let style = MappingStyle {
            strings: "text_keyword".into(),
            decimals: "scaled_float".into(),
            nested: false,
        };
        let fields = [
            Field::new("id", DataType::Int64, false),
            Field::new("price", DataType::Decimal128(12, 2), true),
            Field::new("big", DataType::Decimal128(38, 2), true),
            Field::new("name", DataType::Utf8View, true),
            Field::new(
                "at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new(
                "tags",
                DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
                true,
            ),
            Field::new(
                "geo",
                DataType::Struct(vec![Field::new("lat", DataType::Float64, true)].into()),
                true,
            ),
        ];
        let m = derive(fields.iter(), &style).unwrap();
        assert_eq!(
            m,
            json!({"properties": {
                "id": {"type": "long"},
                "price": {"type": "scaled_float", "scaling_factor": 100.0},
                "big": {"type": "keyword"},
                "name": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
                "at": {"type": "date"},
                "tags": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
                "geo": {"properties": {"lat": {"type": "double"}}},
            }})
        );
        let back = to_arrow(m["properties"].as_object().unwrap());
        assert_eq!(back[0].name(), "at");
        assert!(
            derive(
                [Field::new("d", DataType::Duration(TimeUnit::Second), true)].iter(),
                &style
            )
            .is_err()
        );
    }
}
