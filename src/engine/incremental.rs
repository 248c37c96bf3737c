//! Incremental loads: a source table declared with `OPTIONS ('incremental_column' 'updated_at')`
//! is read, by each write (`INSERT INTO` a sink, `COPY`), only past the highest value of that
//! column the same target has loaded from it before.
//!
//! - The bound `column > last` (minus `'lookback'`) is a filter on the source's scan, so the
//!   connectors push it into their query (SQL `WHERE`, ClickHouse, Elasticsearch and MongoDB
//!   queries, Parquet statistics); nothing is read in full and filtered afterwards where the
//!   source can filter.
//! - Above it, a pass-through filter notes the highest value and the count of the rows that
//!   went by. The new watermark is that highest value, saved in `<state-dir>/watermarks.json`
//!   (per target and source) only after the sink has committed: a failed write leaves it
//!   where it was, and the rerun reads the same rows again.
//! - `'lookback' '1h'` (a time column) or `'lookback' '1000'` (a number) re-reads that much
//!   before the watermark, for rows that arrive late; make the target an upsert so the re-read
//!   rows replace themselves instead of adding up.
//! - `flumen run --full-refresh` reads everything (and then moves the watermark to the top).
//!
//! The column must only grow for the rows that matter (an `updated_at` every update sets, an
//! auto-increment id): a row written later with a value at or below the watermark (and the
//! lookback) is not seen.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, BooleanArray};
use arrow::datatypes::DataType;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, ScalarValue};
use datafusion::functions_aggregate::min_max::MaxAccumulator;
use datafusion::logical_expr::Accumulator;
use datafusion::logical_expr::{
    ColumnarValue, Expr, Filter, LogicalPlan, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility, cast, lit,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The source-table options this module takes (removed before the connector sees them).
pub const OPTIONS: [&str; 2] = ["incremental_column", "lookback"];

/// How a source table is read incrementally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub column: String,
    /// As written: a duration for time columns, a number for numeric ones.
    pub lookback: Option<String>,
}

/// A saved watermark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    pub target: String,
    pub source: String,
    pub column: String,
    /// The highest value loaded, as text (cast to the column's type when used).
    pub value: String,
    pub run_id: String,
    pub updated_at: String,
}

/// The watermarks of a state directory.
#[derive(Debug, Clone)]
pub struct Watermarks {
    path: PathBuf,
}

impl Watermarks {
    pub fn new(state_dir: &std::path::Path) -> Self {
        Self {
            path: state_dir.join("watermarks.json"),
        }
    }

    /// Every saved watermark, by key (`target <- source`).
    pub fn load(&self) -> Result<BTreeMap<String, Mark>> {
        if !self.path.exists() {
            return Ok(BTreeMap::new());
        }
        crate::sink::read_json(&self.path)
    }

    /// Replaces the file atomically.
    fn save(&self, marks: &BTreeMap<String, Mark>) -> Result<()> {
        if let Some(dir) = self.path.parent() {
            crate::sink::private_dir(dir)?;
        }
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(marks)
            .map_err(|e| Error::Config(format!("encoding watermarks: {e}")))?;
        std::fs::write(&tmp, text).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
        std::fs::rename(&tmp, &self.path)
            .map_err(|e| Error::io(format!("replacing {}", self.path.display()), e))
    }
}

/// The key of a watermark.
pub fn key(target: &str, source: &str) -> String {
    format!("{target} <- {source}")
}

/// What the pass-through filter saw.
#[derive(Debug, Default)]
struct Seen {
    max: Option<ScalarValue>,
    rows: u64,
}

/// One incremental source of a write being run.
#[derive(Debug)]
pub struct Bound {
    pub target: String,
    pub source: String,
    pub column: String,
    /// The watermark the read started past (`None`: everything was read).
    pub from: Option<String>,
    seen: Arc<Mutex<Seen>>,
}

impl Bound {
    /// Rows of the source that went by.
    pub fn rows(&self) -> u64 {
        self.seen.lock().map(|s| s.rows).unwrap_or(0)
    }

    /// The highest value that went by, as text.
    fn high(&self) -> Result<Option<String>> {
        let max = self.seen.lock().ok().and_then(|s| s.max.clone());
        match max {
            Some(v) if !v.is_null() => {
                let a = v.to_array()?;
                Ok(Some(arrow::util::display::array_value_to_string(&a, 0)?))
            }
            _ => Ok(None),
        }
    }
}

/// The pass-through filter: `flumen_watermark_N(column[, low])` is true, and notes the highest
/// `column` and the count of the rows with `column > low`. It takes the bound, not the
/// condition, so that the condition stays a plain `column > literal` the source can run.
#[derive(Debug)]
struct Observe {
    name: String,
    signature: Signature,
    seen: Arc<Mutex<Seen>>,
}

impl PartialEq for Observe {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}
impl Eq for Observe {}
impl std::hash::Hash for Observe {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state)
    }
}

impl ScalarUDFImpl for Observe {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::error::Result<ColumnarValue> {
        let n = args.number_rows;
        let mut it = args.args.into_iter();
        let Some(values) = it.next() else {
            return Err(datafusion::error::DataFusionError::Internal(format!(
                "{} takes the column (and its lower bound)",
                self.name
            )));
        };
        let values: ArrayRef = values.into_array(n)?;
        // Rows past the lower bound (all when there is none); a NULL column value is not.
        let mask = match it.next() {
            Some(low) => {
                let low = low.into_array(n)?;
                arrow::compute::kernels::cmp::gt(&values, &low)?
            }
            None => BooleanArray::from(vec![true; n]),
        };
        let mask = if mask.null_count() > 0 {
            arrow::compute::prep_null_mask_filter(&mask)
        } else {
            mask
        };
        let passed = arrow::compute::filter(&values, &mask)?;
        let mut acc = MaxAccumulator::try_new(passed.data_type())?;
        acc.update_batch(&[Arc::clone(&passed)])?;
        let max = acc.evaluate()?;
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| datafusion::error::DataFusionError::Internal("watermark lock".into()))?;
        seen.rows += passed.len() as u64;
        if !max.is_null() {
            let higher = match &seen.max {
                Some(m) => max.partial_cmp(m) == Some(std::cmp::Ordering::Greater),
                None => true,
            };
            if higher {
                seen.max = Some(max);
            }
        }
        // The rows are filtered below (pushed into the source where it can): pass them all.
        Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(true))))
    }
}

/// The lower bound of the read: the watermark cast to the column's type, less the lookback.
fn lower_bound(spec: &Spec, source: &str, dt: &DataType, from: &str) -> Result<Expr> {
    let low = cast(lit(from.to_string()), dt.clone());
    let Some(back) = &spec.lookback else {
        return Ok(low);
    };
    let bad = |why: &str| Error::Option(format!("table {source}: option 'lookback' '{back}': {why}"));
    match dt {
        DataType::Timestamp(..) | DataType::Date32 | DataType::Date64 => {
            let d = crate::sink::parse_duration(back).map_err(|e| bad(&e))?;
            let nanos = i64::try_from(d.as_nanos()).map_err(|_| bad("too long"))?;
            Ok(low - lit(ScalarValue::new_interval_mdn(0, 0, nanos)))
        }
        t if t.is_integer() || t.is_floating() || matches!(t, DataType::Decimal128(..)) => {
            let n: i64 = back
                .parse()
                .map_err(|_| bad("a numeric column takes a whole number (1000)"))?;
            Ok(cast(low - lit(n), dt.clone()))
        }
        other => Err(bad(&format!(
            "a lookback needs a time or numeric column, and {} is {other}",
            spec.column
        ))),
    }
}

static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bounds every scan of an incremental table in `plan`, a write to `target`: returns the new
/// plan and what to save once the write has committed. `full` ignores saved watermarks.
pub fn bound(
    plan: LogicalPlan,
    specs: &HashMap<String, Spec>,
    marks: &BTreeMap<String, Mark>,
    target: &str,
    full: bool,
) -> Result<(LogicalPlan, Vec<Bound>)> {
    if specs.is_empty() {
        return Ok((plan, Vec::new()));
    }
    let mut bounds = Vec::new();
    let mut failed: Option<Error> = None;
    let out = plan
        .transform_up(|p| {
            let LogicalPlan::TableScan(scan) = &p else {
                return Ok(Transformed::no(p));
            };
            let source = scan.table_name.table().to_string();
            let Some(spec) = specs.get(&source.to_lowercase()) else {
                return Ok(Transformed::no(p));
            };
            let schema = scan.source.schema();
            let Ok(field) = schema.field_with_name(&spec.column) else {
                failed = Some(Error::Option(format!(
                    "table {source}: option 'incremental_column': no column '{}' (columns: {})",
                    spec.column,
                    crate::connector::options::column_names(&schema)
                )));
                return Ok(Transformed::no(p));
            };
            // A lookback that cannot apply is an error on the first run too.
            if spec.lookback.is_some()
                && let Err(e) = lower_bound(spec, &source, field.data_type(), "0")
            {
                failed = Some(e);
                return Ok(Transformed::no(p));
            }
            let from = if full {
                None
            } else {
                marks
                    .get(&key(target, &source))
                    .filter(|m| m.column == spec.column)
                    .map(|m| m.value.clone())
            };
            let c = Expr::Column(Column::new(Some(scan.table_name.clone()), &spec.column));
            let low = match &from {
                Some(v) => match lower_bound(spec, &source, field.data_type(), v) {
                    Ok(low) => Some(low),
                    Err(e) => {
                        failed = Some(e);
                        return Ok(Transformed::no(p));
                    }
                },
                None => None,
            };
            let seen = Arc::new(Mutex::new(Seen::default()));
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let observe = ScalarUDF::new_from_impl(Observe {
                name: format!("flumen_watermark_{n}"),
                signature: Signature::variadic_any(Volatility::Volatile),
                seen: Arc::clone(&seen),
            });
            bounds.push(Bound {
                target: target.to_string(),
                source: source.clone(),
                column: spec.column.clone(),
                from,
                seen,
            });
            let mut node = p;
            let mut args = vec![c.clone()];
            if let Some(low) = low {
                node = LogicalPlan::Filter(Filter::try_new(c.gt(low.clone()), Arc::new(node))?);
                args.push(low);
            }
            node = LogicalPlan::Filter(Filter::try_new(observe.call(args), Arc::new(node))?);
            Ok(Transformed::yes(node))
        })?
        .data;
    if let Some(e) = failed {
        return Err(e);
    }
    Ok((out, bounds))
}

/// Saves the watermarks of a committed write; returns a line per source for the user.
pub fn commit(marks: &Watermarks, bounds: &[Bound], run_id: &str) -> Result<Vec<String>> {
    if bounds.is_empty() {
        return Ok(Vec::new());
    }
    let mut saved = marks.load()?;
    let mut lines = Vec::new();
    // A source scanned twice (a self-join) is one watermark: the highest of both.
    let mut highs: BTreeMap<String, (&Bound, Option<String>, u64)> = BTreeMap::new();
    for b in bounds {
        let k = key(&b.target, &b.source);
        let high = b.high()?;
        let entry = highs.entry(k).or_insert((b, None, 0));
        entry.2 += b.rows();
        if let Some(h) = high
            && entry.1.as_deref().is_none_or(|e| greater(&h, e))
        {
            entry.1 = Some(h);
        }
    }
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    for (k, (b, high, rows)) in highs {
        let before = b.from.clone();
        // The watermark never moves back (a lookback re-reads rows below it).
        let keep = saved
            .get(&k)
            .filter(|m| m.column == b.column)
            .map(|m| m.value.clone());
        let next = match (&high, &keep) {
            (Some(h), Some(old)) if b.from.is_some() && !greater(h, old) => Some(old.clone()),
            (Some(h), _) => Some(h.clone()),
            (None, old) => old.clone(),
        };
        if let Some(v) = &next {
            saved.insert(
                k.clone(),
                Mark {
                    target: b.target.clone(),
                    source: b.source.clone(),
                    column: b.column.clone(),
                    value: v.clone(),
                    run_id: run_id.to_string(),
                    updated_at: now.clone(),
                },
            );
        }
        lines.push(format!(
            "incremental {}.{} -> {}: {rows} rows read past {}; watermark {}",
            b.source,
            b.column,
            b.target,
            before.as_deref().unwrap_or("(none: a full read)"),
            next.as_deref().unwrap_or("(none yet)")
        ));
    }
    marks.save(&saved)?;
    Ok(lines)
}

/// `a > b` for watermark texts: as numbers when both are, else as text (ISO timestamps sort).
fn greater(a: &str, b: &str) -> bool {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x > y,
        _ => a > b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watermark_texts_compare_as_numbers_or_times() {
        assert!(greater("10", "9"));
        assert!(!greater("9", "10"));
        assert!(greater("2024-01-02T00:00:00", "2024-01-01T23:59:59"));
        assert_eq!(key("dst", "src"), "dst <- src");
    }
}
