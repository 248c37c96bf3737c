//! A run's state on disk: its ledger, staging manifests, and the paths of staged and
//! dead-letter files. Everything lives under one state directory (default `.flumen/`):
//!
//! ```text
//! .flumen/runs/<run-id>.json                      the run ledger (status, sink counters, progress)
//! .flumen/runs/<run-id>.lock                      held (flock) by the process running or resuming it
//! .flumen/runs/<run-id>.journal.jsonl             the delivery journal (see super::journal)
//! .flumen/runs/<run-id>.sql                       the script, unsubstituted, for a replay
//! .flumen/staging/<run-id>/<table>/manifest.json  staged parts and whether each was delivered
//! .flumen/staging/<run-id>/<table>/part-<attempt>-N.parquet  rows that could not be delivered
//! .flumen/dead_letter/<run-id>/<table>/part-N.parquet  rejected rows + _error, _attempts, _at
//! ```
//!
//! Files are replaced atomically (write to a temporary name, then rename), so a crash leaves
//! either the old or the new version. Staged parts are named after the attempt (the process)
//! that wrote them and manifests are merged with what is on disk, so a replay never overwrites
//! what a killed attempt staged. Directories are made private (0700) and files 0600: staged rows,
//! dead letters and scripts are the user's data. `<table>` is the table's name with every byte
//! but letters, digits, `_` and `-` written as `%XX`, so two names never share a folder and no
//! name leaves its parent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::journal::{Journal, Replay, SinkReplay};
use super::metrics::{SinkMetrics, SinkMetricsSnapshot};
use crate::error::{Error, Result};

/// Where a run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Started and not finished (or the process died).
    Running,
    /// Every statement succeeded; nothing is staged.
    Succeeded,
    /// A statement failed.
    Failed,
    /// Rows are staged and wait for `flumen resume`.
    Spilled,
}

/// The ledger of one run: `runs/<run-id>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunLedger {
    /// The run.
    pub run_id: String,
    /// The script that ran, as the user named it.
    pub script: String,
    /// Status.
    pub status: RunStatus,
    /// When the run started (RFC 3339).
    pub started_at: String,
    /// When the ledger was last written (RFC 3339).
    pub updated_at: String,
    /// Counters per sink table.
    pub sinks: BTreeMap<String, SinkMetricsSnapshot>,
    /// Progress that sources record (a split finished, an offset), by key.
    pub progress: BTreeMap<String, String>,
    /// The last error, redacted.
    pub error: Option<String>,
    /// The process that last wrote the ledger.
    #[serde(default)]
    pub pid: u32,
    /// What each incremental write read and where its watermark moved.
    #[serde(default)]
    pub watermarks: Vec<String>,
}

impl RunLedger {
    /// Whether a process is running or resuming this run now: it holds the run's lock.
    pub fn is_live(&self, dir: &Path) -> bool {
        run_is_locked(dir, &self.run_id)
    }
}

/// Whether another process holds run `run_id`'s lock under `dir`.
pub fn run_is_locked(dir: &Path, run_id: &str) -> bool {
    let Ok(f) = std::fs::File::open(lock_path(dir, run_id)) else {
        return false;
    };
    matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock))
}

fn lock_path(dir: &Path, run_id: &str) -> PathBuf {
    dir.join("runs").join(format!("{run_id}.lock"))
}

/// Creates `dir` and its missing parents, private to the user (0700).
pub(crate) fn private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("creating {}", dir.display()), e))
    // (A directory that exists keeps its mode: it may be one the user named, such as `.`.)
}

/// Options that create a file private to the user (0600).
pub(crate) fn private_file_options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).mode(0o600);
    o
}

/// Writes `bytes` to a new private file at `path` (replacing it).
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = private_file_options()
        .truncate(true)
        .open(path)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
    f.write_all(bytes)
        .map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

/// One staged file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Part {
    /// File name inside the table's staging directory.
    pub file: String,
    /// Rows in it.
    pub rows: u64,
    /// The delivery token of the request it holds; `resume` sends it with the same token.
    pub token: String,
    /// Whether `resume` has delivered it.
    pub delivered: bool,
    /// When the part holds some rows of another request (those left of a partial answer):
    /// that request's token and the rows' indexes in it, from which item ids are derived.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<(String, Vec<u32>)>,
    /// Why the part will not be delivered although its rows were not (its broker messages were
    /// given back to the broker, which delivers them again); it then counts as delivered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<String>,
    /// The token the journal knows the request by, when it is not `token` (a part that holds
    /// the rows left of a partial answer is staged under the retry's token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

impl Part {
    /// The token the journal knows the part's request by.
    pub fn request_token(&self) -> &str {
        self.request.as_deref().unwrap_or(&self.token)
    }
}

/// The staging manifest of one table in one run.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Manifest {
    /// The run.
    pub run_id: String,
    /// The sink table.
    pub table: String,
    /// The `CREATE EXTERNAL TABLE` that made the table, with its `${VAR}`s unsubstituted, so
    /// `resume` can make it again without any secret having been written to disk.
    pub create_sql: Option<String>,
    /// The staged parts.
    pub parts: Vec<Part>,
}

/// Writes `value` as JSON to `path` atomically.
fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    if let Some(dir) = path.parent() {
        private_dir(dir)?;
    }
    // A temporary name of this writer's own: two writers of one file must not rename each
    // other's half-written text (the last complete one wins).
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("json.{}-{n}.tmp", std::process::id()));
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Config(format!("encoding {}: {e}", path.display())))?;
    write_private(&tmp, &text)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("replacing {}", path.display()), e))
}

/// Reads JSON from `path`.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    serde_json::from_slice(&text)
        .map_err(|e| Error::Config(format!("{} is not a valid flumen file: {e}", path.display())))
}

/// The state of the run in progress, shared by the engine and every sink of the session.
#[derive(Debug)]
pub struct RunState {
    run_id: String,
    dir: PathBuf,
    script: Mutex<String>,
    script_text: Mutex<Option<String>>,
    started_at: String,
    continued: bool,
    delivering_staged: AtomicBool,
    attempt: String,
    statement: AtomicUsize,
    scope: Mutex<String>,
    /// The origin of the staged part `resume` delivers now (see [`Part::origin`]).
    origin: Mutex<Option<(String, Vec<u32>)>>,
    /// The parts the running statement staged: (table, file, the request's journal token).
    statement_parts: Mutex<Vec<(String, String, String)>>,
    journal: Journal,
    replay: Mutex<Option<Replay>>,
    templates: Mutex<HashMap<String, String>>,
    sinks: Mutex<BTreeMap<String, Arc<SinkMetrics>>>,
    manifests: Mutex<HashMap<String, Manifest>>,
    parts: Mutex<HashMap<String, Arc<AtomicU64>>>,
    progress: Mutex<BTreeMap<String, String>>,
    watermarks: Mutex<Vec<String>>,
    /// Whether the running statement's input comes out the same when the run is replayed (no
    /// incremental bounds; brokers are checked at the sink).
    repeatable: AtomicBool,
    /// Side effects this run has done (from the journal, and as they happen).
    effects: Mutex<HashSet<String>>,
    /// The run's lock file, held while this process runs or resumes the run.
    lock: Mutex<Option<std::fs::File>>,
    /// Broker consumers of the running statement, waiting for its outcome.
    pending: crate::connector::broker::Pending,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A new, sortable, unique run id: UTC time and process id.
pub fn new_run_id() -> String {
    format!(
        "{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"),
        std::process::id()
    )
}

impl RunState {
    /// State for run `run_id` under `dir`; `continued` when `flumen resume` continues it.
    pub fn new(dir: impl Into<PathBuf>, run_id: String, continued: bool) -> Self {
        let dir = dir.into();
        Self {
            scope: Mutex::new(run_id.clone()),
            origin: Mutex::default(),
            statement_parts: Mutex::default(),
            journal: Journal::new(dir.join("runs").join(format!("{run_id}.journal.jsonl"))),
            // Unique to this process and this state: two attempts never share a name.
            attempt: {
                static STATES: AtomicU64 = AtomicU64::new(0);
                format!(
                    "a{}-{}-{}",
                    std::process::id(),
                    chrono::Utc::now().timestamp_millis(),
                    STATES.fetch_add(1, Ordering::Relaxed)
                )
            },
            run_id,
            dir,
            script: Mutex::new(String::new()),
            script_text: Mutex::new(None),
            started_at: now(),
            continued,
            delivering_staged: AtomicBool::new(false),
            statement: AtomicUsize::new(0),
            replay: Mutex::new(None),
            templates: Mutex::default(),
            sinks: Mutex::default(),
            manifests: Mutex::default(),
            parts: Mutex::default(),
            progress: Mutex::default(),
            watermarks: Mutex::default(),
            repeatable: AtomicBool::new(true),
            effects: Mutex::default(),
            lock: Mutex::default(),
            pending: Default::default(),
        }
    }

    /// Takes the run's lock (`runs/<run-id>.lock`), held until the process ends: one process
    /// at a time runs or resumes a run, and a run whose lock is free has no process left.
    pub fn acquire_lock(&self) -> Result<()> {
        let mut held = self
            .lock
            .lock()
            .map_err(|_| Error::Config("run lock poisoned".into()))?;
        if held.is_some() {
            return Ok(());
        }
        let path = lock_path(&self.dir, &self.run_id);
        if let Some(dir) = path.parent() {
            private_dir(dir)?;
        }
        let f = private_file_options()
            .open(&path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        // `flumen runs` checks liveness with a shared lock held for an instant: tries for 0.5 s.
        for _ in 0..25 {
            match f.try_lock() {
                Ok(()) => {
                    *held = Some(f);
                    return Ok(());
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io(format!("locking {}", path.display()), e));
                }
            }
        }
        Err(Error::Config(format!(
            "run {} is being run or resumed by another flumen process (it holds {}); wait for it to end",
            self.run_id,
            path.display()
        )))
    }

    /// The id of this process's attempt at the run (part of delivery tokens and staged part names).
    pub fn attempt(&self) -> &str {
        &self.attempt
    }

    /// Loads what earlier attempts of this run recorded: the side effects they did (never
    /// repeated) and, with `replay`, what they delivered (skipped when the script runs again).
    pub fn continue_from_journal(&self, replay: bool) -> Result<bool> {
        let loaded = Replay::load(self.journal.path())?;
        if let Ok(mut e) = self.effects.lock() {
            e.extend(loaded.effects().iter().cloned());
        }
        if !replay {
            return Ok(false);
        }
        let any = !loaded.is_empty();
        if let Ok(mut r) = self.replay.lock() {
            *r = Some(loaded);
        }
        // What the earlier attempt recorded as done (finished statements, source progress).
        if let (Ok(prev), Ok(mut p)) = (read_json::<RunLedger>(&self.ledger_path()), self.progress.lock()) {
            p.extend(prev.progress);
        }
        Ok(any)
    }

    /// Says whether the running statement's input reads the same in a replay (set by the
    /// engine before each write; see [`RunState::input_repeatable`]).
    pub fn set_input_repeatable(&self, yes: bool) {
        self.repeatable.store(yes, Ordering::Relaxed);
    }

    /// Whether the running statement reads the same rows when the run is replayed: no
    /// incremental source (whose bounds move) and no broker (whose messages are read again
    /// with any that arrived since).
    pub fn input_repeatable(&self) -> bool {
        self.repeatable.load(Ordering::Relaxed) && !self.pending.any()
    }

    /// Whether side effect `key` (`<table>/<what>`) was done by this run, in any attempt.
    pub fn effect_done(&self, key: &str) -> bool {
        self.effects.lock().map(|e| e.contains(key)).unwrap_or(false)
    }

    /// Records side effect `key` as done, in the journal first.
    pub fn record_effect(&self, key: &str) -> Result<()> {
        self.journal.effect(key)?;
        if let Ok(mut e) = self.effects.lock() {
            e.insert(key.to_string());
        }
        Ok(())
    }

    /// The broker consumers whose messages the running statement read: the engine acknowledges
    /// them when the statement commits and gives them back when it fails.
    pub fn pending(&self) -> &crate::connector::broker::Pending {
        &self.pending
    }

    /// The run id.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether `flumen resume` is delivering staged parts (failures then do not stage again).
    pub fn resuming(&self) -> bool {
        self.delivering_staged.load(Ordering::Relaxed)
    }

    /// Marks the start or end of delivering staged parts.
    pub fn set_delivering_staged(&self, on: bool) {
        self.delivering_staged.store(on, Ordering::Relaxed);
    }

    /// Names the script (and keeps its text, unsubstituted, for a replay), for the ledger.
    pub fn set_script(&self, script: &str, text: Option<&str>) {
        if let Ok(mut s) = self.script.lock() {
            *s = script.to_string();
        }
        if let (Some(t), Ok(mut s)) = (text, self.script_text.lock()) {
            *s = Some(t.to_string());
        }
    }

    /// The saved script text of this run (`runs/<run-id>.sql`), if it wrote to a sink.
    pub fn saved_script(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("runs").join(format!("{}.sql", self.run_id))).ok()
    }

    /// Starts a statement: delivery tokens get a prefix unique to this statement and process.
    pub fn begin_statement(&self, line: usize) {
        self.statement.store(line, Ordering::Relaxed);
        if let Ok(mut p) = self.statement_parts.lock() {
            p.clear();
        }
        self.set_scope(format!("{}/{}/l{line}", self.run_id, self.attempt));
    }

    /// The line of the statement running now.
    pub fn statement(&self) -> usize {
        self.statement.load(Ordering::Relaxed)
    }

    /// The delivery journal of this run.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// What an earlier attempt delivered for sink `key` (`table@l<line>`), when replaying (never
    /// while staged parts are delivered: their rows are the journal's staged ones).
    pub fn replay_for(&self, key: &str) -> Option<SinkReplay> {
        if self.resuming() {
            return None;
        }
        let guard = self.replay.lock().ok()?;
        let replay = guard.as_ref()?;
        Some(replay.sink(key).unwrap_or_default())
    }

    /// Sets the prefix of delivery tokens (resume uses a staged part's own token).
    pub fn set_scope(&self, scope: String) {
        if let Ok(mut s) = self.scope.lock() {
            *s = scope;
        }
    }

    /// Where the rows of the staged part being delivered came from (see [`Part::origin`]).
    pub fn set_origin(&self, origin: Option<(String, Vec<u32>)>) {
        if let Ok(mut o) = self.origin.lock() {
            *o = origin;
        }
    }

    /// See [`RunState::set_origin`].
    pub fn origin(&self) -> Option<(String, Vec<u32>)> {
        self.origin.lock().ok().and_then(|o| o.clone())
    }

    /// The tokens of the parts staged for `table` in this run (from the manifest on disk).
    pub fn staged_tokens(&self, table: &str) -> Result<HashSet<String>> {
        let path = self.staging_dir(table).join("manifest.json");
        if !path.exists() {
            return Ok(HashSet::new());
        }
        Ok(read_json::<Manifest>(&path)?
            .parts
            .into_iter()
            .filter(|p| p.dropped.is_none())
            .map(|p| p.request_token().to_string())
            .collect())
    }

    /// The current token prefix.
    pub fn scope(&self) -> String {
        self.scope.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Remembers the unsubstituted `CREATE` statement of a table, for `resume`.
    pub fn record_template(&self, table: &str, create_sql: &str) {
        if let Ok(mut t) = self.templates.lock() {
            t.insert(table.to_string(), create_sql.to_string());
        }
    }

    /// The unsubstituted `CREATE` statement of a table this run created, if any.
    pub fn template(&self, table: &str) -> Option<String> {
        self.templates.lock().ok()?.get(table).cloned()
    }

    /// The counters of a sink table, created on first use.
    pub fn metrics_for(&self, table: &str) -> Arc<SinkMetrics> {
        match self.sinks.lock() {
            Ok(mut s) => Arc::clone(s.entry(table.to_string()).or_default()),
            Err(_) => Arc::new(SinkMetrics::default()),
        }
    }

    /// Ends the ledger of a run that wrote to a sink: succeeded, or with `error` spilled (rows
    /// wait in staging) or failed. A run that wrote to no sink keeps no ledger.
    pub fn finish(&self, error: Option<String>) -> Result<()> {
        let sinks = self.sink_snapshots();
        if sinks.is_empty() && !self.ledger_path().exists() {
            return Ok(());
        }
        let staged = staged_rows(&self.dir, &self.run_id)?.values().any(|n| *n > 0);
        let status = match &error {
            None if staged => RunStatus::Spilled,
            None => RunStatus::Succeeded,
            Some(_) if staged => RunStatus::Spilled,
            Some(_) => RunStatus::Failed,
        };
        self.write_ledger(status, error)
    }

    /// Every sink's counters.
    pub fn sink_snapshots(&self) -> BTreeMap<String, SinkMetricsSnapshot> {
        self.sinks
            .lock()
            .map(|s| s.iter().map(|(k, v)| (k.clone(), v.snapshot())).collect())
            .unwrap_or_default()
    }

    /// `staging/<run-id>/<table>/`.
    pub fn staging_dir(&self, table: &str) -> PathBuf {
        self.dir.join("staging").join(&self.run_id).join(safe_name(table))
    }

    /// `dead_letter/<run-id>/<table>/`.
    pub fn dead_letter_dir(&self, table: &str) -> PathBuf {
        self.dir
            .join("dead_letter")
            .join(&self.run_id)
            .join(safe_name(table))
    }

    /// A new file `<prefix>-<n>.parquet` in `table`'s dead letters. A resumed run counts parts
    /// from 0 again, so the names an earlier attempt used are skipped, never overwritten.
    pub fn new_dead_letter_file(&self, table: &str, prefix: &str) -> PathBuf {
        let dir = self.dead_letter_dir(table);
        loop {
            let part = self.next_part(&format!("dead/{table}"));
            let path = dir.join(format!("{prefix}-{part}.parquet"));
            if !path.exists() {
                return path;
            }
        }
    }

    /// A new staged part of `table`: its path and file name, `part-<attempt>-<n>.parquet`, which
    /// no other attempt of the run can use.
    pub fn new_staging_file(&self, table: &str) -> (PathBuf, String) {
        let dir = self.staging_dir(table);
        loop {
            let n = self.next_part(&format!("staging/{table}"));
            let file = format!("part-{}-{n}.parquet", self.attempt);
            let path = dir.join(&file);
            if !path.exists() {
                return (path, file);
            }
        }
    }

    /// The next part number of a table's staging or dead-letter files.
    pub fn next_part(&self, key: &str) -> u64 {
        let counter = match self.parts.lock() {
            Ok(mut p) => Arc::clone(p.entry(key.to_string()).or_default()),
            Err(_) => Arc::new(AtomicU64::new(0)),
        };
        counter.fetch_add(1, Ordering::Relaxed)
    }

    /// Records a staged part in the table's manifest (written to disk before returning). The
    /// manifest an earlier attempt wrote is read first and kept: parts are only ever added.
    pub fn add_staged_part(&self, table: &str, part: Part) -> Result<()> {
        let mut manifests = self
            .manifests
            .lock()
            .map_err(|_| Error::Config("staging manifest lock poisoned".into()))?;
        let path = self.staging_dir(table).join("manifest.json");
        let m = match manifests.entry(table.to_string()) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let mut m = if path.exists() {
                    read_json::<Manifest>(&path)?
                } else {
                    Manifest {
                        run_id: self.run_id.clone(),
                        table: table.to_string(),
                        create_sql: None,
                        parts: Vec::new(),
                    }
                };
                if m.create_sql.is_none() {
                    m.create_sql = self.templates.lock().ok().and_then(|t| t.get(table).cloned());
                }
                v.insert(m)
            }
        };
        if let Ok(mut p) = self.statement_parts.lock() {
            p.push((
                table.to_string(),
                part.file.clone(),
                part.request_token().to_string(),
            ));
        }
        m.parts.push(part);
        write_json(&path, m)
    }

    /// Gives up the parts the running statement staged, saying `why` in their manifests: the
    /// statement failed and its broker messages went back to the broker, which delivers them
    /// again, so delivering the parts too would write their rows twice.
    pub fn drop_statement_parts(&self, why: &str) -> Result<()> {
        let parts = self
            .statement_parts
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default();
        let mut manifests = self
            .manifests
            .lock()
            .map_err(|_| Error::Config("staging manifest lock poisoned".into()))?;
        // Every part is tried, whatever fails for one of them: the first error is returned.
        let mut first = None;
        let mut touched = std::collections::BTreeSet::new();
        for (table, file, request) in parts {
            // The journal first: a replay then sends the rows again rather than skip them.
            if let Err(e) = self.journal.dropped(&request) {
                first.get_or_insert(e);
                continue;
            }
            if let Some(m) = manifests.get_mut(&table) {
                for p in m.parts.iter_mut().filter(|p| p.file == file) {
                    p.delivered = true;
                    p.dropped = Some(why.to_string());
                }
                touched.insert(table);
            }
        }
        // Each manifest written once, with all of its parts marked.
        for table in touched {
            if let Some(m) = manifests.get(&table)
                && let Err(e) = write_json(&self.staging_dir(&table).join("manifest.json"), m)
            {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }

    /// Records a source's progress under `key` and writes the ledger at once.
    /// Runs without a ledger yet (no sink written so far) keep it in memory until one is written.
    pub fn record_progress(&self, key: &str, value: &str) -> Result<()> {
        if let Ok(mut p) = self.progress.lock() {
            p.insert(key.to_string(), value.to_string());
        }
        if self.ledger_path().exists() {
            self.write_ledger(RunStatus::Running, None)?;
        }
        Ok(())
    }

    /// Whether a replay is running (the run died and `flumen resume` runs its script again).
    pub fn replaying(&self) -> bool {
        self.replay.lock().map(|r| r.is_some()).unwrap_or(false)
    }

    /// The progress a source recorded under `key` in this run.
    pub fn progress(&self, key: &str) -> Option<String> {
        self.progress.lock().ok().and_then(|p| p.get(key).cloned())
    }

    /// The ledger's path.
    pub fn ledger_path(&self) -> PathBuf {
        self.dir.join("runs").join(format!("{}.json", self.run_id))
    }

    /// Notes what an incremental write read and where its watermark moved (for the ledger).
    pub fn record_watermark(&self, line: &str) {
        if let Ok(mut w) = self.watermarks.lock() {
            w.push(line.to_string());
        }
    }

    /// Writes the ledger with `status` (and the error that ended the run, redacted).
    pub fn write_ledger(&self, status: RunStatus, error: Option<String>) -> Result<()> {
        let mut sinks = self.sink_snapshots();
        let mut script = self.script.lock().map(|s| s.clone()).unwrap_or_default();
        let mut started_at = self.started_at.clone();
        // Whoever writes a run's ledger holds the run.
        self.acquire_lock()?;
        if let Ok(Some(text)) = self.script_text.lock().map(|t| t.clone()) {
            let path = self.dir.join("runs").join(format!("{}.sql", self.run_id));
            if !path.exists() {
                if let Some(dir) = path.parent() {
                    private_dir(dir)?;
                }
                write_private(&path, text.as_bytes())?;
            }
        }
        // A resumed run adds to the counters the original run recorded and keeps its identity.
        if self.continued
            && let Ok(prev) = read_json::<RunLedger>(&self.ledger_path())
        {
            script = prev.script;
            started_at = prev.started_at;
            for (t, m) in prev.sinks {
                let entry = sinks.entry(t).or_default();
                let mut total = m;
                total.add(entry);
                *entry = total;
            }
        }
        // Spilled: the rows staged now and not delivered yet, as the manifests say.
        let staged = staged_rows(&self.dir, &self.run_id)?;
        for (t, m) in sinks.iter_mut() {
            m.spilled = staged.get(t).copied().unwrap_or(0);
        }
        let ledger = RunLedger {
            run_id: self.run_id.clone(),
            script,
            status,
            started_at,
            updated_at: now(),
            sinks,
            progress: self.progress.lock().map(|p| p.clone()).unwrap_or_default(),
            error,
            pid: std::process::id(),
            watermarks: self.watermarks.lock().map(|w| w.clone()).unwrap_or_default(),
        };
        write_json(&self.ledger_path(), &ledger)
    }
}

/// A name as one path component: letters, digits, `_` and `-` as they are, every other byte as
/// `%XX`. Distinct names give distinct components, and none is `.`, `..` or holds a `/`.
pub(crate) fn safe_name(name: &str) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    if out.is_empty() {
        out.push_str("%00");
    }
    out
}

/// Undelivered staged rows of a run, by table.
pub fn staged_rows(dir: &Path, run_id: &str) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for (_, m) in run_manifests(dir, run_id)? {
        let n: u64 = m.parts.iter().filter(|p| !p.delivered).map(|p| p.rows).sum();
        *out.entry(m.table).or_insert(0) += n;
    }
    Ok(out)
}

/// All run ledgers under `dir`, oldest first.
pub fn list_runs(dir: &Path) -> Result<Vec<RunLedger>> {
    let runs = dir.join("runs");
    let Ok(entries) = std::fs::read_dir(&runs) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<RunLedger> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| read_json(&p).ok())
        .collect();
    out.sort_by(|a, b| a.run_id.cmp(&b.run_id));
    Ok(out)
}

/// The staging manifests of a run.
pub fn run_manifests(dir: &Path, run_id: &str) -> Result<Vec<(PathBuf, Manifest)>> {
    let staging = dir.join("staging").join(run_id);
    let Ok(entries) = std::fs::read_dir(&staging) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for e in entries.filter_map(|e| e.ok()) {
        let path = e.path().join("manifest.json");
        if path.is_file() {
            out.push((e.path(), read_json::<Manifest>(&path)?));
        }
    }
    out.sort_by(|a, b| a.1.table.cmp(&b.1.table));
    Ok(out)
}

/// Marks one part of a manifest delivered, on disk.
pub fn mark_delivered(table_dir: &Path, file: &str) -> Result<()> {
    let path = table_dir.join("manifest.json");
    let mut m: Manifest = read_json(&path)?;
    for p in m.parts.iter_mut().filter(|p| p.file == file) {
        p.delivered = true;
    }
    write_json(&path, &m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_and_ledger_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = RunState::new(dir.path(), "r1".into(), false);
        s.record_template("t", "CREATE EXTERNAL TABLE t STORED AS X LOCATION '${LOC}'");
        s.add_staged_part(
            "t",
            Part {
                file: "part-0.parquet".into(),
                rows: 5,
                token: "r1/t/0".into(),
                delivered: false,
                origin: None,
                dropped: None,
                request: None,
            },
        )
        .unwrap();
        s.metrics_for("t").spilled(5);
        s.write_ledger(RunStatus::Spilled, None).unwrap();
        assert_eq!(list_runs(dir.path()).unwrap()[0].sinks["t"].spilled, 5);
        let ms = run_manifests(dir.path(), "r1").unwrap();
        assert_eq!(ms.len(), 1);
        assert_eq!(
            ms[0].1.create_sql.as_deref(),
            Some("CREATE EXTERNAL TABLE t STORED AS X LOCATION '${LOC}'")
        );
        mark_delivered(&ms[0].0, "part-0.parquet").unwrap();
        assert!(run_manifests(dir.path(), "r1").unwrap()[0].1.parts[0].delivered);
        let runs = list_runs(dir.path()).unwrap();
        assert_eq!(runs[0].status, RunStatus::Spilled);
        assert_eq!(runs[0].sinks["t"].spilled, 5);
    }

    #[test]
    fn progress_is_recorded_in_the_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let s = RunState::new(dir.path(), "r2".into(), false);
        s.write_ledger(RunStatus::Running, None).unwrap();
        s.record_progress("files/orders.csv", "done").unwrap();
        assert_eq!(s.progress("files/orders.csv").as_deref(), Some("done"));
        assert_eq!(
            list_runs(dir.path()).unwrap()[0].progress["files/orders.csv"],
            "done"
        );
    }

    #[test]
    fn names_become_distinct_safe_file_names() {
        assert_eq!(safe_name("orders_2026-x"), "orders_2026-x");
        assert_eq!(safe_name("db.\"we/ird\" t"), "db%2E%22we%2Fird%22%20t");
        assert_eq!(safe_name(".."), "%2E%2E");
        assert_eq!(safe_name(""), "%00");
        assert_ne!(safe_name("a b"), safe_name("a_b"));
    }

    #[test]
    fn one_process_holds_a_run() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunState::new(dir.path(), "r3".into(), false);
        assert!(!run_is_locked(dir.path(), "r3"));
        a.acquire_lock().unwrap();
        a.acquire_lock().unwrap();
        let b = RunState::new(dir.path(), "r3".into(), true);
        let e = b.acquire_lock().unwrap_err().to_string();
        assert!(e.contains("another flumen process"), "{e}");
        assert!(run_is_locked(dir.path(), "r3"));
        drop(a);
        assert!(!run_is_locked(dir.path(), "r3"));
        b.acquire_lock().unwrap();
    }

    #[test]
    fn a_later_attempt_adds_to_the_manifest_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let part = |file: &str| Part {
            file: file.into(),
            rows: 1,
            token: "t".into(),
            delivered: false,
            origin: None,
            dropped: None,
            request: None,
        };
        let first = RunState::new(dir.path(), "r4".into(), false);
        let (_, f1) = first.new_staging_file("t");
        first.add_staged_part("t", part(&f1)).unwrap();
        let second = RunState::new(dir.path(), "r4".into(), true);
        let (_, f2) = second.new_staging_file("t");
        assert_ne!(f1, f2, "part names are per attempt");
        second.add_staged_part("t", part(&f2)).unwrap();
        let files: Vec<String> = run_manifests(dir.path(), "r4").unwrap()[0]
            .1
            .parts
            .iter()
            .map(|p| p.file.clone())
            .collect();
        assert_eq!(files, vec![f1, f2]);
        assert_eq!(staged_rows(dir.path(), "r4").unwrap()["t"], 2);
    }
}
