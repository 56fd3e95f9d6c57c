//! A fake Convex deployment running the Fondation functions (see `fondation_testkit::fake_convex`).
//! Prints `listening on http://ADDR` as its first line on stdout, serves until SIGTERM or SIGINT.

use std::{io::Write, time::Duration};

use anyhow::Context;
use clap::Parser;
use fondation_testkit::fake_convex::{self, FakeOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(about = "A fake Convex deployment running the Fondation functions")]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "FAKE_CONVEX_LISTEN", default_value = "127.0.0.1:0")]
    listen: String,
    /// queue:retryOrFail backoff base in ms (doubles per attempt).
    #[arg(long, env = "FAKE_CONVEX_BACKOFF_BASE_MS", default_value_t = 5_000)]
    backoff_base_ms: u64,
    /// Longest backoff in ms.
    #[arg(long, env = "FAKE_CONVEX_BACKOFF_MAX_MS", default_value_t = 600_000)]
    backoff_max_ms: u64,
    /// Up to this many ms of random delay added to each backoff.
    #[arg(long, env = "FAKE_CONVEX_BACKOFF_JITTER_MS", default_value_t = 5_000)]
    backoff_jitter_ms: u64,
    /// Attempts after which a job is dead.
    #[arg(long, env = "FAKE_CONVEX_MAX_ATTEMPTS", default_value_t = 5)]
    max_attempts: u32,
    /// HTTP status of function-error replies: 560 (Convex cloud) or 200 (self-hosted).
    #[arg(long, env = "FAKE_CONVEX_FUNCTION_ERROR_STATUS", default_value_t = 560)]
    function_error_status: u16,
    /// The deploy key: calls carrying it may run internal functions and read error messages.
    #[arg(long, env = "FAKE_CONVEX_DEPLOY_KEY", hide_env_values = true)]
    deploy_key: Option<String>,
    /// Show function error messages to callers without the deploy key (a dev deployment).
    #[arg(long, env = "FAKE_CONVEX_EXPOSE_ERRORS")]
    expose_errors: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout's first line is the address, for whoever started us.
    fondation_runtime::logging::init_with_default(
        fondation_runtime::logging::LogFormat::Plain,
        "error",
    );
    let args = Args::parse();
    let options = FakeOptions {
        backoff_base: Duration::from_millis(args.backoff_base_ms),
        backoff_max: Duration::from_millis(args.backoff_max_ms),
        backoff_jitter: Duration::from_millis(args.backoff_jitter_ms),
        max_attempts: args.max_attempts,
        function_error_status: args.function_error_status,
        deploy_key: args.deploy_key,
        expose_errors: args.expose_errors,
        ..FakeOptions::default()
    };
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding FAKE_CONVEX_LISTEN {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "listening on http://{addr}").context("writing to stdout")?;
    stdout.flush().context("flushing stdout")?;

    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    fake_convex::run(listener, options, shutdown)
        .await
        .context("serving")
}

/// Turns the first SIGINT or SIGTERM into a cancelled token.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::error!(%error, "cannot listen for SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    shutdown.cancel();
}
