//! Where jobs come from and where their outcomes go.
//!
//! [`JobSource`] is the queue contract of `DESIGN.md` section 2 seen from the coordinator: claim
//! with a lease, heartbeat, complete with documents, retry-or-fail, cancel detection. Two
//! implementations: [`embedded_store::EmbeddedStore`] (SQLite in `DATA_DIR`, the default) and
//! [`convex::ConvexSource`] (the production Convex deployment over its HTTP API). The coordinator
//! calls either through [`observed::ObservedSource`], which records each call.

pub mod convex;
pub mod embedded_store;
pub mod observed;

use std::{fmt, str::FromStr, time::Duration};

use async_trait::async_trait;

use crate::journal::PlannedAssignment;

/// Milliseconds since the Unix epoch, whole like JavaScript's `Date.now()`: the unit of every
/// timestamp the job sources use.
pub fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |since| since.as_millis() as f64)
}

/// Job id as the source spells it (a Convex id, or an embedded-store id of the same shape).
pub type JobId = String;

pub type Result<T, E = JobSourceError> = std::result::Result<T, E>;

/// Every status a job can have, with the names Convex uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Pending,
    Claimed,
    Running,
    Cloning,
    Analyzing,
    Gathering,
    Completed,
    Failed,
    Canceled,
    Dead,
}

impl JobStatus {
    pub const ALL: [JobStatus; 10] = [
        JobStatus::Pending,
        JobStatus::Claimed,
        JobStatus::Running,
        JobStatus::Cloning,
        JobStatus::Analyzing,
        JobStatus::Gathering,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Canceled,
        JobStatus::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Claimed => "claimed",
            JobStatus::Running => "running",
            JobStatus::Cloning => "cloning",
            JobStatus::Analyzing => "analyzing",
            JobStatus::Gathering => "gathering",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
            JobStatus::Dead => "dead",
        }
    }

    /// No further transition happens from these on their own.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Canceled | JobStatus::Dead
        )
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobStatus {
    type Err = JobSourceError;

    fn from_str(s: &str) -> Result<Self> {
        JobStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| JobSourceError::Invalid(format!("unknown job status {s:?}")))
    }
}

/// The statuses a heartbeat may set (Convex's `queue:heartbeat` validator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveStatus {
    Running,
    Cloning,
    Analyzing,
    Gathering,
}

impl ActiveStatus {
    pub fn as_str(self) -> &'static str {
        self.job_status().as_str()
    }

    pub fn job_status(self) -> JobStatus {
        match self {
            ActiveStatus::Running => JobStatus::Running,
            ActiveStatus::Cloning => JobStatus::Cloning,
            ActiveStatus::Analyzing => JobStatus::Analyzing,
            ActiveStatus::Gathering => JobStatus::Gathering,
        }
    }
}

/// What to clone for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoTarget {
    pub url: String,
    /// Empty for the repository's default branch (what `git clone` checks out).
    pub branch: String,
    /// The repository owner's token, for a private repository (Convex: the user's stored GitHub
    /// token). `None` leaves it to `GITHUB_TOKEN`, else to an anonymous clone. Redacted in `Debug`.
    pub credential: Option<CloneCredential>,
}

/// A job this coordinator now holds the lease of.
#[derive(Debug, Clone)]
pub struct ClaimedJob {
    pub id: JobId,
    /// Attempt number of this run, 1-based.
    pub attempt: u32,
    pub prompt: String,
    /// The repository to analyze, or why it could not be resolved (e.g. the repository document is
    /// missing). The dispatcher fails a job it cannot resolve instead of assigning it.
    pub target: std::result::Result<RepoTarget, String>,
}

/// Fields a heartbeat writes besides extending the lease; `None` leaves a field as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProgressUpdate {
    pub status: Option<ActiveStatus>,
    pub progress: Option<String>,
    pub current_step: Option<u32>,
}

/// Documents and their kinds are the domain model's: one definition, one mapping to the wire
/// and to Convex's `kind` names.
pub use fondation_proto::model::{CloneCredential, Document, DocumentKind};

/// A document as read back from the source: its content only when asked for, its size always.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDocument {
    /// `content` is empty unless the reader asked for contents.
    pub document: Document,
    /// Size of the stored content in bytes.
    pub size_bytes: u64,
}

/// A successful run's outcome.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobResult {
    /// Identifies the run that produced the documents (the assignment id).
    pub run_id: String,
    pub message: String,
    pub documents: Vec<Document>,
}

/// What `fail` did with the job.
#[derive(Debug, Clone, PartialEq)]
pub enum FailOutcome {
    /// Back to pending; runs again at `next_run_at_ms` (ms since the Unix epoch).
    Retrying { attempts: u32, next_run_at_ms: f64 },
    /// Out of attempts.
    Dead { attempts: u32 },
    /// Failed for good without using up its attempts (a non-retryable error, where the source
    /// supports that).
    Failed,
}

/// What one reclaim of expired leases did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReclaimCounts {
    /// Jobs whose lease had expired, sent back to pending.
    pub reclaimed: u32,
    /// Jobs looked at.
    pub checked: u32,
}

/// A job as an operator sees it (`Admin/GetJob`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    pub id: JobId,
    pub status: JobStatus,
    pub attempts: u32,
    pub error: Option<String>,
    pub progress: Option<String>,
    pub current_step: Option<u32>,
    pub repo_url: Option<String>,
    pub branch: Option<String>,
    /// Whether a cancel was requested (Convex's `cancelRequested`), whatever the status says.
    pub cancel_requested: bool,
    /// Who holds the lease (`lockedBy`).
    pub locked_by: Option<String>,
    pub created_at_ms: f64,
    pub updated_at_ms: f64,
    /// Stored documents, in upload order.
    pub documents: Vec<StoredDocument>,
}

/// Which jobs `list_jobs` returns (`Admin/ListJobs`), in which order, and which page of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobQuery {
    /// Only jobs in this status.
    pub status: Option<JobStatus>,
    /// Only jobs whose current or last attempt ran on this agent.
    pub agent_id: Option<String>,
    pub order: JobOrder,
    pub offset: usize,
    pub limit: usize,
}

/// How `list_jobs` orders jobs; ties go newest first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum JobOrder {
    #[default]
    NewestFirst,
    OldestFirst,
    /// Most recently updated first.
    RecentlyUpdated,
    /// By status name.
    Status,
    /// By the agent of the current or last attempt; jobs never assigned last.
    Agent,
}

impl JobOrder {
    /// Compares two jobs, each with the agent of its current or last attempt.
    pub fn compare(
        self,
        (a, a_agent): (&JobView, Option<&str>),
        (b, b_agent): (&JobView, Option<&str>),
    ) -> std::cmp::Ordering {
        let newest_first = b.created_at_ms.total_cmp(&a.created_at_ms);
        match self {
            JobOrder::NewestFirst => newest_first,
            JobOrder::OldestFirst => newest_first.reverse(),
            JobOrder::RecentlyUpdated => b.updated_at_ms.total_cmp(&a.updated_at_ms),
            JobOrder::Status => a.status.as_str().cmp(b.status.as_str()),
            // `None` sorts first in an `Option`: compare "is it missing" first.
            JobOrder::Agent => (a_agent.is_none(), a_agent).cmp(&(b_agent.is_none(), b_agent)),
        }
        .then(newest_first)
        .then_with(|| a.id.cmp(&b.id))
    }
}

/// A job to enqueue (`Admin/SubmitJob`).
#[derive(Debug, Clone)]
pub struct NewJob {
    pub repo_url: String,
    /// Empty for the repository's default branch.
    pub branch: String,
    pub prompt: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JobSourceError {
    /// The lease is someone else's now (or the job no longer exists): stop working on it.
    #[error("job {job_id} is not owned by worker {worker_id}")]
    NotOwned { job_id: JobId, worker_id: String },
    /// The job was canceled; nothing was written.
    #[error("job {0} was canceled")]
    Canceled(JobId),
    #[error("job {0} not found")]
    NotFound(JobId),
    /// The source cannot do this (e.g. submitting jobs to Convex from the coordinator).
    #[error("{0}")]
    Unsupported(String),
    /// The request or the source's reply is malformed.
    #[error("invalid: {0}")]
    Invalid(String),
    /// The source cannot store the result: over its limits, or refused for a reason it may hide.
    /// Running again will not help; the caller records the job as failed with this reason.
    #[error("result cannot be stored: {0}")]
    TooLarge(String),
    /// The source could not be reached or was overloaded, after retries; try again later.
    #[error("job source unavailable: {0}")]
    Unavailable(String),
    /// The source's function failed (Convex `status: "error"`), or local storage failed.
    #[error("job source error: {0}")]
    Failed(String),
}

impl From<JobSourceError> for tonic::Status {
    fn from(error: JobSourceError) -> Self {
        let message = error.to_string();
        match error {
            JobSourceError::NotFound(_) => tonic::Status::not_found(message),
            JobSourceError::Invalid(_) => tonic::Status::invalid_argument(message),
            JobSourceError::Unsupported(_) => tonic::Status::unimplemented(message),
            JobSourceError::Unavailable(_) => tonic::Status::unavailable(message),
            JobSourceError::NotOwned { .. } | JobSourceError::Canceled(_) => {
                tonic::Status::failed_precondition(message)
            }
            JobSourceError::TooLarge(_) => tonic::Status::out_of_range(message),
            JobSourceError::Failed(_) => tonic::Status::internal(message),
        }
    }
}

impl JobSourceError {
    /// Whether calling again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, JobSourceError::Unavailable(_))
    }
}

/// The job queue as the coordinator uses it. Every method is one logical operation on the source;
/// implementations retry transient transport errors themselves within a bounded time and report
/// what is left as [`JobSourceError::Unavailable`].
#[async_trait]
pub trait JobSource: Send + Sync + 'static {
    /// Short name for logs and health ("embedded", "convex").
    fn kind(&self) -> &'static str;

    /// How many claims the dispatcher may have in flight at once when that many slots are free.
    /// A source in the coordinator's own database answers concurrent claims in one transaction
    /// (one commit for all of them); a remote source gains nothing from parallel claims that
    /// mostly come back empty, so the default is one.
    fn parallel_claims(&self) -> usize {
        1
    }

    /// Whether the source records a job's end in the coordinator's own database, as durably as
    /// the journal would: a run's end then goes straight to the source before the agent's result
    /// is acknowledged, instead of through the journal first (the documents written once, one
    /// commit fewer between the result and the job's end). A remote source answers false: its
    /// outages must not keep the agent waiting, so the journal holds the end meanwhile.
    fn records_ends_locally(&self) -> bool {
        false
    }

    /// Claims the oldest due pending job, leasing it to `worker_id` for `lease`.
    async fn claim(&self, worker_id: &str, lease: Duration) -> Result<Option<ClaimedJob>>;

    /// Claims like [`JobSource::claim`]. A source that keeps its jobs in the coordinator's own
    /// database also journals `planned` for the claimed job in the same transaction and returns
    /// `true` with it; otherwise (the default) the caller journals the assignment itself.
    async fn claim_journaled(
        &self,
        worker_id: &str,
        lease: Duration,
        planned: &PlannedAssignment,
    ) -> Result<Option<(ClaimedJob, bool)>> {
        let _ = planned;
        Ok(self.claim(worker_id, lease).await?.map(|job| (job, false)))
    }

    /// Extends the lease by `lease` and writes `update`. [`JobSourceError::NotOwned`] when the
    /// lease is someone else's; [`JobSourceError::Canceled`], writing nothing, when the job was
    /// canceled (a status written over a cancel would undo it).
    async fn heartbeat(
        &self,
        job_id: &str,
        worker_id: &str,
        update: &ProgressUpdate,
        lease: Duration,
    ) -> Result<()>;

    /// Stores all of the result's documents (replacing any earlier set) and marks the job
    /// completed. Safe to call again after a lost reply: a job already completed by this worker
    /// counts as success. [`JobSourceError::TooLarge`] when the source cannot store this result
    /// (over its limits, or refused): the caller then fails the job with that reason, so it never
    /// stays leased with nobody working on it.
    async fn complete(&self, job_id: &str, worker_id: &str, result: &JobResult) -> Result<()>;

    /// Records a failed attempt: retried with backoff, or dead after the maximum attempts. With
    /// `retryable == false` a source that can fail a job for good does so.
    async fn fail(
        &self,
        job_id: &str,
        worker_id: &str,
        error: &str,
        retryable: bool,
    ) -> Result<FailOutcome>;

    /// Hands a job this worker holds back to pending, due at once, as if this claim had not
    /// happened: the attempt its claim counted is not counted, its error and progress stay as
    /// they were. For runs that failed for a reason of the agent, not of the job. Errors as for
    /// `fail` ([`JobSourceError::NotOwned`], [`JobSourceError::Canceled`]);
    /// [`JobSourceError::Unsupported`] where the source cannot give an attempt back (Convex's
    /// `retryOrFail` always counts one): the caller then uses `fail`.
    async fn release(&self, job_id: &str, worker_id: &str) -> Result<()> {
        let _ = (job_id, worker_id);
        Err(JobSourceError::Unsupported(format!(
            "the {} job source cannot hand a job back without counting an attempt",
            self.kind()
        )))
    }

    /// Reads one job; `include_content` fills in document contents.
    async fn get_job(&self, job_id: &str, include_content: bool) -> Result<Option<JobView>>;

    /// Enqueues a job.
    async fn submit(&self, job: NewJob) -> Result<JobId>;

    /// Enqueues a job and, in the same transaction, claims the oldest due job for `planned` (the
    /// new one, unless older ones wait) and journals its assignment: a job submitted while a slot
    /// is free then reaches its agent after one commit, not two (the submit's, then the claim's).
    /// A claimed job is always journaled. The default, for a source that cannot, only enqueues.
    async fn submit_and_claim(
        &self,
        job: NewJob,
        worker_id: &str,
        lease: Duration,
        planned: &PlannedAssignment,
    ) -> Result<(JobId, Option<ClaimedJob>)> {
        let _ = (worker_id, lease, planned);
        Ok((self.submit(job).await?, None))
    }

    /// The jobs `query` selects, in its order: at most `limit` after skipping `offset`.
    /// [`JobSourceError::Unsupported`] where the source cannot list its jobs (Convex).
    async fn list_jobs(&self, query: &JobQuery) -> Result<Vec<JobView>>;

    /// Asks for the job to stop: a pending job is canceled at once, a running one is marked so the
    /// coordinator stops it. Returns the status after the request.
    async fn request_cancel(&self, job_id: &str) -> Result<JobStatus>;

    /// When the next pending job becomes due (ms since the Unix epoch), for sources that know it
    /// cheaply; lets the claim loop wake for a retry instead of waiting a whole poll interval.
    async fn next_due_at_ms(&self) -> Result<Option<f64>> {
        Ok(None)
    }

    /// How many jobs the source holds in each status (statuses with none left out), for
    /// `GetStats`; `None` where the source cannot count its jobs (Convex has no such function).
    async fn count_by_status(&self) -> Result<Option<Vec<(JobStatus, u64)>>> {
        Ok(None)
    }

    /// Jobs waiting to be claimed (the queue depth an autoscaler reads), where the source can
    /// count them cheaply; `None` elsewhere.
    async fn pending_count(&self) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Whether [`JobSource::reclaim_expired`] works here: a source whose expired leases nobody
    /// takes back on its own (Convex, with a deploy key).
    fn can_reclaim(&self) -> bool {
        false
    }

    /// Sends every job whose lease expired, of any worker, back to pending. Callers first refresh
    /// the leases of every job they still hold.
    async fn reclaim_expired(&self) -> Result<ReclaimCounts> {
        Err(JobSourceError::Unsupported(format!(
            "the {} job source reclaims expired leases itself",
            self.kind()
        )))
    }
}

/// Whether a job as read from the source must be stopped: canceled, failed, or with a pending
/// cancel request.
pub fn is_cancel_signal(view: &JobView) -> bool {
    view.cancel_requested || matches!(view.status, JobStatus::Canceled | JobStatus::Failed)
}
