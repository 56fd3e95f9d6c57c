//! Termination signals for both binaries: SIGTERM (what Docker and systemd send) and SIGINT
//! (Ctrl-C) mean the same thing; how many of them matter is the binary's business.

use tokio::signal::unix::{signal, Signal, SignalKind};

pub struct TerminationSignals {
    term: Signal,
    int: Signal,
}

impl TerminationSignals {
    /// Installs the handlers; from then on these signals no longer kill the process.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT and logs it.
    pub async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
