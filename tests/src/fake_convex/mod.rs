//! A fake Convex deployment running the Fondation functions, for tests and compose: a real HTTP
//! server with Convex's endpoints, body formats, validation, reply envelopes and status codes
//! (`DESIGN.md` section 2), plus fault injection and inspection under `/_fake/...`.
//!
//! Convex API (as the real deployment):
//! - `POST /api/query`, `/api/mutation`, `/api/action` with `{"path","format","args"}` (`args` an
//!   object or a one-element array). Requires `Convex-Client` (400 `BadRequest` without it) and
//!   `Content-Type: application/json`. `Authorization: Convex <key>` with the configured deploy
//!   key makes an admin call (internal functions run, function errors are readable); a wrong key
//!   is a 401; no header is a public call. Function results and errors come as
//!   `{"status":"success"|"error",..}` with HTTP 200, or [`FakeOptions::function_error_status`]
//!   (560 by default) for errors. As in production, the message of an error raised while a
//!   function runs (a throw, a transaction limit) is hidden from public callers
//!   (`[Request ID: <hex>] Server Error`) unless [`FakeOptions::expose_errors`]; request-shape
//!   errors (argument validation, unknown function) stay readable.
//! - Functions: `queue:claimOne`, `queue:heartbeat`, `queue:complete`, `queue:retryOrFail`,
//!   `queue:createJob`, the internal `queue:reclaimExpired` (never scheduled),
//!   `repositories:getByRepositoryId`, `docs:upsertFromJob`, `docs:listByJobId`, `jobs:getJob`,
//!   `jobs:create`, `jobs:requestCancel`, `jobs:updateStatus`, `users:getUserById`,
//!   `users:getGitHubToken`, and the fake-only `repositories:create {fullName, defaultBranch,
//!   userId?}` and `users:create {githubId, githubAccessToken?}` returning the new id.
//! - Faults: besides transport faults, `applyThenDrop` runs a mutation and drops its reply, and
//!   `throw` makes a call fail as a function error without applying it.
//!
//! Admin (JSON):
//! - `GET /_fake/calls`: every call recorded ([`CallRecord`]).
//! - `GET /_fake/jobs`, `GET /_fake/jobs/{id}`: raw job documents; `PATCH /_fake/jobs/{id}` merges
//!   fields (`null` removes one).
//! - `GET /_fake/docs/{jobId}`: the job's stored documents.
//! - `POST /_fake/faults` ([`FaultSpec`]), `GET` lists them, `DELETE` clears them and releases hung
//!   calls.
//! - `POST /_fake/latency` ([`LatencySpec`]).
//! - `GET /_fake/violations` ([`Violations`]): writes that undid a cancel.
//! - `POST /_fake/reset`: empties everything (options stay).

mod admin;
mod client;
mod functions;
mod http;
mod queue;
mod store;
mod users;
pub mod validate;

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, task::JoinHandle};
use tokio_util::sync::CancellationToken;

pub use self::{
    client::{FakeConvexClient, FunctionFailure},
    functions::normalize_markdown,
    store::{
        now_ms, AuthSeen, CallOutcome, CallRecord, FaultKind, FaultSpec, JobDoc, LatencySpec,
        RepositoryDoc, StoredDoc, UserDoc, Violations,
    },
};

/// Behaviour knobs; the defaults are the real deployment's.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// `queue:retryOrFail` backoff: `base x 2^(attempts-1)`, capped at `backoff_max`.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Up to this much random delay is added to each backoff.
    pub backoff_jitter: Duration,
    /// The `maxAttempts` `jobs:create` writes (5, as the web app), and the default of
    /// `queue:retryOrFail` for jobs without one.
    pub max_attempts: u32,
    /// Lease when `leaseMs` is omitted.
    pub default_lease: Duration,
    /// HTTP status of function-error replies: 560 (Convex cloud) or 200 (self-hosted).
    pub function_error_status: u16,
    /// The deployment's deploy key. Calls carrying `Authorization: Convex <key>` are admin calls:
    /// they may run internal functions (`queue:reclaimExpired`) and read function error
    /// messages. Calls without the header run public functions; a wrong key is a 401.
    pub deploy_key: Option<String>,
    /// Show function error messages to every caller, as a dev deployment does; production hides
    /// them from callers without the deploy key (the default here).
    pub expose_errors: bool,
    /// What one mutation may read, and separately write, in bytes (Convex: 16 MiB each).
    pub transaction_bytes_limit: usize,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
            backoff_jitter: Duration::from_secs(5),
            max_attempts: 5,
            default_lease: Duration::from_secs(300),
            function_error_status: 560,
            deploy_key: None,
            expose_errors: false,
            transaction_bytes_limit: validate::MAX_ARGS_BYTES,
        }
    }
}

impl FakeOptions {
    /// The real semantics with no retry delay, so a retried job is claimable at once.
    pub fn fast() -> Self {
        FakeOptions {
            backoff_base: Duration::ZERO,
            backoff_jitter: Duration::ZERO,
            ..FakeOptions::default()
        }
    }
}

/// Serves the fake on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    options: FakeOptions,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let shared = Arc::new(http::Shared::new(options, shutdown.clone()));
    axum::serve(listener, http::router(shared))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Starts the fake in this process; it stops on [`FakeConvexHandle::shutdown`] or when the
/// handle is dropped.
pub async fn spawn(listener: TcpListener, options: FakeOptions) -> FakeConvexHandle {
    let addr = listener
        .local_addr()
        .expect("a bound TCP listener has a local address");
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(run(listener, options, shutdown.clone()));
    FakeConvexHandle {
        addr,
        shutdown,
        task: Some(task),
    }
}

/// A fake started by [`spawn`].
pub struct FakeConvexHandle {
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl FakeConvexHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The deployment URL to give a Convex client (`http://127.0.0.1:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client(&self) -> FakeConvexClient {
        FakeConvexClient::new(&self.url())
    }

    /// Stops serving (hung calls end) and waits for the server task.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for FakeConvexHandle {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
