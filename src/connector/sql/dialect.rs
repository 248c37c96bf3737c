//! What differs between MySQL, PostgreSQL and SQLite when flumen writes SQL for them:
//! identifier quoting, literals, which filters they evaluate exactly as DataFusion does.

use arrow::datatypes::DataType;
use datafusion::common::ScalarValue;

/// The three databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    MySql,
    Postgres,
    Sqlite,
}

impl Dialect {
    /// The `STORED AS` name.
    pub fn name(self) -> &'static str {
        match self {
            Dialect::MySql => "MYSQL",
            Dialect::Postgres => "POSTGRES",
            Dialect::Sqlite => "SQLITE",
        }
    }

    /// An identifier, quoted (a dotted `schema.table` quotes each part).
    pub fn ident(self, name: &str) -> String {
        let q = match self {
            Dialect::MySql => '`',
            _ => '"',
        };
        let one = |p: &str| format!("{q}{}{q}", p.replace(q, &format!("{q}{q}")));
        one(name)
    }

    /// A table name as the user wrote it (`db.table` or `table`), each part quoted.
    pub fn table(self, name: &str) -> String {
        name.split('.')
            .map(|p| self.ident(p))
            .collect::<Vec<_>>()
            .join(".")
    }

    /// A string literal that means `s` whatever the session's settings: a backslash is read as
    /// an escape by MySQL unless `NO_BACKSLASH_ESCAPES` is set, and by PostgreSQL when
    /// `standard_conforming_strings` is off. So a string with one is written as MySQL's hex
    /// literal (its UTF-8 bytes; compared as bytes, as DataFusion compares) or PostgreSQL's
    /// escape string (`E'...'`, which reads backslashes the same way in every setting).
    pub fn string(self, s: &str) -> String {
        let quoted = s.replace('\'', "''");
        if !s.contains('\\') {
            return format!("'{quoted}'");
        }
        match self {
            // A utf8mb4 string spelt in hex: compared in the column's collation, as a quoted
            // string would be.
            Dialect::MySql => {
                use std::fmt::Write as _;
                let mut hex = String::with_capacity(s.len() * 2 + 12);
                hex.push_str("_utf8mb4 X'");
                for b in s.bytes() {
                    let _ = write!(hex, "{b:02X}");
                }
                hex.push('\'');
                hex
            }
            Dialect::Postgres => format!("E'{}'", quoted.replace('\\', "\\\\")),
            Dialect::Sqlite => format!("'{quoted}'"),
        }
    }

    /// A literal compared with a column of type `column`, when the database compares them
    /// exactly as DataFusion would (`exact`), or returns at least the rows DataFusion keeps
    /// (not `exact`: DataFusion filters again). `None`: not sent.
    pub fn literal(self, column: &DataType, v: &ScalarValue, equality: bool) -> Option<(String, bool)> {
        let numeric =
            column.is_integer() || column.is_floating() || matches!(column, DataType::Decimal128(..));
        let text = matches!(column, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
        Some(match v {
            ScalarValue::Int8(Some(x)) if numeric => (x.to_string(), true),
            ScalarValue::Int16(Some(x)) if numeric => (x.to_string(), true),
            ScalarValue::Int32(Some(x)) if numeric => (x.to_string(), true),
            ScalarValue::Int64(Some(x)) if numeric => (x.to_string(), true),
            ScalarValue::UInt8(Some(x)) if numeric => (x.to_string(), true),
            ScalarValue::UInt16(Some(x)) if numeric => (x.to_string(), true),
            ScalarValue::UInt32(Some(x)) if numeric => (x.to_string(), true),
            ScalarValue::UInt64(Some(x)) if numeric => (x.to_string(), true),
            ScalarValue::Float64(Some(x)) if numeric && x.is_finite() && column.is_floating() => {
                (format!("{x:?}"), true)
            }
            ScalarValue::Boolean(Some(b)) if *column == DataType::Boolean => match self {
                Dialect::Postgres => (b.to_string().to_uppercase(), true),
                _ => ((*b as u8).to_string(), true),
            },
            // Strings: only equality (ordering follows the column's collation); MySQL's usual
            // collations ignore case and trailing spaces, so there DataFusion checks again.
            ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s))
                if text && equality =>
            {
                (self.string(s), self != Dialect::MySql)
            }
            ScalarValue::Date32(Some(_)) if *column == DataType::Date32 && self != Dialect::Sqlite => {
                (format!("DATE '{v}'"), true)
            }
            // Timestamps to the microsecond (what both servers keep); only for columns
            // without a time zone, whose values the server compares as written.
            ScalarValue::TimestampSecond(Some(_), None)
            | ScalarValue::TimestampMillisecond(Some(_), None)
            | ScalarValue::TimestampMicrosecond(Some(_), None)
            | ScalarValue::TimestampNanosecond(Some(_), None)
                if matches!(column, DataType::Timestamp(_, None)) && self != Dialect::Sqlite =>
            {
                let micros = match v {
                    ScalarValue::TimestampSecond(Some(x), _) => x.checked_mul(1_000_000)?,
                    ScalarValue::TimestampMillisecond(Some(x), _) => x.checked_mul(1_000)?,
                    ScalarValue::TimestampMicrosecond(Some(x), _) => *x,
                    ScalarValue::TimestampNanosecond(Some(x), _) if x % 1_000 == 0 => x / 1_000,
                    _ => return None,
                };
                let t = chrono::DateTime::from_timestamp_micros(micros)?;
                (format!("TIMESTAMP '{}'", t.format("%Y-%m-%d %H:%M:%S%.6f")), true)
            }
            _ => return None,
        })
    }

    /// `LIMIT n`.
    pub fn limit(self, n: usize) -> String {
        format!(" LIMIT {n}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_become_timestamp_literals() {
        let ts = DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, None);
        let v = ScalarValue::TimestampMicrosecond(Some(1_772_409_600_000_001), None);
        assert_eq!(
            Dialect::MySql.literal(&ts, &v, false),
            Some(("TIMESTAMP '2026-03-02 00:00:00.000001'".to_string(), true))
        );
        assert_eq!(Dialect::Sqlite.literal(&ts, &v, false), None);
        let zoned = DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into()));
        assert_eq!(Dialect::Postgres.literal(&zoned, &v, false), None);
    }

    #[test]
    fn quoting_and_literals_follow_the_dialect() {
        assert_eq!(Dialect::MySql.ident("a`b"), "`a``b`");
        assert_eq!(Dialect::Postgres.table("s.t\"x"), "\"s\".\"t\"\"x\"");
        assert_eq!(Dialect::MySql.string("it's"), "'it''s'");
        assert_eq!(
            Dialect::MySql.string("a\\' OR 1=1 -- "),
            "_utf8mb4 X'615C27204F5220313D31202D2D20'"
        );
        assert_eq!(Dialect::Postgres.string("it's a \\"), "E'it''s a \\\\'");
        assert_eq!(Dialect::Postgres.string("it's"), "'it''s'");
        assert_eq!(Dialect::Sqlite.string("it's a \\"), "'it''s a \\'");
        let s = ScalarValue::Utf8(Some("x".into()));
        assert_eq!(
            Dialect::MySql.literal(&DataType::Utf8, &s, true),
            Some(("'x'".into(), false))
        );
        assert_eq!(Dialect::Sqlite.literal(&DataType::Utf8, &s, false), None);
        assert_eq!(
            Dialect::Postgres.literal(&DataType::Date32, &ScalarValue::Date32(Some(0)), false),
            Some(("DATE '1970-01-01'".into(), true))
        );
    }
}
