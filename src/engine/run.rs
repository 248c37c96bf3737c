//! Running a whole script: check every statement first, then run them in order.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{Schema, SchemaRef, UInt64Type};
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;
use futures::StreamExt;

use super::views::ViewOutput;
use super::{Flumen, Statement, StatementKind, script};
use crate::cube::statement::ViewStatement;
use crate::error::{Error, Result};
use crate::output::{ResultFormat, ResultTarget, write_result};
use crate::progress::{ProgressMode, RunSummary, Tracker, peak_rss};

/// Run the statements, or only show what they would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Execute every statement.
    #[default]
    Run,
    /// Print each statement's plan; write nothing.
    Explain,
}

/// How [`Flumen::run_script`] runs and reports.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Run or explain.
    pub mode: Mode,
    /// Where query results go.
    pub result: ResultTarget,
    /// How progress is shown.
    pub progress: ProgressMode,
    /// Read incremental sources in full, ignoring their saved watermarks.
    pub full_refresh: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            mode: Mode::Run,
            result: ResultTarget::default(),
            progress: ProgressMode::Off,
            full_refresh: false,
        }
    }
}

/// A statement after substitution and parsing, before planning.
pub(super) struct Checked {
    pub(super) stmt: Statement,
    pub(super) parsed: Parsed,
}

/// Who runs a statement: DataFusion, or flumen itself.
pub(super) enum Parsed {
    DataFusion(DfStatement),
    /// A materialized-view statement, substituted and as written (`${VAR}`s kept).
    View(ViewStatement, ViewStatement),
}

impl Checked {
    fn is_query(&self) -> bool {
        match &self.parsed {
            Parsed::DataFusion(DfStatement::Statement(s)) => matches!(**s, SqlStatement::Query(_)),
            Parsed::View(v, _) => matches!(v, ViewStatement::Show),
            Parsed::DataFusion(_) => false,
        }
    }
}

impl Flumen {
    /// Substitutes and parses every statement of a script, so that a typo or an unset variable
    /// in the last statement stops the script before the first one runs.
    pub(super) fn check_script(&self, text: &str) -> Result<Vec<Checked>> {
        let dialect = self.ctx.state().config_options().sql_parser.dialect;
        script::split(text)?
            .into_iter()
            .map(|stmt| {
                let sql = self.substitute(&stmt)?;
                if let Some(view) = crate::cube::statement::parse(&sql).map_err(|e| self.at(&stmt, e))? {
                    let written = crate::cube::statement::parse(&stmt.text)
                        .ok()
                        .flatten()
                        .unwrap_or_else(|| view.clone());
                    return Ok(Checked {
                        stmt,
                        parsed: Parsed::View(view, written),
                    });
                }
                let mut parsed = self
                    .ctx
                    .state()
                    .sql_to_statement(&sql, &dialect)
                    .map_err(|e| self.at(&stmt, e.into()))?;
                self.namespace_connector_options(&mut parsed);
                Ok(Checked {
                    stmt,
                    parsed: Parsed::DataFusion(parsed),
                })
            })
            .collect()
    }

    /// Moves the options of a `CREATE EXTERNAL TABLE ... STORED AS <connector>` into flumen's
    /// namespace, so that DataFusion does not judge them as file-format options.
    fn namespace_connector_options(&self, parsed: &mut DfStatement) {
        if let DfStatement::CreateExternalTable(c) = parsed
            && self
                .registry
                .names()
                .any(|n| n.eq_ignore_ascii_case(&c.file_type))
        {
            for (key, _) in c.options.iter_mut() {
                if !key.contains('.') {
                    *key = format!("{}{key}", crate::connector::options::CONNECTOR_PREFIX);
                }
            }
        }
    }

    /// Plans a checked statement; remembers how sink tables were created (for `resume`) and
    /// scopes the delivery tokens of what the statement writes.
    pub(super) async fn plan_checked(&self, c: &Checked) -> Result<LogicalPlan> {
        let Parsed::DataFusion(parsed) = &c.parsed else {
            return Err(Error::Config(
                "a materialized-view statement has no DataFusion plan".into(),
            ));
        };
        let mut parsed = parsed.clone();
        if let DfStatement::CreateExternalTable(c) = &mut parsed {
            self.take_incremental_options(c)?;
        }
        let plan = self.ctx.state().statement_to_plan(parsed).await?;
        let plan = self.prepare(plan).await?;
        if let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd)) = &plan {
            // The text before substitution: no secret is ever written to the state directory.
            self.run.record_template(&cmd.name.to_string(), &c.stmt.text);
        }
        if !self.run.resuming() {
            self.run.begin_statement(c.stmt.line);
        }
        Ok(plan)
    }

    /// Takes `'incremental_column'` and `'lookback'` out of a `CREATE EXTERNAL TABLE` (the
    /// connector never sees them) and remembers them for the writes that read the table; also
    /// `'strict'`, which only flumen reads (CSV tables, see `super::lenient`).
    fn take_incremental_options(&self, c: &mut datafusion::sql::parser::CreateExternalTable) -> Result<()> {
        let mut spec = super::incremental::Spec {
            column: String::new(),
            lookback: None,
        };
        let mut strict: Option<String> = None;
        c.options.retain(|(k, v)| {
            let bare = k
                .strip_prefix(crate::connector::options::CONNECTOR_PREFIX)
                .or_else(|| k.strip_prefix("format."))
                .unwrap_or(k);
            let text = match v {
                datafusion::sql::sqlparser::ast::Value::SingleQuotedString(s) => s.clone(),
                other => other.to_string(),
            };
            match bare {
                "incremental_column" => spec.column = text,
                "lookback" => spec.lookback = Some(text),
                "strict" => strict = Some(text),
                _ => return true,
            }
            false
        });
        let table = c.name.to_string().trim_matches('"').to_lowercase();
        if let Ok(mut s) = self.strict.write() {
            match strict.as_deref().map(str::to_ascii_lowercase).as_deref() {
                None | Some("false") => {
                    s.remove(&table);
                }
                Some("true") => {
                    s.insert(table.clone());
                }
                Some(other) => {
                    return Err(Error::Option(format!(
                        "table {table}: option 'strict' has bad value '{other}': expected true or false"
                    )));
                }
            }
        }
        if spec.column.is_empty() {
            if spec.lookback.is_some() {
                return Err(Error::Option(format!(
                    "table {table}: option 'lookback' needs 'incremental_column'"
                )));
            }
            if let Ok(mut m) = self.incremental.write() {
                m.remove(&table);
            }
            return Ok(());
        }
        if let Ok(mut m) = self.incremental.write() {
            m.insert(table, spec);
        }
        Ok(())
    }

    /// Bounds the incremental sources a write reads (see [`super::incremental`]).
    fn bound_incremental(
        &self,
        plan: LogicalPlan,
        full: bool,
    ) -> Result<(LogicalPlan, Vec<super::incremental::Bound>)> {
        let target = match &plan {
            LogicalPlan::Dml(d) => d.table_name.to_string(),
            LogicalPlan::Copy(c) => c.output_url.clone(),
            _ => return Ok((plan, Vec::new())),
        };
        let specs = self.incremental.read().map(|m| m.clone()).unwrap_or_default();
        if specs.is_empty() {
            return Ok((plan, Vec::new()));
        }
        let marks = super::incremental::Watermarks::new(self.run.dir()).load()?;
        super::incremental::bound(plan, &specs, &marks, &target, full)
    }

    /// Wraps an error with the statement's position, secrets removed.
    fn at(&self, stmt: &Statement, e: Error) -> Error {
        if matches!(
            e,
            Error::Statement { .. } | Error::UnsetVariable { .. } | Error::Syntax { .. }
        ) {
            return e;
        }
        let first = stmt
            .text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("--"))
            .unwrap_or_default();
        let mut shown: String = self.redactor.redact(first).chars().take(120).collect();
        if shown.len() < first.len() || stmt.text.trim().lines().count() > 1 {
            shown.push_str(" ...");
        }
        Error::Statement {
            script: String::new(),
            line: stmt.line,
            statement: shown,
            source: Box::new(e),
        }
    }

    /// Runs (or explains) every statement of a script in order; query results and write counts
    /// go to `out`. Errors name the script and the statement's line; secrets are redacted.
    pub async fn run_script(
        &self,
        name: &str,
        text: &str,
        opts: &RunOptions,
        out: &mut (dyn Write + Send),
    ) -> Result<RunSummary> {
        let started = std::time::Instant::now();
        let located = |e: Error| match e {
            Error::Statement {
                line,
                statement,
                source,
                ..
            } => Error::Statement {
                script: name.to_string(),
                line,
                statement,
                source,
            },
            other => Error::InScript {
                script: name.to_string(),
                source: Box::new(other),
            },
        };
        opts.result.validate().map_err(located)?;
        let checked = self.check_script(text).map_err(located)?;
        self.register_views().await.map_err(located)?;
        let queries: Vec<usize> = checked
            .iter()
            .filter(|c| c.is_query())
            .map(|c| c.stmt.line)
            .collect();
        if opts.result.output.is_some() && opts.mode == Mode::Run && queries.len() != 1 {
            return Err(located(Error::Config(format!(
                "--output takes the result of exactly one query, but the script has {} (at lines {:?})",
                queries.len(),
                queries
            ))));
        }
        let mut summary = RunSummary::default();
        // Runs that write to a sink get a ledger (the sink writes its first version); plain
        // queries and file COPYs leave no state behind.
        let ledger = opts.mode == Mode::Run;
        if ledger {
            self.run.set_script(name, Some(text));
        }
        for c in checked {
            let result = self.run_checked(&c, opts, out).await;
            match result {
                Ok(stats) => summary.add(stats),
                Err(e) => {
                    let e = located(self.at(&c.stmt, e));
                    if ledger {
                        self.run.finish(Some(self.redactor.redact(&e.to_string())))?;
                    }
                    return Err(e);
                }
            }
        }
        if ledger {
            self.run.finish(None)?;
        }
        summary.seconds = started.elapsed().as_secs_f64();
        summary.peak_rss_bytes = peak_rss();
        summary.sinks = self.run.sink_snapshots();
        Ok(summary)
    }

    async fn run_checked(
        &self,
        c: &Checked,
        opts: &RunOptions,
        out: &mut (dyn Write + Send),
    ) -> Result<crate::progress::StatementStats> {
        let write_err = |e| Error::io("writing to standard output", e);
        if let Parsed::View(view, written) = &c.parsed {
            let line = c.stmt.line;
            match self.run_view(view, written, opts.mode, line).await? {
                ViewOutput::Message(m) => writeln!(out, "{m}").map_err(write_err)?,
                ViewOutput::Rows(batch) => {
                    let stream = self.ctx.read_batch(batch)?.execute_stream().await?;
                    let (_, table) = write_result(stream, &opts.result, out).await?;
                    if let Some(table) = table {
                        writeln!(out, "{table}").map_err(write_err)?;
                    }
                }
            }
            return Ok(crate::progress::StatementStats {
                line,
                ..Default::default()
            });
        }
        let plan = self.plan_checked(c).await?;
        let (plan, bounds) = self.bound_incremental(plan, opts.full_refresh)?;
        if opts.mode == Mode::Explain {
            let text = self.explain(plan).await?;
            writeln!(
                out,
                "-- statement at line {}\n{}\n",
                c.stmt.line,
                self.redactor.redact(&text)
            )
            .map_err(write_err)?;
            return Ok(crate::progress::StatementStats {
                line: c.stmt.line,
                ..Default::default()
            });
        }
        let progress_key = format!("statement/l{}", c.stmt.line);
        self.run.set_input_repeatable(bounds.is_empty());
        if StatementKind::of(&plan) == StatementKind::Write
            && self.run.replaying()
            && self.run.progress(&progress_key).as_deref() == Some("done")
        {
            writeln!(
                out,
                "statement at line {} was completed by the earlier attempt: skipped",
                c.stmt.line
            )
            .map_err(write_err)?;
            return Ok(crate::progress::StatementStats {
                line: c.stmt.line,
                ..Default::default()
            });
        }
        let mut running = self.execute(plan).await?;
        let label = format!("line {}", c.stmt.line);
        // Rows streaming to the terminal and a live bar on the same terminal would garble
        // each other: then the bar stays off.
        let streams_to_terminal = running.kind == StatementKind::Query
            && opts.result.format != ResultFormat::Table
            && opts.result.output.is_none()
            && std::io::stdout().is_terminal();
        let mode = match opts.progress {
            ProgressMode::Bar if streams_to_terminal => ProgressMode::Off,
            m => m,
        };
        let tracker = Tracker::start(mode, c.stmt.line, label, running.plan.clone());
        let mut returned = 0;
        let mut written = 0;
        let mut table = None;
        match (running.kind, running.stream.take()) {
            (StatementKind::Query, Some(stream)) => {
                let r = write_result(stream, &opts.result, out).await;
                // A query peeks at broker tables: what it read is delivered again.
                self.run.pending().release().await;
                (returned, table) = r?;
            }
            (StatementKind::Write, Some(mut stream)) => {
                let drained = async {
                    while let Some(batch) = stream.next().await {
                        let batch = batch?;
                        written += count_of(&batch);
                        add_executor_metrics(&self.run, &batch);
                    }
                    running.commit()
                }
                .await;
                // A write that staged rows read its whole input: each row is delivered, staged
                // (`flumen resume` delivers it) or in dead letters, so the write counts as done.
                let staged = match drained {
                    Ok(()) => None,
                    Err(e) if e.is_staged() => Some(e),
                    Err(e) => {
                        self.give_back().await;
                        return Err(e);
                    }
                };
                // The sink has committed (or its staged parts own the rest): acknowledge the
                // broker messages the write consumed.
                self.run.pending().commit().await?;
                // A replay of this run need not run this write again.
                self.run.record_progress(&progress_key, "done")?;
                // Only now do the incremental sources' watermarks move.
                let marks = super::incremental::Watermarks::new(self.run.dir());
                for line in super::incremental::commit(&marks, &bounds, self.run.run_id())? {
                    self.run.record_watermark(&line);
                    writeln!(out, "{line}").map_err(write_err)?;
                }
                if let Some(e) = staged {
                    return Err(e);
                }
            }
            _ => self.run.pending().release().await,
        }
        let mut stats = tracker.finish().await;
        if let (Some(url), Some(plan)) = (&self.cluster, &running.plan) {
            // The executors read: the scheduler has their counts.
            stats.rows_read = super::cluster_rows_read(plan, url).await.unwrap_or(0);
        }
        if let Some(table) = table {
            writeln!(out, "{table}").map_err(write_err)?;
        }
        if running.kind == StatementKind::Write {
            writeln!(out, "{written} rows written").map_err(write_err)?;
        }
        stats.rows_returned = returned;
        stats.rows_written = written;
        Ok(stats)
    }

    /// A write failed (not by staging): its broker messages go back to the broker, which
    /// delivers them again, so the parts it staged are given up first (a kill in between then
    /// leaves them to `flumen resume`, with the messages not yet given back).
    async fn give_back(&self) {
        if self.run.pending().any()
            && let Err(e) = self
                .run
                .drop_statement_parts("the write failed and its broker messages were given back")
        {
            tracing::error!("giving up the parts the failed write staged: {e}");
        }
        self.run.pending().release().await;
    }

    /// What to tell the user after a run failed with `e`: the command that continues it, when
    /// the run wrote to a sink (a staged write's error already names it).
    pub fn recovery_hint(&self, e: &Error) -> Option<String> {
        if e.is_staged() || !self.run.ledger_path().exists() {
            return None;
        }
        Some(format!(
            "to finish this run once the cause is fixed, without writing again what it delivered: `{}`",
            crate::sink::resume_command(&self.run)
        ))
    }

    /// Runs every statement of `sql` (variables substituted) and returns the last one's output:
    /// a query's rows, a write's `count`, nothing for DDL. For embedding and tests.
    ///
    /// An error keeps its typed cause; pass its text through [`Flumen::redactor`] before showing
    /// it, as the CLI does, since a cause may quote a location with a secret in it.
    pub async fn sql(&self, sql: &str) -> Result<SqlOutput> {
        let mut last = SqlOutput {
            kind: StatementKind::Ddl,
            schema: Arc::new(Schema::empty()),
            batches: Vec::new(),
        };
        self.register_views().await?;
        for c in self.check_script(sql)? {
            if let Parsed::View(view, written) = &c.parsed {
                let done = self.run_view(view, written, Mode::Run, c.stmt.line).await;
                last = match done.map_err(|e| self.at(&c.stmt, e))? {
                    ViewOutput::Rows(batch) => SqlOutput {
                        kind: StatementKind::Query,
                        schema: batch.schema(),
                        batches: vec![batch],
                    },
                    ViewOutput::Message(_) => SqlOutput {
                        kind: StatementKind::Ddl,
                        schema: Arc::new(Schema::empty()),
                        batches: Vec::new(),
                    },
                };
                continue;
            }
            let run = async {
                let plan = self.plan_checked(&c).await?;
                self.run.set_input_repeatable(true);
                let mut running = self.execute(plan).await?;
                let mut out = SqlOutput {
                    kind: running.kind,
                    schema: Arc::new(Schema::empty()),
                    batches: Vec::new(),
                };
                let drained = async {
                    if let Some(mut s) = running.stream.take() {
                        out.schema = s.schema();
                        while let Some(b) = s.next().await {
                            out.batches.push(b?);
                        }
                    }
                    running.commit()
                }
                .await;
                match (&drained, out.kind) {
                    (Ok(()), StatementKind::Write) => self.run.pending().commit().await?,
                    // Staged rows belong to the staged parts: the messages are acknowledged.
                    (Err(e), StatementKind::Write) if e.is_staged() => self.run.pending().commit().await?,
                    (Err(_), StatementKind::Write) => self.give_back().await,
                    _ => self.run.pending().release().await,
                }
                drained?;
                Ok::<_, Error>(out)
            };
            last = run.await.map_err(|e| self.at(&c.stmt, e))?;
        }
        Ok(last)
    }
}

/// What [`Flumen::sql`] returns: the last statement's kind, schema and rows.
#[derive(Debug, Clone)]
pub struct SqlOutput {
    /// What the statement was.
    pub kind: StatementKind,
    /// Schema of `batches` (empty for DDL).
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
}

impl SqlOutput {
    /// Total rows in `batches`.
    pub fn num_rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// On a cluster a write's output carries the counters of the executors' sinks: they join the
/// run's own, for the summary and the ledger.
#[cfg(feature = "cluster")]
fn add_executor_metrics(run: &crate::sink::RunState, batch: &RecordBatch) {
    for (table, m) in crate::cluster::codec::sink_metrics_of(batch) {
        run.metrics_for(&table).add(&m);
    }
}

#[cfg(not(feature = "cluster"))]
fn add_executor_metrics(_run: &crate::sink::RunState, _batch: &RecordBatch) {}

/// The row count a DataFusion write returns (its first column, `count`).
pub fn count_of(batch: &RecordBatch) -> u64 {
    batch
        .columns()
        .first()
        .and_then(|c| c.as_primitive_opt::<UInt64Type>())
        .map(|a| (0..a.len()).filter(|i| a.is_valid(*i)).map(|i| a.value(i)).sum())
        .unwrap_or(0)
}
