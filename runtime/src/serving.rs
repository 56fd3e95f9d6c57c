//! What every gRPC server of ours offers besides its own services: the health protocol with a
//! readiness and a liveness name, server reflection (v1 and v1alpha, since grpcurl 1.8 only
//! speaks v1alpha) covering our protos and the health protocol, and a health probe client for the
//! `health` subcommands used by container health checks.
//!
//! Readiness is not liveness. `""` (the whole server) is SERVING when the process takes work: an
//! agent only while connected to the coordinator. [`LIVENESS`] is SERVING for as long as the
//! process serves at all. Orchestrators restart what fails its liveness check, so that check must
//! not be readiness: a coordinator outage would otherwise get every agent killed with its running
//! analysis.

use std::time::Duration;

use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic_health::{
    pb::{
        health_check_response::ServingStatus,
        health_client::HealthClient,
        health_server::{Health, HealthServer},
        HealthCheckRequest,
    },
    server::HealthReporter,
};

/// Health service name that is SERVING while the process is alive and answering.
pub const LIVENESS: &str = "liveness";

/// The health service of a server of ours: [`LIVENESS`] SERVING, `""` NOT_SERVING until the
/// caller says it is ready.
pub async fn health_service() -> (HealthReporter, HealthServer<impl Health>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    (reporter, service)
}

/// Arguments of the `health` subcommand of both binaries.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    /// The health service name to ask about: `""` (the default) is ready to take work,
    /// `liveness` is alive (what restarts should check).
    #[arg(long, default_value = "")]
    pub service: String,
}

/// Errors of the reflection setup and of health probes.
#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("building the reflection service failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("invalid health address {addr:?}: {message}")]
    Address { addr: String, message: String },
    #[error(
        "health check of {addr} failed: {message}; is the process running and listening there?"
    )]
    Probe { addr: String, message: String },
}

/// Reflection service, protocol `grpc.reflection.v1`.
pub fn reflection_v1() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    ServingError,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fondation_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?)
}

/// Reflection service, protocol `grpc.reflection.v1alpha`.
pub fn reflection_v1alpha() -> Result<
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
    ServingError,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(fondation_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?)
}

/// Turns a listen address such as `0.0.0.0:50052` into one a local probe can dial.
pub fn local_dial_url(listen_addr: &str) -> String {
    let addr = listen_addr
        .replace("0.0.0.0", "127.0.0.1")
        .replace("[::]", "[::1]");
    if addr.starts_with("http://") || addr.starts_with("https://") {
        addr
    } else {
        format!("http://{addr}")
    }
}

/// The `health` subcommand of both binaries: prints the status of `args.service` on the server
/// listening at `listen_addr` and succeeds only when it is SERVING (for container health checks).
pub async fn health_command(
    listen_addr: &str,
    args: &HealthArgs,
    tls: Option<ClientTlsConfig>,
) -> Result<std::process::ExitCode, ServingError> {
    let status = probe_health_with(listen_addr, &args.service, Duration::from_secs(3), tls).await?;
    println!("{}", status.as_str_name());
    Ok(if status == ServingStatus::Serving {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// Asks the plaintext health service at `addr` about `service` ("" for the whole server).
pub async fn probe_health(
    addr: &str,
    service: &str,
    timeout: Duration,
) -> Result<ServingStatus, ServingError> {
    probe_health_with(addr, service, timeout, None).await
}

/// Like [`probe_health`], over TLS when `tls` is given.
pub async fn probe_health_with(
    addr: &str,
    service: &str,
    timeout: Duration,
    tls: Option<ClientTlsConfig>,
) -> Result<ServingStatus, ServingError> {
    let mut url = local_dial_url(addr);
    if tls.is_some() {
        url = url.replacen("http://", "https://", 1);
    }
    let address_error = |message: String| ServingError::Address {
        addr: addr.to_string(),
        message,
    };
    let mut endpoint =
        Endpoint::from_shared(url.clone()).map_err(|e| address_error(e.to_string()))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| address_error(e.to_string()))?;
    }
    let probe_error = |message: String| ServingError::Probe {
        addr: url.clone(),
        message,
    };
    let channel = endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| probe_error(e.to_string()))?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .map_err(|status| probe_error(status.message().to_string()))?;
    Ok(response.into_inner().status())
}
