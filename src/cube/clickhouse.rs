//! A cube deployed to ClickHouse: an `AggregatingMergeTree` table of `-State` columns at the
//! finest grain (all dimensions), the `MATERIALIZED VIEW` that feeds it from the raw table, a
//! backfill of the rows already there, and `-Merge` queries for each grouping set.
//!
//! Every coarser grouping set is a `GROUP BY` over the table with `-Merge` combinators, exact
//! for distinct counts too (`uniqExact` states merge exactly). Works on ClickHouse 18.16.
//!
//! Decisions:
//! - The materialized view is created before the backfill. Rows inserted into the raw table
//!   between the two are counted twice, while none are lost: deploy while the raw table is quiet.
//! - Dimensions are sorting keys, which ClickHouse before 20 cannot make `Nullable`: a NULL
//!   dimension is stored as its type's default (`assumeNotNull`).
//! - Dimension expressions are translated for `date_trunc('unit', column)` and plain columns;
//!   measures for `sum`, `count`, `count(DISTINCT)` (`uniqExact`), `avg`, `min` and `max` of a
//!   column. Anything else is an error naming it.

use arrow::datatypes::{DataType, Schema};

use super::model::CubeDef;
use crate::connector::clickhouse::client::quote_ident;
use crate::connector::clickhouse::types::ChType;
use crate::error::{Error, Result};

/// The statements of a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// `CREATE TABLE` and `CREATE MATERIALIZED VIEW`.
    pub create: Vec<String>,
    /// Fills the table from the rows already in the raw table.
    pub backfill: String,
    /// One `-Merge` query per grouping set, with the set's dimensions.
    pub queries: Vec<(Vec<String>, String)>,
    pub table: String,
}

/// Where a deployed cube's objects go.
#[derive(Debug, Clone)]
pub struct Target {
    /// The raw table the materialized view reads (`db.table` or `table`).
    pub raw_table: String,
    /// The server is older than 20 (no DateTime64, Bool, ...).
    pub legacy: bool,
}

fn plain_column(s: &str) -> Option<&str> {
    let s = s.trim().trim_matches('"');
    (!s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')).then_some(s)
}

fn column_type(cube: &str, schema: &Schema, column: &str, target: &Target) -> Result<ChType> {
    let f = schema.field_with_name(column).map_err(|_| {
        Error::Config(format!(
            "cube {cube}: the source has no column {column} (it has {})",
            crate::connector::options::column_names(schema)
        ))
    })?;
    let t = ChType::from_arrow(f.data_type(), f.is_nullable())?;
    if target.legacy {
        t.for_legacy_server()
    } else {
        Ok(t)
    }
}

fn strip_nullable(t: ChType) -> ChType {
    match t {
        ChType::Nullable(inner) => *inner,
        other => other,
    }
}

/// A dimension in ClickHouse's SQL, and its column type.
fn dimension(
    cube: &str,
    name: &str,
    expr: &str,
    schema: &Schema,
    target: &Target,
) -> Result<(String, String)> {
    if let Some(c) = plain_column(expr) {
        let t = strip_nullable(column_type(cube, schema, c, target)?);
        return Ok((format!("assumeNotNull({})", quote_ident(c)), t.to_string()));
    }
    let lower = expr.trim().to_ascii_lowercase();
    let unsupported = || {
        Error::Config(format!(
            "cube {cube}: dimension {name} => {expr} has no ClickHouse translation yet (plain columns and date_trunc('unit', column) have)"
        ))
    };
    let inner = lower
        .strip_prefix("date_trunc(")
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(unsupported)?;
    let (unit, column) = inner.split_once(',').ok_or_else(unsupported)?;
    let column = plain_column(column).ok_or_else(unsupported)?;
    // The column as written (case kept).
    let column = schema
        .fields()
        .iter()
        .find(|f| f.name().eq_ignore_ascii_case(column))
        .map(|f| f.name().clone())
        .ok_or_else(|| Error::Config(format!("cube {cube}: the source has no column {column}")))?;
    let (f, t) = match unit.trim().trim_matches('\'') {
        "year" => ("toStartOfYear", "Date"),
        "quarter" => ("toStartOfQuarter", "Date"),
        "month" => ("toStartOfMonth", "Date"),
        "week" => ("toMonday", "Date"),
        "day" => ("toStartOfDay", "DateTime"),
        "hour" => ("toStartOfHour", "DateTime"),
        "minute" => ("toStartOfMinute", "DateTime"),
        _ => return Err(unsupported()),
    };
    // Timestamps with sub-second parts arrive as DateTime64 or strings on older servers.
    let arg = match schema.field_with_name(&column).map(|f| f.data_type().clone()) {
        Ok(DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8) => {
            format!("parseDateTimeBestEffort(assumeNotNull({}))", quote_ident(&column))
        }
        _ => format!("assumeNotNull({})", quote_ident(&column)),
    };
    Ok((format!("{f}({arg})"), t.to_string()))
}

/// A measure: its `-State` expression, column type and `-Merge` function.
fn measure(
    cube: &str,
    name: &str,
    expr: &str,
    schema: &Schema,
    target: &Target,
) -> Result<(String, String, String)> {
    let unsupported = || {
        Error::Config(format!(
            "cube {cube}: measure {name} => {expr} has no ClickHouse translation (sum, count, count(DISTINCT), avg, min, max of a column have)"
        ))
    };
    let (f, rest) = expr.trim().split_once('(').ok_or_else(unsupported)?;
    let args = rest.trim_end().strip_suffix(')').ok_or_else(unsupported)?.trim();
    let f = f.trim().to_ascii_lowercase();
    let (distinct, args) = match args.to_ascii_lowercase().strip_prefix("distinct ") {
        Some(_) => (true, args[9..].trim()),
        None => (false, args),
    };
    let func = match (f.as_str(), distinct) {
        ("count", true) => "uniqExact",
        ("sum" | "count" | "avg" | "min" | "max", false) => f.as_str(),
        _ => return Err(unsupported()),
    };
    if args == "*" || args.is_empty() {
        if func != "count" {
            return Err(unsupported());
        }
        return Ok((
            "countState()".into(),
            "AggregateFunction(count)".into(),
            "countMerge".into(),
        ));
    }
    let column = plain_column(args).ok_or_else(unsupported)?;
    let t = column_type(cube, schema, column, target)?;
    Ok((
        format!("{func}State({})", quote_ident(column)),
        format!("AggregateFunction({func}, {t})"),
        format!("{func}Merge"),
    ))
}

/// The deployment of `cube` (its local definition; `schema` is its source's).
pub fn deployment(cube: &str, def: &CubeDef, schema: &Schema, target: &Target) -> Result<Deployment> {
    let table = format!("{cube}_agg");
    let mv = format!("{cube}_mv");
    let mut columns = Vec::new();
    let mut select = Vec::new();
    let mut keys = Vec::new();
    for (n, e) in &def.dimensions {
        let (sql, t) = dimension(cube, n, e, schema, target)?;
        columns.push(format!("{} {t}", quote_ident(n)));
        select.push(format!("{sql} AS {}", quote_ident(n)));
        keys.push(quote_ident(n));
    }
    let mut merges = Vec::new();
    for (n, e, _) in &def.measures {
        let (state, t, merge) = measure(cube, n, e, schema, target)?;
        columns.push(format!("{} {t}", quote_ident(n)));
        select.push(format!("{state} AS {}", quote_ident(n)));
        merges.push(format!("{merge}({q}) AS {q}", q = quote_ident(n)));
    }
    let select = format!(
        "SELECT {} FROM {} GROUP BY {}",
        select.join(", "),
        target.raw_table,
        keys.join(", ")
    );
    let create = vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {} ({}) ENGINE = AggregatingMergeTree() ORDER BY ({})",
            quote_ident(&table),
            columns.join(", "),
            keys.join(", ")
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {} TO {} AS {select}",
            quote_ident(&mv),
            quote_ident(&table)
        ),
    ];
    let backfill = format!("INSERT INTO {} {select}", quote_ident(&table));
    let queries = def
        .grouping_sets()
        .into_iter()
        .map(|set| {
            let dims: Vec<String> = set.iter().map(|d| quote_ident(d)).collect();
            let lead: String = dims.iter().map(|d| format!("{d}, ")).collect();
            let tail = if dims.is_empty() {
                String::new()
            } else {
                format!(" GROUP BY {0} ORDER BY {0}", dims.join(", "))
            };
            let sql = format!(
                "SELECT {lead}{} FROM {}{tail}",
                merges.join(", "),
                quote_ident(&table)
            );
            (set, sql)
        })
        .collect();
    Ok(Deployment {
        create,
        backfill,
        queries,
        table,
    })
}

impl Deployment {
    /// The statements as a script to read or run with clickhouse-client.
    pub fn script(&self) -> String {
        let mut out = String::from("-- The table: every dimension, each measure as its -State.\n");
        out.push_str(&format!(
            "{};\n\n-- Fed by every insert into the raw table:\n{};\n\n",
            self.create[0], self.create[1]
        ));
        out.push_str(&format!(
            "-- Backfill of the rows already in the raw table:\n{};\n\n",
            self.backfill
        ));
        out.push_str("-- Each grouping set, from the table:\n");
        for (set, q) in &self.queries {
            out.push_str(&format!("-- ({})\n{q};\n", set.join(", ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cube::model::Sets;
    use arrow::datatypes::{Field, TimeUnit};

    #[test]
    fn a_cube_becomes_an_aggregating_merge_tree_and_its_view() {
        let def = CubeDef::new(
            "sales",
            "orders".into(),
            vec![
                ("month".into(), "date_trunc('month', created_at)".into()),
                ("city".into(), "city".into()),
            ],
            vec![
                ("revenue".into(), "sum(amount)".into()),
                ("orders".into(), "count(*)".into()),
                ("buyers".into(), "count(DISTINCT user_id)".into()),
                ("avg_amount".into(), "avg(amount)".into()),
            ],
            Sets::Rollup,
        )
        .unwrap();
        let schema = Schema::new(vec![
            Field::new(
                "created_at",
                DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
                true,
            ),
            Field::new("city", DataType::Utf8, true),
            Field::new("amount", DataType::Float64, true),
            Field::new("user_id", DataType::Int64, true),
        ]);
        let target = Target {
            raw_table: "orders_raw".into(),
            legacy: true,
        };
        let d = deployment("sales", &def, &schema, &target).unwrap();
        let t = &d.create[0];
        assert!(t.contains("`month` Date, `city` String"), "{t}");
        assert!(
            t.contains("`revenue` AggregateFunction(sum, Nullable(Float64))"),
            "{t}"
        );
        assert!(t.contains("`orders` AggregateFunction(count)"), "{t}");
        assert!(
            t.contains("`buyers` AggregateFunction(uniqExact, Nullable(Int64))"),
            "{t}"
        );
        assert!(
            t.ends_with("ENGINE = AggregatingMergeTree() ORDER BY (`month`, `city`)"),
            "{t}"
        );
        let v = &d.create[1];
        assert!(v.starts_with("CREATE MATERIALIZED VIEW IF NOT EXISTS `sales_mv` TO `sales_agg` AS SELECT toStartOfMonth(assumeNotNull(`created_at`)) AS `month`"), "{v}");
        assert!(
            v.contains("uniqExactState(`user_id`) AS `buyers`")
                && v.ends_with("FROM orders_raw GROUP BY `month`, `city`"),
            "{v}"
        );
        assert_eq!(d.queries.len(), 3);
        assert!(
            d.queries[1].1.contains("uniqExactMerge(`buyers`) AS `buyers`")
                && d.queries[1].1.ends_with("GROUP BY `month` ORDER BY `month`")
        );
        assert!(!d.queries[2].1.contains("GROUP BY"));
        let bad = CubeDef::new(
            "c",
            "o".into(),
            vec![("city".into(), "upper(city)".into())],
            vec![("n".into(), "count(*)".into())],
            Sets::Cube,
        )
        .unwrap();
        let e = deployment("c", &bad, &schema, &target).unwrap_err().to_string();
        assert!(
            e.contains("dimension city => upper(city) has no ClickHouse translation"),
            "{e}"
        );
    }
}
