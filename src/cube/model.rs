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

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{Expr, TableType};
use datafusion::physical_plan::ExecutionPlan;
use serde::{Deserialize, Serialize};

use super::mv::{Merge, is_aggregate, quote};
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
}

/// The flag column of a dimension: 1 in rows where the grouping set rolls it up.
pub fn flag(dimension: &str) -> String {
    format!("__grouping_{dimension}")
}

/// How a measure's aggregate re-aggregates (`None`: it does not, e.g. a distinct count).
fn additive(expr: &str) -> Option<Merge> {
    let e = expr.trim().to_ascii_lowercase();
    let (f, rest) = e.split_once('(')?;
    if rest.trim_start().starts_with("distinct") {
        return None;
    }
    // An average does not re-aggregate from averages.
    is_aggregate(f.trim()).filter(|m| *m != Merge::Avg)
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
        })
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
        cols.extend(
            self.measures
                .iter()
                .map(|(n, e, _)| format!("{e} AS {}", quote(n))),
        );
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
        if exact.is_some() {
            let cols: Vec<String> = columns.iter().map(|c| quote(c)).collect();
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
            let merge = self
                .measures
                .iter()
                .find(|(n, _, _)| n == c)
                .and_then(|(_, _, m)| *m);
            let q = quote(c);
            cols.push(match merge {
                Some(Merge::Sum | Merge::Count) => format!("sum({q}) AS {q}"),
                Some(Merge::Min) => format!("min({q}) AS {q}"),
                Some(Merge::Max) => format!("max({q}) AS {q}"),
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
        let fields: Vec<_> = store_schema
            .fields()
            .iter()
            .filter(|f| !f.name().starts_with("__grouping_"))
            .cloned()
            .collect();
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
