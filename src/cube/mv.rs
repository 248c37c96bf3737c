//! Materialized views kept as Parquet in the warehouse, refreshed atomically, in full or
//! incrementally past a watermark.
//!
//! Layout: `<warehouse>/<name>/view.json` (definition and state, replaced atomically) and one
//! directory of Parquet files per version, `<warehouse>/<name>/v<N>/`. A refresh writes
//! `v<N+1>.tmp/`, renames it to `v<N+1>/`, then points `view.json` at it: a reader, or a
//! refresh killed at any point, sees version N or N+1 whole, never a mix. The previous version
//! is kept for readers that listed its files before the switch; older ones are removed.
//!
//! Incremental refresh (`OPTIONS ('watermark' 'column')`, the column of one append-only source
//! table): the refresh reads the source's rows with `watermark < column <= new high` (the filter
//! goes into the source's scan, so Parquet statistics and SQL sources skip the rest), then
//! - a view without aggregates appends them (the new version links the old files);
//! - an aggregate view merges them: its store keeps each measure as a mergeable state (`sum`,
//!   `count`, `min`, `max` as themselves, `avg` as hidden `sum` and `count` columns) and the
//!   refresh re-aggregates old store ∪ new rows by the keys. The view's readers see the
//!   original columns (`avg` = sum / count). `count(DISTINCT ...)`, expressions over
//!   aggregates, HAVING, LIMIT and grouping sets cannot be merged and are refused with a message
//!   saying so; such views refresh in full.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray, UInt64Array};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue};
use datafusion::dataframe::{DataFrame, DataFrameWriteOptions};
use datafusion::logical_expr::{Expr, Filter, LogicalPlan, cast, lit};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArguments, GroupByExpr, SelectItem, SetExpr, Statement as SqlStatement,
};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::parser::Parser;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Options a materialized view takes.
pub const VIEW_OPTIONS: &[&str] = &["watermark"];

/// How an incremental aggregate view keeps and merges its measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Merge {
    Sum,
    Count,
    Min,
    Max,
    Avg,
}

/// One output column of an incremental aggregate view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputColumn {
    pub name: String,
    /// `None` for a grouping key.
    pub merge: Option<Merge>,
}

/// The parts of an aggregate view's query that incremental refresh needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shape {
    /// The output columns in the query's order.
    pub columns: Vec<OutputColumn>,
    /// The query with each `avg` split into hidden `sum` and `count` columns.
    pub state_query: String,
}

/// The watermark of an incremental view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watermark {
    /// The source table holding the column.
    pub table: String,
    pub column: String,
    /// The highest value loaded so far, as text (cast to the column's type when used).
    pub value: Option<String>,
}

/// Where a view stored with a connector (`STORED AS ... LOCATION ... OPTIONS (...)`) also
/// goes, as written (`${VAR}`s not substituted). The warehouse still keeps the view: it is what
/// readers in flumen see, what an incremental refresh merges into and what makes a refresh
/// atomic; after each refresh the whole view replaces the target's rows through the
/// connector's `'mode' 'overwrite'` (one transaction for the SQL databases).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub stored_as: String,
    pub location: String,
    pub options: Vec<(String, String)>,
}

impl Target {
    /// The `CREATE EXTERNAL TABLE` statement of the target, as table `table`, in overwrite mode.
    pub fn declaration(&self, table: &str) -> String {
        let s = |v: &str| format!("'{}'", v.replace('\'', "''"));
        let mut opts: Vec<String> = self
            .options
            .iter()
            .map(|(k, v)| format!("{} {}", s(k), s(v)))
            .collect();
        opts.push("'mode' 'overwrite'".into());
        format!(
            "CREATE EXTERNAL TABLE {} STORED AS {} LOCATION {} OPTIONS ({})",
            quote(table),
            self.stored_as,
            s(&self.location),
            opts.join(", ")
        )
    }

    /// `STORED AS X LOCATION '...'` (for messages; the caller redacts it).
    pub fn shown(&self) -> String {
        format!("STORED AS {} LOCATION '{}'", self.stored_as, self.location)
    }
}

/// A view's definition and state, as `view.json` keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewDef {
    pub name: String,
    /// The query as written, `${VAR}`s not substituted (no secret is stored).
    pub query: String,
    pub options: BTreeMap<String, String>,
    /// `CREATE EXTERNAL TABLE` statements (as written) of the tables the query reads, so a
    /// later run can refresh the view without declaring them again.
    pub sources: BTreeMap<String, String>,
    pub watermark: Option<Watermark>,
    /// Set for incremental aggregate views.
    pub shape: Option<Shape>,
    /// Set for cubes: queries on the name go through [`super::model::CubeTable`].
    #[serde(default)]
    pub cube: Option<super::model::CubeDef>,
    /// Set for views stored with a connector.
    #[serde(default)]
    pub target: Option<Target>,
    pub version: u64,
    pub rows: u64,
    pub refreshed_at: Option<String>,
}

/// What a refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshed {
    pub version: u64,
    /// Rows the view holds now.
    pub rows: u64,
    /// Rows an incremental refresh appended (0 for merges and full refreshes).
    pub appended: u64,
    pub incremental: bool,
    /// The watermark before and after (incremental views).
    pub watermark: Option<(Option<String>, Option<String>)>,
}

/// The directory of materialized views.
#[derive(Debug, Clone)]
pub struct Warehouse {
    dir: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// A double-quoted SQL identifier.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn hidden(name: &str, part: &str) -> String {
    format!("__{name}_{part}")
}

impl Warehouse {
    /// The warehouse in `dir` (created on the first view).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// Where the warehouse is.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn view_dir(&self, name: &str) -> PathBuf {
        self.dir.join(crate::sink::safe_name(name))
    }

    fn version_dir(&self, name: &str, version: u64) -> PathBuf {
        self.view_dir(name).join(format!("v{version:06}"))
    }

    /// The view's definition, if it exists.
    pub fn load(&self, name: &str) -> Result<Option<ViewDef>> {
        let path = self.view_dir(name).join("view.json");
        if !path.exists() {
            return Ok(None);
        }
        crate::sink::read_json(&path).map(Some)
    }

    /// Every view, by name.
    pub fn list(&self) -> Result<Vec<ViewDef>> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path().join("view.json");
            if path.exists() {
                out.push(crate::sink::read_json::<ViewDef>(&path)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Replaces `view.json` atomically (the switch to a new version).
    fn save(&self, def: &ViewDef) -> Result<()> {
        let dir = self.view_dir(&def.name);
        crate::sink::private_dir(&dir)?;
        let tmp = dir.join("view.json.tmp");
        let text = serde_json::to_vec_pretty(def)
            .map_err(|e| Error::Config(format!("encoding view {}: {e}", def.name)))?;
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
        f.write_all(&text)
            .map_err(io(format!("writing {}", tmp.display())))?;
        f.sync_all().map_err(io(format!("syncing {}", tmp.display())))?;
        std::fs::rename(&tmp, dir.join("view.json"))
            .map_err(io(format!("replacing {}/view.json", dir.display())))
    }

    /// The table name the view's stored rows are registered under.
    fn store_name(def: &ViewDef) -> String {
        if def.cube.is_some() {
            format!("__cube_store_{}", def.name)
        } else if def.shape.is_some() {
            format!("__mv_store_{}", def.name)
        } else {
            def.name.clone()
        }
    }

    /// Registers the view's current version in `ctx` (replacing an older registration).
    pub async fn register(&self, ctx: &SessionContext, def: &ViewDef) -> Result<()> {
        let dir = self.version_dir(&def.name, def.version);
        let store = Self::store_name(def);
        ctx.deregister_table(store.as_str())?;
        ctx.register_parquet(
            quote(&store),
            &format!("{}/", dir.display()),
            ParquetReadOptions::default(),
        )
        .await?;
        if let Some(cube) = &def.cube {
            ctx.deregister_table(def.name.as_str())?;
            let stored = ctx.table_provider(quote(&store)).await?.schema();
            let table = super::model::CubeTable::new(def.name.clone(), store.clone(), cube.clone(), &stored);
            ctx.register_table(quote(&def.name), Arc::new(table))?;
        } else if let Some(shape) = &def.shape {
            ctx.deregister_table(def.name.as_str())?;
            let public = ctx.sql(&public_query(shape, &store)).await?;
            ctx.register_table(quote(&def.name), public.into_view())?;
        }
        Ok(())
    }

    /// Registers every view of the warehouse.
    pub async fn register_all(&self, ctx: &SessionContext) -> Result<()> {
        for def in self.list()? {
            self.register(ctx, &def).await?;
        }
        Ok(())
    }

    /// Computes a new version of the view (`query` is its query with variables substituted)
    /// and switches to it; in full, or incrementally when asked and possible.
    pub async fn refresh(
        &self,
        ctx: &SessionContext,
        def: &mut ViewDef,
        query: &str,
        incremental: bool,
    ) -> Result<Refreshed> {
        let name = def.name.clone();
        if incremental && def.watermark.is_none() {
            return Err(Error::Config(if def.cube.is_some() {
                format!(
                    "cube {name} has no watermark: REFRESH CUBE ... INCREMENTAL needs OPTIONS ('watermark' 'column') at the end of CREATE CUBE; REFRESH CUBE {name} refreshes it in full"
                )
            } else {
                format!(
                    "materialized view {name} has no watermark: REFRESH ... INCREMENTAL needs OPTIONS ('watermark' 'column') when the view is created"
                )
            }));
        }
        let incremental = incremental && def.version > 0;
        let state_query = def
            .shape
            .as_ref()
            .map_or(query.to_string(), |s| s.state_query.clone());
        // The new high mark first: rows arriving during the refresh wait for the next one.
        let (low, high) = match &def.watermark {
            Some(w) => {
                let low = if incremental { w.value.clone() } else { None };
                (low.clone(), high_mark(ctx, w, low.as_deref()).await?)
            }
            None => (None, None),
        };
        if incremental && high.is_none() {
            // Nothing past the watermark.
            return Ok(Refreshed {
                version: def.version,
                rows: def.rows,
                appended: 0,
                incremental: true,
                watermark: Some((low.clone(), low)),
            });
        }
        let plan = ctx.state().create_logical_plan(&state_query).await?;
        let plan = match &def.watermark {
            Some(w) => bound_source(plan, w, low.as_deref(), high.as_deref())?,
            None => plan,
        };
        let computed = DataFrame::new(ctx.state(), plan);
        let version = def.version + 1;
        let tmp = self.view_dir(&name).join(format!("v{version:06}.tmp"));
        if tmp.exists() {
            // Left by a refresh that was killed.
            std::fs::remove_dir_all(&tmp).map_err(io(format!("removing {}", tmp.display())))?;
        }
        crate::sink::private_dir(&tmp)?;
        let delta = format!("__mv_delta_{name}");
        let merge = match (&def.cube, &def.shape) {
            (Some(cube), _) => Some(cube.merge_query(&Self::store_name(def), &delta)),
            (None, Some(shape)) => Some(merge_query(shape, &Self::store_name(def), &delta)),
            (None, None) => None,
        };
        let (appended, rows) = match (incremental, merge) {
            (true, Some(merge)) => {
                ctx.register_table(quote(&delta), computed.into_view())?;
                let merged = ctx.sql(&merge).await;
                let written = match merged {
                    Ok(df) => write(df, &tmp).await,
                    Err(e) => Err(e.into()),
                };
                ctx.deregister_table(delta.as_str())?;
                (0, written?)
            }
            (true, None) => {
                let added = write(computed, &tmp).await?;
                link_files(&self.version_dir(&name, def.version), &tmp)?;
                (added, def.rows + added)
            }
            (false, _) => (0, write(computed, &tmp).await?),
        };
        let dest = self.version_dir(&name, version);
        std::fs::rename(&tmp, &dest).map_err(io(format!(
            "renaming {} to {}",
            tmp.display(),
            dest.display()
        )))?;
        let mut next = def.clone();
        next.version = version;
        next.rows = rows;
        next.refreshed_at = Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
        if let (Some(w), Some(h)) = (next.watermark.as_mut(), &high) {
            w.value = Some(h.clone());
        }
        self.save(&next)?;
        *def = next;
        self.register(ctx, def).await?;
        // Keep the previous version for readers that listed its files; drop the older ones.
        for old in 1..version.saturating_sub(1) {
            let d = self.version_dir(&name, old);
            if d.exists() {
                std::fs::remove_dir_all(&d).map_err(io(format!("removing {}", d.display())))?;
            }
        }
        Ok(Refreshed {
            version,
            rows,
            appended,
            incremental,
            watermark: def.watermark.as_ref().map(|_| (low, high)),
        })
    }

    /// Removes a view and its data; false if there was none.
    pub fn drop_view(&self, ctx: &SessionContext, name: &str) -> Result<bool> {
        let Some(def) = self.load(name)? else {
            return Ok(false);
        };
        ctx.deregister_table(name)?;
        ctx.deregister_table(Self::store_name(&def).as_str())?;
        let dir = self.view_dir(name);
        // The definition goes first: a crash after it leaves only unreferenced files.
        std::fs::remove_file(dir.join("view.json"))
            .map_err(io(format!("removing {}/view.json", dir.display())))?;
        std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
        Ok(true)
    }

    /// `SHOW MATERIALIZED VIEWS`: one row per view.
    pub fn show(&self) -> Result<RecordBatch> {
        let defs = self.list()?;
        let text = |f: &dyn Fn(&ViewDef) -> Option<String>| -> ArrayRef {
            Arc::new(defs.iter().map(f).collect::<StringArray>())
        };
        let schema = Schema::new(vec![
            Field::new("name", DataType::Utf8, false),
            Field::new("rows", DataType::UInt64, false),
            Field::new("version", DataType::UInt64, false),
            Field::new("refreshed_at", DataType::Utf8, true),
            Field::new("watermark", DataType::Utf8, true),
            Field::new("watermark_value", DataType::Utf8, true),
            Field::new("incremental", DataType::Utf8, false),
            Field::new("location", DataType::Utf8, false),
            Field::new("query", DataType::Utf8, false),
        ]);
        let columns: Vec<ArrayRef> = vec![
            text(&|d| Some(d.name.clone())),
            Arc::new(defs.iter().map(|d| d.rows).collect::<UInt64Array>()),
            Arc::new(defs.iter().map(|d| d.version).collect::<UInt64Array>()),
            text(&|d| d.refreshed_at.clone()),
            text(&|d| d.watermark.as_ref().map(|w| format!("{}.{}", w.table, w.column))),
            text(&|d| d.watermark.as_ref().and_then(|w| w.value.clone())),
            text(&|d| {
                Some(
                    match (&d.watermark, &d.shape) {
                        (None, _) => "no",
                        (Some(_), _) if d.cube.is_some() => "merge",
                        (Some(_), Some(_)) => "merge",
                        (Some(_), None) => "append",
                    }
                    .to_string(),
                )
            }),
            text(&|d| Some(self.version_dir(&d.name, d.version).display().to_string())),
            text(&|d| Some(d.query.split_whitespace().collect::<Vec<_>>().join(" "))),
        ];
        Ok(RecordBatch::try_new(Arc::new(schema), columns)?)
    }
}

/// Writes `df` as Parquet files into `dir` (at least one, so an empty view keeps its schema);
/// returns the rows written.
async fn write(df: DataFrame, dir: &Path) -> Result<u64> {
    let schema = Arc::new(df.schema().as_arrow().clone());
    let counts = df
        .write_parquet(&format!("{}/", dir.display()), DataFrameWriteOptions::new(), None)
        .await?;
    let rows: u64 = counts
        .iter()
        .filter_map(|b| b.column(0).as_any().downcast_ref::<UInt64Array>())
        .flat_map(|a| a.iter().flatten())
        .sum();
    let has_file = std::fs::read_dir(dir)
        .map_err(io(format!("listing {}", dir.display())))?
        .flatten()
        .any(|e| e.file_name().to_string_lossy().ends_with(".parquet"));
    if !has_file {
        crate::sink::write_parquet(&dir.join("empty.parquet"), &RecordBatch::new_empty(schema))?;
    }
    Ok(rows)
}

/// Hard-links the files of version directory `from` into `to` (an append keeps the old rows
/// without copying them).
fn link_files(from: &Path, to: &Path) -> Result<()> {
    for e in std::fs::read_dir(from).map_err(io(format!("listing {}", from.display())))? {
        let e = e.map_err(io(format!("listing {}", from.display())))?;
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".parquet") && !name.to_string_lossy().starts_with("empty") {
            let target = to.join(format!("v{}", name.to_string_lossy()));
            std::fs::hard_link(e.path(), &target)
                .or_else(|_| std::fs::copy(e.path(), &target).map(|_| ()))
                .map_err(io(format!(
                    "linking {} into {}",
                    e.path().display(),
                    to.display()
                )))?;
        }
    }
    Ok(())
}

/// The highest value of the watermark column past `low` (`None`: no row past it).
async fn high_mark(ctx: &SessionContext, w: &Watermark, low: Option<&str>) -> Result<Option<String>> {
    let plan = ctx
        .state()
        .create_logical_plan(&format!(
            "SELECT max({c}) FROM {t}",
            c = quote(&w.column),
            t = quote(&w.table)
        ))
        .await?;
    let plan = bound_source(plan, w, low, None)?;
    let batches = DataFrame::new(ctx.state(), plan).collect().await?;
    let Some(b) = batches.first().filter(|b| b.num_rows() > 0) else {
        return Ok(None);
    };
    let v = ScalarValue::try_from_array(b.column(0), 0)?;
    if v.is_null() {
        return Ok(None);
    }
    Ok(Some(arrow::util::display::array_value_to_string(b.column(0), 0)?))
}

/// Puts `low < column <= high` on every scan of the watermark's table in `plan`.
fn bound_source(
    plan: LogicalPlan,
    w: &Watermark,
    low: Option<&str>,
    high: Option<&str>,
) -> Result<LogicalPlan> {
    if low.is_none() && high.is_none() {
        return Ok(plan);
    }
    let mut found = false;
    let out = plan
        .transform_up(|p| {
            let LogicalPlan::TableScan(scan) = &p else {
                return Ok(Transformed::no(p));
            };
            if !scan.table_name.table().eq_ignore_ascii_case(&w.table) {
                return Ok(Transformed::no(p));
            }
            let schema = scan.source.schema();
            let Ok(field) = schema.field_with_name(&w.column) else {
                return Ok(Transformed::no(p));
            };
            found = true;
            let c = Expr::Column(Column::new(Some(scan.table_name.clone()), &w.column));
            let dt = field.data_type().clone();
            let bound = |v: &str| cast(lit(v.to_string()), dt.clone());
            let mut pred: Option<Expr> = None;
            if let Some(l) = low {
                pred = Some(c.clone().gt(bound(l)));
            }
            if let Some(h) = high {
                let e = c.lt_eq(bound(h));
                pred = Some(match pred {
                    Some(p) => p.and(e),
                    None => e,
                });
            }
            match pred {
                Some(pred) => Ok(Transformed::yes(LogicalPlan::Filter(Filter::try_new(
                    pred,
                    Arc::new(p),
                )?))),
                None => Ok(Transformed::no(p)),
            }
        })?
        .data;
    if !found {
        return Err(Error::Config(format!(
            "the view's query does not read column {} of table {} (its watermark)",
            w.column, w.table
        )));
    }
    Ok(out)
}

/// The view's public columns over its store: measures as written, `avg` from its state.
fn public_query(shape: &Shape, store: &str) -> String {
    let cols: Vec<String> = shape
        .columns
        .iter()
        .map(|c| match c.merge {
            Some(Merge::Avg) => format!(
                "CAST({s} AS DOUBLE) / {n} AS {name}",
                s = quote(&hidden(&c.name, "sum")),
                n = quote(&hidden(&c.name, "count")),
                name = quote(&c.name)
            ),
            _ => quote(&c.name),
        })
        .collect();
    format!("SELECT {} FROM {}", cols.join(", "), quote(store))
}

/// Old store ∪ new rows, aggregated again by the keys.
fn merge_query(shape: &Shape, store: &str, delta: &str) -> String {
    let mut cols = Vec::new();
    let mut keys = Vec::new();
    for c in &shape.columns {
        let q = quote(&c.name);
        match c.merge {
            None => {
                cols.push(q.clone());
                keys.push(q);
            }
            Some(Merge::Sum | Merge::Count) => cols.push(format!("sum({q}) AS {q}")),
            Some(Merge::Min) => cols.push(format!("min({q}) AS {q}")),
            Some(Merge::Max) => cols.push(format!("max({q}) AS {q}")),
            Some(Merge::Avg) => {
                for part in ["sum", "count"] {
                    let h = quote(&hidden(&c.name, part));
                    cols.push(format!("sum({h}) AS {h}"));
                }
            }
        }
    }
    let group = if keys.is_empty() {
        String::new()
    } else {
        format!(" GROUP BY {}", keys.join(", "))
    };
    format!(
        "SELECT {} FROM (SELECT * FROM {} UNION ALL SELECT * FROM {}){group}",
        cols.join(", "),
        quote(store),
        quote(delta)
    )
}

/// How the aggregate function `name` merges, if it does.
pub(crate) fn is_aggregate(name: &str) -> Option<Merge> {
    match name.to_ascii_lowercase().as_str() {
        "sum" => Some(Merge::Sum),
        "count" => Some(Merge::Count),
        "min" => Some(Merge::Min),
        "max" => Some(Merge::Max),
        "avg" | "mean" => Some(Merge::Avg),
        _ => None,
    }
}

/// Aggregate functions a key expression must not call.
const AGGREGATES: &[&str] = &[
    "sum",
    "count",
    "min",
    "max",
    "avg",
    "mean",
    "median",
    "stddev",
    "variance",
    "array_agg",
    "string_agg",
    "approx_distinct",
    "first_value",
    "last_value",
    "bool_and",
    "bool_or",
];

/// True when `e` calls an aggregate function anywhere.
fn has_aggregate(e: &SqlExpr) -> bool {
    use datafusion::sql::sqlparser::ast::visit_expressions;
    use std::ops::ControlFlow;
    visit_expressions(e, |x| match x {
        SqlExpr::Function(f) if AGGREGATES.contains(&f.name.to_string().to_ascii_lowercase().as_str()) => {
            ControlFlow::Break(())
        }
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

/// How an incremental view refreshes: `Ok(None)` appends rows (no aggregates); `Ok(Some)`
/// merges aggregates; an error says why the query cannot be refreshed incrementally.
pub fn shape(view: &str, query: &str) -> Result<Option<Shape>> {
    let refuse = |why: String| {
        Error::Config(format!(
            "materialized view {view}: incremental refresh (OPTIONS 'watermark') is not possible: {why}; drop the watermark option to refresh in full"
        ))
    };
    let mut parsed = Parser::parse_sql(&GenericDialect {}, query)
        .map_err(|e| Error::Config(format!("materialized view {view}: {e}")))?;
    let Some(SqlStatement::Query(q)) = parsed.first_mut() else {
        return Err(Error::Config(format!(
            "materialized view {view}: AS must be followed by a query"
        )));
    };
    if q.limit_clause.is_some() || q.fetch.is_some() {
        return Err(refuse("the query has a LIMIT".into()));
    }
    let SetExpr::Select(select) = q.body.as_mut() else {
        return Err(refuse(
            "the query is not a single SELECT (UNION, VALUES ...)".into(),
        ));
    };
    if select.distinct.is_some() {
        return Err(refuse("SELECT DISTINCT cannot be merged".into()));
    }
    if select.having.is_some() {
        return Err(refuse(
            "HAVING filters aggregates, which cannot be merged afterwards".into(),
        ));
    }
    let grouped = match &select.group_by {
        GroupByExpr::All(_) => return Err(refuse("GROUP BY ALL: name the keys".into())),
        GroupByExpr::Expressions(exprs, modifiers) => {
            let sets = !modifiers.is_empty()
                || exprs.iter().any(|e| {
                    matches!(
                        e,
                        SqlExpr::Rollup(_) | SqlExpr::Cube(_) | SqlExpr::GroupingSets(_)
                    )
                });
            if sets {
                return Err(refuse(
                    "ROLLUP, CUBE and GROUPING SETS views refresh in full".into(),
                ));
            }
            !exprs.is_empty()
        }
    };
    let aggregated = grouped
        || select.projection.iter().any(|i| match i {
            SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => has_aggregate(e),
            _ => false,
        });
    if !aggregated {
        return Ok(None);
    }
    let mut columns = Vec::new();
    let mut items = Vec::new();
    for (i, item) in select.projection.iter().enumerate() {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias.value.clone())),
            other => {
                return Err(refuse(format!(
                    "column {} ({other}) must be a named expression",
                    i + 1
                )));
            }
        };
        let plain_name = match expr {
            SqlExpr::Identifier(id) => Some(id.value.clone()),
            SqlExpr::CompoundIdentifier(ids) => ids.last().map(|id| id.value.clone()),
            _ => None,
        };
        if !has_aggregate(expr) {
            let name = alias
                .or(plain_name)
                .ok_or_else(|| refuse(format!("give the key {expr} a name with AS")))?;
            items.push(format!("{expr} AS {}", quote(&name)));
            columns.push(OutputColumn { name, merge: None });
            continue;
        }
        let SqlExpr::Function(f) = expr else {
            return Err(refuse(format!(
                "{expr} combines aggregates; only plain sum/count/min/max/avg(...) merge"
            )));
        };
        let merge = is_aggregate(&f.name.to_string())
            .ok_or_else(|| refuse(format!("{expr}: only sum, count, min, max and avg merge")))?;
        if let FunctionArguments::List(args) = &f.args
            && args.duplicate_treatment.is_some()
        {
            return Err(refuse(format!(
                "{expr}: a distinct count cannot be merged from partial counts"
            )));
        }
        if f.filter.is_some() || f.over.is_some() {
            return Err(refuse(format!("{expr}: FILTER and OVER cannot be merged")));
        }
        let name = alias.ok_or_else(|| refuse(format!("give the measure {expr} a name with AS")))?;
        if merge == Merge::Avg {
            let args = match &f.args {
                FunctionArguments::List(l) => l
                    .args
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                other => other.to_string(),
            };
            items.push(format!("sum({args}) AS {}", quote(&hidden(&name, "sum"))));
            items.push(format!("count({args}) AS {}", quote(&hidden(&name, "count"))));
        } else {
            items.push(format!("{expr} AS {}", quote(&name)));
        }
        columns.push(OutputColumn {
            name,
            merge: Some(merge),
        });
    }
    // The new select list, parsed, replaces the old one; the rest of the query is unchanged.
    let mut list = Parser::parse_sql(&GenericDialect {}, &format!("SELECT {} FROM t", items.join(", ")))
        .map_err(|e| Error::Config(format!("materialized view {view}: {e}")))?;
    if let Some(SqlStatement::Query(lq)) = list.first_mut()
        && let SetExpr::Select(ls) = lq.body.as_mut()
    {
        select.projection = std::mem::take(&mut ls.projection);
    }
    Ok(Some(Shape {
        columns,
        state_query: q.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_views_keep_mergeable_state() {
        let s = shape(
            "v",
            "SELECT city, date_trunc('day', ts) AS day, sum(amount) AS revenue, count(*) AS n, avg(price) AS p, max(ts) AS last FROM orders WHERE amount > 0 GROUP BY city, date_trunc('day', ts)",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            s.columns
                .iter()
                .map(|c| (c.name.as_str(), c.merge))
                .collect::<Vec<_>>(),
            [
                ("city", None),
                ("day", None),
                ("revenue", Some(Merge::Sum)),
                ("n", Some(Merge::Count)),
                ("p", Some(Merge::Avg)),
                ("last", Some(Merge::Max))
            ]
        );
        assert!(
            s.state_query
                .contains(r#"sum(price) AS "__p_sum", count(price) AS "__p_count""#),
            "{}",
            s.state_query
        );
        assert!(
            s.state_query.contains("WHERE amount > 0 GROUP BY city"),
            "{}",
            s.state_query
        );
        let m = merge_query(&s, "store", "delta");
        assert!(
            m.contains(r#"sum("n") AS "n""#) && m.contains(r#"GROUP BY "city", "day""#),
            "{m}"
        );
        let p = public_query(&s, "store");
        assert!(
            p.contains(r#"CAST("__p_sum" AS DOUBLE) / "__p_count" AS "p""#),
            "{p}"
        );
    }

    #[test]
    fn plain_views_append_and_the_rest_is_refused() {
        assert_eq!(
            shape("v", "SELECT id, ts FROM events WHERE kind = 'a'").unwrap(),
            None
        );
        for (q, why) in [
            (
                "SELECT city, count(DISTINCT user_id) AS u FROM o GROUP BY city",
                "distinct count",
            ),
            (
                "SELECT city, sum(a) / count(*) AS r FROM o GROUP BY city",
                "combines aggregates",
            ),
            ("SELECT city, sum(a) AS s FROM o GROUP BY ROLLUP (city)", "ROLLUP"),
            (
                "SELECT city, sum(a) AS s FROM o GROUP BY city HAVING sum(a) > 1",
                "HAVING",
            ),
            (
                "SELECT city, median(a) AS m FROM o GROUP BY city",
                "only sum, count",
            ),
            ("SELECT city, sum(a) FROM o GROUP BY city", "name with AS"),
            ("SELECT id FROM o LIMIT 5", "LIMIT"),
        ] {
            let e = shape("v", q).unwrap_err().to_string();
            assert!(e.contains(why) && e.contains("materialized view v"), "{q}: {e}");
        }
    }
}
