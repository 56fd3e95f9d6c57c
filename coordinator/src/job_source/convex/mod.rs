//! [`ConvexSource`]: the production job source, the Fondation Convex deployment over its HTTP API
//! (`DESIGN.md` section 2). The coordinator is the only process holding its credentials.
//!
//! Layout: `client` speaks HTTP (request shape, reply classification, retries within a budget),
//! `functions` holds the typed arguments and replies of every function used, `owner_token` finds
//! the token that clones a private repository, and this module maps the [`JobSource`] operations
//! onto those functions.
//!
//! The deployment's functions were written for a single Node worker and have sharp edges that this
//! module guards against:
//! - Production hides the message of a function's error from callers without the deploy key, so
//!   no decision is taken from error text: after a refused call or a lost reply the job is read
//!   back with `jobs:getJob` and `status` and `lockedBy` decide.
//! - There is no mutation idempotency. After an ambiguous failure (the request may have been
//!   applied): `queue:heartbeat` and `docs:upsertFromJob` are repeated (harmless);
//!   `queue:complete` and `queue:retryOrFail` are decided by reading the job back;
//!   `queue:claimOne` is never repeated (it would claim a second job): the possible orphan is
//!   logged and counted, and `queue:reclaimExpired` (deploy key only, see `reclaimer`) takes it
//!   back when its lease expires.
//! - `queue:heartbeat`, `queue:complete` and `queue:retryOrFail` only check `lockedBy`, so on a
//!   job the user canceled (status `canceled`, `lockedBy` kept) they would silently overwrite the
//!   cancel. Every call that writes a status is preceded by a `jobs:getJob` check and refused with
//!   [`JobSourceError::Canceled`] instead. A narrow race remains (a cancel between the check and the
//!   write); the deployment offers no conditional write to close it.
//! - A final write the deployment refuses while the job is still ours ends as
//!   [`JobSourceError::TooLarge`] with the reason (or "message hidden"), so the job goes through
//!   `queue:retryOrFail` instead of staying `gathering` under our lock.
//! - There is no permanent-fail function: a non-retryable failure also goes through
//!   `queue:retryOrFail`, which retries the job until its attempts are used up.

mod checks;
mod client;
mod functions;
mod owner_token;

use std::{
    collections::HashMap,
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
    time::Duration,
};

use async_trait::async_trait;
use fondation_proto::limits::truncate_utf8;
use tracing::{info, warn};

pub use self::checks::{is_convex_id, MAX_ARGS_BYTES, MAX_DOCUMENT_BYTES, MAX_ERROR_BYTES};

use self::{
    checks::{
        cap_error_text, check_id, file_args, summary, validate_branch, validate_full_name,
        MAX_MESSAGE_BYTES,
    },
    client::{encode_args, CallError, ConvexClient},
    functions::{
        to_count, ClaimOne, ClaimOneArgs, ClaimedJobReply, Complete, CompleteArgs, CompleteResult,
        GetByRepositoryId, GetByRepositoryIdArgs, GetJob, Heartbeat, HeartbeatArgs, JobDoc,
        JobIdArgs, NoArgs, ReclaimExpired, RepositoryDoc, RequestCancel, RetryOrFail,
        RetryOrFailArgs, RetryOrFailReply, UpsertFromJob, UpsertFromJobArgs,
    },
};
use crate::github_token::EncryptionKey;

use super::{
    is_cancel_signal, now_ms, ClaimedJob, FailOutcome, JobId, JobResult, JobSource, JobSourceError,
    JobStatus, JobView, NewJob, ProgressUpdate, ReclaimCounts, RepoTarget, Result,
};

/// Where a repository is cloned from, `{fullName}` being the repository document's `owner/name`.
pub const DEFAULT_CLONE_URL_TEMPLATE: &str = "https://github.com/{fullName}.git";

/// How the coordinator reaches the Convex deployment.
#[derive(Clone)]
pub struct ConvexConfig {
    /// Deployment URL (`CONVEX_URL`), e.g. `https://happy-animal-123.convex.cloud`.
    pub url: String,
    /// Optional deploy key sent as `Authorization: Convex <key>` (`CONVEX_DEPLOY_KEY`).
    pub deploy_key: Option<String>,
    /// Clone URL template (`CLONE_URL_TEMPLATE`), with `{fullName}`.
    pub clone_url_template: String,
    /// Time allowed for one HTTP attempt, connection to last byte.
    pub request_timeout: Duration,
    /// Time allowed for one logical call including all its retries.
    pub retry_budget: Duration,
    /// `ENCRYPTION_KEY`: decrypts the GitHub tokens the web app stores (`enc_v1_`).
    pub encryption_key: Option<EncryptionKey>,
}

impl ConvexConfig {
    /// A configuration for `url` with the defaults: GitHub clone URLs, 30 s per attempt, 60 s per
    /// call.
    pub fn new(url: impl Into<String>) -> Self {
        ConvexConfig {
            url: url.into(),
            deploy_key: None,
            clone_url_template: DEFAULT_CLONE_URL_TEMPLATE.to_owned(),
            request_timeout: Duration::from_secs(30),
            retry_budget: Duration::from_secs(60),
            encryption_key: None,
        }
    }
}

impl fmt::Debug for ConvexConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConvexConfig")
            .field("url", &self.url)
            .field(
                "deploy_key",
                &self.deploy_key.as_ref().map(|_| "<redacted>"),
            )
            .field("clone_url_template", &self.clone_url_template)
            .field("request_timeout", &self.request_timeout)
            .field("retry_budget", &self.retry_budget)
            .field("encryption_key", &self.encryption_key)
            .finish()
    }
}

/// The Convex deployment as a [`JobSource`].
pub struct ConvexSource {
    client: ConvexClient,
    clone_url_template: String,
    /// `repositoryId` of the jobs this process claimed, so that `complete` does not depend on
    /// reading it back. Jobs adopted after a restart are not in it; their id comes from
    /// `jobs:getJob`. Entries go when the job is completed, failed, canceled or lost.
    repository_ids: Mutex<HashMap<JobId, String>>,
    /// Whether calls carry the deploy key: admin callers read function errors and may run the
    /// internal `queue:reclaimExpired`.
    admin: bool,
    /// `queue:claimOne` calls whose reply was lost: each may have left a job claimed by us that
    /// nobody runs.
    possible_orphans: AtomicU64,
    encryption_key: Option<EncryptionKey>,
}

impl ConvexSource {
    pub fn new(config: ConvexConfig) -> Result<Self> {
        let url = config.url.trim();
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| {
                JobSourceError::Invalid(format!(
                    "CONVEX_URL {url:?} must start with https:// or http://"
                ))
            })?;
        if rest.trim_end_matches('/').is_empty() {
            return Err(JobSourceError::Invalid(format!(
                "CONVEX_URL {url:?} has no host"
            )));
        }
        if !config.clone_url_template.contains("{fullName}") {
            return Err(JobSourceError::Invalid(format!(
                "CLONE_URL_TEMPLATE {:?} must contain {{fullName}}",
                config.clone_url_template
            )));
        }
        if config.request_timeout.is_zero() || config.retry_budget.is_zero() {
            return Err(JobSourceError::Invalid(
                "the Convex request timeout and retry budget must be positive".to_owned(),
            ));
        }
        let deploy_key = config.deploy_key.as_deref().filter(|key| !key.is_empty());
        let client =
            ConvexClient::new(url, deploy_key, config.request_timeout, config.retry_budget)
                .map_err(JobSourceError::Invalid)?;
        if deploy_key.is_none() {
            warn!(
                "no CONVEX_DEPLOY_KEY: a job whose queue:claimOne reply is lost (or claimed just \
                 before a crash) stays claimed and cannot be recovered, and the deployment's \
                 error messages are hidden"
            );
        }
        Ok(ConvexSource {
            client,
            clone_url_template: config.clone_url_template,
            repository_ids: Mutex::new(HashMap::new()),
            admin: deploy_key.is_some(),
            possible_orphans: AtomicU64::new(0),
            encryption_key: config.encryption_key,
        })
    }

    fn remember_repository(&self, job_id: &str, repository_id: &str) {
        self.repository_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(job_id.to_owned(), repository_id.to_owned());
    }

    fn remembered_repository(&self, job_id: &str) -> Option<String> {
        self.repository_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(job_id)
            .cloned()
    }

    fn forget(&self, job_id: &str) {
        self.repository_ids
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(job_id);
    }

    async fn fetch_job(&self, job_id: &str) -> Result<Option<JobDoc>> {
        self.client
            .call::<GetJob>(&JobIdArgs { job_id })
            .await
            .map_err(JobSourceError::from)
    }

    /// Refuses to write over a job that is canceled or no longer this worker's.
    async fn check_writable(&self, job_id: &str, worker_id: &str) -> Result<()> {
        self.read_back(job_id, worker_id).await.map(drop)
    }

    /// How many `queue:claimOne` replies were lost since start (each a possible orphan).
    pub fn possible_orphans(&self) -> u64 {
        self.possible_orphans.load(Ordering::Relaxed)
    }

    /// Turns a claim reply into a job; once the id is known every problem goes into `target`, so
    /// the dispatcher fails the job through `queue:retryOrFail` instead of leaving it claimed.
    async fn claimed_job(&self, raw: serde_json::Value) -> Result<ClaimedJob> {
        let id = match raw.get("id").and_then(serde_json::Value::as_str) {
            Some(id) if is_convex_id(id) => id.to_owned(),
            other => {
                return Err(JobSourceError::Invalid(format!(
                    "queue:claimOne returned a job without a valid id ({other:?}); it stays \
                     claimed until its lease is reclaimed"
                )))
            }
        };
        let reply = match serde_json::from_value::<ClaimedJobReply>(raw) {
            Ok(reply) => reply,
            Err(error) => {
                return Ok(ClaimedJob {
                    id,
                    attempt: 1,
                    prompt: String::new(),
                    target: Err(format!("malformed queue:claimOne reply: {error}")),
                })
            }
        };
        let attempt = match reply.attempts {
            None => Some(1),
            Some(attempts) => to_count(attempts).and_then(|done| done.checked_add(1)),
        };
        let Some(attempt) = attempt else {
            return Ok(ClaimedJob {
                id,
                attempt: 1,
                prompt: reply.prompt,
                target: Err(format!(
                    "queue:claimOne returned an invalid attempts count {:?}",
                    reply.attempts
                )),
            });
        };
        let target = if is_convex_id(&reply.repository_id) {
            self.remember_repository(&id, &reply.repository_id);
            self.resolve_target(&reply.repository_id).await
        } else {
            Err(format!(
                "repository id {:?} is not a Convex id",
                reply.repository_id
            ))
        };
        Ok(ClaimedJob {
            id,
            attempt,
            prompt: reply.prompt,
            target,
        })
    }

    async fn resolve_target(&self, repository_id: &str) -> std::result::Result<RepoTarget, String> {
        match self
            .client
            .call::<GetByRepositoryId>(&GetByRepositoryIdArgs { repository_id })
            .await
        {
            Ok(Some(repository)) => {
                let mut target = self.repo_target(&repository)?;
                target.credential = self
                    .owner_credential(repository_id, repository.user_id.as_deref())
                    .await?;
                Ok(target)
            }
            Ok(None) => Err(format!("repository {repository_id} not found")),
            Err(error) => Err(format!("cannot read repository {repository_id}: {error}")),
        }
    }

    fn repo_target(&self, repository: &RepositoryDoc) -> std::result::Result<RepoTarget, String> {
        validate_full_name(&repository.full_name)?;
        let branch = match repository.default_branch.as_deref() {
            None | Some("") => "main",
            Some(branch) => branch,
        };
        validate_branch(branch)?;
        Ok(RepoTarget {
            url: self
                .clone_url_template
                .replace("{fullName}", &repository.full_name),
            branch: branch.to_owned(),
            credential: None,
        })
    }

    /// The job as it is now, after a call was refused or its reply was lost: the only way to
    /// know what happened, since the deployment's error messages are hidden from callers
    /// without the deploy key (`DESIGN.md` section 2). `Ok(doc)` while the job is still this
    /// worker's and not canceled; else why it is not.
    async fn read_back(&self, job_id: &str, worker_id: &str) -> Result<JobDoc> {
        match self.fetch_job(job_id).await? {
            Some(doc) => writable(&doc, worker_id).map(|()| doc),
            None => Err(not_owned(job_id, worker_id)),
        }
    }

    /// Why the deployment refused a call on a job that is still ours: its message when the deploy
    /// key lets us read it, else only that it refused.
    fn refusal(&self, error: &CallError) -> String {
        match error {
            CallError::Function { path, message } if self.admin => {
                format!("refused by the deployment ({path}: {message})")
            }
            CallError::Function { path, .. } => {
                format!("refused by the deployment (message hidden; {path})")
            }
            other => other.to_string(),
        }
    }

    /// After a `queue:complete` whose reply was lost or that was refused: done, or why not.
    async fn resolve_complete(
        &self,
        job_id: &str,
        worker_id: &str,
        error: CallError,
    ) -> Result<()> {
        let Some(doc) = self.fetch_job(job_id).await? else {
            return Err(not_owned(job_id, worker_id));
        };
        let view = doc.view()?;
        if view.status == JobStatus::Completed && view.locked_by.is_none() {
            info!(
                job_id,
                "job found completed after a lost or refused queue:complete"
            );
            return Ok(());
        }
        writable(&doc, worker_id)?;
        match error {
            // Not applied: the final write is retried later (the upload is safe to repeat).
            CallError::Ambiguous { .. } | CallError::Unavailable { .. } => {
                Err(JobSourceError::from(error))
            }
            error => Err(JobSourceError::TooLarge(self.refusal(&error))),
        }
    }

    /// After a `queue:retryOrFail` whose reply was lost or that was refused: what became of the
    /// job.
    async fn resolve_retry(
        &self,
        job_id: &str,
        worker_id: &str,
        error: CallError,
    ) -> Result<FailOutcome> {
        let Some(doc) = self.fetch_job(job_id).await? else {
            return Err(not_owned(job_id, worker_id));
        };
        let view = doc.view()?;
        match (view.status, &view.locked_by) {
            (JobStatus::Pending, None) => {
                return Ok(FailOutcome::Retrying {
                    attempts: view.attempts,
                    next_run_at_ms: doc.run_at.unwrap_or(view.updated_at_ms),
                })
            }
            // The deployment does not write `attempts` when it marks a job dead.
            (JobStatus::Dead, None) => {
                return Ok(FailOutcome::Dead {
                    attempts: view.attempts.saturating_add(1),
                })
            }
            _ => {}
        }
        writable(&doc, worker_id)?;
        match error {
            CallError::Ambiguous { .. } | CallError::Unavailable { .. } => {
                Err(JobSourceError::from(error))
            }
            error => Err(JobSourceError::Failed(self.refusal(&error))),
        }
    }
}

#[async_trait]
impl JobSource for ConvexSource {
    fn kind(&self) -> &'static str {
        "convex"
    }

    /// Never repeats `queue:claimOne` after a lost reply: a repeat would claim a second job. The
    /// lost claim may have left a job claimed by us that nobody runs; it is counted, and
    /// `queue:reclaimExpired` takes it back once its lease expires (with a deploy key).
    async fn claim(&self, worker_id: &str, lease: Duration) -> Result<Option<ClaimedJob>> {
        let args = ClaimOneArgs {
            worker_id,
            lease_ms: Some(millis(lease)),
        };
        match self.client.call::<ClaimOne>(&args).await {
            Ok(None) => Ok(None),
            Ok(Some(raw)) => {
                crate::failpoint::hit("after-claim");
                self.claimed_job(raw).await.map(Some)
            }
            Err(error @ CallError::Ambiguous { .. }) => {
                let count = self.possible_orphans.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(
                    %error,
                    possible_orphans = count,
                    reclaims = self.admin,
                    "queue:claimOne reply lost: a job may now be claimed by this worker with \
                     nobody running it until queue:reclaimExpired takes it back"
                );
                Err(JobSourceError::from(error))
            }
            Err(error) => Err(JobSourceError::from(error)),
        }
    }

    async fn heartbeat(
        &self,
        job_id: &str,
        worker_id: &str,
        update: &ProgressUpdate,
        lease: Duration,
    ) -> Result<()> {
        check_id(job_id)?;
        if update.status.is_some() {
            // A status written over a canceled job would un-cancel it (see the module header).
            self.check_writable(job_id, worker_id).await?;
        }
        let args = HeartbeatArgs {
            job_id,
            worker_id,
            status: update.status.map(|status| status.as_str()),
            progress: update.progress.as_deref(),
            current_step: update.current_step.map(f64::from),
            lease_ms: Some(millis(lease)),
        };
        match self.client.call::<Heartbeat>(&args).await {
            Ok(_) => Ok(()),
            Err(error @ CallError::Function { .. }) => {
                self.read_back(job_id, worker_id).await?;
                Err(JobSourceError::Failed(self.refusal(&error)))
            }
            Err(error) => Err(JobSourceError::from(error)),
        }
    }

    async fn complete(&self, job_id: &str, worker_id: &str, result: &JobResult) -> Result<()> {
        check_id(job_id)?;
        let files = file_args(job_id, result)?;

        let doc = match self.fetch_job(job_id).await? {
            Some(doc) => doc,
            None => return Err(not_owned(job_id, worker_id)),
        };
        let view = doc.view()?;
        if view.status == JobStatus::Completed && view.locked_by.is_none() {
            // An earlier complete() went through but its reply was lost.
            info!(job_id, "job already completed");
            self.forget(job_id);
            return Ok(());
        }
        if let Err(error) = writable(&doc, worker_id) {
            self.forget(job_id);
            return Err(error);
        }
        let repository_id = self
            .remembered_repository(job_id)
            .or(doc.repository_id)
            .ok_or_else(|| JobSourceError::Invalid(format!("job {job_id} has no repositoryId")))?;

        let files_sent = files.len();
        let summary = summary(&files, now_ms());
        let args = UpsertFromJobArgs {
            job_id,
            repository_id: &repository_id,
            run_id: Some(&result.run_id)
                .filter(|id| !id.is_empty())
                .map(String::as_str),
            files,
            summary,
        };
        let encoded = encode_args::<UpsertFromJob>(&args).map_err(JobSourceError::from)?;
        if encoded.len() > MAX_ARGS_BYTES {
            return Err(JobSourceError::TooLarge(format!(
                "the {files_sent} documents of job {job_id} encode to {} bytes, over Convex's \
                 {MAX_ARGS_BYTES}-byte (16 MiB) limit on the arguments of one call",
                encoded.len()
            )));
        }
        // The upload deletes the repository's previous course and checks nothing: the last look
        // at the job before it is the check above (a cancel after it cannot be caught).
        let upserted = match self.client.call_encoded::<UpsertFromJob>(&encoded).await {
            Ok(upserted) => upserted,
            Err(error @ CallError::Function { .. }) => {
                self.read_back(job_id, worker_id).await?;
                return Err(JobSourceError::TooLarge(self.refusal(&error)));
            }
            Err(error) => return Err(JobSourceError::from(error)),
        };
        drop(encoded);
        // The deployment skips empty chapters and tutorials: its count is the one to record.
        let docs_count = upserted
            .docs_count
            .and_then(to_count)
            .map_or(files_sent as f64, f64::from);

        // Uploading can take a while: look again so a cancel made meanwhile is not overwritten
        // by `completed` (the documents stay, the job stays canceled).
        if let Err(error) = self.check_writable(job_id, worker_id).await {
            if !error.is_transient() {
                self.forget(job_id);
            }
            return Err(error);
        }
        let message = truncate_utf8(&result.message, MAX_MESSAGE_BYTES);
        let args = CompleteArgs {
            job_id,
            worker_id,
            result: Some(CompleteResult {
                success: true,
                message: Some(message),
                data: None,
            }),
            docs_count: Some(docs_count),
        };
        let outcome = match self.client.call::<Complete>(&args).await {
            Ok(_) => Ok(()),
            Err(error) => self.resolve_complete(job_id, worker_id, error).await,
        };
        if !matches!(&outcome, Err(error) if error.is_transient()) {
            self.forget(job_id);
        }
        outcome
    }

    /// Convex has no permanent-fail function: with `retryable == false` the job still goes
    /// through `queue:retryOrFail` and is retried until its attempts are used up, so
    /// [`FailOutcome::Failed`] is never returned.
    async fn fail(
        &self,
        job_id: &str,
        worker_id: &str,
        error: &str,
        retryable: bool,
    ) -> Result<FailOutcome> {
        check_id(job_id)?;
        if !retryable {
            warn!(
                job_id,
                "convex cannot fail a job for good; using queue:retryOrFail"
            );
        }
        if let Err(error) = self.check_writable(job_id, worker_id).await {
            if !error.is_transient() {
                self.forget(job_id);
            }
            return Err(error);
        }
        let capped = cap_error_text(error);
        let args = RetryOrFailArgs {
            job_id,
            worker_id,
            error: &capped,
        };
        let outcome = match self.client.call::<RetryOrFail>(&args).await {
            Ok(RetryOrFailReply::Retrying {
                attempts,
                next_run_at,
            }) => match (to_count(attempts), next_run_at.to_millis()) {
                (Some(attempts), Some(next_run_at_ms)) => Ok(FailOutcome::Retrying {
                    attempts,
                    next_run_at_ms,
                }),
                _ => Err(JobSourceError::Invalid(format!(
                    "queue:retryOrFail returned attempts {attempts} and nextRunAt {next_run_at:?}"
                ))),
            },
            Ok(RetryOrFailReply::Dead { attempts }) => to_count(attempts)
                .map(|attempts| FailOutcome::Dead { attempts })
                .ok_or_else(|| {
                    JobSourceError::Invalid(format!(
                        "queue:retryOrFail returned attempts {attempts}"
                    ))
                }),
            Err(error) => self.resolve_retry(job_id, worker_id, error).await,
        };
        if !matches!(&outcome, Err(error) if error.is_transient()) {
            self.forget(job_id);
        }
        outcome
    }

    async fn get_job(&self, job_id: &str, _include_content: bool) -> Result<Option<JobView>> {
        check_id(job_id)?;
        match self.fetch_job(job_id).await? {
            Some(doc) => doc.view().map(Some),
            None => Ok(None),
        }
    }

    async fn submit(&self, _job: NewJob) -> Result<JobId> {
        Err(JobSourceError::Unsupported(
            "jobs are created by the Fondation web app through jobs:create; SubmitJob works \
             with the embedded store only"
                .to_owned(),
        ))
    }

    async fn list_jobs(
        &self,
        _status: Option<JobStatus>,
        _offset: usize,
        _limit: usize,
    ) -> Result<Vec<JobView>> {
        Err(JobSourceError::Unsupported(
            "the Convex deployment has no function listing jobs; ListJobs works with the \
             embedded store only"
                .to_owned(),
        ))
    }

    /// `jobs:requestCancel` throws on a finished or missing job; whatever it did, the job read
    /// back says what is true now.
    async fn request_cancel(&self, job_id: &str) -> Result<JobStatus> {
        check_id(job_id)?;
        match self
            .client
            .call::<RequestCancel>(&JobIdArgs { job_id })
            .await
        {
            Ok(_) | Err(CallError::Function { .. } | CallError::Ambiguous { .. }) => {}
            Err(error) => return Err(JobSourceError::from(error)),
        }
        match self.fetch_job(job_id).await? {
            Some(doc) => Ok(doc.view()?.status),
            None => Err(JobSourceError::NotFound(job_id.to_owned())),
        }
    }

    fn can_reclaim(&self) -> bool {
        self.admin
    }

    async fn reclaim_expired(&self) -> Result<ReclaimCounts> {
        if !self.admin {
            return Err(JobSourceError::Unsupported(
                "queue:reclaimExpired is internal: it needs CONVEX_DEPLOY_KEY".to_owned(),
            ));
        }
        let reply = self
            .client
            .call::<ReclaimExpired>(&NoArgs {
                _unused: std::marker::PhantomData,
            })
            .await
            .map_err(JobSourceError::from)?;
        match (to_count(reply.reclaimed), to_count(reply.checked)) {
            (Some(reclaimed), Some(checked)) => Ok(ReclaimCounts { reclaimed, checked }),
            _ => Err(JobSourceError::Invalid(format!(
                "queue:reclaimExpired returned {reply:?}"
            ))),
        }
    }
}

fn writable(doc: &JobDoc, worker_id: &str) -> Result<()> {
    if is_cancel_signal(&doc.view()?) {
        return Err(JobSourceError::Canceled(doc.id.clone()));
    }
    if doc.locked_by.as_deref() != Some(worker_id) {
        return Err(not_owned(&doc.id, worker_id));
    }
    Ok(())
}

fn not_owned(job_id: &str, worker_id: &str) -> JobSourceError {
    JobSourceError::NotOwned {
        job_id: job_id.to_owned(),
        worker_id: worker_id.to_owned(),
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_millis() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_the_deploy_key() {
        let mut config = ConvexConfig::new("http://127.0.0.1:1");
        config.deploy_key = Some("prod:secret-key".to_owned());
        let printed = format!("{config:?}");
        assert!(!printed.contains("secret-key"), "{printed}");
        assert!(printed.contains("<redacted>"));
    }
}
