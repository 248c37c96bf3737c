//! ClickHouse column types: parsing the names `system.columns` reports, printing them, and the
//! default map from Arrow types (used to create tables).

use std::fmt;

use arrow::datatypes::{DataType, TimeUnit};

use crate::error::{Error, Result};

/// A ClickHouse column type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChType {
    /// Signed integers of 8..256 bits.
    Int(u16),
    /// Unsigned integers of 8..256 bits.
    UInt(u16),
    /// `Float32`.
    Float32,
    /// `Float64`.
    Float64,
    /// `Decimal(P, S)`, stored in 32, 64, 128 or 256 bits by precision.
    Decimal(u8, i8),
    /// `String`.
    String,
    /// `FixedString(N)`.
    FixedString(usize),
    /// `Date`: days since 1970 as UInt16.
    Date,
    /// `Date32`: days since 1970 as Int32.
    Date32,
    /// `DateTime` or `DateTime('tz')`: seconds as UInt32.
    DateTime(Option<String>),
    /// `DateTime64(P)` or `DateTime64(P, 'tz')`: ticks of 10^-P s as Int64.
    DateTime64(u8, Option<String>),
    /// `Bool`: UInt8 0/1.
    Bool,
    /// `UUID`.
    Uuid,
    /// `Nullable(T)`.
    Nullable(Box<ChType>),
    /// `Array(T)`.
    Array(Box<ChType>),
    /// `Tuple(T1, T2, ...)`, optionally with element names.
    Tuple(Vec<(Option<String>, ChType)>),
    /// `Map(K, V)`.
    Map(Box<ChType>, Box<ChType>),
    /// `Enum8(...)` (8 bits) or `Enum16(...)`: names and their values.
    Enum(u8, Vec<(String, i16)>),
    /// `LowCardinality(T)`: a dictionary of T's values and one index per row.
    LowCardinality(Box<ChType>),
}

impl fmt::Display for ChType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tz = |tz: &Option<String>| tz.as_ref().map(|t| format!("'{}'", t.replace('\'', "\\'")));
        match self {
            ChType::Int(b) => write!(f, "Int{b}"),
            ChType::UInt(b) => write!(f, "UInt{b}"),
            ChType::Float32 => f.write_str("Float32"),
            ChType::Float64 => f.write_str("Float64"),
            ChType::Decimal(p, s) => write!(f, "Decimal({p}, {s})"),
            ChType::String => f.write_str("String"),
            ChType::FixedString(n) => write!(f, "FixedString({n})"),
            ChType::Date => f.write_str("Date"),
            ChType::Date32 => f.write_str("Date32"),
            ChType::DateTime(t) => match tz(t) {
                Some(t) => write!(f, "DateTime({t})"),
                None => f.write_str("DateTime"),
            },
            ChType::DateTime64(p, t) => match tz(t) {
                Some(t) => write!(f, "DateTime64({p}, {t})"),
                None => write!(f, "DateTime64({p})"),
            },
            ChType::Bool => f.write_str("Bool"),
            ChType::Uuid => f.write_str("UUID"),
            ChType::Nullable(t) => write!(f, "Nullable({t})"),
            ChType::Array(t) => write!(f, "Array({t})"),
            ChType::Tuple(items) => {
                f.write_str("Tuple(")?;
                for (i, (name, t)) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    match name {
                        Some(n) => write!(f, "{n} {t}")?,
                        None => write!(f, "{t}")?,
                    }
                }
                f.write_str(")")
            }
            ChType::Map(k, v) => write!(f, "Map({k}, {v})"),
            ChType::Enum(bits, items) => {
                write!(f, "Enum{bits}(")?;
                for (i, (name, v)) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "'{}' = {v}", name.replace('\\', "\\\\").replace('\'', "\\'"))?;
                }
                f.write_str(")")
            }
            ChType::LowCardinality(t) => write!(f, "LowCardinality({t})"),
        }
    }
}

impl ChType {
    /// The ClickHouse type flumen creates for an Arrow type (documented type map).
    ///
    /// | Arrow | ClickHouse |
    /// |---|---|
    /// | Int8..Int64, UInt8..UInt64 | Int8..Int64, UInt8..UInt64 |
    /// | Float16/32, Float64 | Float32, Float64 |
    /// | Decimal128/256(P, S) | Decimal(P, S) |
    /// | Utf8, LargeUtf8, Utf8View, Binary, LargeBinary, BinaryView | String |
    /// | FixedSizeBinary(N) | FixedString(N) |
    /// | Boolean | Bool |
    /// | Date32, Date64 | Date32 |
    /// | Timestamp(s) | DateTime(tz) |
    /// | Timestamp(ms/µs/ns) | DateTime64(3/6/9, tz) |
    /// | List, LargeList, FixedSizeList | Array |
    /// | Struct | Tuple (named) |
    /// | Map | Map |
    /// | Dictionary(_, V) | LowCardinality(V) (plain V before ClickHouse 20) |
    ///
    /// A nullable Arrow field becomes `Nullable(T)` where ClickHouse allows it (not for Array,
    /// Tuple and Map, whose NULLs become empty values).
    pub fn from_arrow(t: &DataType, nullable: bool) -> Result<ChType> {
        let base = match t {
            DataType::Int8 => ChType::Int(8),
            DataType::Int16 => ChType::Int(16),
            DataType::Int32 => ChType::Int(32),
            DataType::Int64 => ChType::Int(64),
            DataType::UInt8 => ChType::UInt(8),
            DataType::UInt16 => ChType::UInt(16),
            DataType::UInt32 => ChType::UInt(32),
            DataType::UInt64 => ChType::UInt(64),
            DataType::Float16 | DataType::Float32 => ChType::Float32,
            DataType::Float64 => ChType::Float64,
            DataType::Decimal32(p, s)
            | DataType::Decimal64(p, s)
            | DataType::Decimal128(p, s)
            | DataType::Decimal256(p, s) => ChType::Decimal(*p, *s),
            DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView => ChType::String,
            DataType::FixedSizeBinary(n) => ChType::FixedString(*n as usize),
            DataType::Boolean => ChType::Bool,
            DataType::Date32 | DataType::Date64 => ChType::Date32,
            DataType::Timestamp(unit, tz) => {
                let tz = tz.as_ref().map(|t| t.to_string());
                match unit {
                    TimeUnit::Second => ChType::DateTime(tz),
                    TimeUnit::Millisecond => ChType::DateTime64(3, tz),
                    TimeUnit::Microsecond => ChType::DateTime64(6, tz),
                    TimeUnit::Nanosecond => ChType::DateTime64(9, tz),
                }
            }
            DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                ChType::Array(Box::new(ChType::from_arrow(f.data_type(), f.is_nullable())?))
            }
            DataType::Struct(fields) => ChType::Tuple(
                fields
                    .iter()
                    .map(|f| {
                        Ok((
                            Some(f.name().clone()),
                            ChType::from_arrow(f.data_type(), f.is_nullable())?,
                        ))
                    })
                    .collect::<Result<_>>()?,
            ),
            DataType::Map(entries, _) => match entries.data_type() {
                DataType::Struct(kv) if kv.len() == 2 => ChType::Map(
                    Box::new(ChType::from_arrow(kv[0].data_type(), false)?),
                    Box::new(ChType::from_arrow(kv[1].data_type(), kv[1].is_nullable())?),
                ),
                other => return Err(Error::Config(format!("unsupported Arrow map entries {other}"))),
            },
            DataType::Dictionary(_, v) => {
                return Ok(ChType::LowCardinality(Box::new(ChType::from_arrow(v, nullable)?)));
            }
            other => {
                return Err(Error::Config(format!(
                    "Arrow type {other} has no ClickHouse equivalent in flumen's type map"
                )));
            }
        };
        Ok(if nullable && base.can_be_nullable() {
            ChType::Nullable(Box::new(base))
        } else {
            base
        })
    }

    /// The Arrow field type of a column of this type (the table's schema in DataFusion).
    pub fn to_arrow(&self) -> (DataType, bool) {
        use arrow::datatypes::Field;
        let t = match self {
            ChType::Int(8) => DataType::Int8,
            ChType::Int(16) => DataType::Int16,
            ChType::Int(32) => DataType::Int32,
            // Arrow has no 128/256-bit integers: Decimal256(76, 0) holds them (all of Int128
            // and UInt128; Int256/UInt256 up to 76 digits).
            ChType::Int(128 | 256) | ChType::UInt(128 | 256) => DataType::Decimal256(76, 0),
            ChType::Int(_) => DataType::Int64,
            ChType::UInt(8) => DataType::UInt8,
            ChType::UInt(16) => DataType::UInt16,
            ChType::UInt(32) => DataType::UInt32,
            ChType::UInt(_) => DataType::UInt64,
            ChType::Enum(..) => DataType::Utf8,
            // Read as the values themselves (DataFusion's functions all take them).
            ChType::LowCardinality(inner) => return inner.to_arrow(),
            ChType::Float32 => DataType::Float32,
            ChType::Float64 => DataType::Float64,
            ChType::Decimal(p, s) if *p > 38 => DataType::Decimal256(*p, *s),
            ChType::Decimal(p, s) => DataType::Decimal128(*p, *s),
            // A view: DataFusion reads files' strings as views, so inserts need no cast.
            ChType::String => DataType::Utf8View,
            ChType::FixedString(_) | ChType::Uuid => DataType::Utf8,
            ChType::Date | ChType::Date32 => DataType::Date32,
            ChType::DateTime(tz) => DataType::Timestamp(TimeUnit::Second, tz.as_deref().map(Into::into)),
            ChType::DateTime64(p, tz) => DataType::Timestamp(
                match p {
                    0 => TimeUnit::Second,
                    1..=3 => TimeUnit::Millisecond,
                    4..=6 => TimeUnit::Microsecond,
                    _ => TimeUnit::Nanosecond,
                },
                tz.as_deref().map(Into::into),
            ),
            ChType::Bool => DataType::Boolean,
            ChType::Nullable(inner) => return (inner.to_arrow().0, true),
            // Nested fields are nullable on the Arrow side so DataFusion can cast into them; the
            // encoder still refuses a NULL where the ClickHouse type is not Nullable.
            ChType::Array(inner) => {
                DataType::List(std::sync::Arc::new(Field::new("item", inner.to_arrow().0, true)))
            }
            ChType::Tuple(items) => DataType::Struct(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, (name, t))| {
                        // Unnamed elements get DataFusion's own names for struct(...) fields.
                        Field::new(
                            name.clone().unwrap_or_else(|| format!("c{i}")),
                            t.to_arrow().0,
                            true,
                        )
                    })
                    .collect(),
            ),
            ChType::Map(k, v) => {
                let (kt, _) = k.to_arrow();
                let (vt, _) = v.to_arrow();
                let entries = Field::new(
                    "entries",
                    DataType::Struct(
                        vec![Field::new("key", kt, false), Field::new("value", vt, true)].into(),
                    ),
                    false,
                );
                DataType::Map(std::sync::Arc::new(entries), false)
            }
        };
        (t, false)
    }

    /// The closest type a ClickHouse server older than 20 (no DateTime64, Date32, Bool, Map)
    /// can create.
    pub fn for_legacy_server(self) -> Result<ChType> {
        Ok(match self {
            ChType::DateTime64(_, tz) => ChType::DateTime(tz),
            ChType::Date32 => ChType::Date,
            ChType::Bool => ChType::UInt(8),
            ChType::Nullable(t) => ChType::Nullable(Box::new(t.for_legacy_server()?)),
            ChType::Array(t) => ChType::Array(Box::new(t.for_legacy_server()?)),
            ChType::Tuple(items) => ChType::Tuple(
                items
                    .into_iter()
                    .map(|(n, t)| Ok((n, t.for_legacy_server()?)))
                    .collect::<Result<_>>()?,
            ),
            ChType::Map(..) => {
                return Err(Error::Config(
                    "this ClickHouse server has no Map type (it came in 21.1)".into(),
                ));
            }
            ChType::Int(128 | 256) | ChType::UInt(128 | 256) => {
                return Err(Error::Config(
                    "this ClickHouse server has no 128/256-bit integers (they came in 20.8)".into(),
                ));
            }
            // Experimental before 19; flumen writes the plain type there.
            ChType::LowCardinality(t) => t.for_legacy_server()?,
            other => other,
        })
    }

    /// Whether ClickHouse allows `Nullable(self)`.
    pub fn can_be_nullable(&self) -> bool {
        !matches!(
            self,
            ChType::Array(_)
                | ChType::Tuple(_)
                | ChType::Map(..)
                | ChType::Nullable(_)
                | ChType::LowCardinality(_)
        )
    }

    /// Parses a type name as ClickHouse prints it (`Nullable(DateTime64(6, 'UTC'))`, ...).
    pub fn parse(s: &str) -> Result<ChType> {
        if s.len() > MAX_TYPE_LEN {
            return Err(Error::Config(format!(
                "a ClickHouse type name of {} bytes (more than {MAX_TYPE_LEN}) is not a type flumen reads: '{}...'",
                s.len(),
                s.chars().take(80).collect::<String>()
            )));
        }
        let mut p = Parser {
            s: s.as_bytes(),
            i: 0,
            text: s,
            depth: 0,
        };
        let t = p.ty()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(p.err("unexpected text after the type"));
        }
        Ok(t)
    }
}

/// Types nested deeper than this (`Array(Array(...))`) are refused: a server's answer must not
/// drive the parser's (or the decoder's) recursion as deep as it likes.
const MAX_TYPE_DEPTH: usize = 32;

/// Longer type names are refused before parsing.
const MAX_TYPE_LEN: usize = 64 << 10;

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
    text: &'a str,
    depth: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> Error {
        let shown: String = self.text.chars().take(200).collect();
        let more = if shown.len() < self.text.len() { "..." } else { "" };
        Error::Config(format!(
            "cannot parse ClickHouse type '{shown}{more}' at {}: {what}",
            self.i
        ))
    }

    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> bool {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, c: u8) -> Result<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.err(&format!("expected '{}'", c as char)))
        }
    }

    fn ident(&mut self) -> String {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric() || self.s[self.i] == b'_') {
            self.i += 1;
        }
        self.text[start..self.i].to_string()
    }

    fn number(&mut self) -> Result<i64> {
        self.ws();
        let start = self.i;
        if self.s.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        while self.i < self.s.len() && self.s[self.i].is_ascii_digit() {
            self.i += 1;
        }
        self.text[start..self.i]
            .parse()
            .map_err(|_| self.err("expected a number"))
    }

    fn quoted(&mut self) -> Result<String> {
        self.expect(b'\'')?;
        let mut out = String::new();
        while let Some(&c) = self.s.get(self.i) {
            self.i += 1;
            match c {
                b'\\' => {
                    if let Some(&n) = self.s.get(self.i) {
                        out.push(n as char);
                        self.i += 1;
                    }
                }
                b'\'' => return Ok(out),
                _ => out.push(c as char),
            }
        }
        Err(self.err("unterminated quote"))
    }

    fn ty(&mut self) -> Result<ChType> {
        self.depth += 1;
        if self.depth > MAX_TYPE_DEPTH {
            return Err(self.err(&format!("types nested more than {MAX_TYPE_DEPTH} deep")));
        }
        let t = self.ty_here();
        self.depth -= 1;
        t
    }

    fn ty_here(&mut self) -> Result<ChType> {
        let name = self.ident();
        let t = match name.as_str() {
            "Int8" | "Int16" | "Int32" | "Int64" | "Int128" | "Int256" => {
                ChType::Int(name[3..].parse().unwrap_or(64))
            }
            "UInt8" | "UInt16" | "UInt32" | "UInt64" | "UInt128" | "UInt256" => {
                ChType::UInt(name[4..].parse().unwrap_or(64))
            }
            "Enum8" | "Enum16" | "Enum" => {
                self.expect(b'(')?;
                let mut items = Vec::new();
                let mut next = 1i16;
                loop {
                    let n = self.quoted()?;
                    let v = if self.eat(b'=') {
                        self.number()? as i16
                    } else {
                        next
                    };
                    next = v.saturating_add(1);
                    items.push((n, v));
                    if !self.eat(b',') {
                        break;
                    }
                }
                self.expect(b')')?;
                let bits = if name == "Enum8"
                    || name == "Enum" && items.iter().all(|(_, v)| i8::try_from(*v).is_ok())
                {
                    8
                } else {
                    16
                };
                ChType::Enum(bits, items)
            }
            "Float32" => ChType::Float32,
            "Float64" => ChType::Float64,
            "String" => ChType::String,
            "Bool" | "Boolean" => ChType::Bool,
            "UUID" => ChType::Uuid,
            "Date" => ChType::Date,
            "Date32" => ChType::Date32,
            "Decimal" => {
                self.expect(b'(')?;
                let p = self.number()?;
                self.expect(b',')?;
                let s = self.number()?;
                self.expect(b')')?;
                ChType::Decimal(p as u8, s as i8)
            }
            "Decimal32" | "Decimal64" | "Decimal128" | "Decimal256" => {
                let p = match name.as_str() {
                    "Decimal32" => 9,
                    "Decimal64" => 18,
                    "Decimal128" => 38,
                    _ => 76,
                };
                self.expect(b'(')?;
                let s = self.number()?;
                self.expect(b')')?;
                ChType::Decimal(p, s as i8)
            }
            "FixedString" => {
                self.expect(b'(')?;
                let n = self.number()?;
                self.expect(b')')?;
                ChType::FixedString(n.max(0) as usize)
            }
            "DateTime" => {
                let tz = if self.eat(b'(') {
                    let tz = self.quoted()?;
                    self.expect(b')')?;
                    Some(tz)
                } else {
                    None
                };
                ChType::DateTime(tz)
            }
            "DateTime64" => {
                self.expect(b'(')?;
                let p = self.number()?;
                let tz = if self.eat(b',') {
                    Some(self.quoted()?)
                } else {
                    None
                };
                self.expect(b')')?;
                ChType::DateTime64(p as u8, tz)
            }
            "Nullable" | "Array" | "LowCardinality" => {
                self.expect(b'(')?;
                let inner = self.ty()?;
                self.expect(b')')?;
                match name.as_str() {
                    "Nullable" => ChType::Nullable(Box::new(inner)),
                    "Array" => ChType::Array(Box::new(inner)),
                    _ => ChType::LowCardinality(Box::new(inner)),
                }
            }
            "Map" => {
                self.expect(b'(')?;
                let k = self.ty()?;
                self.expect(b',')?;
                let v = self.ty()?;
                self.expect(b')')?;
                ChType::Map(Box::new(k), Box::new(v))
            }
            "Tuple" => {
                self.expect(b'(')?;
                let mut items = Vec::new();
                loop {
                    // `name Type` or just `Type`.
                    let save = self.i;
                    let first = self.ident();
                    self.ws();
                    let named =
                        !first.is_empty() && self.s.get(self.i).is_some_and(|c| c.is_ascii_alphabetic());
                    self.i = save;
                    let name = if named { Some(self.ident()) } else { None };
                    items.push((name, self.ty()?));
                    if !self.eat(b',') {
                        break;
                    }
                }
                self.expect(b')')?;
                ChType::Tuple(items)
            }
            "" => return Err(self.err("expected a type name")),
            other => return Err(self.err(&format!("type {other} is not supported by flumen"))),
        };
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn parses_and_prints_round_trip() {
        for name in [
            "Int8",
            "UInt64",
            "Decimal(18, 2)",
            "Nullable(DateTime64(6, 'UTC'))",
            "Array(Nullable(String))",
            "Map(String, Array(Int32))",
            "Tuple(a Int32, b Nullable(String))",
            "Tuple(Int32, String)",
            "FixedString(16)",
            "DateTime('Europe/Berlin')",
            "DateTime",
            "Date32",
            "Int128",
            "UInt256",
            "LowCardinality(Nullable(String))",
            "Enum8('a' = 1, 'b' = 2)",
        ] {
            let t = ChType::parse(name).unwrap();
            assert_eq!(t.to_string(), name);
        }
        assert_eq!(ChType::parse("Decimal64(3)").unwrap(), ChType::Decimal(18, 3));
        assert_eq!(
            ChType::parse("Enum8('a' = 1, 'it\\'s' = -2)").unwrap(),
            ChType::Enum(8, vec![("a".into(), 1), ("it's".into(), -2)])
        );
        assert_eq!(
            ChType::parse("Enum16('a' = 1000)").unwrap().to_string(),
            "Enum16('a' = 1000)"
        );
        assert!(ChType::parse("Nullable(").is_err());
        // Nesting and length are bounded: an error, not a stack overflow.
        let deep = format!("{}Int8{}", "Array(".repeat(100_000), ")".repeat(100_000));
        let e = ChType::parse(&deep).unwrap_err().to_string();
        assert!(
            e.contains("nested more than 32 deep") || e.contains("more than 65536"),
            "{e}"
        );
        let deep = format!("{}Int8{}", "Array(".repeat(40), ")".repeat(40));
        assert!(
            ChType::parse(&deep)
                .unwrap_err()
                .to_string()
                .contains("nested more than 32 deep")
        );
        let ok = format!("{}Int8{}", "Array(".repeat(20), ")".repeat(20));
        assert!(ChType::parse(&ok).is_ok());
        assert!(ChType::parse("IPv4").is_err());
    }

    #[test]
    fn maps_arrow_types() {
        use arrow::datatypes::Field;
        let ts = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        assert_eq!(
            ChType::from_arrow(&ts, true).unwrap().to_string(),
            "Nullable(DateTime64(6, 'UTC'))"
        );
        let list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
        assert_eq!(
            ChType::from_arrow(&list, true).unwrap().to_string(),
            "Array(Nullable(String))"
        );
        assert_eq!(
            ChType::from_arrow(&DataType::Decimal128(18, 2), false)
                .unwrap()
                .to_string(),
            "Decimal(18, 2)"
        );
        assert!(ChType::from_arrow(&DataType::Duration(TimeUnit::Second), false).is_err());
    }
}
