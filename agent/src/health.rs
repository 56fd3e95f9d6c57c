//! The agent's own gRPC health service (`HEALTH_ADDR`), with reflection.
//!
//! `""` is SERVING only while the agent is connected to the coordinator and takes work, so a
//! readiness check means "this agent can run jobs now". `liveness` is SERVING while the process
//! serves at all: restarts must check that one, or a coordinator outage would get every agent
//! restarted with its running analysis. The agent serves no `fondation.v1` service of its own,
//! so it reports no other name.

use fondation_runtime::{listener, serving};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::{server::HealthReporter, ServingStatus};

#[derive(Clone)]
pub struct HealthState {
    reporter: HealthReporter,
    draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HealthState {
    pub async fn set_connected(&self, connected: bool) {
        let draining = self.draining.load(std::sync::atomic::Ordering::Relaxed);
        self.set_ready(connected && !draining).await;
    }

    pub async fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.set_ready(false).await;
    }

    async fn set_ready(&self, ready: bool) {
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
        draining: Default::default(),
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
