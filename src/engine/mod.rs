//! The engine: one DataFusion session, scripts split into statements, `${VAR}` substitution,
//! memory limits and spilling, and statement planning and execution.

mod copy;
mod globs;
pub mod incremental;
mod lenient;
mod modified;
mod redact;
mod resume;
mod run;
pub mod script;
mod stores;
mod views;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::common::GetExt;
use datafusion::datasource::MemTable;
use datafusion::datasource::file_format::json::JsonFormatFactory;
use datafusion::datasource::file_format::{FileFormat, FileFormatFactory};
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::memory_pool::{FairSpillPool, TrackConsumersPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::logical_expr::{DdlStatement, LogicalPlan};
use datafusion::physical_plan::{ExecutionPlan, SendableRecordBatchStream, execute_stream};
use datafusion::prelude::{SessionConfig, SessionContext};

pub use redact::{MASK, Redactor, is_secret_option};
pub use resume::ResumeReport;
pub use run::{Mode, RunOptions, SqlOutput, count_of};
pub use script::{Statement, Variables};
pub use stores::LazyStoreRegistry;

use crate::connector::Registry;
use crate::error::{Error, Result};
use crate::sink::{RunState, new_run_id};

/// How a [`Flumen`] engine is set up.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Memory the query engine may use, in bytes; operators spill to disk beyond it.
    /// Default: [`default_memory_limit`].
    pub memory_limit: Option<u64>,
    /// Where operators spill; default: the system temporary directory.
    pub spill_dir: Option<PathBuf>,
    /// Parallel partitions per query; default: the number of cores.
    pub target_partitions: Option<usize>,
    /// Rows per record batch; default: DataFusion's 8192.
    pub batch_size: Option<usize>,
    /// `--set` variables; the environment is consulted after them.
    pub vars: HashMap<String, String>,
    /// Connectors; `None` means [`Registry::builtin`].
    pub registry: Option<Registry>,
    /// Where runs keep their ledger, staging and dead letters; default `.flumen`.
    pub state_dir: Option<PathBuf>,
    /// The run to continue (`flumen resume`); default a new run id.
    pub resume_run: Option<String>,
    /// Where materialized views are kept; default `warehouse/` in the state directory.
    pub warehouse: Option<PathBuf>,
    /// A Ballista scheduler (`df://host:port`) to plan and run queries on; default: this
    /// process. Needs the `cluster` feature.
    pub cluster: Option<String>,
}

/// Half of the machine's memory, read from `/proc/meminfo`; 4 GiB where that is unavailable.
pub fn default_memory_limit() -> u64 {
    total_memory().map_or(4 << 30, |t| t / 2)
}

fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Lets `SELECT * FROM 'events.ndjson'` find the JSON reader: DataFusion picks a file's format
/// by its extension and knows `.json` only.
#[derive(Debug)]
struct NdjsonExtension(JsonFormatFactory);

impl GetExt for NdjsonExtension {
    fn get_ext(&self) -> String {
        "ndjson".into()
    }
}

impl FileFormatFactory for NdjsonExtension {
    fn create(
        &self,
        state: &dyn datafusion::catalog::Session,
        options: &HashMap<String, String>,
    ) -> datafusion::error::Result<Arc<dyn FileFormat>> {
        self.0.create(state, options)
    }

    fn default(&self) -> Arc<dyn FileFormat> {
        self.0.default()
    }
}

/// What kind of statement a plan is; decides how it runs and how its result is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatementKind {
    /// Returns rows: SELECT, VALUES, SHOW, DESCRIBE, EXPLAIN.
    Query,
    /// Writes rows and returns a count: INSERT, COPY.
    Write,
    /// Changes the catalog or settings: CREATE, DROP, SET. Runs when planned.
    Ddl,
    /// `CREATE TABLE ... AS SELECT`: a query whose rows fill an in-memory table.
    CreateTableAs,
}

impl StatementKind {
    fn of(plan: &LogicalPlan) -> Self {
        match plan {
            LogicalPlan::Dml(_) | LogicalPlan::Copy(_) => Self::Write,
            LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(_)) => Self::CreateTableAs,
            LogicalPlan::Ddl(_) | LogicalPlan::Statement(_) => Self::Ddl,
            _ => Self::Query,
        }
    }
}

/// A statement that is executing: its physical plan (for progress) and its output rows.
pub struct Running {
    /// What kind of statement.
    pub kind: StatementKind,
    /// The physical plan, watched for progress; `None` for DDL.
    pub plan: Option<Arc<dyn ExecutionPlan>>,
    /// The rows it returns: a query's result, a write's count, nothing for DDL.
    pub stream: Option<SendableRecordBatchStream>,
    /// Work to finish once the stream is drained (a directory COPY's swap into place).
    commit: Option<copy::DirSwap>,
}

impl Running {
    /// Completes the statement after its stream has been drained without error.
    pub fn commit(&mut self) -> Result<()> {
        match self.commit.take() {
            Some(swap) => swap.commit(),
            None => Ok(()),
        }
    }
}

/// The flumen engine: one DataFusion session that runs SQL scripts statement by statement.
pub struct Flumen {
    ctx: SessionContext,
    vars: Variables,
    redactor: Redactor,
    registry: Registry,
    memory_limit: u64,
    run: Arc<RunState>,
    warehouse: crate::cube::mv::Warehouse,
    /// Set once the warehouse's views are registered in the session.
    views_registered: tokio::sync::OnceCell<()>,
    /// Source tables read incrementally, by lower-case name.
    incremental: std::sync::RwLock<HashMap<String, incremental::Spec>>,
    /// CSV tables declared `'strict' 'true'`, by lower-case name.
    strict: std::sync::RwLock<std::collections::HashSet<String>>,
    /// Queries run on a Ballista cluster (`--cluster`).
    cluster: Option<String>,
}

impl std::fmt::Debug for Flumen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flumen")
            .field("memory_limit", &self.memory_limit)
            .field("connectors", &self.registry.names().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Flumen {
    /// Builds the session: memory pool with spilling, object stores from the environment,
    /// file formats and connectors, `SELECT ... FROM 'path'` enabled.
    pub fn new(config: Config) -> Result<Self> {
        let memory_limit = config.memory_limit.unwrap_or_else(default_memory_limit);
        let pool = TrackConsumersPool::new(
            FairSpillPool::new(memory_limit as usize),
            std::num::NonZeroUsize::new(5).unwrap_or(std::num::NonZeroUsize::MIN),
        );
        let mut disk = DiskManagerBuilder::default();
        if let Some(dir) = &config.spill_dir {
            crate::sink::private_dir(dir)?;
            disk = disk.with_mode(DiskManagerMode::Directories(vec![dir.clone()]));
        }
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(pool))
            .with_disk_manager_builder(disk)
            .with_object_store_registry(Arc::new(LazyStoreRegistry::new()))
            .build_arc()?;
        let state_dir = config
            .state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(".flumen"));
        let warehouse = crate::cube::mv::Warehouse::new(
            config
                .warehouse
                .clone()
                .unwrap_or_else(|| state_dir.join("warehouse")),
        );
        let run = Arc::new(RunState::new(
            state_dir,
            config.resume_run.clone().unwrap_or_else(new_run_id),
            config.resume_run.is_some(),
        ));
        let mut session = SessionConfig::new()
            .with_extension(Arc::clone(&run))
            .with_information_schema(true)
            .with_create_default_catalog_and_schema(true);
        if let Some(n) = config.target_partitions {
            session = session.with_target_partitions(n.max(1));
        }
        if let Some(n) = config.batch_size {
            session = session.with_batch_size(n.max(1));
        }
        let registry = config.registry.unwrap_or_else(Registry::builtin);
        let cluster = config.cluster.is_some();
        let installed = cluster_registry(&registry, cluster);
        let builder = SessionStateBuilder::new()
            .with_config(session)
            .with_runtime_env(runtime)
            .with_default_features();
        let mut state = installed.install(builder).build();
        state.register_file_format(Arc::new(NdjsonExtension(JsonFormatFactory::new())), false)?;
        let state = on_cluster(state, config.cluster.as_deref(), run.dir())?;
        let ctx = SessionContext::new_with_state(state).enable_url_table();
        // Full-text search, pushed into searches of ELASTICSEARCH tables.
        ctx.register_udf(datafusion::logical_expr::ScalarUDF::from(
            crate::connector::elasticsearch::udf::MatchUdf::default(),
        ));
        Ok(Self {
            ctx,
            vars: Variables::new(config.vars),
            redactor: Redactor::default(),
            registry,
            memory_limit,
            run,
            warehouse,
            views_registered: tokio::sync::OnceCell::new(),
            incremental: std::sync::RwLock::new(HashMap::new()),
            strict: Default::default(),
            cluster: config.cluster.clone(),
        })
    }

    /// Whether queries run on a Ballista cluster.
    pub fn on_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    /// Registers the warehouse's materialized views, once per engine.
    async fn register_views(&self) -> Result<()> {
        self.views_registered
            .get_or_try_init(|| async { self.warehouse.register_all(&self.ctx).await })
            .await
            .map(|_| ())
    }

    /// The DataFusion session, to register tables or functions directly.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// The redactor every message shown to the user passes through.
    pub fn redactor(&self) -> &Redactor {
        &self.redactor
    }

    /// The state of this run: its id, ledger, staging and sink counters.
    pub fn run_state(&self) -> &Arc<RunState> {
        &self.run
    }

    /// The memory limit in force, in bytes.
    pub fn memory_limit(&self) -> u64 {
        self.memory_limit
    }

    /// Sets a variable for the statements that follow.
    pub fn set_var(&mut self, name: &str, value: &str) {
        self.vars.insert(name, value);
    }

    /// Substitutes variables in a statement, learning secret values for redaction.
    pub fn substitute(&self, stmt: &Statement) -> Result<String> {
        self.vars.substitute(&stmt.text, stmt.line, |name, value| {
            self.redactor.observe(name, value)
        })
    }

    /// Checks a planned statement and applies what flumen adds before it runs: a clear error
    /// for an unknown `STORED AS` name, and globs in object-store locations.
    pub async fn prepare(&self, plan: LogicalPlan) -> Result<LogicalPlan> {
        self.check_plan(&plan)?;
        globs::expand(&self.ctx, plan).await
    }

    /// What flumen adds to a file table: a CSV table's typed columns are cast by flumen, bad
    /// values to dead letters, unless `'strict' 'true'` ([`lenient`]); a table read
    /// incrementally by `_modified` gets that column ([`modified`]).
    async fn wrap_file_table(&self, name: datafusion::common::TableReference) -> Result<()> {
        let key = name.table().to_lowercase();
        let by_time = self
            .incremental
            .read()
            .map(|m| m.get(&key).is_some_and(|s| s.column == modified::COLUMN))
            .unwrap_or(false);
        if self.on_cluster() {
            // On a cluster a table must cross to the executors as DataFusion's own
            // ListingTable: CSV is read by arrow-csv's typed reader (as with 'strict'), and
            // files cannot be read incrementally by modification time.
            if by_time {
                return Err(Error::Option(format!(
                    "table {name}: 'incremental_column' '{}' is not available on a cluster (run it without --cluster)",
                    modified::COLUMN
                )));
            }
            return Ok(());
        }
        let strict = self.strict.read().map(|s| s.contains(&key)).unwrap_or(false);
        let provider = self.ctx.table_provider(name.clone()).await?;
        let Some(listing) = provider.downcast_ref::<datafusion::datasource::listing::ListingTable>() else {
            if by_time {
                return Err(Error::Option(format!(
                    "table {name}: 'incremental_column' '{}' is the modification time of files; this table is not read from files",
                    modified::COLUMN
                )));
            }
            return Ok(());
        };
        let csv = listing.options().format.get_ext().eq_ignore_ascii_case("csv");
        if strict && !csv {
            return Err(Error::Option(format!(
                "table {name}: option 'strict' is for CSV tables (other formats always fail on a bad value)"
            )));
        }
        let lenient = if csv && !strict {
            lenient::LenientTable::wrap(&name.to_string(), Arc::clone(&provider), listing, by_time)?
        } else {
            None
        };
        let wrapped: Arc<dyn datafusion::catalog::TableProvider> = match lenient {
            Some(t) => Arc::new(t),
            None if by_time => Arc::new(modified::ModifiedTable::wrap(
                &name.to_string(),
                Arc::new(listing.clone()),
            )?),
            None => return Ok(()),
        };
        self.ctx.deregister_table(name.clone())?;
        self.ctx.register_table(name, wrapped)?;
        Ok(())
    }

    /// Rejects plans flumen can tell are wrong before DataFusion does, with a better message.
    fn check_plan(&self, plan: &LogicalPlan) -> Result<()> {
        if let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd)) = plan {
            self.redactor
                .observe_options(cmd.options.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        if let LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd)) = plan
            && !self.registry.knows(&cmd.file_type)
        {
            return Err(Error::Config(format!(
                "unknown STORED AS name '{}'; known: {}",
                cmd.file_type,
                self.registry.all_names().join(", ")
            )));
        }
        Ok(())
    }

    /// Starts a planned statement. DDL completes here; queries and writes return their stream.
    pub async fn execute(&self, plan: LogicalPlan) -> Result<Running> {
        let kind = StatementKind::of(&plan);
        let created = match &plan {
            LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd)) => Some(cmd.name.clone()),
            _ => None,
        };
        let (plan, commit) = copy::stage(plan)?;
        let df = self.ctx.execute_logical_plan(plan).await?;
        if let Some(name) = created {
            self.wrap_file_table(name).await?;
        }
        if matches!(kind, StatementKind::Ddl | StatementKind::CreateTableAs) {
            return Ok(Running {
                kind,
                plan: None,
                stream: None,
                commit,
            });
        }
        let physical = df.create_physical_plan().await?;
        let stream = execute_stream(Arc::clone(&physical), self.ctx.task_ctx())?;
        Ok(Running {
            kind,
            plan: Some(physical),
            stream: Some(stream),
            commit,
        })
    }

    /// Explains a planned statement without writing anything: DDL that only changes the catalog
    /// runs (so later statements can be planned); a `CREATE TABLE AS` registers an empty table of
    /// the right schema; queries and writes are planned, not run. Returns the text to show.
    pub async fn explain(&self, plan: LogicalPlan) -> Result<String> {
        match (StatementKind::of(&plan), &plan) {
            (StatementKind::CreateTableAs, LogicalPlan::Ddl(DdlStatement::CreateMemoryTable(cmd))) => {
                let df = self.ctx.execute_logical_plan((*cmd.input).clone()).await?;
                let schema = Arc::new(df.schema().as_arrow().clone());
                let text = self.explain_text(df).await?;
                let table = MemTable::try_new(schema, vec![vec![]])?;
                self.ctx.register_table(cmd.name.clone(), Arc::new(table))?;
                Ok(format!("creates in-memory table {} from:\n{text}", cmd.name))
            }
            (StatementKind::Ddl, _) => {
                let shown = plan.display_indent().to_string();
                let created = match &plan {
                    LogicalPlan::Ddl(DdlStatement::CreateExternalTable(cmd)) => Some(cmd.name.clone()),
                    _ => None,
                };
                self.ctx.execute_logical_plan(plan).await?;
                if let Some(name) = created {
                    self.wrap_file_table(name).await?;
                }
                Ok(shown)
            }
            _ => {
                self.explain_text(self.ctx.execute_logical_plan(plan).await?)
                    .await
            }
        }
    }
}

/// The connectors to install: on a cluster each table remembers how it was created, so that
/// it can be created again on the scheduler and the executors.
#[cfg(feature = "cluster")]
fn cluster_registry(registry: &Registry, cluster: bool) -> Registry {
    if cluster {
        registry.map(crate::cluster::codec::RememberingFactory::wrap)
    } else {
        registry.clone()
    }
}

#[cfg(not(feature = "cluster"))]
fn cluster_registry(registry: &Registry, _cluster: bool) -> Registry {
    registry.clone()
}

#[cfg(feature = "cluster")]
fn on_cluster(
    state: datafusion::execution::SessionState,
    url: Option<&str>,
    state_dir: &std::path::Path,
) -> Result<datafusion::execution::SessionState> {
    match url {
        Some(url) => crate::cluster::upgrade(state, url, state_dir),
        None => Ok(state),
    }
}

#[cfg(not(feature = "cluster"))]
fn on_cluster(
    state: datafusion::execution::SessionState,
    url: Option<&str>,
    _state_dir: &std::path::Path,
) -> Result<datafusion::execution::SessionState> {
    match url {
        Some(url) => Err(Error::Option(format!(
            "--cluster {url}: this flumen was built without the 'cluster' feature (cargo build --release --features cluster)"
        ))),
        None => Ok(state),
    }
}

impl Flumen {
    /// The logical and physical plan of a query. On a cluster the physical plan is the one the
    /// scheduler cuts into stages, followed by how many tasks read each source and whether
    /// each write runs in parallel or as one task.
    async fn explain_text(&self, df: datafusion::dataframe::DataFrame) -> Result<String> {
        let logical = df.clone().into_optimized_plan()?;
        let physical = if self.on_cluster() {
            // Ballista's planner hands the whole plan to the scheduler; plan it here as the
            // scheduler will.
            let state = self.ctx.state();
            datafusion::physical_planner::PhysicalPlanner::create_physical_plan(
                &datafusion::physical_planner::DefaultPhysicalPlanner::default(),
                &logical,
                &state,
            )
            .await?
        } else {
            df.create_physical_plan().await?
        };
        let mut text = format!(
            "logical plan:\n{}\nphysical plan:\n{}",
            logical.display_indent(),
            datafusion::physical_plan::displayable(physical.as_ref()).indent(true)
        );
        if self.on_cluster() {
            text.push_str("on the cluster:\n");
            for note in cluster_notes(&physical) {
                text.push_str(&format!("  {note}\n"));
            }
        }
        Ok(text)
    }
}

/// What the executors read for the statement that ran as `plan` on the cluster at `url`.
#[cfg(feature = "cluster")]
pub(super) async fn cluster_rows_read(
    plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    url: &str,
) -> Option<u64> {
    crate::cluster::rows_read(plan, url).await
}

#[cfg(not(feature = "cluster"))]
pub(super) async fn cluster_rows_read(
    _plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>,
    _url: &str,
) -> Option<u64> {
    None
}

#[cfg(feature = "cluster")]
fn cluster_notes(plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>) -> Vec<String> {
    crate::cluster::notes(plan)
}

#[cfg(not(feature = "cluster"))]
fn cluster_notes(_plan: &Arc<dyn datafusion::physical_plan::ExecutionPlan>) -> Vec<String> {
    Vec::new()
}
