//! `flumen cluster scheduler` and `flumen cluster executor`: Ballista's scheduler and executor,
//! started from the flumen binary so that any machine with it can join a cluster (cargo
//! feature `cluster`).
//!
//! Not yet: flumen's logical and physical extension codecs (its connectors' table providers,
//! scans and sinks), `flumen run --cluster`, the metrics aggregation. Without the codecs a
//! cluster runs what plain DataFusion plans serialize (file scans, SQL over them).

use std::net::SocketAddr;
use std::sync::Arc;

use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;

use crate::error::{Error, Result};

/// Runs a scheduler on `bind` until the process is stopped.
pub async fn scheduler(bind: SocketAddr) -> Result<()> {
    let config = SchedulerConfig {
        bind_host: bind.ip().to_string(),
        external_host: bind.ip().to_string(),
        bind_port: bind.port(),
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

/// Runs an executor that registers with `scheduler` (`host:port`), with `slots` task slots and
/// its shuffle files under `work_dir`, until the process is stopped.
pub async fn executor(
    scheduler: &str,
    bind: SocketAddr,
    grpc_port: u16,
    slots: usize,
    work_dir: Option<String>,
) -> Result<()> {
    let (host, port) = scheduler
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse::<u16>().ok().map(|p| (h.to_string(), p)))
        .ok_or_else(|| Error::Option(format!("--scheduler '{scheduler}' is not host:port")))?;
    let config = ballista_executor::executor_process::ExecutorProcessConfig {
        bind_host: bind.ip().to_string(),
        external_host: Some(bind.ip().to_string()),
        port: bind.port(),
        grpc_port,
        scheduler_host: host,
        scheduler_port: port,
        vcores: slots.max(1),
        work_dir,
        ..Default::default()
    };
    eprintln!("flumen cluster executor: {bind} with {slots} slots, scheduler {scheduler}");
    ballista_executor::executor_process::start_executor_process(Arc::new(config))
        .await
        .map_err(|e| Error::Config(format!("the Ballista executor on {bind}: {e}")))
}
