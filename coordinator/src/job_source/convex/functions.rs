//! Typed arguments and replies of the Fondation Convex functions (`DESIGN.md` section 2).
//!
//! Arguments carry exactly the fields of each function's validator: Convex rejects unknown fields,
//! and an optional field must be omitted rather than sent as `null`, hence
//! `skip_serializing_if = "Option::is_none"` on every `Option`. Numbers are `f64` because plain
//! JSON numbers are Convex `float64`. Replies tolerate fields we do not read (`_id`,
//! `_creationTime`, fields added later) but are strict about the types of the fields we do read.

use serde::{de::DeserializeOwned, de::IgnoredAny, Deserialize, Serialize};

use crate::job_source::{JobSourceError, JobStatus, JobView};

/// The HTTP endpoint a function is called through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FunctionKind {
    Query,
    Mutation,
}

impl FunctionKind {
    pub(crate) fn endpoint(self) -> &'static str {
        match self {
            FunctionKind::Query => "api/query",
            FunctionKind::Mutation => "api/mutation",
        }
    }
}

/// One Convex function: its path, kind, argument and reply types.
pub(crate) trait ConvexFunction {
    const PATH: &'static str;
    const KIND: FunctionKind;
    /// Whether calling it twice does no more than calling it once, so a call whose reply was
    /// lost may simply be sent again (`DESIGN.md` section 2: the HTTP API has no idempotency).
    const REPEATABLE: bool;
    type Args<'a>: Serialize + Sync;
    type Reply: DeserializeOwned;
}

macro_rules! convex_function {
    ($name:ident, $path:literal, $kind:ident, $args:ident, $reply:ty) => {
        convex_function!($name, $path, $kind, $args, $reply, repeatable = true);
    };
    ($name:ident, $path:literal, $kind:ident, $args:ident, $reply:ty, repeatable = $repeatable:literal) => {
        pub(crate) enum $name {}
        impl ConvexFunction for $name {
            const PATH: &'static str = $path;
            const KIND: FunctionKind = FunctionKind::$kind;
            const REPEATABLE: bool = $repeatable;
            type Args<'a> = $args<'a>;
            type Reply = $reply;
        }
    };
}

// The claim reply is kept as raw JSON first: once a job is claimed it must not be lost, so the
// caller extracts the id before parsing the rest strictly (see `ClaimedJobReply`). A repeated
// claim after a lost reply would claim a second job: never repeated.
convex_function!(
    ClaimOne,
    "queue:claimOne",
    Mutation,
    ClaimOneArgs,
    Option<serde_json::Value>,
    repeatable = false
);
convex_function!(
    Heartbeat,
    "queue:heartbeat",
    Mutation,
    HeartbeatArgs,
    IgnoredAny
);
convex_function!(
    Complete,
    "queue:complete",
    Mutation,
    CompleteArgs,
    IgnoredAny,
    repeatable = false
);
convex_function!(
    RetryOrFail,
    "queue:retryOrFail",
    Mutation,
    RetryOrFailArgs,
    RetryOrFailReply,
    repeatable = false
);
convex_function!(
    GetByRepositoryId,
    "repositories:getByRepositoryId",
    Query,
    GetByRepositoryIdArgs,
    Option<RepositoryDoc>
);
convex_function!(
    UpsertFromJob,
    "docs:upsertFromJob",
    Mutation,
    UpsertFromJobArgs,
    UpsertReply
);
convex_function!(GetJob, "jobs:getJob", Query, JobIdArgs, Option<JobDoc>);
convex_function!(
    GetUserById,
    "users:getUserById",
    Query,
    UserIdArgs,
    Option<UserDoc>
);
convex_function!(
    GetGitHubToken,
    "users:getGitHubToken",
    Query,
    GithubIdArgs,
    Option<StoredToken>
);
convex_function!(
    RequestCancel,
    "jobs:requestCancel",
    Mutation,
    JobIdArgs,
    IgnoredAny,
    repeatable = false
);
// Internal: runs only with the deploy key. Not repeated within a call: the reclaimer calls it
// again at its next interval.
convex_function!(
    ReclaimExpired,
    "queue:reclaimExpired",
    Mutation,
    NoArgs,
    ReclaimReply,
    repeatable = false
);

/// `{}`: a function without arguments.
#[derive(Debug, Serialize)]
pub(crate) struct NoArgs<'a> {
    #[serde(skip)]
    pub _unused: std::marker::PhantomData<&'a ()>,
}

/// What `queue:reclaimExpired` did: jobs sent back to pending, and expired leases looked at.
#[derive(Debug, Deserialize)]
pub(crate) struct ReclaimReply {
    pub reclaimed: f64,
    pub checked: f64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClaimOneArgs<'a> {
    pub worker_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<f64>,
}

/// A claimed job as `queue:claimOne` returns it. No `Debug`: it holds the job's callback token,
/// which must never reach a log or an agent.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ClaimedJobReply {
    // Extracted from the raw reply before this parse (see `ClaimOne`).
    #[serde(rename = "id")]
    pub _id: String,
    pub repository_id: String,
    // Read to hold the reply to its documented shape; not used by the coordinator.
    #[serde(rename = "userId")]
    pub _user_id: String,
    pub prompt: String,
    // Required by the contract, parsed only to check the reply's shape, then dropped: agents never
    // get it (DESIGN.md section 5).
    #[serde(rename = "callbackToken")]
    pub _callback_token: String,
    /// Failed attempts so far (`queue:retryOrFail` increments it); missing on new jobs.
    #[serde(default)]
    pub attempts: Option<f64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HeartbeatArgs<'a> {
    pub job_id: &'a str,
    pub worker_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_step: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<f64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CompleteArgs<'a> {
    pub job_id: &'a str,
    pub worker_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<CompleteResult<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docs_count: Option<f64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CompleteResult<'a> {
    pub success: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a str>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RetryOrFailArgs<'a> {
    pub job_id: &'a str,
    pub worker_id: &'a str,
    pub error: &'a str,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "status", rename_all = "lowercase")]
pub(crate) enum RetryOrFailReply {
    #[serde(rename_all = "camelCase")]
    Retrying {
        attempts: f64,
        next_run_at: Timestamp,
    },
    Dead {
        attempts: f64,
    },
}

/// A point in time as the deployment spells it: `queue:retryOrFail` returns `nextRunAt` as an ISO
/// 8601 string (`new Date(..).toISOString()`), while stored fields are ms since the epoch.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum Timestamp {
    Millis(f64),
    Iso(String),
}

impl Timestamp {
    /// Milliseconds since the Unix epoch, `None` when the string is not `YYYY-MM-DDTHH:MM:SS(.sss)Z`.
    pub(crate) fn to_millis(&self) -> Option<f64> {
        match self {
            Timestamp::Millis(ms) => ms.is_finite().then_some(*ms),
            Timestamp::Iso(text) => parse_iso_millis(text),
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GetByRepositoryIdArgs<'a> {
    pub repository_id: &'a str,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RepositoryDoc {
    pub full_name: String,
    #[serde(default)]
    pub default_branch: Option<String>,
    /// The owner, whose GitHub token clones the repository when it is private.
    #[serde(default)]
    pub user_id: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UserIdArgs<'a> {
    pub user_id: &'a str,
}

/// The fields of a `users` document the coordinator reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UserDoc {
    /// GitHub's numeric user id, stored as a string (a number is accepted too).
    #[serde(default)]
    pub github_id: Option<GithubId>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum GithubId {
    Text(String),
    Number(f64),
}

impl GithubId {
    /// The id as `users:getGitHubToken` takes it.
    pub(crate) fn as_arg(&self) -> Option<String> {
        match self {
            GithubId::Text(text) if !text.is_empty() => Some(text.clone()),
            GithubId::Number(number) => to_count(*number).map(|id| id.to_string()),
            GithubId::Text(_) => None,
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct GithubIdArgs<'a> {
    pub github_id: &'a str,
}

/// A user's GitHub token as stored (`enc_v1_...`, `obf_...` or plain text). No `Debug` of its
/// contents: it is a secret until proven otherwise.
#[derive(Deserialize)]
#[serde(transparent)]
pub(crate) struct StoredToken(pub String);

impl std::fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoredToken(<redacted>)")
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UpsertFromJobArgs<'a> {
    pub job_id: &'a str,
    pub repository_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<&'a str>,
    pub files: Vec<FileArg<'a>>,
    pub summary: Summary,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct FileArg<'a> {
    pub slug: &'a str,
    pub title: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chapter_index: Option<f64>,
    pub content: &'a str,
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Summary {
    pub chapters_count: f64,
    pub tutorials_count: f64,
    pub generated_at: f64,
}

/// `docs:upsertFromJob` returns `{docsCount, docIds, stats}`; only the count is used (documents
/// with empty content are skipped by the deployment, so it may be lower than what was sent).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct UpsertReply {
    #[serde(default)]
    pub docs_count: Option<f64>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobIdArgs<'a> {
    pub job_id: &'a str,
}

/// The fields of a `jobs` document the coordinator reads. `callbackToken` is deliberately not
/// among them.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct JobDoc {
    #[serde(rename = "_id")]
    pub id: String,
    #[serde(rename = "_creationTime")]
    pub creation_time: f64,
    pub status: String,
    #[serde(default)]
    pub repository_id: Option<String>,
    #[serde(default)]
    pub attempts: Option<f64>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub progress: Option<String>,
    #[serde(default)]
    pub current_step: Option<f64>,
    #[serde(default)]
    pub cancel_requested: Option<bool>,
    #[serde(default)]
    pub locked_by: Option<String>,
    #[serde(default)]
    pub run_at: Option<f64>,
    #[serde(default)]
    pub created_at: Option<f64>,
    #[serde(default)]
    pub updated_at: Option<f64>,
}

impl JobDoc {
    /// The job as the coordinator shows it; strict on the values it reads.
    pub(crate) fn view(&self) -> Result<JobView, JobSourceError> {
        let invalid = |field: &str, value: f64| {
            JobSourceError::Invalid(format!("job {} has an invalid {field} {value}", self.id))
        };
        let status: JobStatus = self.status.parse()?;
        let attempts = match self.attempts {
            Some(value) => to_count(value).ok_or_else(|| invalid("attempts", value))?,
            None => 0,
        };
        let current_step = match self.current_step {
            Some(value) => Some(to_count(value).ok_or_else(|| invalid("currentStep", value))?),
            None => None,
        };
        let created_at_ms = self.created_at.unwrap_or(self.creation_time);
        Ok(JobView {
            id: self.id.clone(),
            status,
            attempts,
            error: self.last_error.clone().or_else(|| self.error.clone()),
            progress: self.progress.clone(),
            current_step,
            repo_url: None,
            branch: None,
            cancel_requested: self.cancel_requested.unwrap_or(false),
            locked_by: self.locked_by.clone(),
            created_at_ms,
            updated_at_ms: self.updated_at.unwrap_or(created_at_ms),
            documents: Vec::new(),
        })
    }
}

/// A non-negative whole count from a float64 field (`attempts`, `currentStep`).
pub(crate) fn to_count(value: f64) -> Option<u32> {
    (value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value <= f64::from(u32::MAX))
        .then_some(value as u32)
}

/// Parses JavaScript's `Date.prototype.toISOString` (`2024-02-29T12:34:56.789Z`).
fn parse_iso_millis(text: &str) -> Option<f64> {
    let timestamp: jiff::Timestamp = text.parse().ok()?;
    Some(timestamp.as_millisecond() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_timestamps_parse_like_javascript() {
        assert_eq!(parse_iso_millis("1970-01-01T00:00:00.000Z"), Some(0.0));
        assert_eq!(
            parse_iso_millis("2024-02-29T12:34:56.789Z"),
            Some(1_709_210_096_789.0)
        );
        assert_eq!(
            parse_iso_millis("2024-02-29T12:34:56Z"),
            Some(1_709_210_096_000.0)
        );
        assert_eq!(parse_iso_millis("2024-13-01T00:00:00.000Z"), None);
        assert_eq!(parse_iso_millis("yesterday"), None);
    }

    #[test]
    fn optional_arguments_are_omitted_not_null() {
        let args = HeartbeatArgs {
            job_id: "j",
            worker_id: "w",
            status: None,
            progress: None,
            current_step: None,
            lease_ms: Some(1000.0),
        };
        let json = serde_json::to_string(&args).expect("serializes");
        assert_eq!(json, r#"{"jobId":"j","workerId":"w","leaseMs":1000.0}"#);
    }

    #[test]
    fn retry_or_fail_replies_parse() {
        let retrying: RetryOrFailReply = serde_json::from_str(
            r#"{"status":"retrying","attempts":2,"nextRunAt":"2024-01-01T00:00:10.000Z"}"#,
        )
        .expect("retrying");
        assert!(matches!(retrying, RetryOrFailReply::Retrying { attempts, .. } if attempts == 2.0));
        let dead: RetryOrFailReply =
            serde_json::from_str(r#"{"status":"dead","attempts":5}"#).expect("dead");
        assert!(matches!(dead, RetryOrFailReply::Dead { attempts } if attempts == 5.0));
    }

    #[test]
    fn counts_must_be_whole_and_non_negative() {
        assert_eq!(to_count(3.0), Some(3));
        assert_eq!(to_count(-1.0), None);
        assert_eq!(to_count(1.5), None);
        assert_eq!(to_count(f64::NAN), None);
    }
}
