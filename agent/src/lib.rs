//! The Fondation agent: a long-lived process that dials the coordinator, runs the analyzer CLI on
//! the jobs it is assigned, streams their progress and returns their documents.
//!
//! Layout:
//! - [`config`]: flags and environment variables;
//! - [`session`]: the stream to the coordinator, reconnects, held results;
//! - [`runner`]: one assignment end to end (workspace, clone, analyzer, output);
//! - [`clone`]: the checked `git clone`; [`process`]: child processes in their own group;
//! - [`analyzer`]: the `ANALYZER_COMMAND` template; [`progress`]: reading the CLI's progress;
//! - [`collector`]: the output folder turned into documents;
//! - [`output_tail`]: the analyzer's output lines kept and sent for the job's logs, with
//!   [`redact`] taking the secrets out of them;
//! - [`sandbox`]: the analyzer's environment allow-list, per-slot users and process sweep;
//! - [`self_check`]: what every job needs, checked before taking work and after agent failures;
//! - [`health`]: the agent's own gRPC health service;
//! - [`metrics`]: the agent's Prometheus registry (`METRICS_ADDR`) and each run's timer.

pub mod analyzer;
pub mod clone;
pub mod collector;
pub mod config;
pub mod health;
pub mod metrics;
pub mod output_tail;
pub mod process;
pub mod progress;
pub mod redact;
pub mod runner;
pub mod sandbox;
pub mod self_check;
pub mod session;

use std::sync::Arc;

pub use config::{AgentConfig, Cli, Command};
pub use session::Shutdown;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Workspace(#[from] runner::WorkspaceError),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Serving(#[from] fondation_runtime::serving::ServingError),
    #[error(transparent)]
    Listen(#[from] fondation_runtime::listener::ListenError),
}

/// Runs the agent until `shutdown.drain` is cancelled and its jobs have ended, or were handed back
/// when `shutdown.now` fired or SHUTDOWN_GRACE ran out. The caller binds the health listener
/// (tests bind port 0).
pub async fn run(
    health_listener: TcpListener,
    config: AgentConfig,
    shutdown: Shutdown,
) -> Result<(), AgentError> {
    let checked = config.check()?;
    let workspace_root = config.temp_dir.join(&checked.agent_id);
    // Held until the agent returns: a second agent with our id and TEMP_DIR refuses to start.
    let _workspace_lock = runner::prepare_workspace_root(&workspace_root)?;
    let sandbox = sandbox::Sandbox::new(
        config.analyzer_isolation,
        config.analyzer_uid_base,
        config.max_concurrent_jobs,
        checked.analyzer_env,
        &workspace_root,
    )?;
    // A previous instance may have been killed with its analyzers running: none may go on.
    sandbox.sweep_all().await;
    let metrics_listener = fondation_runtime::metrics::bind(
        &config.metrics_addr,
        config.metrics_address_file.as_deref(),
    )
    .await?;
    let stop_health = CancellationToken::new();
    let (health, health_task) = health::serve(health_listener, stop_health.clone()).await?;
    let metrics = metrics::AgentMetrics::new(config.max_concurrent_jobs);
    // Served until the very end, like health: a draining agent's last runs are still counted.
    let metrics_task = metrics_listener.map(|listener| {
        tokio::spawn(fondation_runtime::metrics::serve(
            listener,
            metrics.clone(),
            stop_health.clone().cancelled_owned(),
        ))
    });
    tracing::info!(agent_id = %checked.agent_id, coordinator = %config.coordinator_url, slots = config.max_concurrent_jobs, "agent starting");
    let check = self_check::SelfCheck {
        workspace_root: workspace_root.clone(),
        min_free_disk: config.min_free_disk.as_u64(),
        workdir: config.analyzer_workdir.clone(),
        analyzer_argv: checked.template.argv().to_vec(),
        analyzer_env: sandbox.analyzer_env(&workspace_root, 0),
        slot_user: sandbox.user(0),
        check_command: checked.check_command.clone(),
        check_timeout: config.analyzer_check_timeout,
    };
    let readiness = self_check::Readiness::default();
    let checker = tokio::spawn(self_check::supervise(
        check,
        readiness.clone(),
        health.clone(),
        stop_health.clone(),
    ));
    let ctx = Arc::new(runner::RunnerContext {
        config,
        workspace_root,
        allowlist: checked.allowlist,
        template: checked.template,
        sandbox,
        metrics,
    });
    let grace = ctx.config.shutdown_grace;
    let grace_timer = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.drain.cancelled().await;
            tokio::select! {
                _ = tokio::time::sleep(grace) => shutdown.now.cancel(),
                _ = shutdown.now.cancelled() => {}
            }
        })
    };
    session::Agent::new(ctx, checked.agent_id, checked.tls, health, readiness)
        .run(shutdown)
        .await;
    grace_timer.abort();
    stop_health.cancel();
    let _ = health_task.await;
    if let Some(task) = metrics_task {
        if let Ok(Err(error)) = task.await {
            tracing::warn!(%error, "the metrics endpoint failed");
        }
    }
    let _ = checker.await;
    Ok(())
}
