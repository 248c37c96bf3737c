//! `flumen resume <run-id>`: deliver what a run staged, exactly the parts not yet delivered.

use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::ParquetReadOptions;

use super::Flumen;
use crate::error::{Error, Result};
use crate::sink::{RunStatus, mark_delivered, run_manifests};

/// What a resume did.
#[derive(Debug, Clone, Default)]
pub struct ResumeReport {
    /// Parts delivered now.
    pub parts: u64,
    /// Rows in them.
    pub rows: u64,
    /// Parts that were delivered by an earlier resume.
    pub already_delivered: u64,
}

impl Flumen {
    /// Delivers the staged, undelivered parts of this engine's run (made with
    /// [`crate::Config::resume_run`]). Each table is made again from its `CREATE` statement with
    /// today's variables; each part is sent with the delivery token it had in the first run, so
    /// an idempotent sink never gets it twice. A failing part stays staged for the next resume.
    pub async fn resume(&self) -> Result<ResumeReport> {
        let run = self.run.run_id().to_string();
        let manifests = run_manifests(self.run.dir(), &run)?;
        if manifests.is_empty() {
            return Err(Error::Config(format!(
                "run {run} has nothing staged under {}; `flumen runs` lists the runs",
                self.run.dir().display()
            )));
        }
        self.run.set_script(&format!("resume {run}"));
        let mut report = ResumeReport::default();
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
