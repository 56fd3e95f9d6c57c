//! The agent's own gRPC health service (`HEALTH_ADDR`), with reflection.
//!
//! `""` is SERVING only while the agent is connected to the coordinator, its self-check passes
//! ([`crate::self_check`]) and it takes work, so a readiness check means "this agent can run jobs
//! now". `liveness` is SERVING while the process
//! serves at all: restarts must check that one, or a coordinator outage would get every agent
//! restarted with its running analysis. The agent serves no `fondation.v1` service of its own,
//! so it reports no other name.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use fondation_runtime::{listener, serving};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::{server::HealthReporter, ServingStatus};

#[derive(Clone)]
pub struct HealthState {
    reporter: HealthReporter,
    flags: Arc<Flags>,
}

/// What readiness is made of; `""` is SERVING when connected, checked and not draining.
#[derive(Default)]
struct Flags {
    connected: AtomicBool,
    checks_passed: AtomicBool,
    draining: AtomicBool,
}

impl HealthState {
    pub async fn set_connected(&self, connected: bool) {
        self.flags.connected.store(connected, Ordering::Relaxed);
        self.refresh().await;
    }

    /// The self-check's latest outcome.
    pub async fn set_checks_passed(&self, passed: bool) {
        self.flags.checks_passed.store(passed, Ordering::Relaxed);
        self.refresh().await;
    }

    pub async fn set_draining(&self) {
        self.flags.draining.store(true, Ordering::Relaxed);
        self.refresh().await;
    }

    async fn refresh(&self) {
        let flags = &self.flags;
        let ready = flags.connected.load(Ordering::Relaxed)
            && flags.checks_passed.load(Ordering::Relaxed)
            && !flags.draining.load(Ordering::Relaxed);
        let status = if ready {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
    }
}

/// Starts the health server on `listener`; it stops when `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(HealthState, tokio::task::JoinHandle<()>), serving::ServingError> {
    let (reporter, service) = serving::health_service().await;
    let state = HealthState {
        reporter,
        flags: Arc::default(),
    };
    let connections = listener::Connections::new(listener::ConnectionLimits::default());
    let router = connections
        .server()
        .add_service(service)
        .add_service(serving::reflection_v1()?)
        .add_service(serving::reflection_v1alpha()?);
    let handle = tokio::spawn(async move {
        if let Err(error) =
            listener::serve(router, listener, &connections, stop.cancelled_owned()).await
        {
            tracing::error!(%error, "the health server failed");
        }
    });
    Ok((state, handle))
}
