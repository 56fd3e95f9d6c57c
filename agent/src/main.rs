//! `fondation-agent`: parse the configuration, read secret files, become AGENT_USER (before any
//! thread starts), bind the health address, run until signalled.
//! A first SIGTERM/SIGINT drains (running jobs may finish within SHUTDOWN_GRACE); a second one
//! stops running jobs at once and hands them back.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use fondation_agent::{sandbox::privileges, AgentConfig, Cli, Command, Shutdown};
use fondation_runtime::{listener, logging, serving, signals::TerminationSignals};

fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(Command::Health(args)) = &cli.command {
        return runtime()?.block_on(async {
            Ok(serving::health_command(&cli.config.health_addr, args, None).await?)
        });
    }
    // Secret files are read before the switch: they may be readable by root only.
    let config = cli.config.read_secret_files()?;
    // Before any thread exists: capabilities are per thread (see sandbox::privileges).
    let switch = privileges::become_agent_user(config.agent_user.as_ref())
        .context("switching to AGENT_USER")?;
    runtime()?.block_on(serve(config, switch))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn serve(config: AgentConfig, switch: privileges::Switch) -> anyhow::Result<ExitCode> {
    logging::init(config.log_format);
    if let privileges::Switch::Switched { uid, gid, kept } = switch {
        tracing::info!(uid, gid, capabilities = %kept, "running as AGENT_USER");
    }
    let listener = listener::bind(
        &config.health_addr,
        "HEALTH_ADDR",
        config.address_file.as_deref(),
    )
    .await?;
    let mut signals = TerminationSignals::install().context("installing signal handlers")?;
    let shutdown = Shutdown::default();
    let on_signal = shutdown.clone();
    // First signal: drain. Second: stop running jobs now (they are still handed back).
    tokio::spawn(async move {
        signals.next().await;
        on_signal.drain.cancel();
        signals.next().await;
        on_signal.now.cancel();
    });
    fondation_agent::run(listener, config, shutdown)
        .await
        .context("running the agent")?;
    Ok(ExitCode::SUCCESS)
}
