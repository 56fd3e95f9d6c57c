//! `fondation-agent`: parse the configuration, bind the health address, run until signalled.
//! A first SIGTERM/SIGINT drains (running jobs may finish within SHUTDOWN_GRACE); a second one
//! stops running jobs at once and hands them back.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use fondation_agent::{Cli, Command, Shutdown};
use fondation_runtime::{listener, logging, serving, signals::TerminationSignals};

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(Command::Health(args)) = &cli.command {
        return Ok(serving::health_command(&cli.config.health_addr, args, None).await?);
    }
    let config = cli.config.read_secret_files()?;
    logging::init(config.log_format);
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
