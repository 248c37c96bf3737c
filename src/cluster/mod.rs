//! `flumen cluster scheduler` and `flumen cluster executor`: Ballista's scheduler and executor,
//! started from the flumen binary so that any machine with it can join a cluster (cargo
//! feature `cluster`).
//!
//! Both are started with flumen's codecs ([`codec`]), so that connector tables, their scans and
//! their sinks cross from `flumen run --cluster` to the scheduler and the executors.

pub mod claims;
pub mod codec;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ballista_core::extension::{SessionConfigExt, SessionStateExt};
use datafusion::execution::SessionState;
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::physical_plan::{ExecutionPlan, ExecutionPlanProperties};

use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;

use crate::error::{Error, Result};

/// Runs a scheduler on `bind` until the process is stopped; an executor silent for
/// `executor_timeout` seconds is lost, and its tasks run again on the others. Tasks go to the
/// executors in turn, or with `bias` to fill one executor's slots first.
pub async fn scheduler(bind: SocketAddr, executor_timeout: u64, bias: bool) -> Result<()> {
    let config = SchedulerConfig {
        bind_host: bind.ip().to_string(),
        external_host: bind.ip().to_string(),
        bind_port: bind.port(),
        override_logical_codec: Some(Arc::new(codec::LogicalCodec::new(PathBuf::from(".flumen")))),
        override_physical_codec: Some(Arc::new(codec::PhysicalCodec::new(PathBuf::from(".flumen")))),
        executor_timeout_seconds: executor_timeout.max(1),
        task_distribution: if bias {
            ballista_scheduler::config::TaskDistributionPolicy::Bias
        } else {
            ballista_scheduler::config::TaskDistributionPolicy::RoundRobin
        },
        expire_dead_executor_interval_seconds: (executor_timeout / 4).clamp(1, 15),
        no_executors_grace_period_seconds: executor_timeout.max(1),
        ..SchedulerConfig::default()
    };
    let at = |e: ballista_core::error::BallistaError| {
        Error::Config(format!("the Ballista scheduler on {bind}: {e}"))
    };
    let cluster = BallistaCluster::new_from_config(&config).await.map_err(at)?;
    eprintln!("flumen cluster scheduler: listening on {bind}");
    ballista_scheduler::scheduler_process::start_server(cluster, bind, Arc::new(config))
        .await
        .map_err(at)
}

/// Runs an executor that registers with `scheduler` (`host:port`), with `slots` task slots,
/// its shuffle files under `work_dir` and a heartbeat every `heartbeat` seconds, until the
/// process is stopped.
pub async fn executor(
    scheduler: &str,
    bind: SocketAddr,
    grpc_port: u16,
    slots: usize,
    work_dir: Option<String>,
    heartbeat: u64,
) -> Result<()> {
    let (host, port) = scheduler
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
        .ok_or_else(|| Error::Option(format!("--scheduler '{scheduler}' is not host:port")))?;
    // Ballista's shuffle files and flumen's run state (sink journals, staging, dead letters)
    // share the work directory.
    let work_dir = PathBuf::from(work_dir.unwrap_or_else(|| {
        std::env::temp_dir()
            .join(format!("flumen-executor-{}", bind.port()))
            .display()
            .to_string()
    }));
    std::fs::create_dir_all(&work_dir).map_err(|e| {
        Error::io(
            format!("creating executor work directory {}", work_dir.display()),
            e,
        )
    })?;
    let state_dir = work_dir.join("flumen");
    let config = ballista_executor::executor_process::ExecutorProcessConfig {
        bind_host: bind.ip().to_string(),
        external_host: Some(bind.ip().to_string()),
        port: bind.port(),
        grpc_port,
        scheduler_host: host,
        scheduler_port: port,
        vcores: slots.max(1),
        executor_heartbeat_interval_seconds: heartbeat.max(1),
        work_dir: Some(work_dir.display().to_string()),
        override_logical_codec: Some(Arc::new(codec::LogicalCodec::new(state_dir.clone()))),
        override_physical_codec: Some(Arc::new(codec::PhysicalCodec::new(state_dir))),
        ..Default::default()
    };
    eprintln!("flumen cluster executor: {bind} with {slots} slots, scheduler {scheduler}");
    ballista_executor::executor_process::start_executor_process(Arc::new(config))
        .await
        .map_err(|e| Error::Config(format!("the Ballista executor on {bind}: {e}")))
}

/// `df://host:port` as the scheduler's gRPC address.
fn scheduler_url(url: &str) -> Result<String> {
    let parsed = url::Url::parse(url)
        .map_err(|e| Error::Option(format!("--cluster '{url}' is not df://host:port: {e}")))?;
    match (parsed.scheme(), parsed.host_str(), parsed.port()) {
        ("df", Some(host), port) => Ok(format!("http://{host}:{}", port.unwrap_or(50050))),
        _ => Err(Error::Option(format!("--cluster '{url}' is not df://host:port"))),
    }
}

/// Turns a flumen session into one that plans and runs its queries on the cluster at `url`
/// (`df://host:port`), with flumen's codecs.
pub fn upgrade(state: SessionState, url: &str, state_dir: &Path) -> Result<SessionState> {
    let scheduler = scheduler_url(url)?;
    let mut config = state.config().clone();
    if let Some(addr) = claims::serve(scheduler.trim_start_matches("http://")) {
        config = config.with_extension(Arc::new(codec::ClaimService(addr.to_string())));
    }
    let config = config
        .with_ballista_logical_extension_codec(Arc::new(codec::LogicalCodec::new(state_dir.to_path_buf())))
        .with_ballista_physical_extension_codec(Arc::new(codec::PhysicalCodec::new(state_dir.to_path_buf())));
    let state = SessionStateBuilder::new_from_existing(state)
        .with_config(config)
        .build();
    Ok(state.upgrade_for_ballista(scheduler)?)
}

/// How a plan runs on a cluster, one line per source and per write: how many tasks read each
/// source (one for a stream that cannot be split), and whether a write runs from every input
/// partition or as one task.
pub fn notes(plan: &Arc<dyn ExecutionPlan>) -> Vec<String> {
    let mut out = Vec::new();
    let mut walk = vec![Arc::clone(plan)];
    while let Some(node) = walk.pop() {
        let any: &dyn std::any::Any = node.as_ref();
        if let Some(scan) = any.downcast_ref::<codec::ClusterScanExec>() {
            out.push(match scan.tasks() {
                1 => format!(
                    "table {}: read as one task (its source is one stream that cannot be split)",
                    scan.table()
                ),
                n => format!(
                    "table {}: read by {n} tasks, spread over the executors",
                    scan.table()
                ),
            });
        } else if let Some(sink) = any.downcast_ref::<codec::ClusterSinkExec>() {
            out.push(if sink.parallel() {
                let n = sink.properties().output_partitioning().partition_count();
                format!(
                    "table {}: written by {n} tasks in parallel, each executor with its own staging",
                    sink.table()
                )
            } else {
                format!(
                    "table {}: written as one task (one transaction, an overwrite or an upsert)",
                    sink.table()
                )
            });
        } else if node.name() == "DataSinkExec" {
            // DataFusion's file writes (COPY, INSERT INTO a file table).
            let n = node
                .children()
                .first()
                .map_or(1, |c| c.output_partitioning().partition_count());
            out.push(match n {
                1 => "files: written as one task".to_string(),
                n => format!("files: written by {n} tasks"),
            });
        } else if node.children().is_empty() {
            let n = node.output_partitioning().partition_count();
            let what = if n == 1 {
                "as one task".to_string()
            } else {
                format!("by {n} tasks")
            };
            out.push(format!("{}: read {what}", node.name()));
        }
        walk.extend(node.children().into_iter().cloned());
    }
    out.reverse();
    out
}

/// The rows the executors' sources read for the job that ran as `plan` (a query handed to the
/// cluster at `url`), from the scheduler's job metrics: the output rows of each stage's leaves
/// other than shuffle reads. None when the scheduler does not tell.
pub async fn rows_read(plan: &Arc<dyn ExecutionPlan>, url: &str) -> Option<u64> {
    use ballista_core::execution_plans::DistributedQueryExec;
    use ballista_core::serde::protobuf::{
        GetJobMetricsParams, OperatorMetricsSet, scheduler_grpc_client::SchedulerGrpcClient,
    };
    let mut walk = vec![Arc::clone(plan)];
    let mut job = None;
    while let Some(node) = walk.pop() {
        let any: &dyn std::any::Any = node.as_ref();
        if let Some(q) =
            any.downcast_ref::<DistributedQueryExec<datafusion_proto::protobuf::LogicalPlanNode>>()
        {
            job = q.job_id();
            break;
        }
        walk.extend(node.children().into_iter().cloned());
    }
    let job = job?;
    let mut client = SchedulerGrpcClient::connect(scheduler_url(url).ok()?)
        .await
        .ok()?;
    let metrics = client
        .get_job_metrics(GetJobMetricsParams {
            job_id: job.to_string(),
        })
        .await
        .ok()?
        .into_inner();
    let mut rows = 0;
    for stage in &metrics.stages {
        let ops = &stage.operators;
        for (i, op) in ops.iter().enumerate() {
            let leaf = ops.get(i + 1).is_none_or(|next| next.depth <= op.depth);
            if !leaf || op.operator_type.contains("Shuffle") {
                continue;
            }
            let set: Option<datafusion::physical_plan::metrics::MetricsSet> = OperatorMetricsSet {
                metrics: op.metrics.clone(),
            }
            .try_into()
            .ok();
            rows += set.and_then(|m| m.output_rows()).unwrap_or(0) as u64;
        }
    }
    Some(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls() {
        assert_eq!(
            scheduler_url("df://10.0.0.5:50070").ok().as_deref(),
            Some("http://10.0.0.5:50070")
        );
        assert_eq!(
            scheduler_url("df://sched").ok().as_deref(),
            Some("http://sched:50050")
        );
        assert!(scheduler_url("http://sched:50050").is_err());
        assert!(scheduler_url("sched:50050").is_err());
    }
}
