//! Builds the coordinator from its configuration and serves it until shutdown.

use std::{sync::Arc, time::Duration};

use fondation_proto::{
    pb::{admin_server::AdminServer, agent_gateway_server::AgentGatewayServer},
    ADMIN_SERVICE, AGENT_GATEWAY_SERVICE,
};
use fondation_runtime::{listener, metrics as metrics_endpoint, serving, tls};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::{
    admin::Admin,
    agents::AgentRegistry,
    assignments::AssignmentTable,
    config::{ConfigError, CoordinatorConfig},
    context::Context,
    database::{Database, DatabaseError},
    dispatcher,
    gateway::Gateway,
    history::History,
    identity,
    job_logs::JobLogs,
    job_source::{
        convex::{ConvexConfig, ConvexSource},
        embedded_store::{EmbeddedOptions, EmbeddedStore},
        observed::ObservedSource,
        JobSource, JobSourceError,
    },
    journal::{self, Journal},
    lease::{spawn_keeper, KeeperStart},
    metrics::{CoordinatorMetrics, Scrape},
    source_health::SourceHealth,
};

/// How long lease keepers get to suspend at shutdown before the server stops anyway.
const SUSPEND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not create DATA_DIR {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("could not open the coordinator's database: {0}")]
    Database(#[from] DatabaseError),
    #[error("could not open the job source: {0}")]
    Source(#[from] JobSourceError),
    #[error(transparent)]
    Serving(#[from] serving::ServingError),
    #[error(transparent)]
    Tls(#[from] tls::TlsFileError),
    #[error(transparent)]
    Listen(#[from] listener::ListenError),
    #[error("the gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Opens the job source the configuration asks for: Convex when `CONVEX_URL` is set, else the
/// embedded store in `DATA_DIR`.
fn open_source(
    config: &CoordinatorConfig,
    db: &Database,
) -> Result<Arc<dyn JobSource>, ServeError> {
    Ok(match &config.convex_url {
        Some(url) => Arc::new(ConvexSource::new(ConvexConfig {
            deploy_key: config
                .convex_deploy_key
                .as_ref()
                .map(|key| key.expose().to_string()),
            clone_url_template: config.clone_url_template.clone(),
            request_timeout: config.convex_request_timeout,
            retry_budget: config.convex_retry_budget,
            encryption_key: config.parsed_encryption_key()?,
            ..ConvexConfig::new(url.clone())
        })?),
        None => Arc::new(EmbeddedStore::new(
            db.clone(),
            EmbeddedOptions {
                max_attempts: config.max_attempts,
                backoff_base: config.retry_backoff,
                backoff_jitter: config.retry_backoff,
                ..EmbeddedOptions::default()
            },
        )),
    })
}

/// Serves the coordinator on `listener` until `shutdown` is cancelled, then hands back what it
/// cannot finish and returns.
pub async fn run(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let allowlist = config.validate()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let worker_id = identity::resolve(config.worker_id.as_deref(), &config.data_dir)?;
    // One owner of the file for the journal and the embedded store (crate::database).
    let db = Database::open(&config.data_dir)?;
    let source = open_source(&config, &db)?;
    // Convex jobs go away without the coordinator hearing of it: their history is capped.
    let history = match config.convex_url {
        Some(_) => History::capped(db.clone()),
        None => History::new(db.clone(), None),
    };
    let metrics = CoordinatorMetrics::new(config.convex_url.is_none());
    let source_health = Arc::new(SourceHealth::new(
        source.kind(),
        config.source_unhealthy_after,
    ));
    let source: Arc<dyn JobSource> = Arc::new(ObservedSource::new(
        source,
        metrics.source(),
        source_health.clone(),
    ));
    let job_logs = JobLogs::new(db.clone());
    let journal = Journal::new(db);
    let metrics_listener =
        metrics_endpoint::bind(&config.metrics_addr, config.metrics_address_file.as_deref())
            .await?;
    info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        source = source.kind(),
        worker_id = %worker_id,
        "coordinator starting"
    );

    let keepalive = config.agent_heartbeat_interval();
    let keepalive_timeout = config.agent_timeout;
    let ctx = Arc::new(Context {
        config,
        allowlist,
        worker_id,
        source,
        source_health,
        metrics,
        started: std::time::Instant::now(),
        agents: AgentRegistry::default(),
        journal,
        history,
        assignments: AssignmentTable::default(),
        job_logs,
        wake_claimer: tokio::sync::Notify::new(),
        shutdown: shutdown.clone(),
        sessions_closed: CancellationToken::new(),
    });

    let (health, health_service) = serving::health_service().await;
    for service in [AGENT_GATEWAY_SERVICE, ADMIN_SERVICE] {
        health
            .set_service_status(service, ServingStatus::Serving)
            .await;
    }
    // The whole server's readiness (`""`) follows the job source's health and shutdown.
    let readiness = {
        let (ctx, health) = (ctx.clone(), health.clone());
        tokio::spawn(async move {
            ctx.source_health
                .drive_readiness(ctx.shutdown.clone(), |ready| {
                    let status = if ready {
                        ServingStatus::Serving
                    } else {
                        ServingStatus::NotServing
                    };
                    let health = health.clone();
                    async move { health.set_service_status("", status).await }
                })
                .await
        })
    };
    let metrics_server = metrics_listener.map(|listener| {
        let shutdown = ctx.shutdown.clone().cancelled_owned();
        tokio::spawn(metrics_endpoint::serve(
            listener,
            Arc::new(Scrape(ctx.clone())),
            shutdown,
        ))
    });

    // Before serving: an agent re-attaching must find its journaled run.
    recover(&ctx).await?;
    let claimer = tokio::spawn(dispatcher::run_claim_loop(ctx.clone()));
    let reclaimer = tokio::spawn(crate::reclaimer::run(ctx.clone()));

    let stopping = {
        let ctx = ctx.clone();
        async move {
            ctx.shutdown.cancelled().await;
            info!(
                "shutting down: no more claims; in-flight jobs stay journaled for the next start"
            );
            for service in [AGENT_GATEWAY_SERVICE, ADMIN_SERVICE] {
                health
                    .set_service_status(service, ServingStatus::NotServing)
                    .await;
            }
            // Its last word is NOT_SERVING for `""`.
            let _ = readiness.await;
            wait_for_keepers(&ctx).await;
            ctx.sessions_closed.cancel();
        }
    };

    let connections = listener::Connections::new(ctx.config.connection_limits());
    let mut builder = connections.server();
    if let Some(tls) = server_tls(&ctx.config)? {
        builder = builder.tls_config(tls)?;
    }
    let router = builder
        .http2_keepalive_interval(Some(keepalive))
        .http2_keepalive_timeout(Some(keepalive_timeout))
        .add_service(health_service)
        .add_service(serving::reflection_v1()?)
        .add_service(serving::reflection_v1alpha()?)
        .add_service(AgentGatewayServer::new(Gateway::new(ctx.clone())))
        .add_service(AdminServer::new(Admin::new(ctx.clone())));
    listener::serve(router, listener, &connections, stopping).await?;
    let _ = claimer.await;
    let _ = reclaimer.await;
    if let Some(server) = metrics_server {
        match server.await {
            Ok(Err(error)) => warn!(%error, "the metrics endpoint failed"),
            Err(error) => warn!(%error, "the metrics endpoint panicked"),
            Ok(Ok(())) => {}
        }
    }
    info!("coordinator stopped");
    Ok(())
}

/// TLS for LISTEN_ADDR when certificates are configured. Client certificates are optional at the
/// TLS layer so operators keep Admin, health and reflection; the gateway refuses agents without
/// one when TLS_CLIENT_CA is set.
fn server_tls(config: &CoordinatorConfig) -> Result<Option<ServerTlsConfig>, ServeError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let cert = tls::read_pem(cert, "the TLS certificate", "TLS_CERT")?;
    let key = tls::read_pem(key, "the TLS key", "TLS_KEY")?;
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(ca) = &config.tls_client_ca {
        let ca = tls::read_pem(ca, "the client CA certificate", "TLS_CLIENT_CA")?;
        tls = tls
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(true);
    }
    Ok(Some(tls))
}

/// Adopts the journal's jobs: keepers resume their leases and wait for their agents to re-attach
/// (or deliver an end that was not delivered yet).
async fn recover(ctx: &Arc<Context>) -> Result<(), ServeError> {
    let entries = ctx.journal.load().await?;
    if !entries.is_empty() {
        info!(jobs = entries.len(), "recovering journaled jobs");
    }
    for entry in entries {
        ctx.assignments.observe_epoch(entry.record.epoch);
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        ctx.assignments.insert(entry.record.clone(), events_tx);
        spawn_keeper(
            ctx.clone(),
            entry.record,
            events_rx,
            KeeperStart::Recovered { end: entry.end },
        );
    }
    Ok(())
}

/// Waits until every lease keeper has suspended or finished, within a bound.
async fn wait_for_keepers(ctx: &Context) {
    if tokio::time::timeout(SUSPEND_TIMEOUT, ctx.assignments.emptied())
        .await
        .is_err()
    {
        warn!(
            remaining = ctx.assignments.len(),
            "lease keepers did not stop in time; the journal still has their jobs"
        );
    }
}
