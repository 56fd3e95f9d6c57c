//! HTTP client for Convex's function API: builds requests, parses replies, classifies errors and
//! retries what may succeed later.
//!
//! Classification follows `DESIGN.md` section 2: a `{"status":"error"}` reply (HTTP 200 from a
//! self-hosted backend, 560 from the cloud) is the function's own error and is never retried;
//! 408, 429, other 5xx and transport failures (connection refused or reset, timeouts, truncated
//! bodies) are transient; any other status is a request error (bad request, bad key, unknown
//! deployment) that no retry fixes. A function error's message is kept for logs only: production
//! hides it from callers without the deploy key, so no caller decides anything from it.
//!
//! The HTTP API has no mutation idempotency: a transient failure after the request was sent may
//! hide an applied mutation. Functions that are safe to repeat ([`ConvexFunction::REPEATABLE`]:
//! queries, `queue:heartbeat`, `docs:upsertFromJob`) are retried within the call's budget; the
//! others are retried only while the request provably never left (the connection was refused),
//! and otherwise end in [`CallError::Ambiguous`] for the caller to resolve by reading the job.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use base64::Engine;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use serde_json::Value;
use tracing::{debug, warn};

use super::functions::ConvexFunction;
use crate::job_source::JobSourceError;
use fondation_proto::limits::MAX_QUOTED_BODY_CHARS;

/// Name and version sent in `Convex-Client`, which the API expects as `<name>-<semver>`.
const CLIENT_NAME: &str = concat!("fondation-coordinator-", env!("CARGO_PKG_VERSION"));

/// An attempt never gets less than this (or the request timeout, if smaller), so the last attempt
/// before the budget runs out still has a chance.
const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The function ran and threw (or rejected its arguments). `message` is for logs only: a
    /// production deployment replaces it with `[Request ID: ...] Server Error` for callers
    /// without the deploy key.
    #[error("{path}: {message}")]
    Function { path: &'static str, message: String },
    /// A mutation that is not safe to repeat failed after its request was sent: it may have been
    /// applied. Not retried; the caller reads the job back to know.
    #[error("{path}: reply lost, the call may have been applied: {detail}")]
    Ambiguous { path: &'static str, detail: String },
    /// The request was refused for a reason retrying does not change.
    #[error("{path}: HTTP {status}: {detail}")]
    Request {
        path: &'static str,
        status: u16,
        detail: String,
    },
    /// Every attempt within the retry budget failed transiently.
    #[error("{path}: gave up after {attempts} attempt(s) in {elapsed:?}: {last}")]
    Unavailable {
        path: &'static str,
        attempts: u32,
        elapsed: Duration,
        last: String,
    },
    /// The reply does not have the documented shape.
    #[error("{path}: invalid reply: {detail}")]
    InvalidReply { path: &'static str, detail: String },
    /// The request could not be built (bad URL, unsupported scheme, unencodable arguments).
    #[error("{path}: cannot send request: {detail}")]
    Setup { path: &'static str, detail: String },
}

/// How a failed call surfaces through [`JobSource`](crate::job_source::JobSource).
impl From<CallError> for JobSourceError {
    fn from(error: CallError) -> Self {
        match &error {
            CallError::Function { .. } | CallError::Setup { .. } => {
                JobSourceError::Failed(error.to_string())
            }
            CallError::Request { status: 400, .. } | CallError::InvalidReply { .. } => {
                JobSourceError::Invalid(error.to_string())
            }
            CallError::Request { status: 413, .. } => JobSourceError::TooLarge(error.to_string()),
            CallError::Request { .. } => JobSourceError::Failed(error.to_string()),
            CallError::Unavailable { .. } | CallError::Ambiguous { .. } => {
                JobSourceError::Unavailable(error.to_string())
            }
        }
    }
}

/// What one attempt produced, before the retry policy looks at it.
#[derive(Debug)]
enum AttemptError {
    /// May succeed later. `sent` is false only when the request provably never reached the
    /// deployment (connection refused), so even a mutation unsafe to repeat may be sent again.
    Retryable {
        message: String,
        sent: bool,
    },
    Fatal(CallError),
}

impl AttemptError {
    fn retryable(message: String) -> Self {
        AttemptError::Retryable {
            message,
            sent: true,
        }
    }
}

impl std::fmt::Display for AttemptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AttemptError::Retryable { message, .. } => f.write_str(message),
            AttemptError::Fatal(error) => error.fmt(f),
        }
    }
}

/// The reply envelope of `/api/query` and `/api/mutation`.
#[derive(Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
enum Envelope {
    Success {
        #[serde(default)]
        value: Value,
    },
    #[serde(rename_all = "camelCase")]
    Error {
        error_message: String,
        #[serde(default)]
        error_data: Option<Value>,
    },
}

pub(crate) struct ConvexClient {
    http: reqwest::Client,
    /// Deployment URL without a trailing slash.
    base_url: String,
    /// `Convex <deploy key>`, marked sensitive so it is never printed by `Debug`.
    authorization: Option<HeaderValue>,
    request_timeout: Duration,
    retry_budget: Duration,
}

impl ConvexClient {
    pub(crate) fn new(
        base_url: &str,
        deploy_key: Option<&str>,
        request_timeout: Duration,
        retry_budget: Duration,
    ) -> Result<Self, String> {
        let authorization = match deploy_key {
            Some(key) => {
                let mut value = HeaderValue::from_str(&format!("Convex {key}"))
                    .map_err(|_| "the deploy key contains characters not allowed in a header")?;
                value.set_sensitive(true);
                Some(value)
            }
            None => None,
        };
        let http = reqwest::Client::builder()
            .connect_timeout(request_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|error| format!("cannot build the HTTP client: {error}"))?;
        Ok(ConvexClient {
            http,
            base_url: base_url.trim_end_matches('/').to_owned(),
            authorization,
            request_timeout,
            retry_budget,
        })
    }

    /// Calls `F` with `args`.
    pub(crate) async fn call<F: ConvexFunction>(
        &self,
        args: &F::Args<'_>,
    ) -> Result<F::Reply, CallError> {
        let encoded = encode_args::<F>(args)?;
        self.call_encoded::<F>(&encoded).await
    }

    /// Calls `F` with arguments already encoded by [`encode_args`] (so their size can be checked
    /// first without encoding twice).
    pub(crate) async fn call_encoded<F: ConvexFunction>(
        &self,
        encoded_args: &[u8],
    ) -> Result<F::Reply, CallError> {
        let path = F::PATH;
        let url = format!("{}/{}", self.base_url, F::KIND.endpoint());
        let body = request_body(path, encoded_args);
        let started = Instant::now();
        let deadline = started + self.retry_budget;
        let attempts = AtomicU32::new(0);

        let backoff = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(8))
            .with_jitter()
            .without_max_times();
        let outcome = (|| async {
            let attempt = attempts.fetch_add(1, Ordering::Relaxed) + 1;
            self.attempt(&url, path, &body, deadline, attempt).await
        })
        .retry(backoff)
        .when(|error| match error {
            AttemptError::Retryable { sent, .. } => F::REPEATABLE || !sent,
            AttemptError::Fatal(_) => false,
        })
        // Sleep no further than the deadline; once it has passed, stop.
        .adjust(|_, wait| {
            let remaining = deadline.saturating_duration_since(Instant::now());
            wait.filter(|_| !remaining.is_zero())
                .map(|wait| wait.min(remaining))
        })
        .notify(|error, wait| {
            warn!(
                function = path,
                attempt = attempts.load(Ordering::Relaxed),
                retry_in_ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
                error = %error,
                "convex call failed, retrying"
            );
        })
        .await;

        let value = match outcome {
            Ok(value) => value,
            Err(AttemptError::Fatal(error)) => return Err(error),
            Err(AttemptError::Retryable {
                message,
                sent: true,
            }) if !F::REPEATABLE => {
                return Err(CallError::Ambiguous {
                    path,
                    detail: message,
                })
            }
            Err(AttemptError::Retryable { message: last, .. }) => {
                return Err(CallError::Unavailable {
                    path,
                    attempts: attempts.load(Ordering::Relaxed),
                    elapsed: started.elapsed(),
                    last,
                })
            }
        };
        serde_json::from_value(decode_convex_value(value)).map_err(|error| {
            CallError::InvalidReply {
                path,
                detail: error.to_string(),
            }
        })
    }

    async fn attempt(
        &self,
        url: &str,
        path: &'static str,
        body: &[u8],
        deadline: Instant,
        attempt: u32,
    ) -> Result<Value, AttemptError> {
        let timeout = self
            .request_timeout
            .min(deadline.saturating_duration_since(Instant::now()))
            .max(MIN_ATTEMPT_TIMEOUT.min(self.request_timeout));
        debug!(function = path, attempt, "calling convex");
        let mut request = self
            .http
            .post(url)
            .timeout(timeout)
            .header(CONTENT_TYPE, "application/json")
            .header("Convex-Client", CLIENT_NAME)
            .body(body.to_vec());
        if let Some(authorization) = &self.authorization {
            request = request.header(AUTHORIZATION, authorization.clone());
        }
        let response = request
            .send()
            .await
            .map_err(|error| transport_error(path, &error))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|error| transport_error(path, &error))?;
        classify(path, status, &bytes)
    }
}

/// Encodes `args` as the JSON text sent in the request's `args` field.
pub(crate) fn encode_args<F: ConvexFunction>(args: &F::Args<'_>) -> Result<Vec<u8>, CallError> {
    serde_json::to_vec(args).map_err(|error| CallError::Setup {
        path: F::PATH,
        detail: format!("cannot encode arguments: {error}"),
    })
}

/// `{"path":..,"format":"convex_encoded_json","args":..}` around already encoded arguments.
fn request_body(path: &str, encoded_args: &[u8]) -> Vec<u8> {
    let head = format!(
        r#"{{"path":{},"format":"convex_encoded_json","args":"#,
        Value::from(path)
    );
    let mut body = Vec::with_capacity(head.len() + encoded_args.len() + 1);
    body.extend_from_slice(head.as_bytes());
    body.extend_from_slice(encoded_args);
    body.push(b'}');
    body
}

fn transport_error(path: &'static str, error: &reqwest::Error) -> AttemptError {
    let mut message = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    if error.is_builder() {
        // E.g. an https URL while no TLS backend is compiled in: retrying cannot help.
        return AttemptError::Fatal(CallError::Setup {
            path,
            detail: message,
        });
    }
    if error.is_timeout() {
        return AttemptError::retryable(format!("timed out: {message}"));
    }
    if error.is_connect() {
        // No connection, no request: nothing can have been applied.
        return AttemptError::Retryable {
            message: format!("cannot connect: {message}"),
            sent: false,
        };
    }
    AttemptError::retryable(format!("transport error: {message}"))
}

fn classify(path: &'static str, status: u16, body: &[u8]) -> Result<Value, AttemptError> {
    match status {
        200..=299 | 560 => match serde_json::from_slice::<Envelope>(body) {
            Ok(Envelope::Success { value }) => Ok(value),
            Ok(Envelope::Error {
                error_message,
                error_data,
            }) => {
                let message = match error_data {
                    Some(data) if !data.is_null() => {
                        format!(
                            "{error_message} (data: {})",
                            quote(data.to_string().as_bytes())
                        )
                    }
                    _ => error_message,
                };
                Err(AttemptError::Fatal(CallError::Function { path, message }))
            }
            Err(error) => Err(AttemptError::Fatal(CallError::InvalidReply {
                path,
                detail: format!(
                    "HTTP {status} with an unexpected body ({error}): {}",
                    quote(body)
                ),
            })),
        },
        408 | 429 | 500..=599 => Err(AttemptError::retryable(format!(
            "HTTP {status}: {}",
            describe_error_body(body)
        ))),
        _ => Err(AttemptError::Fatal(CallError::Request {
            path,
            status,
            detail: describe_error_body(body),
        })),
    }
}

/// `code: message` from Convex's `{code, message}` error body, else the body as text.
fn describe_error_body(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct ErrorBody {
        code: String,
        message: String,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { code, message }) => format!("{code}: {message}"),
        Err(_) if body.iter().all(u8::is_ascii_whitespace) => "(empty body)".to_owned(),
        Err(_) => quote(body),
    }
}

fn quote(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    match text.char_indices().nth(MAX_QUOTED_BODY_CHARS) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text.to_owned(),
    }
}

/// Turns Convex-encoded special values into plain JSON where that is lossless: `{"$integer": b64}`
/// (int64, 8 little-endian bytes) becomes a number. Anything else is left alone and fails typed
/// parsing if it appears where a plain value is expected.
fn decode_convex_value(value: Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.into_iter().map(decode_convex_value).collect()),
        Value::Object(map) => {
            if map.len() == 1 {
                if let Some(Value::String(encoded)) = map.get("$integer") {
                    if let Some(number) = decode_int64(encoded) {
                        return Value::from(number);
                    }
                }
            }
            Value::Object(
                map.into_iter()
                    .map(|(key, value)| (key, decode_convex_value(value)))
                    .collect(),
            )
        }
        other => other,
    }
}

fn decode_int64(encoded: &str) -> Option<i64> {
    let bytes: [u8; 8] = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?
        .try_into()
        .ok()?;
    Some(i64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_body_wraps_encoded_arguments() {
        let body = request_body("queue:claimOne", br#"{"workerId":"w"}"#);
        let parsed: Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(
            parsed,
            serde_json::json!({
                "path": "queue:claimOne",
                "format": "convex_encoded_json",
                "args": {"workerId": "w"}
            })
        );
    }

    #[test]
    fn int64_values_decode() {
        // 5 as 8 little-endian bytes.
        let value = serde_json::json!({"attempts": {"$integer": "BQAAAAAAAAA="}, "x": [1]});
        assert_eq!(
            decode_convex_value(value),
            serde_json::json!({"attempts": 5, "x": [1]})
        );
    }

    #[test]
    fn replies_are_classified() {
        let ok = classify("f", 200, br#"{"status":"success","value":1,"logLines":[]}"#);
        assert_eq!(ok.ok(), Some(Value::from(1)));
        for status in [200, 560] {
            let error = classify("f", status, br#"{"status":"error","errorMessage":"boom"}"#);
            assert!(matches!(
                error,
                Err(AttemptError::Fatal(CallError::Function { ref message, .. })) if message == "boom"
            ));
        }
        assert!(matches!(
            classify("f", 503, b"overloaded"),
            Err(AttemptError::Retryable { sent: true, .. })
        ));
        assert!(matches!(
            classify("f", 401, br#"{"code":"BadAdminKey","message":"nope"}"#),
            Err(AttemptError::Fatal(CallError::Request { status: 401, ref detail, .. })) if detail == "BadAdminKey: nope"
        ));
    }
}
