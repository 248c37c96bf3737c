//! `COPY ... TO 'dir/'` on the local file system replaces the directory, atomically.
//!
//! DataFusion's COPY adds new files next to whatever a directory already holds, so running a job
//! twice would double its output. flumen writes a directory COPY into a fresh sibling directory
//! (`.<name>.flumen-tmp-<pid>-<nanos>`) and swaps it into place only after every file is written:
//! a failed COPY leaves the old output untouched, a successful one leaves exactly the query's rows.
//! Single-file COPYs already replace their file. Object-store targets keep DataFusion's behaviour
//! (new files are added).
//!
//! The swap is one `renameat2(RENAME_EXCHANGE)` on Linux: there is no moment without a target.
//! Where the file system cannot exchange (or off Linux) it falls back to two renames, with a
//! moment between them where the target is absent. A COPY holds a lock file beside its staging
//! directory while it runs; the next COPY to the same target removes the staging directories of
//! COPYs that were killed (their lock is free).
//!
//! A COPY replaces only what looks like an earlier output: a directory holding data files
//! (`.parquet`, `.csv`, `.json`, ... optionally compressed), `key=value` partition directories
//! and hidden files. Anything else (a source tree, a home directory, `/`) is refused, so a
//! wrong variable cannot delete a directory that was never a COPY's.

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
    /// Held while the COPY runs: its staging directory is not an orphan.
    lock: Option<(PathBuf, std::fs::File)>,
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

const DATA_EXTENSIONS: &[&str] = &[
    "parquet", "csv", "tsv", "json", "ndjson", "jsonl", "arrow", "ipc", "feather", "avro", "txt",
];
const COMPRESSED: &[&str] = &["gz", "bz2", "xz", "zst", "zstd", "lz4", "snappy"];

/// Whether `dir` holds only what a COPY writes (data files, `key=value` folders, hidden files).
fn looks_like_output(dir: &Path, depth: usize) -> std::result::Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot list it: {e}"))?;
    for e in entries {
        let e = e.map_err(|e| format!("cannot list it: {e}"))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let kind = e.file_type().map_err(|e| format!("{name}: {e}"))?;
        if kind.is_dir() {
            if depth < 16 && name.contains('=') {
                looks_like_output(&e.path(), depth + 1).map_err(|w| format!("{name}/{w}"))?;
                continue;
            }
            return Err(format!("it holds the folder {name}"));
        }
        let mut parts = name.rsplit('.');
        let last = parts.next().unwrap_or_default().to_ascii_lowercase();
        let data = DATA_EXTENSIONS.contains(&last.as_str())
            || COMPRESSED.contains(&last.as_str())
                && parts
                    .next()
                    .is_some_and(|x| DATA_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()));
        if !data || !kind.is_file() {
            return Err(format!("it holds {name}, which is not a data file"));
        }
    }
    Ok(())
}

/// Refuses targets a COPY must never replace.
fn check_target(target: &Path) -> Result<()> {
    let refuse = |why: String| {
        Err(Error::Config(format!(
            "COPY would replace {}, but {why}; COPY to a new or earlier output folder, or remove it first",
            target.display()
        )))
    };
    let Ok(abs) = std::path::absolute(target).map(|p| normalize(&p)) else {
        return refuse("its absolute path cannot be known".into());
    };
    if abs.parent().is_none() {
        return refuse("it is the root folder".into());
    }
    if let Ok(cwd) = std::env::current_dir()
        && cwd.starts_with(&abs)
    {
        return refuse("it holds the current folder".into());
    }
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from)
        && home.starts_with(&abs)
    {
        return refuse("it holds the home folder".into());
    }
    match std::fs::symlink_metadata(target) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_dir() => refuse("it is not a folder".into()),
        Ok(_) => match looks_like_output(target, 0) {
            Ok(()) => Ok(()),
            Err(why) => refuse(format!("it does not look like a COPY's output ({why})")),
        },
    }
}

/// `p` with `.` and `..` resolved lexically.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The prefix of the staging names of COPYs to `target`: `.<name>.flumen-tmp-`.
fn staging_prefix(target: &Path) -> String {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    format!(".{name}.flumen-tmp-")
}

/// Removes what killed COPYs to `target` left beside it: staging folders whose lock is free.
fn remove_orphans(target: &Path) {
    let Some(parent) = target.parent().map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    }) else {
        return;
    };
    let prefix = staging_prefix(target);
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&prefix) && name.ends_with(".lock.new") {
            // A COPY killed between making its lock and naming it (a minute old: one that is
            // starting now holds it unlocked for an instant).
            let stale = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| {
                t.elapsed()
                    .is_ok_and(|age| age > std::time::Duration::from_secs(60))
            });
            if stale && std::fs::File::open(e.path()).is_ok_and(|f| f.try_lock().is_ok()) {
                let _ = std::fs::remove_file(e.path());
            }
            continue;
        }
        if !name.starts_with(&prefix) || name.ends_with(".lock") {
            continue;
        }
        // `<staging>` and the `<staging>.old` an older flumen made share the staging's lock.
        let base = name.strip_suffix(".old").unwrap_or(&name);
        let lock = parent.join(format!("{base}.lock"));
        let free = match std::fs::File::open(&lock) {
            Ok(f) => f.try_lock().is_ok(),
            // No lock file: made by a flumen before locks, alive only if its process is.
            Err(_) => {
                let pid = base[prefix.len()..].split('-').next().unwrap_or_default();
                !pid.is_empty() && !Path::new(&format!("/proc/{pid}")).exists()
            }
        };
        if free {
            tracing::info!(
                "removing {}, left by a COPY that did not finish",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
            let _ = std::fs::remove_file(&lock);
        }
    }
}

/// Redirects a directory COPY to a staging directory; other plans pass through unchanged.
pub fn stage(plan: LogicalPlan) -> Result<(LogicalPlan, Option<DirSwap>)> {
    let LogicalPlan::Copy(copy) = plan else {
        return Ok((plan, None));
    };
    let Some(target) = local_dir_target(&copy) else {
        return Ok((LogicalPlan::Copy(copy), None));
    };
    check_target(&target)?;
    remove_orphans(&target);
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let staging = target.with_file_name(format!(
        "{}{}-{stamp}",
        staging_prefix(&target),
        std::process::id()
    ));
    let lock_path = staging.with_file_name(format!(
        "{}.lock",
        staging
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    }
    // Locked under a name the orphan sweep leaves alone while it is young, then renamed: no COPY
    // ever sees it unlocked.
    let fresh = lock_path.with_file_name(format!(
        "{}.new",
        lock_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let lock =
        std::fs::File::create(&fresh).map_err(|e| Error::io(format!("creating {}", fresh.display()), e))?;
    lock.try_lock()
        .map_err(|e| Error::Config(format!("locking {}: {e}", fresh.display())))?;
    std::fs::rename(&fresh, &lock_path)
        .map_err(|e| Error::io(format!("creating {}", lock_path.display()), e))?;
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
            lock: Some((lock_path, lock)),
            done: false,
        }),
    ))
}

/// Swaps two paths in one step (`renameat2(RENAME_EXCHANGE)`); `Ok(false)` where the system
/// or file system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them like rename(2).
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<bool> {
    Ok(false)
}

impl DirSwap {
    /// Puts the staged directory in place of the target, then removes the old one.
    pub fn commit(mut self) -> Result<()> {
        let io = |what: &str, p: &Path, e| Error::io(format!("{what} {}", p.display()), e);
        if !self.staging.exists() {
            // The query returned no rows: the result is an empty directory.
            std::fs::create_dir_all(&self.staging).map_err(|e| io("creating", &self.staging, e))?;
        }
        if !self.target.exists() {
            std::fs::rename(&self.staging, &self.target)
                .map_err(|e| io("moving into place", &self.target, e))?;
            self.done = true;
            return Ok(());
        }
        // The old output is checked again: it may have changed while the query ran.
        check_target(&self.target)?;
        if exchange(&self.staging, &self.target).map_err(|e| io("swapping into place", &self.target, e))? {
            // The staging name now holds the old output.
            self.done = true;
            std::fs::remove_dir_all(&self.staging)
                .map_err(|e| io("removing old output", &self.staging, e))?;
            return Ok(());
        }
        // No exchange here: two renames, with a moment where the target is absent.
        let old = self.staging.with_file_name(format!(
            "{}.old",
            self.staging
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        std::fs::rename(&self.target, &old).map_err(|e| io("moving aside", &self.target, e))?;
        if let Err(e) = std::fs::rename(&self.staging, &self.target) {
            let _ = std::fs::rename(&old, &self.target);
            return Err(io("moving into place", &self.target, e));
        }
        self.done = true;
        std::fs::remove_dir_all(&old).map_err(|e| io("removing old output", &old, e))
    }
}

impl Drop for DirSwap {
    fn drop(&mut self) {
        if !self.done {
            // Failed or abandoned COPY: its partial output must not linger.
            let _ = std::fs::remove_dir_all(&self.staging);
        }
        if let Some((path, _)) = self.lock.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_earlier_outputs_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("country=DE")).unwrap();
        std::fs::write(out.join("country=DE/part-0.parquet"), b"x").unwrap();
        std::fs::write(out.join("a.csv.gz"), b"x").unwrap();
        std::fs::write(out.join("_SUCCESS"), b"").unwrap();
        check_target(&out).unwrap();
        std::fs::write(out.join("main.rs"), b"fn main() {}").unwrap();
        let e = check_target(&out).unwrap_err().to_string();
        assert!(e.contains("main.rs"), "{e}");
        let e = check_target(Path::new("/")).unwrap_err().to_string();
        assert!(e.contains("root"), "{e}");
        let e = check_target(&std::env::current_dir().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("current folder"), "{e}");
        let e = check_target(Path::new("src/..")).unwrap_err().to_string();
        assert!(e.contains("current folder"), "{e}");
    }

    #[test]
    fn the_swap_leaves_one_target_and_no_staging() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir_all(&target).unwrap();
        std::fs::write(target.join("old.parquet"), b"old").unwrap();
        let staging = dir.path().join(".out.flumen-tmp-1-2");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::write(staging.join("new.parquet"), b"new").unwrap();
        let swap = DirSwap {
            target: target.clone(),
            staging: staging.clone(),
            lock: None,
            done: false,
        };
        swap.commit().unwrap();
        assert!(target.join("new.parquet").exists() && !target.join("old.parquet").exists());
        assert!(!staging.exists());
    }

    #[test]
    fn orphans_of_killed_copies_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let dead = dir.path().join(".out.flumen-tmp-1-1");
        let live = dir.path().join(".out.flumen-tmp-2-2");
        for d in [&dead, &live] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::File::create(dir.path().join(".out.flumen-tmp-1-1.lock")).unwrap();
        let held = std::fs::File::create(dir.path().join(".out.flumen-tmp-2-2.lock")).unwrap();
        held.lock().unwrap();
        remove_orphans(&target);
        assert!(!dead.exists(), "a staging folder whose lock is free is an orphan");
        assert!(live.exists(), "a running COPY's staging folder stays");
    }
}
