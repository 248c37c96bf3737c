//! Cubes: named dimensions and measures over one source, materialized for chosen grouping sets
//! and queried by name, each query answered from the grouping set that fits it.
//!
//! ```sql
//! CREATE CUBE sales FROM orders
//!   DIMENSIONS (day => date_trunc('day', created_at), city, status)
//!   MEASURES (revenue => sum(amount), orders => count(*), buyers => count(DISTINCT user_id))
//!   [CUBE | ROLLUP | GROUPING SETS ((day, city), (city), ())];
//! SELECT city, revenue, buyers FROM sales;            -- answered by the (city) set
//! SELECT day, revenue FROM sales WHERE city = 'Bern';  -- the (day, city) set, filtered
//! ```
//!
//! A cube is stored as a materialized view (`super::mv`) whose query groups by the chosen sets
//! and adds one `__grouping_<dimension>` flag per dimension (1 where the set rolls it up). A
//! query on the cube uses some dimensions (selected, filtered or grouped on): the scan reads the
//! rows of the set that groups by exactly those, one row per group, so every measure is exact,
//! distinct counts included. Without such a set (ROLLUP, explicit sets), the smallest set that
//! holds them all is re-aggregated, which only sums, counts, minima and maxima allow.
//!
//! A cube created with `OPTIONS ('watermark' 'column')` refreshes incrementally
//! (`REFRESH CUBE name INCREMENTAL`): its store keeps every measure as a mergeable state (`sum`,
//! `count`, `min`, `max` as themselves, `avg` as hidden sum and count columns, `count(DISTINCT
//! x)` as the hidden list of distinct values, what ClickHouse's `uniqExactState` keeps), and a
//! refresh aggregates the new source rows by the same sets and merges them into the store by
//! dimensions and flags. Such a cube also re-aggregates averages and distinct counts, so every
//! query it holds the dimensions of is exact. Other aggregates (median, ...) are refused in an
//! incremental cube. The lists make the store larger: a cube refreshed in full keeps none.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use serde::{Deserialize, Serialize};

use datafusion::sql::sqlparser::ast::{DuplicateTreatment, Expr as SqlExpr, FunctionArguments};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;

use super::mv::{Merge, hidden, is_aggregate, quote};
use crate::error::{Error, Result};

/// Which grouping sets a cube keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Sets {
    /// Every subset of the dimensions.
    Cube,
    /// The prefixes of the dimension list, down to the grand total.
    Rollup,
    /// These sets of dimension names.
    Explicit(Vec<Vec<String>>),
}

/// A cube's definition, kept with its view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CubeDef {
    pub source: String,
    /// `(name, expression)`.
    pub dimensions: Vec<(String, String)>,
    /// `(name, aggregate expression, how it re-aggregates)`.
    pub measures: Vec<(String, String, Option<Merge>)>,
    pub sets: Sets,
    /// Measures kept as mergeable state (a cube with a watermark: incremental refresh).
    #[serde(default)]
    pub mergeable: bool,
}

/// How a mergeable cube keeps one measure.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kept {
    /// The aggregate itself (`sum`, `count`, `min`, `max`; anything in a cube refreshed in full).
    Plain(Option<Merge>),
    /// `avg(args)` as hidden `sum(args)` and `count(args)`.
    Avg(String),
    /// `count(DISTINCT arg)` as the hidden list of the distinct non-null values.
    Distinct(String),
}

/// One aggregate call, as a measure is written.
struct Call {
    name: String,
    distinct: bool,
    args: Vec<String>,
}

/// The measure `expr` if it is exactly one aggregate call without FILTER, OVER or ORDER BY
/// (`sum(a) / count(*)` is not: it neither re-aggregates nor merges).
fn call(expr: &str) -> Option<Call> {
    let e = Parser::new(&GenericDialect {})
        .try_with_sql(expr)
        .ok()?
        .parse_expr()
        .ok()?;
    let SqlExpr::Function(f) = e else {
        return None;
    };
    if f.filter.is_some() || f.over.is_some() || !f.within_group.is_empty() {
        return None;
    }
    let FunctionArguments::List(list) = &f.args else {
        return None;
    };
    if !list.clauses.is_empty() {
        return None;
    }
    Some(Call {
        name: f.name.to_string().to_ascii_lowercase(),
        distinct: matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct)),
        args: list.args.iter().map(|a| a.to_string()).collect(),
    })
}

/// The flag column of a dimension: 1 in rows where the grouping set rolls it up.
pub fn flag(dimension: &str) -> String {
    format!("__grouping_{dimension}")
}

/// How a measure's aggregate re-aggregates (`None`: it does not, e.g. a distinct count).
fn additive(expr: &str) -> Option<Merge> {
    let c = call(expr).filter(|c| !c.distinct)?;
    // An average does not re-aggregate from averages.
    is_aggregate(&c.name).filter(|m| *m != Merge::Avg)
}

impl CubeDef {
    /// Checks the names and builds the definition.
    pub fn new(
        cube: &str,
        source: String,
        dimensions: Vec<(String, String)>,
        measures: Vec<(String, String)>,
        sets: Sets,
    ) -> Result<Self> {
        let mut seen = BTreeSet::new();
        for (n, _) in dimensions.iter().chain(&measures) {
            if !seen.insert(n.to_lowercase()) {
                return Err(Error::Config(format!("cube {cube}: the name {n} is used twice")));
            }
        }
        if dimensions.is_empty() || measures.is_empty() {
            return Err(Error::Config(format!(
                "cube {cube}: it needs at least one dimension and one measure"
            )));
        }
        if let Sets::Explicit(sets) = &sets {
            if let Some((d, _)) = dimensions
                .iter()
                .find(|(d, _)| !sets.iter().any(|s| s.contains(d)))
            {
                return Err(Error::Config(format!(
                    "cube {cube}: dimension {d} is in no grouping set; add it to one or leave it out"
                )));
            }
            for s in sets {
                for d in s {
                    if !dimensions.iter().any(|(n, _)| n == d) {
                        return Err(Error::Config(format!(
                            "cube {cube}: grouping set ({}) names {d}, which is not a dimension (dimensions: {})",
                            s.join(", "),
                            dimensions
                                .iter()
                                .map(|(n, _)| n.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )));
                    }
                }
            }
        }
        let measures = measures
            .into_iter()
            .map(|(n, e)| {
                let m = additive(&e);
                (n, e, m)
            })
            .collect();
        Ok(Self {
            source,
            dimensions,
            measures,
            sets,
            mergeable: false,
        })
    }

    /// Keeps every measure as a mergeable state (for incremental refresh); an error names a
    /// measure that has none.
    pub fn make_mergeable(&mut self, cube: &str) -> Result<()> {
        self.mergeable = true;
        for (n, e, _) in &self.measures {
            self.kept(e).map_err(|why| {
                Error::Config(format!(
                    "cube {cube}: measure {n} => {e} cannot be merged with new rows ({why}); incremental cubes take sum, count, min, max, avg and count(DISTINCT one column): drop the watermark option to refresh the cube in full"
                ))
            })?;
        }
        Ok(())
    }

    /// How the store keeps a measure; the error says why it cannot be merged.
    fn kept(&self, expr: &str) -> std::result::Result<Kept, String> {
        if !self.mergeable {
            return Ok(Kept::Plain(additive(expr)));
        }
        let c = call(expr).ok_or("not one plain aggregate call")?;
        match (is_aggregate(&c.name), c.distinct) {
            (Some(Merge::Count), true) => match c.args.as_slice() {
                [one] => Ok(Kept::Distinct(one.clone())),
                _ => Err("a distinct count of several columns".into()),
            },
            (_, true) => Err(format!("{}(DISTINCT ...)", c.name)),
            (Some(Merge::Avg), false) => Ok(Kept::Avg(c.args.join(", "))),
            (Some(m), false) => Ok(Kept::Plain(Some(m))),
            (None, false) => Err(format!("{} has no mergeable state", c.name)),
        }
    }

    /// Each measure with how it is kept (definitions are checked when made).
    fn kept_measures(&self) -> Vec<(&str, Kept)> {
        self.measures
            .iter()
            .map(|(n, e, m)| (n.as_str(), self.kept(e).unwrap_or(Kept::Plain(*m))))
            .collect()
    }

    /// The stored columns of measure `name`: `(column, aggregate over the source)`.
    fn stored(name: &str, expr: &str, kept: &Kept) -> Vec<(String, String)> {
        match kept {
            Kept::Plain(_) => vec![(name.to_string(), expr.to_string())],
            Kept::Avg(args) => vec![
                (hidden(name, "sum"), format!("sum({args})")),
                (hidden(name, "count"), format!("count({args})")),
            ],
            Kept::Distinct(arg) => vec![(
                hidden(name, "set"),
                format!("array_agg(DISTINCT {arg}) FILTER (WHERE {arg} IS NOT NULL)"),
            )],
        }
    }

    /// The public type of a measure kept as state (`None`: the stored column's own).
    fn state_type(kept: &Kept) -> Option<arrow::datatypes::DataType> {
        match kept {
            Kept::Plain(_) => None,
            Kept::Avg(_) => Some(arrow::datatypes::DataType::Float64),
            Kept::Distinct(_) => Some(arrow::datatypes::DataType::Int64),
        }
    }

    /// The SQL that merges new rows (`delta`, the cube's query over them) into the store:
    /// both aggregated again by dimensions and flags, in the store's column order.
    pub fn merge_query(&self, store: &str, delta: &str) -> String {
        let mut cols: Vec<String> = self.dimensions.iter().map(|(n, _)| quote(n)).collect();
        for (n, kept) in self.kept_measures() {
            match kept {
                Kept::Plain(Some(Merge::Min)) => cols.push(format!("min({q}) AS {q}", q = quote(n))),
                Kept::Plain(Some(Merge::Max)) => cols.push(format!("max({q}) AS {q}", q = quote(n))),
                Kept::Plain(_) => cols.push(format!("sum({q}) AS {q}", q = quote(n))),
                Kept::Avg(_) => {
                    for part in ["sum", "count"] {
                        cols.push(format!("sum({q}) AS {q}", q = quote(&hidden(n, part))));
                    }
                }
                Kept::Distinct(_) => cols.push(format!(
                    "{} AS {q}",
                    union_of_sets(&quote(&hidden(n, "set"))),
                    q = quote(&hidden(n, "set"))
                )),
            }
        }
        let mut keys: Vec<String> = self.dimensions.iter().map(|(n, _)| quote(n)).collect();
        for (n, _) in &self.dimensions {
            cols.push(quote(&flag(n)));
            keys.push(quote(&flag(n)));
        }
        format!(
            "SELECT {} FROM (SELECT * FROM {} UNION ALL SELECT * FROM {}) GROUP BY {}",
            cols.join(", "),
            quote(store),
            quote(delta),
            keys.join(", ")
        )
    }

    /// The grouping sets, as lists of dimension names.
    pub fn grouping_sets(&self) -> Vec<Vec<String>> {
        let names: Vec<String> = self.dimensions.iter().map(|(n, _)| n.clone()).collect();
        match &self.sets {
            Sets::Explicit(s) => s.clone(),
            Sets::Rollup => (0..=names.len()).rev().map(|k| names[..k].to_vec()).collect(),
            Sets::Cube => {
                let n = names.len();
                let mut out: Vec<Vec<String>> = (0..1u64 << n)
                    .map(|mask| {
                        names
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| mask & (1 << i) != 0)
                            .map(|(_, d)| d.clone())
                            .collect()
                    })
                    .collect();
                out.sort_by_key(|s| std::cmp::Reverse(s.len()));
                out
            }
        }
    }

    /// The query that materializes the cube: dimensions, measures and a flag per dimension.
    pub fn query(&self) -> String {
        let mut cols: Vec<String> = self
            .dimensions
            .iter()
            .map(|(n, e)| format!("{e} AS {}", quote(n)))
            .collect();
        for ((n, e, _), (_, kept)) in self.measures.iter().zip(self.kept_measures()) {
            for (col, agg) in Self::stored(n, e, &kept) {
                cols.push(format!("{agg} AS {}", quote(&col)));
            }
        }
        cols.extend(
            self.dimensions
                .iter()
                .map(|(n, e)| format!("grouping({e}) AS {}", quote(&flag(n)))),
        );
        let expr = |d: &str| {
            self.dimensions
                .iter()
                .find(|(n, _)| n == d)
                .map_or(d.to_string(), |(_, e)| e.clone())
        };
        let all: Vec<String> = self.dimensions.iter().map(|(_, e)| e.clone()).collect();
        let group = match &self.sets {
            Sets::Cube => format!("CUBE ({})", all.join(", ")),
            Sets::Rollup => format!("ROLLUP ({})", all.join(", ")),
            Sets::Explicit(sets) => format!(
                "GROUPING SETS ({})",
                sets.iter()
                    .map(|s| format!("({})", s.iter().map(|d| expr(d)).collect::<Vec<_>>().join(", ")))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        format!("SELECT {} FROM {} GROUP BY {group}", cols.join(", "), self.source)
    }

    /// The SQL that answers a scan of `columns` (public names, in the scan's order) from the
    /// store table: the exact grouping set of the dimensions among them, or the smallest set
    /// holding them re-aggregated.
    pub fn scan_query(&self, cube: &str, store: &str, columns: &[String]) -> Result<String> {
        let dims: BTreeSet<&str> = columns
            .iter()
            .filter(|c| self.dimensions.iter().any(|(n, _)| n == *c))
            .map(String::as_str)
            .collect();
        let sets = self.grouping_sets();
        let holds = |s: &Vec<String>| dims.iter().all(|d| s.iter().any(|x| x == d));
        let exact = sets.iter().find(|s| holds(s) && s.len() == dims.len());
        let chosen = match exact {
            Some(s) => s,
            None => sets
                .iter()
                .filter(|s| holds(s))
                .min_by_key(|s| s.len())
                .ok_or_else(|| {
                    Error::Config(format!(
                        "cube {cube}: no grouping set holds ({}); its sets are {}",
                        dims.iter().copied().collect::<Vec<_>>().join(", "),
                        sets.iter()
                            .map(|s| format!("({})", s.join(", ")))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?,
        };
        let flags: Vec<String> = self
            .dimensions
            .iter()
            .map(|(n, _)| format!("{} = {}", quote(&flag(n)), if chosen.contains(n) { 0 } else { 1 }))
            .collect();
        let filter = format!("{} WHERE {}", quote(store), flags.join(" AND "));
        let kept = self.kept_measures();
        let kept_of = |c: &str| kept.iter().find(|(n, _)| *n == c).map(|(_, k)| k.clone());
        if exact.is_some() {
            let cols: Vec<String> = columns
                .iter()
                .map(|c| match kept_of(c) {
                    Some(Kept::Avg(_)) => format!(
                        "CAST({} AS DOUBLE) / nullif({}, 0) AS {}",
                        quote(&hidden(c, "sum")),
                        quote(&hidden(c, "count")),
                        quote(c)
                    ),
                    Some(Kept::Distinct(_)) => format!(
                        "CAST(coalesce(cardinality({}), 0) AS BIGINT) AS {}",
                        quote(&hidden(c, "set")),
                        quote(c)
                    ),
                    _ => quote(c),
                })
                .collect();
            let list = if cols.is_empty() {
                "1 AS one".to_string()
            } else {
                cols.join(", ")
            };
            return Ok(format!("SELECT {list} FROM {filter}"));
        }
        let mut cols = Vec::new();
        for c in columns {
            if dims.contains(c.as_str()) {
                cols.push(quote(c));
                continue;
            }
            let q = quote(c);
            cols.push(match kept_of(c) {
                Some(Kept::Plain(Some(Merge::Sum | Merge::Count))) => format!("sum({q}) AS {q}"),
                Some(Kept::Plain(Some(Merge::Min))) => format!("min({q}) AS {q}"),
                Some(Kept::Plain(Some(Merge::Max))) => format!("max({q}) AS {q}"),
                Some(Kept::Avg(_)) => format!(
                    "CAST(sum({}) AS DOUBLE) / nullif(sum({}), 0) AS {q}",
                    quote(&hidden(c, "sum")),
                    quote(&hidden(c, "count"))
                ),
                Some(Kept::Distinct(_)) => format!(
                    "CAST(coalesce(cardinality({}), 0) AS BIGINT) AS {q}",
                    union_of_sets(&quote(&hidden(c, "set")))
                ),
                _ => {
                    return Err(Error::Config(format!(
                        "cube {cube}: no grouping set is exactly ({}), and measure {c} cannot be re-aggregated from the ({}) set; add ({0}) to the cube's GROUPING SETS",
                        dims.iter().copied().collect::<Vec<_>>().join(", "),
                        chosen.join(", ")
                    )));
                }
            });
        }
        let keys: Vec<String> = dims.iter().map(|d| quote(d)).collect();
        let group = if keys.is_empty() {
            String::new()
        } else {
            format!(" GROUP BY {}", keys.join(", "))
        };
        if cols.is_empty() {
            cols.push("1 AS one".into());
        }
        Ok(format!("SELECT {} FROM {filter}{group}", cols.join(", ")))
    }
}

/// The distinct values of a list column's lists, over a group.
fn union_of_sets(set: &str) -> String {
    format!("array_distinct(flatten(array_agg({set}) FILTER (WHERE {set} IS NOT NULL)))")
}

/// The table a cube is queried through.
#[derive(Debug)]
pub struct CubeTable {
    pub name: String,
    pub store: String,
    pub def: CubeDef,
    /// Dimensions and measures (the flags stay hidden).
    pub schema: SchemaRef,
}

impl CubeTable {
    /// The table over `store` (whose schema has the flag columns too).
    pub fn new(name: String, store: String, def: CubeDef, store_schema: &Schema) -> Self {
        let mut fields: Vec<arrow::datatypes::FieldRef> = def
            .dimensions
            .iter()
            .filter_map(|(n, _)| store_schema.field_with_name(n).ok())
            .map(|f| Arc::new(f.clone()))
            .collect();
        for (n, kept) in def.kept_measures() {
            match CubeDef::state_type(&kept) {
                Some(dt) => fields.push(Arc::new(arrow::datatypes::Field::new(n, dt, true))),
                None => {
                    if let Ok(f) = store_schema.field_with_name(n) {
                        fields.push(Arc::new(f.clone()));
                    }
                }
            }
        }
        Self {
            name,
            store,
            def,
            schema: Arc::new(Schema::new(fields)),
        }
    }
}

#[async_trait]
impl TableProvider for CubeTable {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let columns: Vec<String> = match projection {
            Some(p) => p.iter().map(|i| self.schema.field(*i).name().clone()).collect(),
            None => self.schema.fields().iter().map(|f| f.name().clone()).collect(),
        };
        let mut sql = self.def.scan_query(&self.name, &self.store, &columns)?;
        if let Some(l) = limit {
            sql.push_str(&format!(" LIMIT {l}"));
        }
        let Some(session) = state.as_any().downcast_ref::<SessionState>() else {
            return Err(Error::Config(format!("cube {}: not a flumen session", self.name)).into());
        };
        let plan = session.create_logical_plan(&sql).await?;
        // Exactly the columns and types the scan promises: a re-aggregated sum may have widened
        // its type, and an empty projection (count(*)) keeps one row per group but no column.
        let exprs: Vec<Expr> = columns
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let (q, f) = plan.schema().qualified_field(i);
                let want = self.schema.field_with_name(name).map(|f| f.data_type().clone());
                let c = Expr::Column(datafusion::common::Column::new(q.cloned(), f.name()));
                match want {
                    Ok(dt) if &dt != f.data_type() => datafusion::logical_expr::cast(c, dt).alias(name),
                    _ => c.alias(name),
                }
            })
            .collect();
        let plan = datafusion::logical_expr::LogicalPlanBuilder::from(plan)
            .project(exprs)?
            .build()?;
        session.create_physical_plan(&plan).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sales(sets: Sets) -> CubeDef {
        CubeDef::new(
            "sales",
            "orders".into(),
            vec![
                ("day".into(), "date_trunc('day', ts)".into()),
                ("city".into(), "city".into()),
            ],
            vec![
                ("revenue".into(), "sum(amount)".into()),
                ("buyers".into(), "count(DISTINCT user_id)".into()),
            ],
            sets,
        )
        .unwrap()
    }

    #[test]
    fn grouping_sets_and_the_query() {
        let c = sales(Sets::Cube);
        assert_eq!(c.grouping_sets().len(), 4);
        assert_eq!(c.grouping_sets()[0], ["day", "city"]);
        let r = sales(Sets::Rollup);
        assert_eq!(
            r.grouping_sets(),
            vec![vec!["day".to_string(), "city".into()], vec!["day".into()], vec![]]
        );
        let q = c.query();
        assert!(
            q.contains(r#"grouping(date_trunc('day', ts)) AS "__grouping_day""#),
            "{q}"
        );
        assert!(q.ends_with("GROUP BY CUBE (date_trunc('day', ts), city)"), "{q}");
    }

    #[test]
    fn scans_pick_the_set_that_fits() {
        let c = sales(Sets::Cube);
        let cols = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let q = c.scan_query("sales", "st", &cols(&["city", "buyers"])).unwrap();
        assert!(
            q.contains(r#""__grouping_day" = 1 AND "__grouping_city" = 0"#) && !q.contains("GROUP BY"),
            "{q}"
        );
        // ROLLUP (day, city) has no (city) set: revenue re-aggregates from (day, city), buyers cannot.
        let r = sales(Sets::Rollup);
        let q = r.scan_query("sales", "st", &cols(&["city", "revenue"])).unwrap();
        assert!(
            q.contains(r#"sum("revenue") AS "revenue""#) && q.contains(r#"GROUP BY "city""#),
            "{q}"
        );
        let e = r
            .scan_query("sales", "st", &cols(&["city", "buyers"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("measure buyers cannot be re-aggregated"), "{e}");
        let apart = sales(Sets::Explicit(vec![vec!["day".into()], vec!["city".into()]]));
        let e = apart
            .scan_query("sales", "st", &cols(&["day", "city"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no grouping set holds (city, day)"), "{e}");
    }

    #[test]
    fn mergeable_cubes_keep_states_and_merge_them() {
        let mut c = sales(Sets::Rollup);
        c.measures.push(("mean".into(), "avg(amount)".into(), None));
        c.make_mergeable("sales").unwrap();
        let q = c.query();
        assert!(
            q.contains(r#"array_agg(DISTINCT user_id) FILTER (WHERE user_id IS NOT NULL) AS "__buyers_set""#)
                && q.contains(r#"sum(amount) AS "__mean_sum", count(amount) AS "__mean_count""#),
            "{q}"
        );
        let m = c.merge_query("st", "delta");
        assert!(
            m.contains(r#"array_distinct(flatten(array_agg("__buyers_set") FILTER (WHERE "__buyers_set" IS NOT NULL))) AS "__buyers_set""#)
                && m.ends_with(r#"GROUP BY "day", "city", "__grouping_day", "__grouping_city""#),
            "{m}"
        );
        // (city) is no set of the rollup: the kept states re-aggregate exactly.
        let cols: Vec<String> = ["city", "buyers", "mean"].iter().map(|s| s.to_string()).collect();
        let q = c.scan_query("sales", "st", &cols).unwrap();
        assert!(
            q.contains(r#"CAST(sum("__mean_sum") AS DOUBLE) / nullif(sum("__mean_count"), 0) AS "mean""#),
            "{q}"
        );
        for (m, why) in [
            ("median(amount)", "median has no mergeable state"),
            ("sum(amount) / count(*)", "not one plain aggregate call"),
            ("count(DISTINCT user_id, city)", "several columns"),
            (
                "sum(amount) FILTER (WHERE amount > 0)",
                "not one plain aggregate call",
            ),
        ] {
            let mut c = sales(Sets::Cube);
            c.measures.push(("x".into(), m.into(), None));
            let e = c.make_mergeable("sales").unwrap_err().to_string();
            assert!(
                e.contains(&format!("measure x => {m} cannot be merged")) && e.contains(why),
                "{e}"
            );
        }
    }

    #[test]
    fn definitions_are_checked() {
        let e = CubeDef::new(
            "c",
            "o".into(),
            vec![("city".into(), "city".into())],
            vec![("city".into(), "count(*)".into())],
            Sets::Cube,
        )
        .unwrap_err();
        assert!(e.to_string().contains("the name city is used twice"));
        let e = CubeDef::new(
            "c",
            "o".into(),
            vec![("city".into(), "city".into())],
            vec![("n".into(), "count(*)".into())],
            Sets::Explicit(vec![vec!["town".into()]]),
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("dimension city is in no grouping set"),
            "{e}"
        );
    }
}
