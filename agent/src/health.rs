//! The agent's own gRPC health service (`HEALTH_ADDR`), with reflection.
//!
//! `""` is SERVING only while the agent is connected to the coordinator and takes work, so a
//! health check means "this agent can run jobs now", not merely "the process exists".

use fondation_proto::serving;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic_health::{server::HealthReporter, ServingStatus};

/// Name under which the agent reports its own health, besides the overall `""`.
pub const AGENT_SERVICE: &str = "fondation.v1.Agent";

#[derive(Clone)]
pub struct HealthState {
    reporter: HealthReporter,
    draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HealthState {
    pub async fn set_connected(&self, connected: bool) {
        let draining = self.draining.load(std::sync::atomic::Ordering::Relaxed);
        self.set(connected && !draining).await;
    }

    pub async fn set_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.set(false).await;
    }

    async fn set(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for service in ["", AGENT_SERVICE] {
            self.reporter.set_service_status(service, status).await;
        }
    }
}

/// Starts the health server on `listener`; it stops when `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    stop: CancellationToken,
) -> Result<(HealthState, tokio::task::JoinHandle<()>), serving::ServingError> {
    let (reporter, service) = tonic_health::server::health_reporter();
    let state = HealthState {
        reporter,
        draining: Default::default(),
    };
    state.set(false).await;
    let router = tonic::transport::Server::builder()
        .add_service(service)
        .add_service(serving::reflection_v1()?)
        .add_service(serving::reflection_v1alpha()?);
    let handle = tokio::spawn(async move {
        let incoming = TcpListenerStream::new(listener);
        if let Err(error) = router
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
        {
            tracing::error!(%error, "the health server failed");
        }
    });
    Ok((state, handle))
}
