//! Progress while a statement runs, and the summary at the end of a run.
//!
//! Progress is read from the running physical plan's own metrics, so it costs nothing on the
//! data path: rows read are the output rows of the lowest plan nodes that count them (the scans),
//! bytes read come from scans that report `bytes_scanned` (Parquet), and the input size is the
//! sum of the scanned files' sizes. An ETA is shown when the total row count is known: Parquet
//! metadata states it; for uncompressed local CSV and NDJSON it is estimated from the files' sizes
//! and the line length in the first MiB of the first file (shown with a `~`).

use std::collections::HashSet;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::common::stats::Precision;
use datafusion::datasource::physical_plan::FileScanConfig;
use datafusion::datasource::source::DataSourceExec;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::oneshot;

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressMode {
    /// A live line on the terminal (stderr), redrawn a few times a second.
    Bar,
    /// A log line every interval: for pipes, files and schedulers.
    Log(Duration),
    /// Nothing.
    Off,
}

impl ProgressMode {
    /// A live bar when stderr is a terminal, else log lines every `interval`.
    pub fn auto(interval: Duration) -> Self {
        if std::io::stderr().is_terminal() {
            Self::Bar
        } else {
            Self::Log(interval)
        }
    }
}

/// What one statement did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatementStats {
    /// 1-based script line of the statement.
    pub line: usize,
    /// Rows the sources produced.
    pub rows_read: u64,
    /// Bytes the sources read, where they report it.
    pub bytes_read: Option<u64>,
    /// Rows written by INSERT / COPY.
    pub rows_written: u64,
    /// Rows a query returned.
    pub rows_returned: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

/// A snapshot of a running plan's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanCounters {
    /// Rows produced by the sources so far.
    pub rows_read: u64,
    /// Bytes read by sources that report it.
    pub bytes_read: Option<u64>,
    /// Pages fetched and requests retried, by sources that page (HTTP APIs).
    pub pages: Option<(u64, u64)>,
}

/// What is known up front about a plan's input.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlanInput {
    /// Total source rows, when every source states it (or it could be estimated).
    pub total_rows: Option<u64>,
    /// Whether `total_rows` is an estimate from a sample of lines.
    pub estimated: bool,
    /// Total size of the scanned files, when the plan scans files.
    pub total_bytes: Option<u64>,
}

impl PlanInput {
    /// Reads the input size from the plan's sources (no IO: file sizes come from the listing).
    pub fn of(plan: &Arc<dyn ExecutionPlan>) -> Self {
        let mut total_rows = Some(0u64);
        let mut estimated = false;
        let mut files = HashSet::new();
        let mut total_bytes = 0u64;
        visit_leaves(plan, &mut |leaf| {
            let rows = StatisticsContext::new()
                .compute(leaf.as_ref(), &StatisticsArgs::new())
                .ok()
                .and_then(|s| match s.num_rows {
                    Precision::Exact(n) | Precision::Inexact(n) => Some(n as u64),
                    Precision::Absent => None,
                });
            let scan = leaf
                .downcast_ref::<DataSourceExec>()
                .and_then(|d| d.data_source().downcast_ref::<FileScanConfig>());
            let mut leaf_bytes = 0;
            if let Some(scan) = scan {
                for f in scan.file_groups.iter().flat_map(|g| g.files()) {
                    if files.insert(f.object_meta.location.clone()) {
                        leaf_bytes += f.object_meta.size;
                    }
                }
                total_bytes += leaf_bytes;
            }
            let rows = rows.or_else(|| {
                let n = scan.and_then(|s| estimate_rows(s, leaf_bytes))?;
                estimated = true;
                Some(n)
            });
            total_rows = total_rows.zip(rows).map(|(a, b)| a + b);
        });
        Self {
            total_rows: total_rows.filter(|n| *n > 0),
            estimated,
            total_bytes: (!files.is_empty()).then_some(total_bytes),
        }
    }
}

/// Rows in a line-oriented (CSV, NDJSON) local, uncompressed scan: its bytes divided by the mean
/// line length in the first MiB of its first file. `None` when that cannot be known cheaply.
fn estimate_rows(scan: &FileScanConfig, bytes: u64) -> Option<u64> {
    use std::io::Read;
    if !matches!(scan.file_source().file_type(), "csv" | "json")
        || scan.object_store_url.as_str() != "file:///"
    {
        return None;
    }
    let first = scan.file_groups.iter().flat_map(|g| g.files()).next()?;
    let path = format!("/{}", first.object_meta.location);
    if [".gz", ".bz2", ".xz", ".zst", ".zstd"]
        .iter()
        .any(|ext| path.ends_with(ext))
    {
        return None;
    }
    let mut sample = Vec::with_capacity(1 << 20);
    std::fs::File::open(&path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut sample)
        .ok()?;
    let lines = sample.iter().filter(|b| **b == b'\n').count() as u64;
    (lines > 0).then(|| bytes * lines / sample.len() as u64)
}

fn visit_leaves(plan: &Arc<dyn ExecutionPlan>, f: &mut impl FnMut(&Arc<dyn ExecutionPlan>)) {
    let children = plan.children();
    if children.is_empty() {
        f(plan);
    }
    for c in children {
        visit_leaves(c, f);
    }
}

fn output_rows(plan: &Arc<dyn ExecutionPlan>) -> Option<u64> {
    plan.metrics().and_then(|m| m.output_rows()).map(|n| n as u64)
}

/// Rows the sources under `plan` produced, counted at the lowest node that counts rows
/// (some sources, such as streaming tables, leave counting to the node above them).
fn source_rows(plan: &Arc<dyn ExecutionPlan>) -> Option<u64> {
    let children = plan.children();
    if children.is_empty() {
        return output_rows(plan);
    }
    let mut total = 0;
    for c in children {
        match source_rows(c) {
            Some(n) => total += n,
            None => return output_rows(plan),
        }
    }
    Some(total)
}

impl PlanCounters {
    /// Reads the live counters of a running plan.
    pub fn of(plan: &Arc<dyn ExecutionPlan>) -> Self {
        let mut bytes: Option<u64> = None;
        let mut pages: Option<(u64, u64)> = None;
        fn walk(p: &Arc<dyn ExecutionPlan>, bytes: &mut Option<u64>, pages: &mut Option<(u64, u64)>) {
            if let Some(m) = p.metrics() {
                if let Some(v) = m.sum_by_name("bytes_scanned") {
                    *bytes = Some(bytes.unwrap_or(0) + v.as_usize() as u64);
                }
                if let Some(v) = m.sum_by_name("pages") {
                    let retries = m.sum_by_name("retries").map_or(0, |r| r.as_usize() as u64);
                    let (p0, r0) = pages.unwrap_or((0, 0));
                    *pages = Some((p0 + v.as_usize() as u64, r0 + retries));
                }
            }
            for c in p.children() {
                walk(c, bytes, pages);
            }
        }
        walk(plan, &mut bytes, &mut pages);
        Self {
            rows_read: source_rows(plan).unwrap_or(0),
            bytes_read: bytes,
            pages,
        }
    }
}

/// Shows progress for one statement until [`Tracker::finish`] is called.
pub struct Tracker {
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    plan: Option<Arc<dyn ExecutionPlan>>,
    started: Instant,
    line: usize,
}

impl Tracker {
    /// Starts showing progress of `plan` (if any) for the statement at `line`.
    pub fn start(
        mode: ProgressMode,
        line: usize,
        label: String,
        plan: Option<Arc<dyn ExecutionPlan>>,
    ) -> Self {
        let started = Instant::now();
        let (stop, mut stopped) = oneshot::channel();
        let task = match (&plan, mode) {
            (Some(p), ProgressMode::Bar | ProgressMode::Log(_)) => {
                let p = Arc::clone(p);
                Some(tokio::spawn(async move {
                    let input = PlanInput::of(&p);
                    // Created at the first tick, so statements that finish quickly draw nothing.
                    let mut bar: Option<ProgressBar> = None;
                    let new_bar = || {
                        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
                        let style = ProgressStyle::with_template("{spinner} {prefix} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner());
                        bar.set_style(style);
                        bar.set_prefix(label.clone());
                        bar
                    };
                    let every = match mode {
                        ProgressMode::Log(d) => d,
                        _ => Duration::from_millis(200),
                    };
                    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                    loop {
                        tokio::select! {
                            _ = &mut stopped => break,
                            _ = tick.tick() => {
                                let msg = describe(&PlanCounters::of(&p), &input, started.elapsed());
                                if mode == ProgressMode::Bar {
                                    let b = bar.get_or_insert_with(new_bar);
                                    b.set_message(msg);
                                    b.tick();
                                } else {
                                    tracing::info!(target: "flumen::progress", statement_line = line, "{label}: {msg}");
                                }
                            }
                        }
                    }
                    if let Some(b) = bar {
                        b.finish_and_clear();
                    }
                }))
            }
            _ => None,
        };
        Self {
            stop: Some(stop),
            task,
            plan,
            started,
            line,
        }
    }

    /// Stops the display and returns the statement's final counters.
    pub async fn finish(mut self) -> StatementStats {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let counters = self.plan.as_ref().map(PlanCounters::of).unwrap_or_default();
        StatementStats {
            line: self.line,
            rows_read: counters.rows_read,
            bytes_read: counters.bytes_read,
            rows_written: 0,
            rows_returned: 0,
            seconds: self.started.elapsed().as_secs_f64(),
        }
    }
}

/// One progress line: rows (and share of the total), bytes, rate, elapsed, ETA.
pub fn describe(c: &PlanCounters, input: &PlanInput, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    let mut msg = format!("{} rows read", human_count(c.rows_read));
    if let Some(total) = input.total_rows {
        let pct = (c.rows_read as f64 / total as f64 * 100.0).min(100.0);
        let approx = if input.estimated { "~" } else { "" };
        msg.push_str(&format!(" of {approx}{} ({pct:.0}%)", human_count(total)));
    }
    match (c.bytes_read, input.total_bytes) {
        (Some(b), _) => msg.push_str(&format!(", {}", human_bytes(b))),
        (None, Some(t)) => msg.push_str(&format!(", input {}", human_bytes(t))),
        (None, None) => {}
    }
    if let Some((pages, retries)) = c.pages {
        msg.push_str(&format!(
            ", {} pages ({:.1}/s), {retries} retries",
            human_count(pages),
            pages as f64 / secs
        ));
    }
    let rate = c.rows_read as f64 / secs;
    msg.push_str(&format!(
        ", {} rows/s, {} elapsed",
        human_count(rate as u64),
        clock(elapsed)
    ));
    if let Some(total) = input.total_rows
        && c.rows_read > 0
        && c.rows_read < total
    {
        let left = (total - c.rows_read) as f64 / rate;
        msg.push_str(&format!(", ETA {}", clock(Duration::from_secs_f64(left))));
    }
    msg
}

/// The summary of a whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    /// Statements executed.
    pub statements: usize,
    /// Rows produced by sources, over all statements.
    pub rows_read: u64,
    /// Rows written by INSERT and COPY.
    pub rows_written: u64,
    /// Rows returned by queries.
    pub rows_returned: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Peak resident memory of the process, in bytes, where the OS reports it.
    pub peak_rss_bytes: Option<u64>,
    /// Per statement.
    pub per_statement: Vec<StatementStats>,
    /// Counters of every sink table written.
    pub sinks: std::collections::BTreeMap<String, crate::sink::SinkMetricsSnapshot>,
}

impl RunSummary {
    /// Adds one statement's stats.
    pub fn add(&mut self, s: StatementStats) {
        self.statements += 1;
        self.rows_read += s.rows_read;
        self.rows_written += s.rows_written;
        self.rows_returned += s.rows_returned;
        self.per_statement.push(s);
    }

    /// One line for humans.
    pub fn line(&self) -> String {
        let rate = self.rows_read as f64 / self.seconds.max(1e-3);
        let mut s = format!(
            "done: {} statement{}, {} rows read, {} rows written, {:.2}s ({} rows/s)",
            self.statements,
            if self.statements == 1 { "" } else { "s" },
            human_count(self.rows_read),
            human_count(self.rows_written),
            self.seconds,
            human_count(rate as u64),
        );
        if let Some(rss) = self.peak_rss_bytes {
            s.push_str(&format!(", peak memory {}", human_bytes(rss)));
        }
        for (table, m) in &self.sinks {
            // A source's rejections (values that do not fit their column) are kept like a
            // sink's, under `source <table>`.
            if let Some(source) = table.strip_prefix("source ") {
                s.push_str(&format!(
                    "\n  source {source}: {} rows rejected (values that do not fit their column; see the dead letters)",
                    human_count(m.rejected)
                ));
                continue;
            }
            s.push_str(&format!(
                "\n  sink {table}: {} rows delivered, {} requests, {} retries, {} rows spilled, {} rows rejected",
                human_count(m.rows),
                m.requests,
                m.retries,
                human_count(m.spilled),
                human_count(m.rejected)
            ));
            if !m.rules.is_empty() {
                let per: Vec<String> = m.rules.iter().map(|(r, n)| format!("{r} {n}")).collect();
                s.push_str(&format!(" (by rule: {})", per.join(", ")));
            }
        }
        s
    }
}

/// Peak resident set size of this process (`VmHWM`), Linux only.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `1234567` → `1.23M`.
pub fn human_count(n: u64) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=999_999 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}M", n as f64 / 1e6),
        _ => format!("{:.2}G", n as f64 / 1e9),
    }
}

/// `1536` → `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn clock(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_progress_with_eta_when_total_known() {
        let c = PlanCounters {
            rows_read: 250,
            bytes_read: Some(2048),
            pages: None,
        };
        let input = PlanInput {
            total_rows: Some(1000),
            estimated: false,
            total_bytes: Some(8192),
        };
        let msg = describe(&c, &input, Duration::from_secs(5));
        assert_eq!(
            msg,
            "250 rows read of 1000 (25%), 2.0 KiB, 50 rows/s, 00:05 elapsed, ETA 00:15"
        );
    }

    #[test]
    fn describes_progress_without_totals() {
        let c = PlanCounters {
            rows_read: 2_500_000,
            bytes_read: None,
            pages: Some((120, 3)),
        };
        let input = PlanInput {
            total_rows: None,
            estimated: false,
            total_bytes: Some(3 << 30),
        };
        let msg = describe(&c, &input, Duration::from_secs(2));
        assert_eq!(
            msg,
            "2.50M rows read, input 3.0 GiB, 120 pages (60.0/s), 3 retries, 1.25M rows/s, 00:02 elapsed"
        );
    }

    #[test]
    fn human_units() {
        assert_eq!(human_count(12_345), "12.3k");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(clock(Duration::from_secs(3725)), "1:02:05");
    }

    #[test]
    fn summary_adds_statements() {
        let mut s = RunSummary::default();
        s.add(StatementStats {
            rows_read: 10,
            rows_written: 4,
            ..Default::default()
        });
        s.add(StatementStats {
            rows_read: 5,
            rows_returned: 2,
            ..Default::default()
        });
        assert_eq!(
            (s.statements, s.rows_read, s.rows_written, s.rows_returned),
            (2, 15, 4, 2)
        );
        assert!(
            s.line()
                .starts_with("done: 2 statements, 15 rows read, 4 rows written")
        );
    }
}
