//! `fondation-coordinator`: parse the configuration, bind, serve until SIGINT/SIGTERM.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use fondation_coordinator::{Cli, Command};
use fondation_runtime::{listener, logging, serving, signals::TerminationSignals};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(Command::Health(args)) = &cli.command {
        let tls = cli.config.health_probe_tls()?;
        return Ok(serving::health_command(&cli.config.listen_addr, args, tls).await?);
    }
    let config = cli.config.read_secret_files()?;
    logging::init(config.log_format);
    let listener = listener::bind(
        &config.listen_addr,
        "LISTEN_ADDR",
        config.address_file.as_deref(),
    )
    .await?;
    let mut signals = TerminationSignals::install().context("installing signal handlers")?;
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        signals.next().await;
        on_signal.cancel();
    });
    fondation_coordinator::run(listener, config, shutdown)
        .await
        .context("running the coordinator")?;
    Ok(ExitCode::SUCCESS)
}
