//! `flumen resume <run-id>`: finish a run that did not succeed.
//!
//! 1. The run's lock is taken: one process at a time runs or resumes a run, and a run whose
//!    lock is free has no process left (a killed run's ledger still says `running`).
//! 2. The side effects earlier attempts recorded in the journal (a `create replace`, a table
//!    swap) are loaded: they are never done again.
//! 3. Every staged part not yet delivered is sent, with the delivery token it was staged under,
//!    so a sink that deduplicates by token never applies it twice. A part that fails stays staged.
//! 4. Unless the run succeeded, its saved script runs again (a replay): statements an earlier
//!    attempt completed are skipped, and writes skip the rows the journal shows were delivered,
//!    staged or dead-lettered, and send the requests that were in flight again with their own
//!    tokens (see [`crate::sink::Replay`]). So a run killed half way, one stopped by a failure
//!    (once its cause is fixed), and one whose later statements never ran because an earlier
//!    one staged rows, all end as if the run had gone through once.
//!
//! The replay runs the script as it was saved when the run started (`runs/<run-id>.sql`), with
//! today's `--set` values and environment.

use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::ParquetReadOptions;

use super::Flumen;
use crate::error::{Error, Result};
use crate::sink::{RunLedger, RunStatus, mark_delivered, read_json, run_manifests};

/// What a resume did.
#[derive(Debug, Clone, Default)]
pub struct ResumeReport {
    /// Parts delivered now.
    pub parts: u64,
    /// Rows in them.
    pub rows: u64,
    /// Parts that were delivered by an earlier resume.
    pub already_delivered: u64,
    /// Whether the run's script was replayed.
    pub replayed: bool,
    /// Rows the replay wrote.
    pub replayed_rows: u64,
}

impl Flumen {
    /// Finishes this engine's run (made with [`crate::Config::resume_run`]): delivers its staged
    /// parts, then replays its script unless it had succeeded (see the module docs).
    pub async fn resume(&self, out: &mut (dyn std::io::Write + Send)) -> Result<ResumeReport> {
        let run = self.run.run_id().to_string();
        let mut report = ResumeReport::default();
        let ledger_path = self.run.ledger_path();
        let ledger: Option<RunLedger> = if ledger_path.exists() {
            Some(read_json(&ledger_path)?)
        } else {
            None
        };
        self.run.acquire_lock()?;
        let Some(ledger) = ledger else {
            return Err(Error::Config(format!(
                "run {run} has no ledger under {}; `flumen runs` lists the runs",
                self.run.dir().display()
            )));
        };
        // A run without a saved script is an executor's write task of a cluster run: it read
        // all its input when it staged rows, and has nothing to replay otherwise.
        let script = match ledger.status {
            RunStatus::Succeeded => None,
            _ => self.run.saved_script(),
        };
        let unreplayable =
            script.is_none() && matches!(ledger.status, RunStatus::Running | RunStatus::Failed);
        self.run.continue_from_journal(script.is_some())?;

        let delivered = self.deliver_staged(&mut report).await;
        if let Err(e) = delivered {
            let error = self.redactor.redact(&e.to_string());
            self.run.finish(Some(error))?;
            return Err(e);
        }
        if let Some(script) = script {
            let opts = crate::RunOptions::default();
            let summary = self.run_script(&ledger.script, &script, &opts, out).await?;
            report.replayed = true;
            report.replayed_rows = summary.rows_written;
        } else if unreplayable {
            let e = Error::Config(format!(
                "run {run} did not finish, and its script was not saved, so it cannot be replayed; \
                 its staged parts are delivered"
            ));
            self.run.finish(Some(e.to_string()))?;
            return Err(e);
        } else {
            self.run.finish(None)?;
        }
        Ok(report)
    }

    /// Sends every staged, undelivered part of the run. Each table is made again from its
    /// `CREATE` statement with today's variables; each part goes with the delivery token it had
    /// when it was staged, and is marked delivered once it is.
    async fn deliver_staged(&self, report: &mut ResumeReport) -> Result<()> {
        let run = self.run.run_id().to_string();
        let manifests = run_manifests(self.run.dir(), &run)?;
        self.run.set_delivering_staged(true);
        // A part is read in file order, one stream: row i of the part is row i of the request
        // it was staged as (documents' ids derive from it); a large file is otherwise split
        // into byte ranges read in parallel.
        let state = self.ctx.state_ref();
        let repartition = {
            let mut s = state.write();
            let o = s.config_mut().options_mut();
            std::mem::replace(&mut o.optimizer.repartition_file_scans, false)
        };
        let result = async {
            for (dir, manifest) in &manifests {
                let pending: Vec<_> = manifest.parts.iter().filter(|p| !p.delivered).collect();
                report.already_delivered += (manifest.parts.len() - pending.len()) as u64;
                if pending.is_empty() {
                    continue;
                }
                let create = manifest.create_sql.as_deref().ok_or_else(|| {
                    Error::Config(format!(
                        "run {run}: table {} was not made by CREATE EXTERNAL TABLE in the script, so resume \
                         cannot make it again",
                        manifest.table
                    ))
                })?;
                self.sql(create).await?;
                let table = self.quoted(&manifest.table)?;
                for part in pending {
                    self.run.set_scope(part.token.clone());
                    self.run.set_origin(part.origin.clone());
                    let path = dir.join(&part.file);
                    let df = self
                        .ctx
                        .read_parquet(path.display().to_string(), ParquetReadOptions::default())
                        .await?;
                    df.write_table(&table, DataFrameWriteOptions::new()).await?;
                    mark_delivered(dir, &part.file)?;
                    report.parts += 1;
                    report.rows += part.rows;
                }
                // The replay declares the table again.
                self.ctx.deregister_table(table.as_str())?;
            }
            Ok::<_, Error>(())
        }
        .await;
        state
            .write()
            .config_mut()
            .options_mut()
            .optimizer
            .repartition_file_scans = repartition;
        self.run.set_delivering_staged(false);
        result
    }
}

impl Flumen {
    /// A table's name as a manifest holds it (as `TableReference` shows it: `t`, `schema.t`,
    /// or a quoted name that holds a dot) in the quoted form DataFusion reads back unchanged,
    /// so a table declared as `"Orders"` or `"a.b"` stays itself.
    fn quoted(&self, name: &str) -> Result<String> {
        use datafusion::common::TableReference;
        let whole = TableReference::bare(name);
        if self.ctx.table_exist(whole.clone())? {
            return Ok(whole.to_quoted_string());
        }
        let parts: Vec<&str> = name.split('.').collect();
        let r = match parts.as_slice() {
            [s, t] => TableReference::partial(*s, *t),
            [c, s, t] => TableReference::full(*c, *s, *t),
            _ => whole,
        };
        Ok(r.to_quoted_string())
    }
}
