//! `COPY ... TO 'dir/'` on the local file system replaces the directory, atomically.
//!
//! DataFusion's COPY adds new files next to whatever a directory already holds, so running a job
//! twice would double its output. flumen writes a directory COPY into a fresh sibling directory
//! and swaps it into place only after every file is written: a failed COPY leaves the old output
//! untouched, a successful one leaves exactly the query's rows. Single-file COPYs already replace
//! their file. Object-store targets keep DataFusion's behaviour (new files are added).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::logical_expr::LogicalPlan;
use datafusion::logical_expr::dml::CopyTo;

use crate::error::{Error, Result};

/// A directory written under a temporary name, to be swapped into place.
#[derive(Debug)]
pub struct DirSwap {
    target: PathBuf,
    staging: PathBuf,
    done: bool,
}

/// The local directory a COPY writes to, if it writes a directory on the local file system.
fn local_dir_target(copy: &CopyTo) -> Option<PathBuf> {
    let url = copy.output_url.as_str();
    let path = match url.strip_prefix("file://") {
        Some(p) => p,
        None if url.contains("://") => return None,
        None => url,
    };
    let has_ext = Path::new(path).extension().is_some();
    let is_dir = url.ends_with('/') || !copy.partition_by.is_empty() || !has_ext;
    is_dir.then(|| PathBuf::from(path.trim_end_matches('/')))
}

/// Redirects a directory COPY to a staging directory; other plans pass through unchanged.
pub fn stage(plan: LogicalPlan) -> Result<(LogicalPlan, Option<DirSwap>)> {
    let LogicalPlan::Copy(copy) = plan else {
        return Ok((plan, None));
    };
    let Some(target) = local_dir_target(&copy) else {
        return Ok((LogicalPlan::Copy(copy), None));
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let staging = target.with_file_name(format!(".{name}.flumen-tmp-{}-{stamp}", std::process::id()));
    let staged = CopyTo {
        output_url: format!("{}/", staging.display()),
        input: Arc::clone(&copy.input),
        partition_by: copy.partition_by.clone(),
        file_type: Arc::clone(&copy.file_type),
        options: copy.options.clone(),
        output_schema: Arc::clone(&copy.output_schema),
    };
    Ok((
        LogicalPlan::Copy(staged),
        Some(DirSwap {
            target,
            staging,
            done: false,
        }),
    ))
}

impl DirSwap {
    /// Puts the staged directory in place of the target, then removes the old one.
    pub fn commit(mut self) -> Result<()> {
        let io = |what: &str, p: &Path, e| Error::io(format!("{what} {}", p.display()), e);
        if !self.staging.exists() {
            // The query returned no rows: the result is an empty directory.
            std::fs::create_dir_all(&self.staging).map_err(|e| io("creating", &self.staging, e))?;
        }
        let old = self.staging.with_extension("old");
        let had_old = self.target.exists();
        if had_old {
            std::fs::rename(&self.target, &old).map_err(|e| io("moving aside", &self.target, e))?;
        }
        if let Err(e) = std::fs::rename(&self.staging, &self.target) {
            if had_old {
                let _ = std::fs::rename(&old, &self.target);
            }
            return Err(io("moving into place", &self.target, e));
        }
        self.done = true;
        if had_old {
            std::fs::remove_dir_all(&old).map_err(|e| io("removing old output", &old, e))?;
        }
        Ok(())
    }
}

impl Drop for DirSwap {
    fn drop(&mut self) {
        if !self.done {
            // Failed or abandoned COPY: its partial output must not linger.
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}
