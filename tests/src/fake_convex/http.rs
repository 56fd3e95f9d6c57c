//! The fake's HTTP surface: Convex's `/api/query`, `/api/mutation` and `/api/action` with their
//! request checks, reply envelopes and status codes, fault injection in front of them, and the
//! `/_fake/...` admin endpoints tests drive it with.

use std::{
    io,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use axum::{
    body::{Body, Bytes},
    extract::{DefaultBodyLimit, State},
    http::{header, HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use rand::Rng;
use serde_json::{json, Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{
    admin,
    functions::{lookup, FunctionError, Kind},
    store::{now_ms, AuthSeen, CallOutcome, CallRecord, FaultKind, Store},
    validate::{check_limits, MAX_ARGS_BYTES},
    FakeOptions,
};

/// Requests up to this size reach the fake's own limit checks (16 MiB of arguments).
const BODY_LIMIT: usize = 64 * 1024 * 1024;

/// Recorded strings longer than this are shortened.
const RECORDED_STRING_MAX: usize = 2048;

/// A hung call gives up after this long even if nobody releases it.
const MAX_HANG: Duration = Duration::from_secs(600);

pub(crate) struct Shared {
    pub options: FakeOptions,
    pub store: Mutex<Store>,
    /// Cancelled when the fake stops: hung and delayed calls end then.
    pub shutdown: CancellationToken,
    /// Wakes hung calls when the faults are cleared or the fake is reset.
    pub release: Notify,
}

impl Shared {
    pub fn new(options: FakeOptions, shutdown: CancellationToken) -> Self {
        Shared {
            options,
            store: Mutex::new(Store::default()),
            shutdown,
            release: Notify::new(),
        }
    }

    pub(super) fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/query", post(query))
        .route("/api/mutation", post(mutation))
        .route("/api/action", post(action))
        .route("/_fake/calls", get(admin::calls))
        .route("/_fake/jobs", get(admin::jobs))
        .route("/_fake/jobs/{id}", get(admin::job).patch(admin::patch_job))
        .route("/_fake/docs/{job_id}", get(admin::docs))
        .route(
            "/_fake/faults",
            post(admin::add_fault)
                .get(admin::faults)
                .delete(admin::clear_faults),
        )
        .route("/_fake/latency", post(admin::set_latency))
        .route("/_fake/violations", get(admin::violations))
        .route("/_fake/reset", post(admin::reset))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(shared)
}

async fn query(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(shared, Kind::Query, headers, body).await
}

async fn mutation(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(shared, Kind::Mutation, headers, body).await
}

async fn action(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    handle(shared, Kind::Action, headers, body).await
}

/// The call being handled, filled in as it is understood.
struct Call {
    endpoint: Kind,
    path: Option<String>,
    args: Value,
    client: Option<String>,
    auth: AuthSeen,
}

/// A decided reply.
struct Reply {
    status: StatusCode,
    body: Value,
    outcome: CallOutcome,
}

impl Reply {
    fn request_error(status: StatusCode, code: &str, message: &str) -> Self {
        Reply {
            status,
            body: json!({"code": code, "message": message}),
            outcome: CallOutcome::Rejected,
        }
    }
}

async fn handle(shared: Arc<Shared>, endpoint: Kind, headers: HeaderMap, body: Bytes) -> Response {
    let parsed: Result<Value, String> =
        serde_json::from_slice(&body).map_err(|error| error.to_string());
    let path = parsed
        .as_ref()
        .ok()
        .and_then(|body| body.get("path"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut call = Call {
        endpoint,
        path: path.clone(),
        args: parsed
            .as_ref()
            .ok()
            .and_then(|body| body.get("args"))
            .map_or(Value::Null, shorten),
        client: headers
            .get("convex-client")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
        auth: auth_seen(&shared.options, &headers),
    };

    let delay = shared.store().latency(path.as_deref());
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.shutdown.cancelled() => return dropped_connection(),
        }
    }

    let fault = shared.store().take_fault(path.as_deref());
    let mut drop_reply = false;
    if let Some(fault) = fault {
        match fault.kind {
            FaultKind::HttpError => {
                let status = fault
                    .status
                    .and_then(|status| StatusCode::from_u16(status).ok())
                    .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                let reply = Reply {
                    status,
                    body: json!({"code": "Overloaded", "message": "fake convex: injected error"}),
                    outcome: CallOutcome::InjectedHttpError,
                };
                return respond(&shared, call, reply);
            }
            FaultKind::DropConnection => {
                record(&shared, &call, None, None, CallOutcome::DroppedConnection);
                return dropped_connection();
            }
            FaultKind::Hang => {
                record(&shared, &call, None, None, CallOutcome::Hung);
                let released = shared.release.notified();
                tokio::select! {
                    () = released => {}
                    () = shared.shutdown.cancelled() => {}
                    () = tokio::time::sleep(MAX_HANG) => {}
                }
                return dropped_connection();
            }
            FaultKind::ApplyThenDrop => drop_reply = true,
            FaultKind::Throw => {
                let admin = call.auth == AuthSeen::Valid;
                let reply = function_error(
                    &shared.options,
                    admin,
                    "Uncaught Error: fake convex: injected function error".to_owned(),
                    CallOutcome::FunctionError,
                );
                return respond(&shared, call, reply);
            }
        }
    }

    let reply = match check_request(&call, &headers, parsed) {
        Err(reply) => reply,
        Ok((path, args)) => {
            call.args = shorten(&args);
            run(&shared, endpoint, &path, args, call.auth == AuthSeen::Valid)
        }
    };
    if drop_reply {
        record(
            &shared,
            &call,
            None,
            Some(shorten(&reply.body)),
            CallOutcome::AppliedReplyDropped,
        );
        return dropped_connection();
    }
    respond(&shared, call, reply)
}

fn auth_seen(options: &FakeOptions, headers: &HeaderMap) -> AuthSeen {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return AuthSeen::None;
    };
    match (&options.deploy_key, value.to_str().ok()) {
        (None, _) => AuthSeen::Unchecked,
        (Some(key), Some(value)) if value.strip_prefix("Convex ") == Some(key.as_str()) => {
            AuthSeen::Valid
        }
        _ => AuthSeen::Invalid,
    }
}

/// The request-level checks, giving the function path and its arguments as an object.
fn check_request(
    call: &Call,
    headers: &HeaderMap,
    parsed: Result<Value, String>,
) -> Result<(String, Value), Reply> {
    match call.auth {
        AuthSeen::Invalid => {
            return Err(Reply::request_error(
                StatusCode::UNAUTHORIZED,
                "BadAdminKey",
                "The provided admin key was invalid for this instance",
            ))
        }
        AuthSeen::Unchecked => {
            return Err(Reply::request_error(
                StatusCode::UNAUTHORIZED,
                "BadAdminKey",
                "The provided admin key was invalid for this instance (this fake deployment \
                 has no deploy key)",
            ))
        }
        // Without a key a caller runs public functions and sees no function error message.
        AuthSeen::None | AuthSeen::Valid => {}
    }
    if call.client.as_deref().is_none_or(str::is_empty) {
        return Err(Reply::request_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Missing Convex-Client header (expected <name>-<semver>)",
        ));
    }
    let json_content = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if !json_content {
        return Err(Reply::request_error(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Content-Type must be application/json",
        ));
    }
    let body = parsed
        .map_err(|error| Reply::request_error(StatusCode::BAD_REQUEST, "BadJsonBody", &error))?;
    let Some(path) = body.get("path").and_then(Value::as_str) else {
        return Err(Reply::request_error(
            StatusCode::BAD_REQUEST,
            "BadJsonBody",
            "missing field `path`",
        ));
    };
    match body.get("format") {
        None => {}
        Some(Value::String(format)) if format == "convex_encoded_json" || format == "json" => {}
        Some(other) => {
            return Err(Reply::request_error(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("unsupported format {other}"),
            ))
        }
    }
    // Object arguments, or the legacy one-element array.
    let args = match body.get("args") {
        None => Value::Object(Map::new()),
        Some(Value::Object(args)) => Value::Object(args.clone()),
        Some(Value::Array(items)) if items.is_empty() => Value::Object(Map::new()),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_object() => items[0].clone(),
        Some(_) => {
            return Err(Reply::request_error(
                StatusCode::BAD_REQUEST,
                "BadJsonBody",
                "args must be an object or a one-element array of an object",
            ))
        }
    };
    Ok((path.to_owned(), args))
}

/// A function error reply. Like a production deployment, the message of an error raised while
/// the function runs reaches only admin callers (the deploy key) unless
/// [`FakeOptions::expose_errors`]; others get `[Request ID: <hex>] Server Error`.
fn function_error(
    options: &FakeOptions,
    admin: bool,
    message: String,
    outcome: CallOutcome,
) -> Reply {
    let request_id: String = {
        let mut rng = rand::rng();
        (0..16)
            .map(|_| char::from(b"0123456789abcdef"[rng.random_range(0..16)]))
            .collect()
    };
    let hidden = outcome == CallOutcome::FunctionError && !admin && !options.expose_errors;
    let error_message = if hidden {
        format!("[Request ID: {request_id}] Server Error")
    } else {
        format!("[Request ID: {request_id}] Server Error\n{message}")
    };
    Reply {
        status: StatusCode::from_u16(options.function_error_status).unwrap_or(StatusCode::OK),
        body: json!({
            "status": "error",
            "errorMessage": error_message,
            "logLines": [],
        }),
        outcome,
    }
}

/// Runs the function as one transaction and shapes its reply. `admin`: the call carries the
/// deploy key (internal functions run, error messages show).
fn run(shared: &Shared, endpoint: Kind, path: &str, args: Value, admin: bool) -> Reply {
    let error = |message: String, outcome: CallOutcome| {
        function_error(&shared.options, admin, message, outcome)
    };
    let Some(function) = lookup(path).filter(|function| admin || !function.internal) else {
        return error(
            format!(
                "Could not find public function for '{path}'. Did you forget to run `npx convex \
                 dev` or `npx convex deploy`?"
            ),
            CallOutcome::Rejected,
        );
    };
    if function.kind != endpoint {
        return error(
            format!(
                "Trying to execute {path} as {}, but it is defined as {}.",
                endpoint.name(),
                function.kind.name()
            ),
            CallOutcome::Rejected,
        );
    }
    let size = serde_json::to_vec(&args).map_or(0, |encoded| encoded.len());
    if size > MAX_ARGS_BYTES {
        return error(
            format!(
                "Uncaught Error: Arguments are too large ({size} bytes > maximum size \
                 {MAX_ARGS_BYTES} bytes)"
            ),
            CallOutcome::Rejected,
        );
    }
    if let Err(message) = check_limits(&args, 1) {
        return error(format!("Uncaught Error: {message}"), CallOutcome::Rejected);
    }

    let mut store = shared.store();
    let validated = {
        let tables = &store.tables;
        function
            .args
            .check(&args, "", &|id: &str| tables.get(id).copied())
    };
    if let Err(message) = validated {
        return error(
            format!("ArgumentValidationError: {message}"),
            CallOutcome::Rejected,
        );
    }
    let module = path.split(':').next().unwrap_or(path);
    match (function.handler)(&mut store, &shared.options, args) {
        Ok(value) => Reply {
            status: StatusCode::OK,
            body: json!({"status": "success", "value": js_numbers(value), "logLines": []}),
            outcome: CallOutcome::Success,
        },
        Err(FunctionError::Thrown(message)) => error(
            format!("Uncaught Error: {message}\n    at handler (../convex/{module}.ts)"),
            CallOutcome::FunctionError,
        ),
        // Raised while the function runs: hidden like a thrown error.
        Err(FunctionError::Limit(message)) => error(
            format!("Uncaught Error: {message}"),
            CallOutcome::FunctionError,
        ),
    }
}

fn respond(shared: &Shared, call: Call, reply: Reply) -> Response {
    record(
        shared,
        &call,
        Some(reply.status.as_u16()),
        Some(shorten(&reply.body)),
        reply.outcome,
    );
    (reply.status, Json(reply.body)).into_response()
}

fn record(
    shared: &Shared,
    call: &Call,
    http_status: Option<u16>,
    reply: Option<Value>,
    outcome: CallOutcome,
) {
    let endpoint = match call.endpoint {
        Kind::Query => "query",
        Kind::Mutation => "mutation",
        Kind::Action => "action",
    };
    shared.store().record(CallRecord {
        seq: 0,
        at_ms: now_ms(),
        endpoint: endpoint.to_owned(),
        path: call.path.clone(),
        args: call.args.clone(),
        http_status,
        reply,
        outcome,
        rejected: outcome == CallOutcome::Rejected,
        client: call.client.clone(),
        auth: call.auth,
    });
}

/// A reply that never completes: headers may go out, then the body fails and hyper closes the
/// connection, so the client sees a transport error.
fn dropped_connection() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, io::Error>(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "fake convex: dropping the connection",
        ))
    });
    (StatusCode::OK, Body::from_stream(failing)).into_response()
}

/// Convex replies with JavaScript numbers: whole float64 values print without `.0`.
fn js_numbers(value: Value) -> Value {
    match value {
        Value::Number(number) => match number.as_f64() {
            Some(float) if float.fract() == 0.0 && float.abs() < 9_007_199_254_740_992.0 => {
                Value::from(float as i64)
            }
            _ => Value::Number(number),
        },
        Value::Array(items) => Value::Array(items.into_iter().map(js_numbers).collect()),
        Value::Object(object) => Value::Object(
            object
                .into_iter()
                .map(|(key, value)| (key, js_numbers(value)))
                .collect(),
        ),
        other => other,
    }
}

/// A copy for the call record with long strings cut.
fn shorten(value: &Value) -> Value {
    match value {
        Value::String(text) if text.len() > RECORDED_STRING_MAX => {
            let mut cut = 64;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            Value::String(format!("{}...[{} bytes]", &text[..cut], text.len()))
        }
        Value::Array(items) => Value::Array(items.iter().map(shorten).collect()),
        Value::Object(object) => Value::Object(
            object
                .iter()
                .map(|(key, value)| (key.clone(), shorten(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}
