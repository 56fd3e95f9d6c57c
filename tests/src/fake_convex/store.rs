//! The fake deployment's data: its tables (`jobs`, `repositories`, `docs`), the record of every
//! call, the violations it noticed and the faults it was told to inject.

use std::{
    collections::{BTreeMap, HashMap},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::validate::ID_ALPHABET;

/// A `jobs` document, field for field as the Fondation functions write it. `None` fields are
/// absent from the document, as Convex's `undefined`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_creationTime")]
    pub creation_time: f64,
    pub user_id: String,
    pub repository_id: String,
    pub prompt: String,
    pub callback_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedupe_key: Option<String>,
    pub status: String,
    pub run_at: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_until: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locked_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_step: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_requested: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docs_count: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub created_at: f64,
    pub updated_at: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<f64>,
    /// What the last `docs:upsertFromJob` did (`inserted`, `updated`, `skipped`, `rejected`,
    /// `deleted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regeneration_stats: Option<Value>,
}

impl JobDoc {
    /// Whether a user canceled the job (what the coordinator must not write over).
    pub fn is_canceled(&self) -> bool {
        self.cancel_requested == Some(true) || self.status == "canceled"
    }
}

/// A `repositories` document (the fields the job functions read).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RepositoryDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_creationTime")]
    pub creation_time: f64,
    pub full_name: String,
    /// Required, as the web app always writes it (GitHub's default branch, else `main`).
    pub default_branch: String,
    /// The owner, whose GitHub token clones a private repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
}

/// A `users` document (the fields the worker reads).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_creationTime")]
    pub creation_time: f64,
    pub github_id: String,
    /// Stored as the web app stores it: `enc_v1_...`, `obf_...` or plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_access_token: Option<String>,
}

/// A `docs` document written by `docs:upsertFromJob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_creationTime")]
    pub creation_time: f64,
    pub job_id: String,
    pub repository_id: String,
    pub slug: String,
    pub title: String,
    pub chapter_index: f64,
    pub kind: String,
    pub content: String,
    pub source_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub created_at: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<f64>,
}

/// What became of one recorded call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CallOutcome {
    /// The function ran and returned.
    Success,
    /// The function ran and threw (e.g. "not owned"): a legitimate outcome, not a rejection.
    FunctionError,
    /// Refused for its shape: bad request, missing header, bad key, unknown function, argument
    /// validation, limits.
    Rejected,
    /// An injected HTTP error (503 by default).
    InjectedHttpError,
    /// An injected dropped connection; nothing was applied.
    DroppedConnection,
    /// An injected hang; nothing was applied.
    Hung,
    /// Applied (see `reply`), then the connection was dropped instead of replying.
    AppliedReplyDropped,
}

/// Whether and how the call authenticated. The header's value is never recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AuthSeen {
    None,
    /// `Authorization: Convex <key>` with the fake's deploy key.
    Valid,
    /// An `Authorization` header with the wrong key or scheme.
    Invalid,
    /// An `Authorization` header while the fake has no key configured.
    Unchecked,
}

/// One call as the fake saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CallRecord {
    pub seq: u64,
    /// Ms since the Unix epoch when the reply was decided.
    pub at_ms: f64,
    /// `query`, `mutation` or `action`.
    pub endpoint: String,
    pub path: Option<String>,
    /// The arguments as received; strings over 2 KiB are shortened.
    pub args: Value,
    /// `None` when no reply was sent (dropped connection, hang).
    pub http_status: Option<u16>,
    /// The reply body (or the reply that was dropped), strings over 2 KiB shortened.
    pub reply: Option<Value>,
    pub outcome: CallOutcome,
    pub rejected: bool,
    /// The `Convex-Client` header.
    pub client: Option<String>,
    pub auth: AuthSeen,
}

/// Writes the real deployment would accept but that undo a user's cancel: the coordinator must
/// never make them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Violations {
    /// Jobs whose status a heartbeat set while they were canceled.
    pub status_written_after_cancel: Vec<String>,
    /// Jobs `queue:complete` marked completed while they were canceled.
    pub completed_after_cancel: Vec<String>,
    /// Jobs `queue:retryOrFail` sent back to pending (or dead) while they were canceled.
    pub retried_after_cancel: Vec<String>,
}

impl Violations {
    pub fn is_empty(&self) -> bool {
        self.status_written_after_cancel.is_empty()
            && self.completed_after_cancel.is_empty()
            && self.retried_after_cancel.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FaultKind {
    /// Reply with an HTTP error, 503 unless `status` says otherwise; nothing is applied.
    HttpError,
    /// Close the connection without a reply; nothing is applied.
    DropConnection,
    /// Never reply (until the faults are cleared or the fake stops); nothing is applied.
    Hang,
    /// Run the function, then close the connection instead of replying.
    ApplyThenDrop,
    /// Reply as if the function threw (e.g. over a transaction limit); nothing is applied.
    Throw,
}

/// A fault to inject, as posted to `/_fake/faults`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultSpec {
    pub kind: FaultKind,
    /// Only calls of this function (`queue:complete`); all calls when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// How many matching calls it hits; 1 when neither `count` nor `for_ms` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// For how long from now it hits matching calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_ms: Option<u64>,
    /// HTTP status of an `httpError` fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
}

impl FaultSpec {
    pub fn new(kind: FaultKind) -> Self {
        FaultSpec {
            kind,
            path: None,
            count: None,
            for_ms: None,
            status: None,
        }
    }

    pub fn path(mut self, path: &str) -> Self {
        self.path = Some(path.to_owned());
        self
    }

    pub fn count(mut self, count: u32) -> Self {
        self.count = Some(count);
        self
    }

    pub fn for_ms(mut self, for_ms: u64) -> Self {
        self.for_ms = Some(for_ms);
        self
    }

    pub fn status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }
}

/// Added latency, as posted to `/_fake/latency`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LatencySpec {
    /// Delay before each matching call is handled; 0 removes the rule for that path.
    pub ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Debug)]
struct ActiveFault {
    spec: FaultSpec,
    remaining: Option<u32>,
    until: Option<Instant>,
}

/// Everything the fake holds, behind one lock: each function runs as one transaction.
#[derive(Debug, Default)]
pub(crate) struct Store {
    pub jobs: BTreeMap<String, JobDoc>,
    pub repositories: BTreeMap<String, RepositoryDoc>,
    pub users: BTreeMap<String, UserDoc>,
    pub docs: BTreeMap<String, Vec<StoredDoc>>,
    /// Table of every id issued, so `v.id("jobs")` refuses a repository id.
    pub tables: HashMap<String, &'static str>,
    pub calls: Vec<CallRecord>,
    pub violations: Violations,
    faults: Vec<ActiveFault>,
    latency: Vec<LatencySpec>,
    last_creation_time: f64,
}

impl Store {
    /// Clears data, records, faults and latency.
    pub fn reset(&mut self) {
        *self = Store::default();
    }

    pub fn new_id(&mut self, table: &'static str) -> String {
        let mut rng = rand::rng();
        let id: String = (0..32)
            .map(|_| char::from(ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())]))
            .collect();
        self.tables.insert(id.clone(), table);
        id
    }

    /// A strictly increasing `_creationTime`, like Convex's (ms with a fractional part).
    pub fn creation_time(&mut self) -> f64 {
        let now = now_ms();
        self.last_creation_time = if now > self.last_creation_time {
            now
        } else {
            self.last_creation_time + 0.001
        };
        self.last_creation_time
    }

    pub fn record(&mut self, mut record: CallRecord) {
        record.seq = self.calls.len() as u64 + 1;
        self.calls.push(record);
    }

    pub fn add_fault(&mut self, spec: FaultSpec) {
        let remaining = match (spec.count, spec.for_ms) {
            (None, None) => Some(1),
            (count, _) => count,
        };
        let until = spec
            .for_ms
            .map(|ms| Instant::now() + Duration::from_millis(ms));
        self.faults.push(ActiveFault {
            spec,
            remaining,
            until,
        });
    }

    pub fn faults(&self) -> Vec<FaultSpec> {
        self.faults.iter().map(|fault| fault.spec.clone()).collect()
    }

    pub fn clear_faults(&mut self) {
        self.faults.clear();
    }

    /// The fault hitting a call of `path`, if any, using up one of its hits.
    pub fn take_fault(&mut self, path: Option<&str>) -> Option<FaultSpec> {
        let now = Instant::now();
        self.faults.retain(|fault| {
            fault.remaining != Some(0) && fault.until.is_none_or(|until| now < until)
        });
        let fault = self
            .faults
            .iter_mut()
            .find(|fault| fault.spec.path.is_none() || fault.spec.path.as_deref() == path)?;
        if let Some(remaining) = fault.remaining.as_mut() {
            *remaining -= 1;
        }
        Some(fault.spec.clone())
    }

    pub fn set_latency(&mut self, spec: LatencySpec) {
        self.latency.retain(|rule| rule.path != spec.path);
        if spec.ms > 0 {
            self.latency.push(spec);
        }
    }

    /// The delay for a call of `path`: its own rule, else the rule for all calls.
    pub fn latency(&self, path: Option<&str>) -> Duration {
        let specific = self
            .latency
            .iter()
            .find(|rule| rule.path.is_some() && rule.path.as_deref() == path);
        let general = self.latency.iter().find(|rule| rule.path.is_none());
        Duration::from_millis(specific.or(general).map_or(0, |rule| rule.ms))
    }
}

/// Ms since the Unix epoch, whole like JavaScript's `Date.now()`.
pub fn now_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_millis() as f64)
}

/// `Date.prototype.toISOString` of a time in ms since the epoch (always three fraction digits).
pub fn iso_string(ms: f64) -> String {
    let millis = ms.max(0.0).round() as i64;
    jiff::Timestamp::from_millisecond(millis)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_strings_match_javascript() {
        assert_eq!(iso_string(0.0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso_string(1_709_210_096_789.0), "2024-02-29T12:34:56.789Z");
        assert_eq!(iso_string(1_709_210_096_000.0), "2024-02-29T12:34:56.000Z");
    }

    #[test]
    fn faults_are_used_up() {
        let mut store = Store::default();
        store.add_fault(
            FaultSpec::new(FaultKind::HttpError)
                .path("queue:complete")
                .count(2),
        );
        assert!(store.take_fault(Some("queue:heartbeat")).is_none());
        assert!(store.take_fault(Some("queue:complete")).is_some());
        assert!(store.take_fault(Some("queue:complete")).is_some());
        assert!(store.take_fault(Some("queue:complete")).is_none());
    }
}
