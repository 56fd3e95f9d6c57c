//! `fondation-agent`: parse the configuration, bind the health address, run until signalled.
//! A first SIGTERM/SIGINT drains (running jobs may finish within SHUTDOWN_GRACE); a second one
//! stops running jobs at once and hands them back.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use fondation_agent::{Cli, Command, Shutdown};
use fondation_proto::{logging, serving};

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    if let Some(Command::Health) = cli.command {
        return Ok(serving::health_command(&cli.config.health_addr, None).await?);
    }
    logging::init(cli.config.log_format);
    let listener = tokio::net::TcpListener::bind(&cli.config.health_addr)
        .await
        .with_context(|| format!("binding HEALTH_ADDR {}", cli.config.health_addr))?;
    let shutdown = Shutdown::default();
    tokio::spawn(on_signals(shutdown.clone()));
    fondation_agent::run(listener, cli.config, shutdown)
        .await
        .context("running the agent")?;
    Ok(ExitCode::SUCCESS)
}

/// First SIGTERM/SIGINT: drain. Second: stop running jobs now (they are still handed back).
async fn on_signals(shutdown: Shutdown) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("could not install signal handlers; stop with SIGKILL");
        return;
    };
    for round in 0..2 {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        if round == 0 {
            shutdown.drain.cancel();
        } else {
            shutdown.now.cancel();
        }
    }
}
