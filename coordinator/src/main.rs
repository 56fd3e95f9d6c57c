//! `fondation-coordinator`: parse the configuration, bind, serve until SIGINT/SIGTERM.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use fondation_coordinator::{Cli, Command};
use fondation_proto::{logging, serving};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(Command::Health) = cli.command {
        let tls = cli.config.health_probe_tls()?;
        return Ok(serving::health_command(&cli.config.listen_addr, tls).await?);
    }
    logging::init(cli.config.log_format);
    let listener = tokio::net::TcpListener::bind(&cli.config.listen_addr)
        .await
        .with_context(|| format!("binding LISTEN_ADDR {}", cli.config.listen_addr))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    fondation_coordinator::run(listener, cli.config, shutdown)
        .await
        .context("running the coordinator")?;
    Ok(ExitCode::SUCCESS)
}

/// Turns the first SIGINT or SIGTERM into a cancelled token.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("could not install signal handlers; stop with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    shutdown.cancel();
}
