//! `flumen cluster scheduler` and `flumen cluster executor`: Ballista's scheduler and executor,
//! started from the flumen binary so that any machine with it can join a cluster (cargo
//! feature `cluster`).
//!
//! Both are started with flumen's codecs ([`codec`]), so that connector tables, their scans and
//! their sinks cross from `flumen run --cluster` to the scheduler and the executors.

pub mod codec;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ballista_core::extension::{SessionConfigExt, SessionStateExt};
use datafusion::execution::SessionState;
use datafusion::execution::session_state::SessionStateBuilder;

use ballista_scheduler::cluster::BallistaCluster;
use ballista_scheduler::config::SchedulerConfig;

use crate::error::{Error, Result};

/// Runs a scheduler on `bind` until the process is stopped.
pub async fn scheduler(bind: SocketAddr) -> Result<()> {
    let config = SchedulerConfig {
        bind_host: bind.ip().to_string(),
        external_host: bind.ip().to_string(),
        bind_port: bind.port(),
        override_logical_codec: Some(Arc::new(codec::LogicalCodec::new(PathBuf::from(".flumen")))),
        override_physical_codec: Some(Arc::new(codec::PhysicalCodec::new(PathBuf::from(".flumen")))),
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
    let config = state
        .config()
        .clone()
        .with_ballista_logical_extension_codec(Arc::new(codec::LogicalCodec::new(state_dir.to_path_buf())))
        .with_ballista_physical_extension_codec(Arc::new(codec::PhysicalCodec::new(state_dir.to_path_buf())));
    let state = SessionStateBuilder::new_from_existing(state)
        .with_config(config)
        .build();
    Ok(state.upgrade_for_ballista(scheduler)?)
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
