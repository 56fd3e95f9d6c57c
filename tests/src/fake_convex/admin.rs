//! The `/_fake/...` admin endpoints: inspect what the fake received and holds, inject faults,
//! reset. Not part of Convex.

use std::sync::Arc;

use axum::{
    extract::{Path, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{Map, Value};

use super::{
    http::Shared,
    store::{CallRecord, FaultSpec, JobDoc, LatencySpec, StoredDoc, Violations},
};

pub(super) async fn calls(State(shared): State<Arc<Shared>>) -> Json<Vec<CallRecord>> {
    Json(shared.store().calls.clone())
}

pub(super) async fn jobs(State(shared): State<Arc<Shared>>) -> Json<Vec<JobDoc>> {
    Json(shared.store().jobs.values().cloned().collect())
}

pub(super) async fn job(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.store().jobs.get(&id) {
        Some(job) => Json(job.clone()).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no job {id}")).into_response(),
    }
}

/// Merges fields into a job document (`null` removes a field), e.g. to expire a lease.
pub(super) async fn patch_job(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Json(patch): Json<Map<String, Value>>,
) -> Response {
    let mut store = shared.store();
    let Some(job) = store.jobs.get(&id) else {
        return (StatusCode::NOT_FOUND, format!("no job {id}")).into_response();
    };
    let mut fields = match serde_json::to_value(job) {
        Ok(Value::Object(fields)) => fields,
        _ => return StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    };
    for (key, value) in patch {
        if value.is_null() {
            fields.remove(&key);
        } else {
            fields.insert(key, value);
        }
    }
    match serde_json::from_value::<JobDoc>(Value::Object(fields)) {
        Ok(updated) => {
            store.jobs.insert(id, updated.clone());
            Json(updated).into_response()
        }
        Err(error) => (StatusCode::BAD_REQUEST, error.to_string()).into_response(),
    }
}

pub(super) async fn docs(
    State(shared): State<Arc<Shared>>,
    Path(job_id): Path<String>,
) -> Json<Vec<StoredDoc>> {
    Json(
        shared
            .store()
            .docs
            .get(&job_id)
            .cloned()
            .unwrap_or_default(),
    )
}

pub(super) async fn add_fault(
    State(shared): State<Arc<Shared>>,
    Json(spec): Json<FaultSpec>,
) -> StatusCode {
    shared.store().add_fault(spec);
    StatusCode::NO_CONTENT
}

pub(super) async fn faults(State(shared): State<Arc<Shared>>) -> Json<Vec<FaultSpec>> {
    Json(shared.store().faults())
}

pub(super) async fn clear_faults(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.store().clear_faults();
    shared.release.notify_waiters();
    StatusCode::NO_CONTENT
}

pub(super) async fn set_latency(
    State(shared): State<Arc<Shared>>,
    Json(spec): Json<LatencySpec>,
) -> StatusCode {
    shared.store().set_latency(spec);
    StatusCode::NO_CONTENT
}

pub(super) async fn violations(State(shared): State<Arc<Shared>>) -> Json<Violations> {
    Json(shared.store().violations.clone())
}

pub(super) async fn reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.store().reset();
    shared.release.notify_waiters();
    StatusCode::NO_CONTENT
}
