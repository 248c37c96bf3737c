//! `flumen resume <run-id>`: finish a run. A run that died (its ledger still says `running`) is
//! replayed first: its saved script runs again and its sinks skip the rows the journal shows were
//! delivered (see [`crate::sink::Replay`]). Then every staged part not yet delivered is sent.

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
    /// Whether the run had died and its script was replayed.
    pub replayed: bool,
    /// Rows the replay wrote.
    pub replayed_rows: u64,
}

impl Flumen {
    /// Delivers the staged, undelivered parts of this engine's run (made with
    /// [`crate::Config::resume_run`]). Each table is made again from its `CREATE` statement with
    /// today's variables; each part is sent with the delivery token it had in the first run, so
    /// an idempotent sink never gets it twice. A failing part stays staged for the next resume.
    pub async fn resume(&self, out: &mut (dyn std::io::Write + Send)) -> Result<ResumeReport> {
        let run = self.run.run_id().to_string();
        let mut report = ResumeReport::default();
        let ledger: Option<RunLedger> = read_json(&self.run.ledger_path()).ok();
        let finished = ledger.as_ref().is_some_and(|l| l.status == RunStatus::Succeeded);
        if let Some(l) = ledger.as_ref().filter(|l| l.still_running()) {
            return Err(Error::Config(format!(
                "run {run} is still running (process {})",
                l.pid
            )));
        }
        if let Some(ledger) = ledger.filter(|l| l.status == RunStatus::Running) {
            let script = self.run.saved_script().ok_or_else(|| {
                Error::Config(format!(
                    "run {run} died, but its script was not saved, so it cannot be replayed"
                ))
            })?;
            self.run.start_replay()?;
            let opts = crate::RunOptions::default();
            let summary = self.run_script(&ledger.script, &script, &opts, out).await?;
            report.replayed = true;
            report.replayed_rows = summary.rows_written;
        }
        let manifests = run_manifests(self.run.dir(), &run)?;
        if manifests.is_empty() && (report.replayed || finished) {
            return Ok(report);
        }
        if manifests.is_empty() {
            return Err(Error::Config(format!(
                "run {run} has nothing staged under {}; `flumen runs` lists the runs",
                self.run.dir().display()
            )));
        }
        self.run.set_delivering_staged(true);
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
                for part in pending {
                    self.run.set_scope(part.token.clone());
                    let path = dir.join(&part.file);
                    let df = self
                        .ctx
                        .read_parquet(path.display().to_string(), ParquetReadOptions::default())
                        .await?;
                    df.write_table(&manifest.table, DataFrameWriteOptions::new())
                        .await?;
                    mark_delivered(dir, &part.file)?;
                    report.parts += 1;
                    report.rows += part.rows;
                }
            }
            Ok::<_, Error>(())
        }
        .await;
        self.run.set_delivering_staged(false);
        let left = run_manifests(self.run.dir(), &run)?
            .iter()
            .any(|(_, m)| m.parts.iter().any(|p| !p.delivered));
        let status = if left {
            RunStatus::Spilled
        } else {
            RunStatus::Succeeded
        };
        let error = result
            .as_ref()
            .err()
            .map(|e| self.redactor.redact(&e.to_string()));
        self.run.write_ledger(status, error)?;
        result.map(|()| report)
    }
}
