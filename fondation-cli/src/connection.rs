//! Dialing the coordinator's Admin API, as the other binaries dial: plain or TLS (with a client
//! certificate for mutual TLS), the Admin token as bearer metadata. Failures become a
//! [`CliError`] that says what to do.

use std::time::Duration;

use fondation_proto::pb::admin_client::AdminClient;
use fondation_runtime::{settings, tls};
use tonic::{
    metadata::MetadataValue,
    service::{interceptor::InterceptedService, Interceptor},
    transport::{Channel, Endpoint},
    Code, Request, Status,
};

use crate::args::ConnectionArgs;

/// How long to wait for the coordinator to answer the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub type Admin = AdminClient<InterceptedService<Channel, BearerToken>>;

/// What went wrong, said for the person at the terminal.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("coordinator not reachable at {url}: is it running? (set --coordinator or FONDATION_COORDINATOR; {reason})")]
    Unreachable { url: String, reason: String },
    #[error("invalid coordinator address {url:?}: {reason} (e.g. http://127.0.0.1:50051)")]
    BadAddress { url: String, reason: String },
    #[error("{0}")]
    Settings(String),
    #[error("the coordinator refused the token: set ADMIN_TOKEN (or ADMIN_TOKEN_FILE) to its ADMIN_TOKEN ({0})")]
    Unauthenticated(String),
    #[error("this token may only read: set ADMIN_TOKEN to the coordinator's ADMIN_TOKEN ({0})")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("refused: {0}")]
    InvalidArgument(String),
    #[error("the coordinator at {url} cannot do this: {message}")]
    Unsupported { url: String, message: String },
    #[error("the connection to the coordinator at {url} failed: {message}")]
    Unavailable { url: String, message: String },
    #[error("the coordinator answered with an error ({code}): {message}")]
    Other { code: Code, message: String },
    #[error("job {job_id} ended {status}: {error}")]
    JobFailed {
        job_id: String,
        status: String,
        error: String,
    },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl CliError {
    /// The error of a call that failed with `status`.
    pub fn from_status(status: Status, url: &str) -> Self {
        let message = status.message().to_string();
        match status.code() {
            Code::Unauthenticated => CliError::Unauthenticated(message),
            Code::PermissionDenied => CliError::PermissionDenied(message),
            Code::NotFound => CliError::NotFound(message),
            Code::InvalidArgument | Code::FailedPrecondition | Code::AlreadyExists => {
                CliError::InvalidArgument(message)
            }
            Code::Unimplemented => CliError::Unsupported {
                url: url.to_string(),
                message,
            },
            Code::Unavailable => CliError::Unavailable {
                url: url.to_string(),
                message,
            },
            code => CliError::Other { code, message },
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct BearerToken(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Connects to the coordinator named in `args`.
pub async fn connect(args: &ConnectionArgs) -> Result<Admin, CliError> {
    let url = args.coordinator.clone();
    let token = settings::secret_setting(
        "ADMIN_TOKEN",
        args.admin_token.clone(),
        args.admin_token_file.as_deref(),
    )
    .map_err(|error| CliError::Settings(error.to_string()))?;
    let token = token
        .map(|token| {
            format!("Bearer {}", token.expose())
                .parse()
                .map_err(|_| CliError::Settings("ADMIN_TOKEN must be printable ASCII".into()))
        })
        .transpose()?;

    let bad_address = |reason: String| CliError::BadAddress {
        url: url.clone(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|error| bad_address(error.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    if url.starts_with("https://") {
        let read = |path: &std::path::Path, what, variable| {
            tls::read_pem(path, what, variable)
                .map_err(|error| CliError::Settings(error.to_string()))
        };
        let ca = args
            .tls_ca
            .as_deref()
            .map(|path| read(path, "the CA certificate", "TLS_CA"))
            .transpose()?;
        let identity = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => Some((
                read(cert, "the client certificate", "TLS_CERT")?,
                read(key, "the client key", "TLS_KEY")?,
            )),
            _ => None,
        };
        endpoint = endpoint
            .tls_config(tls::client_config(ca, identity, args.tls_domain.as_deref()))
            .map_err(|error| bad_address(error.to_string()))?;
    } else if args.tls_ca.is_some() || args.tls_cert.is_some() {
        return Err(CliError::Settings(format!(
            "TLS settings are given but {url} is not an https:// address: use https://"
        )));
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| CliError::Unreachable {
            url: url.clone(),
            // Transport errors say little at the top; the causes say what happened.
            reason: format!("{:#}", anyhow::Error::new(error)),
        })?;
    Ok(AdminClient::with_interceptor(channel, BearerToken(token)))
}
