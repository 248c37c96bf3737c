//! flumen's Ballista codecs: how a connector table, its scans and its sinks cross from the
//! client to the scheduler and on to the executors.
//!
//! A connector table (anything `STORED AS` a flumen connector) is sent as the statement that
//! created it: connector name, location, options and columns ([`TableSpec`]). Whoever receives
//! it (the scheduler, to plan; an executor, to run) builds the table again with the same
//! connector factory. A scan is sent as that table plus its projection, filters and limit, and
//! is re-planned on the executor the first time one of its partitions runs ([`ClusterScanExec`]);
//! a sink likewise ([`ClusterSinkExec`]), each executor writing with its own staging and journal
//! under its work directory.
//!
//! DataFusion's own file tables (Parquet, CSV, JSON, Avro, Arrow) keep Ballista's codecs.
//!
//! The location travels as written after `${VAR}` substitution, so a secret in it crosses the
//! cluster's gRPC connections (as it would reach the database): run the cluster on a private
//! network. It is never logged or shown by flumen.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::datatypes::{Schema, SchemaRef};
use async_trait::async_trait;
use ballista_core::serde::{BallistaLogicalExtensionCodec, BallistaPhysicalExtensionCodec};
use datafusion::catalog::{Session, TableProvider, TableProviderFactory};
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{DFSchema, TableReference};
use datafusion::datasource::file_format::FileFormatFactory;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{
    AggregateUDF, CreateExternalTable, Expr, Extension, LogicalPlan, ScalarUDF, TableProviderFilterPushDown,
    TableType, WindowUDF,
};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{BaselineMetrics, ExecutionPlanMetricsSet, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, Distribution, ExecutionPlan, ExecutionPlanProperties, Partitioning,
    PhysicalExpr, PlanProperties,
};
use datafusion_proto::bytes::Serializeable;
use datafusion_proto::logical_plan::LogicalExtensionCodec;
use datafusion_proto::physical_plan::{PhysicalExtensionCodec, PhysicalProtoConverterExtension};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::connector::Registry;
use crate::sink::{RunState, SinkMetricsSnapshot};

/// Leads every buffer flumen's codecs write, so that Ballista's own buffers are told apart.
const TABLE: &[u8] = b"flumen-table:";
const SCAN: &[u8] = b"flumen-scan:";
const SINK: &[u8] = b"flumen-sink:";

/// How a connector table was created: enough to create it again anywhere.
#[derive(Clone, Serialize, Deserialize)]
pub struct TableSpec {
    name: String,
    stored_as: String,
    location: String,
    options: BTreeMap<String, String>,
    /// The declared columns as an Arrow IPC stream with no batches.
    schema: Vec<u8>,
    /// The client's run id: executors journal and stage under it.
    run: String,
    /// The client's claim service ([`super::claims`]), where write tasks claim their partition.
    #[serde(default)]
    claims: Option<String>,
    /// The `CREATE` statement before `${VAR}` substitution (no secret in it), for a `resume`
    /// on the executor of what its write staged.
    #[serde(default)]
    template: Option<String>,
}

impl fmt::Debug for TableSpec {
    // No location: it may hold a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TableSpec")
            .field("name", &self.name)
            .field("stored_as", &self.stored_as)
            .finish_non_exhaustive()
    }
}

/// The column of a cluster write's output that carries the executor's sink counters (JSON,
/// table to [`SinkMetricsSnapshot`]); the client adds them to its run summary and ledger.
pub const METRICS_COLUMN: &str = "flumen_sink_metrics";

/// What a write returns: a `count` column, as DataFusion's own sinks, and the sink counters
/// of the executor that wrote.
fn count_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        arrow::datatypes::Field::new("count", arrow::datatypes::DataType::UInt64, false),
        arrow::datatypes::Field::new(METRICS_COLUMN, arrow::datatypes::DataType::Utf8, true),
    ]))
}

/// The sink counters a cluster write's output batch carries, by table.
pub fn sink_metrics_of(batch: &arrow::array::RecordBatch) -> BTreeMap<String, SinkMetricsSnapshot> {
    let mut out: BTreeMap<String, SinkMetricsSnapshot> = BTreeMap::new();
    let Some(col) = batch
        .column_by_name(METRICS_COLUMN)
        .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
    else {
        return out;
    };
    for json in col.iter().flatten() {
        if let Ok(m) = serde_json::from_str::<BTreeMap<String, SinkMetricsSnapshot>>(json) {
            for (table, s) in m {
                out.entry(table).or_default().add(&s);
            }
        }
    }
    out
}

/// The address of the client's claim service, in the client's session config.
#[derive(Debug, Clone)]
pub struct ClaimService(pub String);

/// The Ballista job a task on an executor belongs to: Ballista names a task
/// `TID <job>/<stage>.<stage attempt>/<task>.<task attempt>`.
fn job_of(ctx: &TaskContext) -> Option<String> {
    let id = ctx.task_id()?;
    let tid = id.split_whitespace().last()?;
    Some(tid.split('/').next()?.to_string())
}

fn schema_bytes(schema: &Schema) -> DfResult<Vec<u8>> {
    let mut out = Vec::new();
    let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
    w.finish()?;
    drop(w);
    Ok(out)
}

fn schema_from(bytes: &[u8]) -> DfResult<SchemaRef> {
    let r = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    Ok(r.schema())
}

fn decode_err(what: &str, e: impl fmt::Display) -> DataFusionError {
    DataFusionError::Internal(format!("flumen cluster codec: decoding {what}: {e}"))
}

impl TableSpec {
    fn of(cmd: &CreateExternalTable, run: &str) -> DfResult<Self> {
        Ok(Self {
            name: cmd.name.to_string(),
            stored_as: cmd.file_type.clone(),
            location: cmd.locations.first().cloned().unwrap_or_default(),
            options: cmd.options.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            schema: schema_bytes(cmd.schema.as_arrow())?,
            run: run.to_string(),
            claims: None,
            template: None,
        })
    }

    /// Whether rows may be written from several executors at once: appends to a connector
    /// that does not make a statement one transaction. Overwrite, upsert, SQL databases (one
    /// transaction per statement) and `'create' 'replace'` (the table is replaced once, by the
    /// task that writes) write from one task.
    fn parallel_writes(&self) -> bool {
        let option = |name: &str| {
            self.options
                .iter()
                .find(|(k, _)| k.rsplit('.').next() == Some(name))
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let transactional = matches!(
            self.stored_as.to_ascii_uppercase().as_str(),
            "POSTGRES" | "MYSQL" | "SQLITE"
        );
        !transactional
            && option("mode").as_deref().is_none_or(|m| m == "append")
            && option("create").as_deref() != Some("replace")
    }

    fn command(&self) -> DfResult<CreateExternalTable> {
        let schema = schema_from(&self.schema)?;
        let df_schema = DFSchema::try_from(schema.as_ref().clone())?;
        Ok(CreateExternalTable::builder(
            TableReference::from(self.name.as_str()),
            self.location.clone(),
            self.stored_as.clone(),
            Arc::new(df_schema),
        )
        .with_options(
            self.options
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<HashMap<_, _>>(),
        )
        .build())
    }

    /// Creates the table again through its connector, in `state` (see [`session_on`]).
    async fn create(&self, state: &datafusion::execution::SessionState) -> DfResult<Arc<dyn TableProvider>> {
        let registry = Registry::builtin();
        let factory = registry.factory(&self.stored_as).ok_or_else(|| {
            DataFusionError::Plan(format!(
                "table {}: this flumen has no connector STORED AS {}",
                self.name, self.stored_as
            ))
        })?;
        factory.create(state, &self.command()?).await
    }
}

/// A session on a task's config and runtime, with flumen's run state for `run` under
/// `state_dir` (unless the config already carries one, as on the client).
fn session_on(
    ctx: &TaskContext,
    run: &str,
    state_dir: &std::path::Path,
) -> datafusion::execution::SessionState {
    let config = ctx.session_config().clone();
    if config.get_extension::<RunState>().is_some() {
        return session_with(ctx, config);
    }
    let run = Arc::new(RunState::new(state_dir.to_path_buf(), run.to_string(), false));
    session_with(ctx, config.with_extension(run))
}

fn session_with(
    ctx: &TaskContext,
    config: datafusion::prelude::SessionConfig,
) -> datafusion::execution::SessionState {
    SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(ctx.runtime_env())
        .with_default_features()
        .build()
}

/// Wraps each connector factory so that its tables remember how they were created.
#[derive(Debug)]
pub struct RememberingFactory {
    inner: Arc<dyn TableProviderFactory>,
}

impl RememberingFactory {
    pub fn wrap(inner: Arc<dyn TableProviderFactory>) -> Arc<dyn TableProviderFactory> {
        Arc::new(Self { inner })
    }
}

#[async_trait]
impl TableProviderFactory for RememberingFactory {
    async fn create(
        &self,
        state: &dyn Session,
        cmd: &CreateExternalTable,
    ) -> DfResult<Arc<dyn TableProvider>> {
        let inner = self.inner.create(state, cmd).await?;
        let run = state
            .config()
            .get_extension::<RunState>()
            .map(|r| r.run_id().to_string())
            .unwrap_or_else(crate::sink::new_run_id);
        let mut spec = TableSpec::of(cmd, &run)?;
        spec.template = state
            .config()
            .get_extension::<RunState>()
            .and_then(|r| r.template(&cmd.name.to_string()));
        spec.claims = state
            .config()
            .get_extension::<ClaimService>()
            .map(|c| c.0.clone());
        Ok(Arc::new(Remembered { spec, inner }))
    }
}

/// A connector table and the statement that created it.
#[derive(Debug)]
pub struct Remembered {
    spec: TableSpec,
    inner: Arc<dyn TableProvider>,
}

#[async_trait]
impl TableProvider for Remembered {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        self.inner.table_type()
    }

    fn supports_filters_pushdown(&self, filters: &[&Expr]) -> DfResult<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let plan = self.inner.scan(state, projection, filters, limit).await?;
        Ok(Arc::new(ClusterScanExec::new(
            ScanSpec {
                table: self.spec.clone(),
                projection: projection.cloned(),
                filters: filters
                    .iter()
                    .map(|f| f.to_bytes().map(|b| b.to_vec()))
                    .collect::<DfResult<_>>()?,
                limit,
                partitions: plan.output_partitioning().partition_count(),
                unbounded: plan.boundedness().is_unbounded(),
                output: schema_bytes(plan.schema().as_ref())?,
            },
            Some(plan),
        )?))
    }

    async fn insert_into(
        &self,
        state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if insert_op != InsertOp::Append {
            // Let the connector refuse it with its own message.
            return self.inner.insert_into(state, input, insert_op).await;
        }
        Ok(Arc::new(ClusterSinkExec::new(self.spec.clone(), input)))
    }
}

/// What a connector scan needs to be planned again on an executor.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ScanSpec {
    table: TableSpec,
    projection: Option<Vec<usize>>,
    /// Each filter as DataFusion protobuf.
    filters: Vec<Vec<u8>>,
    limit: Option<usize>,
    partitions: usize,
    unbounded: bool,
    output: Vec<u8>,
}

/// A connector's scan that can cross to an executor: planned on the client (to show and to
/// size), planned again through the connector where it runs.
#[derive(Debug)]
pub struct ClusterScanExec {
    spec: ScanSpec,
    /// The connector's own plan, once known in this process.
    plan: Arc<tokio::sync::OnceCell<Arc<dyn ExecutionPlan>>>,
    state_dir: PathBuf,
    properties: Arc<PlanProperties>,
    /// Output rows, which the scheduler's job metrics add up as the rows read.
    metrics: ExecutionPlanMetricsSet,
}

impl ClusterScanExec {
    fn new(spec: ScanSpec, plan: Option<Arc<dyn ExecutionPlan>>) -> DfResult<Self> {
        let schema = schema_from(&spec.output)?;
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(spec.partitions.max(1)),
            EmissionType::Incremental,
            if spec.unbounded {
                Boundedness::Unbounded {
                    requires_infinite_memory: false,
                }
            } else {
                Boundedness::Bounded
            },
        );
        let cell = tokio::sync::OnceCell::new();
        if let Some(p) = plan {
            let _ = cell.set(p);
        }
        Ok(Self {
            spec,
            plan: Arc::new(cell),
            state_dir: PathBuf::from(".flumen"),
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }

    /// How many tasks read this source on a cluster (1: one non-splittable stream).
    pub fn tasks(&self) -> usize {
        self.spec.partitions
    }

    /// The table read.
    pub fn table(&self) -> &str {
        &self.spec.table.name
    }

    async fn planned(&self, ctx: &TaskContext) -> DfResult<Arc<dyn ExecutionPlan>> {
        self.plan
            .get_or_try_init(|| async {
                let state = session_on(ctx, &self.spec.table.run, &self.state_dir);
                let provider = self.spec.table.create(&state).await?;
                let filters = self
                    .spec
                    .filters
                    .iter()
                    .map(|b| Expr::from_bytes_with_ctx(b, ctx))
                    .collect::<DfResult<Vec<_>>>()?;
                let plan = provider
                    .scan(&state, self.spec.projection.as_ref(), &filters, self.spec.limit)
                    .await?;
                let n = plan.output_partitioning().partition_count();
                if n != self.spec.partitions {
                    return Err(DataFusionError::Execution(format!(
                        "table {}: planned with {} partitions on the client but {n} on this executor",
                        self.spec.table.name, self.spec.partitions
                    )));
                }
                Ok(plan)
            })
            .await
            .cloned()
    }
}

impl DisplayAs for ClusterScanExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClusterScanExec: table={}, tasks={}",
            self.spec.table.name, self.spec.partitions
        )?;
        if let Some(plan) = self.plan.get() {
            write!(f, " [")?;
            plan.fmt_as(t, f)?;
            write!(f, "]")?;
        }
        Ok(())
    }
}

impl ExecutionPlan for ClusterScanExec {
    fn name(&self) -> &str {
        "ClusterScanExec"
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![]
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let this = Self {
            spec: self.spec.clone(),
            plan: Arc::clone(&self.plan),
            state_dir: self.state_dir.clone(),
            properties: Arc::clone(&self.properties),
            metrics: self.metrics.clone(),
        };
        let schema = self.schema();
        let baseline = BaselineMetrics::new(&self.metrics, partition);
        let stream = futures::stream::once(async move {
            let plan = this.planned(&context).await?;
            plan.execute(partition, context)
        })
        .try_flatten()
        .inspect_ok(move |b| baseline.record_output(b.num_rows()));
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }
}

/// An `INSERT INTO` a connector table that can cross to the executors. Appends to connectors
/// that allow it write from every input partition (each executor its own requests, staging and
/// journal); the rest write from one task.
#[derive(Debug)]
pub struct ClusterSinkExec {
    table: TableSpec,
    input: Arc<dyn ExecutionPlan>,
    parallel: bool,
    state_dir: PathBuf,
    provider: Arc<tokio::sync::OnceCell<Arc<dyn TableProvider>>>,
    properties: Arc<PlanProperties>,
}

impl ClusterSinkExec {
    fn new(table: TableSpec, input: Arc<dyn ExecutionPlan>) -> Self {
        let parallel = table.parallel_writes();
        Self::with(table, input, parallel, PathBuf::from(".flumen"))
    }

    fn with(table: TableSpec, input: Arc<dyn ExecutionPlan>, parallel: bool, state_dir: PathBuf) -> Self {
        let partitions = if parallel {
            input.output_partitioning().partition_count().max(1)
        } else {
            1
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(count_schema()),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Self {
            table,
            input,
            parallel,
            state_dir,
            provider: Arc::new(tokio::sync::OnceCell::new()),
            properties: Arc::new(properties),
        }
    }

    /// Whether several executors write at once.
    pub fn parallel(&self) -> bool {
        self.parallel
    }

    /// The table written.
    pub fn table(&self) -> &str {
        &self.table.name
    }
}

impl DisplayAs for ClusterSinkExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClusterSinkExec: table={}, {}",
            self.table.name,
            if self.parallel {
                "written from every input partition"
            } else {
                "written from one task"
            }
        )
    }
}

impl ExecutionPlan for ClusterSinkExec {
    fn name(&self) -> &str {
        "ClusterSinkExec"
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        if self.parallel {
            vec![Distribution::UnspecifiedDistribution]
        } else {
            vec![Distribution::SinglePartition]
        }
    }

    fn benefits_from_input_partitioning(&self) -> Vec<bool> {
        vec![self.parallel]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = children
            .into_iter()
            .next()
            .ok_or_else(|| DataFusionError::Internal("ClusterSinkExec needs one input".into()))?;
        Ok(Arc::new(Self::with(
            self.table.clone(),
            input,
            self.parallel,
            self.state_dir.clone(),
        )))
    }

    fn execute(&self, partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        let input: Arc<dyn ExecutionPlan> = Arc::new(OnePartition {
            input: Arc::clone(&self.input),
            partition,
            properties: Arc::new(PlanProperties::new(
                EquivalenceProperties::new(self.input.schema()),
                Partitioning::UnknownPartitioning(1),
                EmissionType::Incremental,
                Boundedness::Bounded,
            )),
        });
        let stream = futures::stream::once(write_task(
            self.table.clone(),
            input,
            partition,
            context,
            self.state_dir.clone(),
            Arc::clone(&self.provider),
        ));
        Ok(Box::pin(RecordBatchStreamAdapter::new(count_schema(), stream)))
    }
}

/// One write task on an executor: claims its partition at the client, writes it as a run of
/// its own (`<run>-<job>-<table>-p<partition>`: its ledger, journal, staging and dead letters)
/// and returns its row count with its sink counters.
async fn write_task(
    table: TableSpec,
    input: Arc<dyn ExecutionPlan>,
    partition: usize,
    context: Arc<TaskContext>,
    state_dir: PathBuf,
    provider: Arc<tokio::sync::OnceCell<Arc<dyn TableProvider>>>,
) -> DfResult<arrow::array::RecordBatch> {
    let job = job_of(&context).unwrap_or_default();
    if let Some(addr) = &table.claims {
        claim(addr, &job, &table.name, partition).await?;
    }
    let run = format!(
        "{}-{}-{}-p{partition}",
        table.run,
        crate::sink::safe_name(&job),
        crate::sink::safe_name(&table.name)
    );
    // Always a run state of its own, so that its counters are this task's alone.
    let run_state = Arc::new(RunState::new(state_dir.clone(), run.clone(), false));
    let state = session_with(
        &context,
        context
            .session_config()
            .clone()
            .with_extension(Arc::clone(&run_state)),
    );
    if let Some(t) = &table.template {
        run_state.record_template(&table.name, t);
    }
    let write = async {
        let provider = provider.get_or_try_init(|| table.create(&state)).await?;
        let plan = provider.insert_into(&state, input, InsertOp::Append).await?;
        // The sink finds its run state (journal, staging) in the task's config.
        let task = Arc::new(TaskContext::from(&state));
        let mut written = plan.execute(0, task)?;
        let mut count = 0u64;
        while let Some(batch) = written.next().await {
            count += crate::engine::count_of(&batch?);
        }
        Ok::<_, DataFusionError>(count)
    };
    let result = write.await;
    let error = result
        .as_ref()
        .err()
        .map(|e| crate::engine::Redactor::default().redact(&e.to_string()));
    run_state
        .finish(error)
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
    let count = result.map_err(|e| resume_here(e, &run, &state_dir))?;
    let metrics = run_state.sink_snapshots();
    let json = serde_json::to_string(&metrics).map_err(|e| decode_err("sink counters", e))?;
    Ok(arrow::array::RecordBatch::try_new(
        count_schema(),
        vec![
            Arc::new(arrow::array::UInt64Array::from(vec![count])),
            Arc::new(arrow::array::StringArray::from(vec![json])),
        ],
    )?)
}

/// Claims the write of `partition` at the client ([`super::claims`]): Ballista runs the task of
/// a lost executor again under a new id, and only the client can tell the partition was handed
/// out before. An earlier attempt may have delivered rows that only its (lost) executor's
/// journal knows of, so a second claim is an error rather than a second delivery.
async fn claim(addr: &str, job: &str, table: &str, partition: usize) -> DfResult<()> {
    let first = super::claims::claim(addr, job, table, partition)
        .await
        .map_err(|e| {
            DataFusionError::Execution(format!(
                "table {table}: the write of partition {partition} cannot reach flumen run at {addr} to claim it: {e}"
            ))
        })?;
    if first {
        return Ok(());
    }
    Err(DataFusionError::Execution(format!(
        "table {table}: the write of partition {partition} was started before on an executor that was \
         lost; rows that attempt delivered may be in the table, so this run stops instead of \
         writing them twice. Check the table, then run the script again"
    )))
}

/// A sink's error, with its `flumen resume RUN` hint pointed at this executor's state dir,
/// where the staging is.
fn resume_here(e: DataFusionError, run: &str, state_dir: &std::path::Path) -> DataFusionError {
    let msg = e.to_string();
    let msg = msg.strip_prefix("External error: ").unwrap_or(&msg);
    let Some(start) = msg.find(&format!("`flumen resume {run}")) else {
        return e;
    };
    let Some(len) = msg[start + 1..].find('`') else {
        return e;
    };
    let end = start + 1 + len + 1;
    DataFusionError::Execution(format!(
        "{}`flumen resume {run} --state-dir {}` on that executor{}",
        &msg[..start],
        state_dir.display(),
        &msg[end..]
    ))
}

/// One partition of a plan, shown as a plan of one partition (what a sink reads).
#[derive(Debug)]
struct OnePartition {
    input: Arc<dyn ExecutionPlan>,
    partition: usize,
    properties: Arc<PlanProperties>,
}

impl DisplayAs for OnePartition {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OnePartition: {}", self.partition)
    }
}

impl ExecutionPlan for OnePartition {
    fn name(&self) -> &str {
        "OnePartition"
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = children
            .into_iter()
            .next()
            .ok_or_else(|| DataFusionError::Internal("OnePartition needs one input".into()))?;
        Ok(Arc::new(Self {
            input,
            partition: self.partition,
            properties: Arc::clone(&self.properties),
        }))
    }

    fn execute(&self, _partition: usize, context: Arc<TaskContext>) -> DfResult<SendableRecordBatchStream> {
        self.input.execute(self.partition, context)
    }
}

/// Ballista's logical codec, plus flumen's connector tables.
#[derive(Debug)]
pub struct LogicalCodec {
    ballista: BallistaLogicalExtensionCodec,
    state_dir: PathBuf,
}

impl LogicalCodec {
    /// A codec whose rebuilt tables keep their run state under `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            ballista: BallistaLogicalExtensionCodec::default(),
            state_dir,
        }
    }
}

impl LogicalExtensionCodec for LogicalCodec {
    fn try_decode(&self, buf: &[u8], inputs: &[LogicalPlan], ctx: &TaskContext) -> DfResult<Extension> {
        self.ballista.try_decode(buf, inputs, ctx)
    }

    fn try_encode(&self, node: &Extension, buf: &mut Vec<u8>) -> DfResult<()> {
        self.ballista.try_encode(node, buf)
    }

    fn try_decode_table_provider(
        &self,
        buf: &[u8],
        table_ref: &TableReference,
        schema: SchemaRef,
        ctx: &TaskContext,
    ) -> DfResult<Arc<dyn TableProvider>> {
        let Some(json) = buf.strip_prefix(TABLE) else {
            return self
                .ballista
                .try_decode_table_provider(buf, table_ref, schema, ctx);
        };
        let spec: TableSpec = serde_json::from_slice(json).map_err(|e| decode_err("a table", e))?;
        // Table providers are created by async factories; the codec is called synchronously
        // from within the scheduler's runtime.
        let created = tokio::task::block_in_place(|| {
            let state = session_on(ctx, &spec.run, &self.state_dir);
            tokio::runtime::Handle::current().block_on(spec.create(&state))
        })?;
        Ok(Arc::new(Remembered { spec, inner: created }))
    }

    fn try_encode_table_provider(
        &self,
        table_ref: &TableReference,
        node: Arc<dyn TableProvider>,
        buf: &mut Vec<u8>,
    ) -> DfResult<()> {
        if let Some(r) = node.downcast_ref::<Remembered>() {
            buf.extend_from_slice(TABLE);
            serde_json::to_writer(&mut *buf, &r.spec).map_err(|e| decode_err("a table (encoding)", e))?;
            return Ok(());
        }
        self.ballista.try_encode_table_provider(table_ref, node, buf)
    }

    fn try_decode_file_format(&self, buf: &[u8], ctx: &TaskContext) -> DfResult<Arc<dyn FileFormatFactory>> {
        self.ballista.try_decode_file_format(buf, ctx)
    }

    fn try_encode_file_format(&self, buf: &mut Vec<u8>, node: Arc<dyn FileFormatFactory>) -> DfResult<()> {
        self.ballista.try_encode_file_format(buf, node)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> DfResult<Arc<ScalarUDF>> {
        self.ballista.try_decode_udf(name, buf)
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> DfResult<()> {
        self.ballista.try_encode_udf(node, buf)
    }

    fn try_decode_udaf(&self, name: &str, buf: &[u8]) -> DfResult<Arc<AggregateUDF>> {
        self.ballista.try_decode_udaf(name, buf)
    }

    fn try_encode_udaf(&self, node: &AggregateUDF, buf: &mut Vec<u8>) -> DfResult<()> {
        self.ballista.try_encode_udaf(node, buf)
    }

    fn try_decode_udwf(&self, name: &str, buf: &[u8]) -> DfResult<Arc<WindowUDF>> {
        self.ballista.try_decode_udwf(name, buf)
    }

    fn try_encode_udwf(&self, node: &WindowUDF, buf: &mut Vec<u8>) -> DfResult<()> {
        self.ballista.try_encode_udwf(node, buf)
    }
}

/// Ballista's physical codec, plus flumen's connector scans and sinks.
#[derive(Debug)]
pub struct PhysicalCodec {
    ballista: BallistaPhysicalExtensionCodec,
    state_dir: PathBuf,
}

impl PhysicalCodec {
    /// A codec whose scans and sinks keep their run state (journal, staging, dead letters)
    /// under `state_dir`.
    pub fn new(state_dir: PathBuf) -> Self {
        Self {
            ballista: BallistaPhysicalExtensionCodec::default(),
            state_dir,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct SinkWire {
    table: TableSpec,
    parallel: bool,
}

impl PhysicalExtensionCodec for PhysicalCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &TaskContext,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        if let Some(json) = buf.strip_prefix(SCAN) {
            let spec: ScanSpec = serde_json::from_slice(json).map_err(|e| decode_err("a scan", e))?;
            let mut scan = ClusterScanExec::new(spec, None)?;
            scan.state_dir = self.state_dir.clone();
            return Ok(Arc::new(scan));
        }
        if let Some(json) = buf.strip_prefix(SINK) {
            let wire: SinkWire = serde_json::from_slice(json).map_err(|e| decode_err("a sink", e))?;
            let input = inputs
                .first()
                .cloned()
                .ok_or_else(|| decode_err("a sink", "it has no input"))?;
            return Ok(Arc::new(ClusterSinkExec::with(
                wire.table,
                input,
                wire.parallel,
                self.state_dir.clone(),
            )));
        }
        self.ballista.try_decode(buf, inputs, ctx, proto_converter)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        proto_converter: &dyn PhysicalProtoConverterExtension,
    ) -> DfResult<()> {
        let any: &dyn Any = node.as_ref();
        if let Some(scan) = any.downcast_ref::<ClusterScanExec>() {
            buf.extend_from_slice(SCAN);
            return serde_json::to_writer(&mut *buf, &scan.spec)
                .map_err(|e| decode_err("a scan (encoding)", e));
        }
        if let Some(sink) = any.downcast_ref::<ClusterSinkExec>() {
            buf.extend_from_slice(SINK);
            let wire = SinkWire {
                table: sink.table.clone(),
                parallel: sink.parallel,
            };
            return serde_json::to_writer(&mut *buf, &wire).map_err(|e| decode_err("a sink (encoding)", e));
        }
        self.ballista.try_encode(node, buf, proto_converter)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> DfResult<Arc<ScalarUDF>> {
        self.ballista.try_decode_udf(name, buf)
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> DfResult<()> {
        self.ballista.try_encode_udf(node, buf)
    }
}
