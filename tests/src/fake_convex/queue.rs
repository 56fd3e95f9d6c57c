//! The `queue` module of the deployment: claim, heartbeat, complete, retry-or-fail and enqueue.
//! Ownership is checked on `lockedBy` only, like the real functions, so a canceled job still
//! accepts heartbeats, completion and retries: the fake applies them and records a violation.

use rand::Rng;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    functions::{owned_job, parse, thrown, to_value, FunctionError, ACTIVE_STATUSES},
    store::{iso_string, now_ms, JobDoc, Store},
    validate::convex_size,
    FakeOptions,
};

/// Statuses of a job some worker holds (what `queue:reclaimExpired` takes back).
const PROCESSING_STATUSES: [&str; 5] = ["claimed", "cloning", "analyzing", "gathering", "running"];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClaimOneArgs {
    worker_id: String,
    lease_ms: Option<f64>,
}

pub(super) fn claim_one(
    store: &mut Store,
    options: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: ClaimOneArgs = parse(args)?;
    let now = now_ms();
    let lease_ms = args
        .lease_ms
        .unwrap_or(options.default_lease.as_millis() as f64);
    let oldest = store
        .jobs
        .values()
        .filter(|job| job.status == "pending" && job.run_at <= now)
        .min_by(|a, b| {
            (a.run_at, a.creation_time)
                .partial_cmp(&(b.run_at, b.creation_time))
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .map(|job| job.id.clone());
    let Some(job) = oldest.and_then(|id| store.jobs.get_mut(&id)) else {
        return Ok(Value::Null);
    };
    job.status = "claimed".to_owned();
    job.locked_by = Some(args.worker_id);
    job.lease_until = Some(now + lease_ms);
    job.updated_at = now;
    let mut reply = json!({
        "id": job.id,
        "repositoryId": job.repository_id,
        "userId": job.user_id,
        "prompt": job.prompt,
        "callbackToken": job.callback_token,
    });
    if let Some(attempts) = job.attempts {
        reply["attempts"] = json!(attempts);
    }
    Ok(reply)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct HeartbeatArgs {
    job_id: String,
    worker_id: String,
    status: Option<String>,
    progress: Option<String>,
    current_step: Option<f64>,
    total_steps: Option<f64>,
    lease_ms: Option<f64>,
}

pub(super) fn heartbeat(
    store: &mut Store,
    options: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: HeartbeatArgs = parse(args)?;
    let now = now_ms();
    let job = owned_job(store, &args.job_id, &args.worker_id)?;
    let violation = args.status.is_some() && job.is_canceled();
    // Like the deployment: falsy values (empty strings) are not written.
    if let Some(status) = args.status.filter(|status| !status.is_empty()) {
        job.status = status;
    }
    if let Some(progress) = args.progress.filter(|progress| !progress.is_empty()) {
        job.progress = Some(progress);
    }
    if let Some(step) = args.current_step {
        job.current_step = Some(step);
    }
    if let Some(total) = args.total_steps {
        job.total_steps = Some(total);
    }
    job.lease_until = Some(
        now + args
            .lease_ms
            .unwrap_or(options.default_lease.as_millis() as f64),
    );
    job.updated_at = now;
    if violation {
        store
            .violations
            .status_written_after_cancel
            .push(args.job_id);
    }
    Ok(json!({"success": true}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompleteArgs {
    job_id: String,
    worker_id: String,
    result: Option<Value>,
    docs_count: Option<f64>,
}

pub(super) fn complete(
    store: &mut Store,
    _: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: CompleteArgs = parse(args)?;
    let now = now_ms();
    let job = owned_job(store, &args.job_id, &args.worker_id)?;
    let violation = job.is_canceled();
    job.status = "completed".to_owned();
    job.result = args.result;
    job.docs_count = args.docs_count;
    job.completed_at = Some(now);
    job.updated_at = now;
    job.locked_by = None;
    job.lease_until = None;
    if violation {
        store.violations.completed_after_cancel.push(args.job_id);
    }
    Ok(json!({"success": true}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RetryOrFailArgs {
    job_id: String,
    worker_id: String,
    error: String,
}

pub(super) fn retry_or_fail(
    store: &mut Store,
    options: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: RetryOrFailArgs = parse(args)?;
    let now = now_ms();
    let job = owned_job(store, &args.job_id, &args.worker_id)?;
    let violation = job.is_canceled();
    let attempts = job.attempts.unwrap_or(0.0) + 1.0;
    let max_attempts = job.max_attempts.unwrap_or(f64::from(options.max_attempts));
    let reply = if attempts >= max_attempts {
        // Like the deployment, `attempts` is not written when the job dies.
        job.status = "dead".to_owned();
        job.error = Some(args.error.clone());
        job.last_error = Some(args.error);
        job.completed_at = Some(now);
        json!({"status": "dead", "attempts": attempts})
    } else {
        let base = options.backoff_base.as_millis() as f64 * 2f64.powf(attempts - 1.0);
        let delay = base.min(options.backoff_max.as_millis() as f64);
        let jitter = rand::rng().random::<f64>() * options.backoff_jitter.as_millis() as f64;
        let next_run_at = now + delay + jitter;
        job.status = "pending".to_owned();
        job.attempts = Some(attempts);
        job.run_at = next_run_at;
        job.last_error = Some(args.error);
        json!({"status": "retrying", "attempts": attempts, "nextRunAt": iso_string(next_run_at)})
    };
    job.updated_at = now;
    job.locked_by = None;
    job.lease_until = None;
    if violation {
        store.violations.retried_after_cancel.push(args.job_id);
    }
    Ok(reply)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateJobArgs {
    user_id: String,
    repository_id: String,
    prompt: String,
    callback_token: String,
    dedupe_key: Option<String>,
}

pub(super) fn create_job(
    store: &mut Store,
    _: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: CreateJobArgs = parse(args)?;
    if let Some(key) = args.dedupe_key.as_deref().filter(|key| !key.is_empty()) {
        let existing = store.jobs.values().find(|job| {
            job.dedupe_key.as_deref() == Some(key) && ACTIVE_STATUSES.contains(&job.status.as_str())
        });
        if let Some(job) = existing {
            return Ok(json!({"jobId": job.id, "duplicate": true, "status": job.status}));
        }
    }
    let now = now_ms();
    let id = store.new_id("jobs");
    let job = JobDoc {
        id: id.clone(),
        creation_time: store.creation_time(),
        user_id: args.user_id,
        repository_id: args.repository_id,
        prompt: args.prompt,
        callback_token: args.callback_token,
        dedupe_key: args.dedupe_key,
        status: "pending".to_owned(),
        run_at: now,
        attempts: Some(0.0),
        max_attempts: None,
        lease_until: None,
        locked_by: None,
        progress: Some("Initializing...".to_owned()),
        current_step: Some(0.0),
        total_steps: Some(6.0),
        cancel_requested: None,
        last_error: None,
        error: None,
        result: None,
        docs_count: None,
        run_id: None,
        created_at: now,
        updated_at: now,
        completed_at: None,
        regeneration_stats: None,
    };
    store.jobs.insert(id.clone(), job);
    Ok(json!({"jobId": id, "duplicate": false, "status": "pending"}))
}

/// The internal `queue:reclaimExpired`: every job whose `leaseUntil` is not in the future (the
/// index range also holds jobs without a lease) is read; those still in a processing status go
/// back to `pending` with `attempts + 1`, never `dead`. Fails on the transaction read limit like
/// the real one on a large jobs table.
pub(super) fn reclaim_expired(
    store: &mut Store,
    options: &FakeOptions,
    _: Value,
) -> Result<Value, FunctionError> {
    let now = now_ms();
    let expired: Vec<String> = store
        .jobs
        .values()
        .filter(|job| job.lease_until.is_none_or(|until| until <= now))
        .map(|job| job.id.clone())
        .collect();
    let mut read = 0usize;
    for id in &expired {
        if let Some(job) = store.jobs.get(id) {
            read += convex_size(&to_value(job)?);
        }
    }
    if read > options.transaction_bytes_limit {
        return Err(FunctionError::Limit(format!(
            "Transaction exceeded resource limits: {read} bytes read (limit {} bytes)",
            options.transaction_bytes_limit
        )));
    }
    let mut reclaimed = 0;
    for id in &expired {
        let Some(job) = store.jobs.get_mut(id) else {
            continue;
        };
        if PROCESSING_STATUSES.contains(&job.status.as_str()) {
            job.status = "pending".to_owned();
            job.attempts = Some(job.attempts.unwrap_or(0.0) + 1.0);
            job.run_at = now;
            job.last_error = Some("Lease expired - worker likely crashed".to_owned());
            job.updated_at = now;
            job.locked_by = None;
            job.lease_until = None;
            reclaimed += 1;
        }
    }
    Ok(json!({"reclaimed": reclaimed, "checked": expired.len()}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateFromUiArgs {
    user_id: String,
    repository_id: String,
    prompt: String,
}

/// The web app's `jobs:create`, how its UI enqueues: refuses a second active job of the same
/// repository, writes `maxAttempts` ([`FakeOptions::max_attempts`], 5 as the web app), a fresh
/// callback token.
pub(super) fn create_from_ui(
    store: &mut Store,
    options: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: CreateFromUiArgs = parse(args)?;
    if !store.repositories.contains_key(&args.repository_id) {
        return Err(thrown("Repository not found"));
    }
    let active = store.jobs.values().any(|job| {
        job.repository_id == args.repository_id && ACTIVE_STATUSES.contains(&job.status.as_str())
    });
    if active {
        return Err(thrown(
            "A job is already running for this repository. Please wait for it to complete or \
             cancel it first.",
        ));
    }
    let now = now_ms();
    let id = store.new_id("jobs");
    let callback_token = uuid::Uuid::new_v4().to_string();
    let job = JobDoc {
        id: id.clone(),
        creation_time: store.creation_time(),
        user_id: args.user_id,
        repository_id: args.repository_id.clone(),
        prompt: args.prompt,
        callback_token: callback_token.clone(),
        dedupe_key: Some(format!("{}_{now}", args.repository_id)),
        status: "pending".to_owned(),
        run_at: now,
        attempts: Some(0.0),
        max_attempts: Some(f64::from(options.max_attempts)),
        lease_until: None,
        locked_by: None,
        progress: Some("Initializing...".to_owned()),
        current_step: Some(0.0),
        total_steps: Some(6.0),
        cancel_requested: None,
        last_error: None,
        error: None,
        result: None,
        docs_count: None,
        run_id: None,
        created_at: now,
        updated_at: now,
        completed_at: None,
        regeneration_stats: None,
    };
    store.jobs.insert(id.clone(), job);
    Ok(json!({"jobId": id, "callbackToken": callback_token}))
}
