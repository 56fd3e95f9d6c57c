//! The embedded job source: the Convex queue of `DESIGN.md` section 2 replicated in a SQLite file
//! under `DATA_DIR`, so the whole system runs on one machine with no cloud account.
//!
//! Semantics follow the Convex functions: claim leases the oldest due pending job, heartbeats
//! extend the lease, a failed attempt goes back to pending with exponential backoff until it is
//! dead, a cancel leaves the lease holder in place so the coordinator notices and stops its agent.
//! One addition: expired leases are reclaimed at the start of every claim (the deployment has
//! `queue:reclaimExpired`, but nothing schedules it).
//!
//! Sizes are Convex's too: a result is refused by `limits::check_result`, the check the Convex
//! source applies before its upload, and an error text is cut by `limits::cap_error_text`, as the
//! Convex source cuts it before `queue:retryOrFail`; tests on this store see what production would.
//!
//! Every call is one request to the coordinator's [`Database`]: it runs in a savepoint of the
//! thread's current group commit and returns once that commit is on disk (`synchronous = FULL`),
//! so an acknowledged change survives a crash. The coordinator's journal lives in the same file
//! (its own tables), which lets a claim journal its assignment in the same transaction
//! ([`EmbeddedStore::claim_journaled`], [`EmbeddedStore::submit_and_claim`]); apart from that
//! this module only touches `jobs` and
//! `documents`, and reads the attempt history ([`crate::history`]) to list jobs by agent.

use std::{path::Path, time::Duration};

use async_trait::async_trait;
use fondation_proto::limits;
use rand::Rng;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::{
    database::{Database, DatabaseError},
    journal::{self, PlannedAssignment},
};

use super::{
    now_ms, ClaimedJob, Document, DocumentKind, FailOutcome, JobId, JobOrder, JobQuery, JobResult,
    JobSource, JobSourceError, JobStatus, JobView, NewJob, ProgressUpdate, RepoTarget, Result,
    StoredDocument,
};

/// Version of the `jobs`/`documents` schema, kept in `PRAGMA user_version`.
const SCHEMA_VERSION: i64 = 1;

/// Convex id alphabet: lowercase Crockford base32 (no i, l, o, u).
/// Claims the dispatcher may have in flight at once on this store: enough to fill a burst of
/// free slots in one commit, few enough that a batch stays a fraction of the database thread's
/// `MAX_BATCH`.
const PARALLEL_CLAIMS: usize = 16;

const ID_ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const ID_LENGTH: usize = 32;

/// Statuses in which a job holds a lease, as an SQL list.
const LEASED_STATUSES_SQL: &str = "('claimed', 'running', 'cloning', 'analyzing', 'gathering')";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id               TEXT PRIMARY KEY NOT NULL,
    status           TEXT NOT NULL,
    repo_url         TEXT NOT NULL,
    branch           TEXT NOT NULL,
    prompt           TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    run_at           REAL NOT NULL,
    locked_by        TEXT,
    lease_until      REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress         TEXT,
    current_step     INTEGER,
    error            TEXT,
    -- who completed the job, so that a repeated complete (lost reply) is recognised
    completed_by     TEXT,
    run_id           TEXT,
    result_message   TEXT,
    docs_count       INTEGER,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_due ON jobs (status, run_at, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs (created_at);

CREATE TABLE IF NOT EXISTS documents (
    job_id        TEXT NOT NULL,
    position      INTEGER NOT NULL,
    slug          TEXT NOT NULL,
    title         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    chapter_index INTEGER,
    content       TEXT NOT NULL,
    size_bytes    INTEGER NOT NULL,
    PRIMARY KEY (job_id, position)
);
";

/// Retry policy, the same as Convex's `queue:retryOrFail` by default.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Attempts after which a failing job is dead.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles with each further attempt.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Random delay in `[0, backoff_jitter)` added to each backoff.
    pub backoff_jitter: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            max_attempts: 5,
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(10 * 60),
            backoff_jitter: Duration::from_secs(5),
        }
    }
}

/// The job queue in the coordinator's database file in `DATA_DIR` ([`crate::database`]). Cheap
/// to clone: clones share the database thread.
#[derive(Debug, Clone)]
pub struct EmbeddedStore {
    db: Database,
    options: EmbeddedOptions,
}

/// What goes wrong inside one database operation, before it gets its context.
enum OpError {
    Db(rusqlite::Error),
    Database(DatabaseError),
    /// The file or a stored value is not what this build can use (unknown status, newer schema).
    Unusable(String),
    Job(JobSourceError),
}

impl From<rusqlite::Error> for OpError {
    fn from(err: rusqlite::Error) -> Self {
        OpError::Db(err)
    }
}

impl From<DatabaseError> for OpError {
    fn from(err: DatabaseError) -> Self {
        OpError::Database(err)
    }
}

impl From<JobSourceError> for OpError {
    fn from(err: JobSourceError) -> Self {
        OpError::Job(err)
    }
}

impl OpError {
    fn with_context(self, what: &str) -> JobSourceError {
        match self {
            OpError::Db(err) => JobSourceError::Failed(format!("embedded store: {what}: {err}")),
            OpError::Database(err) => {
                JobSourceError::Failed(format!("embedded store: {what}: {err}"))
            }
            OpError::Unusable(msg) => {
                JobSourceError::Failed(format!("embedded store: {what}: {msg}"))
            }
            OpError::Job(err) => err,
        }
    }
}

type OpResult<T> = std::result::Result<T, OpError>;

impl EmbeddedStore {
    /// The store in the coordinator's database (which created its tables when it opened).
    pub fn new(db: Database, options: EmbeddedOptions) -> Self {
        EmbeddedStore { db, options }
    }

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        self.db.path()
    }

    /// The earliest `runAt` of a pending job, so the dispatcher can wake up exactly when a retry
    /// becomes due.
    pub async fn next_due_at_ms(&self) -> Result<Option<f64>> {
        self.run("reading the next due time", |conn| {
            let due = query_row(
                conn,
                "SELECT MIN(run_at) FROM jobs WHERE status = 'pending'",
                [],
                |row| row.get(0),
            )?;
            Ok(due)
        })
        .await
    }

    /// Runs `op` as one request of the database thread; `what` names the operation in errors.
    async fn run<T, F>(&self, what: &'static str, op: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> OpResult<T> + Send + 'static,
    {
        self.db
            .run(op)
            .await
            .map_err(|err: OpError| err.with_context(what))
    }
}

#[async_trait]
impl JobSource for EmbeddedStore {
    async fn next_due_at_ms(&self) -> Result<Option<f64>> {
        EmbeddedStore::next_due_at_ms(self).await
    }

    fn kind(&self) -> &'static str {
        "embedded"
    }

    /// Concurrent claims share the database thread's transaction: several free slots cost one
    /// commit, not one each.
    fn parallel_claims(&self) -> usize {
        PARALLEL_CLAIMS
    }

    /// The jobs live in the journal's database.
    fn records_ends_locally(&self) -> bool {
        true
    }

    async fn claim(&self, worker_id: &str, lease: Duration) -> Result<Option<ClaimedJob>> {
        let worker_id = worker_id.to_owned();
        let options = self.options.clone();
        self.run("claiming a job", move |conn| {
            claim_next(conn, &worker_id, lease, &options)
        })
        .await
    }

    /// The claim and the journal entry of its assignment in one request, so one commit: a crash
    /// leaves both or neither.
    async fn claim_journaled(
        &self,
        worker_id: &str,
        lease: Duration,
        planned: &PlannedAssignment,
    ) -> Result<Option<(ClaimedJob, bool)>> {
        let worker_id = worker_id.to_owned();
        let options = self.options.clone();
        let planned = planned.clone();
        self.run("claiming and journaling a job", move |conn| {
            let claimed = claim_and_journal(conn, &worker_id, lease, &options, &planned)?;
            Ok(claimed.map(|job| (job, true)))
        })
        .await
    }

    async fn heartbeat(
        &self,
        job_id: &str,
        worker_id: &str,
        update: &ProgressUpdate,
        lease: Duration,
    ) -> Result<()> {
        let (job_id, worker_id, update) = (job_id.to_owned(), worker_id.to_owned(), update.clone());
        self.run("recording a heartbeat", move |conn| {
            let tx = conn;
            check_owned(tx, &job_id, &worker_id)?;
            let now = now_ms();
            // COALESCE keeps the fields the update leaves out.
            exec(
                tx,
                "UPDATE jobs SET lease_until = ?2,
                     status = COALESCE(?3, status),
                     progress = COALESCE(?4, progress),
                     current_step = COALESCE(?5, current_step),
                     updated_at = ?6
                 WHERE id = ?1",
                params![
                    job_id,
                    now + duration_ms(lease),
                    update.status.map(|status| status.as_str()),
                    update.progress,
                    update.current_step,
                    now,
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn complete(&self, job_id: &str, worker_id: &str, result: &JobResult) -> Result<()> {
        check_result_size(job_id, result)?;
        let (job_id, worker_id, result) = (job_id.to_owned(), worker_id.to_owned(), result.clone());
        self.run("completing a job", move |conn| {
            let tx = conn;
            let state = load_state(tx, &job_id)?;
            // A repeated call after a lost reply: store the documents again (they replace the
            // set, like `docs:upsertFromJob`) and report success.
            let repeated = state.as_ref().is_some_and(|state| {
                state.status == JobStatus::Completed
                    && state.completed_by.as_deref() == Some(worker_id.as_str())
            });
            if !repeated {
                check_owned(tx, &job_id, &worker_id)?;
            }
            let now = now_ms();
            exec(tx, "DELETE FROM documents WHERE job_id = ?1", [&job_id])?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO documents
                         (job_id, position, slug, title, kind, chapter_index, content, size_bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?;
                for (position, doc) in result.documents.iter().enumerate() {
                    insert.execute(params![
                        job_id,
                        position,
                        doc.slug,
                        doc.title,
                        doc.kind.as_str(),
                        doc.chapter_index,
                        doc.content,
                        doc.content.len(),
                    ])?;
                }
            }
            exec(
                tx,
                "UPDATE jobs SET status = 'completed', locked_by = NULL, lease_until = NULL,
                     completed_by = ?2, run_id = ?3, result_message = ?4, docs_count = ?5,
                     updated_at = ?6
                 WHERE id = ?1",
                params![
                    job_id,
                    worker_id,
                    result.run_id,
                    result.message,
                    result.documents.len(),
                    now,
                ],
            )?;
            Ok(())
        })
        .await
    }

    async fn fail(
        &self,
        job_id: &str,
        worker_id: &str,
        error: &str,
        retryable: bool,
    ) -> Result<FailOutcome> {
        let (job_id, worker_id) = (job_id.to_owned(), worker_id.to_owned());
        let error = limits::cap_error_text(error).into_owned();
        let options = self.options.clone();
        self.run("failing a job", move |conn| {
            let tx = conn;
            let state = check_owned(tx, &job_id, &worker_id)?;
            let now = now_ms();
            let outcome = if retryable {
                retry_or_die(tx, &job_id, state.attempts, &error, now, &options)?
            } else {
                end_for_good(tx, &job_id, JobStatus::Failed, &error, now)?;
                FailOutcome::Failed
            };
            Ok(outcome)
        })
        .await
    }

    async fn release(&self, job_id: &str, worker_id: &str) -> Result<()> {
        let (job_id, worker_id) = (job_id.to_owned(), worker_id.to_owned());
        self.run("releasing a job", move |conn| {
            let tx = conn;
            let state = check_owned(tx, &job_id, &worker_id)?;
            let now = now_ms();
            tx.execute(
                "UPDATE jobs SET status = 'pending', run_at = ?2, locked_by = NULL,
                     lease_until = NULL, attempts = ?3, updated_at = ?2
                 WHERE id = ?1",
                params![job_id, now, state.attempts.saturating_sub(1)],
            )?;
            Ok(())
        })
        .await
    }

    async fn get_job(&self, job_id: &str, include_content: bool) -> Result<Option<JobView>> {
        let job_id = job_id.to_owned();
        self.run("reading a job", move |conn| {
            let tx = conn;
            let raw = query_row(
                tx,
                &format!("SELECT {VIEW_COLUMNS} FROM jobs WHERE id = ?1"),
                [&job_id],
                RawView::from_row,
            )
            .optional()?;
            raw.map(|raw| raw.into_view(tx, include_content))
                .transpose()
        })
        .await
    }

    async fn submit(&self, job: NewJob) -> Result<JobId> {
        check_new_job(&job)?;
        let id = new_id();
        let job_id = id.clone();
        self.run("submitting a job", move |conn| {
            insert_job(conn, &job_id, &job)
        })
        .await?;
        Ok(id)
    }

    /// The insert, the claim and the journal entry in one request, so one commit: a crash
    /// leaves all three or none.
    async fn submit_and_claim(
        &self,
        job: NewJob,
        worker_id: &str,
        lease: Duration,
        planned: &PlannedAssignment,
    ) -> Result<(JobId, Option<ClaimedJob>)> {
        check_new_job(&job)?;
        let id = new_id();
        let job_id = id.clone();
        let worker_id = worker_id.to_owned();
        let options = self.options.clone();
        let planned = planned.clone();
        let claimed = self
            .run("submitting and claiming a job", move |conn| {
                insert_job(conn, &job_id, &job)?;
                claim_and_journal(conn, &worker_id, lease, &options, &planned)
            })
            .await?;
        Ok((id, claimed))
    }

    async fn list_jobs(&self, query: &JobQuery) -> Result<Vec<JobView>> {
        let query = query.clone();
        self.run("listing jobs", move |conn| {
            let tx = conn;
            let raws = {
                // The agent of a job is its attempt history's ([`crate::history`]), which the
                // coordinator keeps beside the jobs in this file.
                let last_agent = crate::history::LAST_AGENT_SQL;
                let order = match query.order {
                    JobOrder::NewestFirst => "created_at DESC, rowid DESC".to_owned(),
                    JobOrder::OldestFirst => "created_at, rowid".to_owned(),
                    JobOrder::RecentlyUpdated => "updated_at DESC, rowid DESC".to_owned(),
                    JobOrder::Status => "status, created_at DESC, rowid DESC".to_owned(),
                    JobOrder::Agent => {
                        format!("{last_agent} IS NULL, {last_agent}, created_at DESC, rowid DESC")
                    }
                };
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT {VIEW_COLUMNS} FROM jobs
                     WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR {last_agent} = ?2)
                     ORDER BY {order}
                     LIMIT ?3 OFFSET ?4"
                ))?;
                let limit = i64::try_from(query.limit).unwrap_or(i64::MAX);
                let offset = i64::try_from(query.offset).unwrap_or(i64::MAX);
                let rows = stmt
                    .query_map(
                        params![
                            query.status.map(JobStatus::as_str),
                            query.agent_id,
                            limit,
                            offset
                        ],
                        RawView::from_row,
                    )?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                rows
            };
            raws.into_iter()
                .map(|raw| raw.into_view(tx, false))
                .collect()
        })
        .await
    }

    async fn count_by_status(&self) -> Result<Option<Vec<(JobStatus, u64)>>> {
        self.run("counting jobs by status", |conn| {
            let mut stmt =
                conn.prepare_cached("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
            let rows = stmt
                .query_map([], |row| {
                    Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let counts = rows
                .into_iter()
                .map(|(status, count)| Ok((parse_status(&status)?, count.max(0) as u64)))
                .collect::<OpResult<Vec<_>>>()?;
            Ok(Some(counts))
        })
        .await
    }

    async fn pending_count(&self) -> Result<Option<u64>> {
        self.run("counting pending jobs", |conn| {
            // The status leads the `jobs_by_due` index: a range of it, not a table scan.
            let count: i64 = query_row(
                conn,
                "SELECT COUNT(*) FROM jobs WHERE status = 'pending'",
                [],
                |row| row.get(0),
            )?;
            Ok(Some(count.max(0) as u64))
        })
        .await
    }

    async fn request_cancel(&self, job_id: &str) -> Result<JobStatus> {
        let job_id = job_id.to_owned();
        self.run("canceling a job", move |conn| {
            let tx = conn;
            let Some(state) = load_state(tx, &job_id)? else {
                return Err(JobSourceError::NotFound(job_id).into());
            };
            let now = now_ms();
            let after = match state.status {
                JobStatus::Pending => {
                    exec(
                        tx,
                        "UPDATE jobs SET status = 'canceled', cancel_requested = 1,
                             locked_by = NULL, lease_until = NULL, updated_at = ?2
                         WHERE id = ?1",
                        params![job_id, now],
                    )?;
                    JobStatus::Canceled
                }
                // Like Convex: the lease holder stays, so its coordinator sees the cancel and
                // stops the agent.
                status if !status.is_terminal() => {
                    exec(
                        tx,
                        "UPDATE jobs SET status = 'canceled', cancel_requested = 1,
                             updated_at = ?2
                         WHERE id = ?1",
                        params![job_id, now],
                    )?;
                    JobStatus::Canceled
                }
                terminal => terminal,
            };
            Ok(after)
        })
        .await
    }
}

/// The store's schema, created (or checked) by [`Database::open`] with the rest of the file.
pub(crate) fn create_tables(conn: &mut Connection) -> std::result::Result<(), DatabaseError> {
    // IMMEDIATE so that two processes opening a new file do not race on the schema.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(DatabaseError::Unusable(format!(
            "schema version {version} of the job store is newer than this build's \
             {SCHEMA_VERSION}"
        )));
    }
    tx.execute_batch(SCHEMA)?;
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()?;
    Ok(())
}

/// One statement through the connection's statement cache.
fn exec<P: rusqlite::Params>(conn: &Connection, sql: &str, params: P) -> rusqlite::Result<usize> {
    conn.prepare_cached(sql)?.execute(params)
}

/// One row through the connection's statement cache.
fn query_row<T, P: rusqlite::Params>(
    conn: &Connection,
    sql: &str,
    params: P,
    map: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached(sql)?.query_row(params, map)
}

/// Leases the oldest due pending job to `worker_id`, after taking back expired leases.
/// What a submitted job must hold before it is stored.
fn check_new_job(job: &NewJob) -> Result<()> {
    if job.repo_url.is_empty() {
        return Err(JobSourceError::Invalid("repo_url is empty".to_owned()));
    }
    fondation_proto::validate::check_prompt(&job.prompt)
        .map_err(|error| JobSourceError::Invalid(error.to_string()))
}

/// Stores a submitted job as pending and due now. An empty branch stays empty: the agent clones
/// the repository's default branch.
fn insert_job(conn: &Connection, id: &str, job: &NewJob) -> OpResult<()> {
    let now = now_ms();
    exec(
        conn,
        "INSERT INTO jobs (id, status, repo_url, branch, prompt, attempts, run_at,
             created_at, updated_at)
         VALUES (?1, 'pending', ?2, ?3, ?4, 0, ?5, ?5, ?5)",
        params![id, job.repo_url, job.branch, job.prompt, now],
    )?;
    Ok(())
}

/// Claims the oldest due job and journals `planned` for it, in the caller's transaction.
fn claim_and_journal(
    tx: &Connection,
    worker_id: &str,
    lease: Duration,
    options: &EmbeddedOptions,
    planned: &PlannedAssignment,
) -> OpResult<Option<ClaimedJob>> {
    let Some(job) = claim_next(tx, worker_id, lease, options)? else {
        return Ok(None);
    };
    journal::insert_assignment(tx, &planned.record(&job))?;
    Ok(Some(job))
}

fn claim_next(
    tx: &Connection,
    worker_id: &str,
    lease: Duration,
    options: &EmbeddedOptions,
) -> OpResult<Option<ClaimedJob>> {
    let now = now_ms();
    reclaim_expired(tx, now, options)?;

    let next = query_row(
        tx,
        "SELECT id, prompt, repo_url, branch, attempts FROM jobs
             WHERE status = 'pending' AND run_at <= ?1
             ORDER BY run_at, created_at, rowid
             LIMIT 1",
        [now],
        |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, String>(3)?,
                row.get::<_, u32>(4)?,
            ))
        },
    )
    .optional()?;
    let Some((id, prompt, url, branch, attempts)) = next else {
        // Keep what reclaiming did even though there is nothing to take.
        return Ok(None);
    };
    let attempt = attempts.saturating_add(1);
    // Progress of an earlier attempt would be misleading for this one.
    exec(
        tx,
        "UPDATE jobs SET status = 'claimed', locked_by = ?2, lease_until = ?3,
             attempts = ?4, progress = NULL, current_step = NULL, updated_at = ?5
         WHERE id = ?1",
        params![id, worker_id, now + duration_ms(lease), attempt, now],
    )?;
    Ok(Some(ClaimedJob {
        id,
        attempt,
        prompt,
        target: Ok(RepoTarget {
            url,
            branch,
            // The embedded store has no users; GITHUB_TOKEN may still apply.
            credential: None,
        }),
    }))
}

/// Treats every lease that ran out as a failed attempt. Convex has this as an internal mutation
/// nobody may schedule; here it runs inside each claim so a vanished holder never strands a job.
fn reclaim_expired(tx: &Connection, now: f64, options: &EmbeddedOptions) -> OpResult<()> {
    let expired = {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT id, attempts FROM jobs
             WHERE status IN {LEASED_STATUSES_SQL} AND cancel_requested = 0 AND lease_until < ?1"
        ))?;
        let rows = stmt
            .query_map([now], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, u32>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows
    };
    for (job_id, attempts) in expired {
        let outcome = retry_or_die(tx, &job_id, attempts, "lease expired", now, options)?;
        tracing::warn!(job_id = %job_id, ?outcome, "lease expired, job reclaimed");
    }
    Ok(())
}

/// Ends a job in a final failure status (`failed` or `dead`), releasing its lease.
fn end_for_good(
    tx: &Connection,
    job_id: &str,
    status: JobStatus,
    error: &str,
    now: f64,
) -> OpResult<()> {
    exec(
        tx,
        "UPDATE jobs SET status = ?2, locked_by = NULL, lease_until = NULL,
             error = ?3, updated_at = ?4
         WHERE id = ?1",
        params![job_id, status.as_str(), error, now],
    )?;
    Ok(())
}

/// The `queue:retryOrFail` transition: back to pending after a backoff, or dead.
fn retry_or_die(
    tx: &Connection,
    job_id: &str,
    attempts: u32,
    error: &str,
    now: f64,
    options: &EmbeddedOptions,
) -> OpResult<FailOutcome> {
    if attempts >= options.max_attempts {
        end_for_good(tx, job_id, JobStatus::Dead, error, now)?;
        return Ok(FailOutcome::Dead { attempts });
    }
    let next_run_at_ms = now + backoff_ms(options, attempts);
    exec(
        tx,
        "UPDATE jobs SET status = 'pending', run_at = ?2, locked_by = NULL, lease_until = NULL,
             error = ?3, updated_at = ?4
         WHERE id = ?1",
        params![job_id, next_run_at_ms, error, now],
    )?;
    Ok(FailOutcome::Retrying {
        attempts,
        next_run_at_ms,
    })
}

/// `base * 2^(attempts-1)`, at most `max`, plus jitter in `[0, jitter)`.
fn backoff_ms(options: &EmbeddedOptions, attempts: u32) -> f64 {
    let exponent = attempts.saturating_sub(1).min(62) as i32;
    let delay = (duration_ms(options.backoff_base) * 2f64.powi(exponent))
        .min(duration_ms(options.backoff_max));
    let jitter = duration_ms(options.backoff_jitter);
    if jitter > 0.0 {
        delay + rand::rng().random_range(0.0..jitter)
    } else {
        delay
    }
}

/// The columns of a job that decide whether a worker may write to it.
struct LeaseState {
    status: JobStatus,
    locked_by: Option<String>,
    cancel_requested: bool,
    attempts: u32,
    completed_by: Option<String>,
}

fn load_state(tx: &Connection, job_id: &str) -> OpResult<Option<LeaseState>> {
    let row = query_row(
        tx,
        "SELECT status, locked_by, cancel_requested, attempts, completed_by
             FROM jobs WHERE id = ?1",
        [job_id],
        |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, Option<String>>(1)?,
                row.get::<_, bool>(2)?,
                row.get::<_, u32>(3)?,
                row.get::<_, Option<String>>(4)?,
            ))
        },
    )
    .optional()?;
    row.map(
        |(status, locked_by, cancel_requested, attempts, completed_by)| {
            Ok(LeaseState {
                status: parse_status(&status)?,
                locked_by,
                cancel_requested,
                attempts,
                completed_by,
            })
        },
    )
    .transpose()
}

/// The job exists, is leased to `worker_id`, and is not canceled; the checks every write of a
/// lease holder starts with. A canceled job keeps its `lockedBy`, so the holder hears `Canceled`.
fn check_owned(tx: &Connection, job_id: &str, worker_id: &str) -> OpResult<LeaseState> {
    let not_owned = || {
        OpError::Job(JobSourceError::NotOwned {
            job_id: job_id.to_owned(),
            worker_id: worker_id.to_owned(),
        })
    };
    let state = load_state(tx, job_id)?.ok_or_else(not_owned)?;
    if state.locked_by.as_deref() != Some(worker_id) {
        return Err(not_owned());
    }
    if state.status == JobStatus::Canceled || state.cancel_requested {
        return Err(JobSourceError::Canceled(job_id.to_owned()).into());
    }
    if !is_leased(state.status) {
        return Err(not_owned());
    }
    Ok(state)
}

fn is_leased(status: JobStatus) -> bool {
    matches!(
        status,
        JobStatus::Claimed
            | JobStatus::Running
            | JobStatus::Cloning
            | JobStatus::Analyzing
            | JobStatus::Gathering
    )
}

const VIEW_COLUMNS: &str = "id, status, attempts, error, progress, current_step, repo_url, branch,
    cancel_requested, locked_by, created_at, updated_at";

/// A `jobs` row as read, before its status is parsed and its documents attached.
struct RawView {
    id: String,
    status: String,
    attempts: u32,
    error: Option<String>,
    progress: Option<String>,
    current_step: Option<u32>,
    repo_url: String,
    branch: String,
    cancel_requested: bool,
    locked_by: Option<String>,
    created_at_ms: f64,
    updated_at_ms: f64,
}

impl RawView {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(RawView {
            id: row.get(0)?,
            status: row.get(1)?,
            attempts: row.get(2)?,
            error: row.get(3)?,
            progress: row.get(4)?,
            current_step: row.get(5)?,
            repo_url: row.get(6)?,
            branch: row.get(7)?,
            cancel_requested: row.get(8)?,
            locked_by: row.get(9)?,
            created_at_ms: row.get(10)?,
            updated_at_ms: row.get(11)?,
        })
    }

    fn into_view(self, tx: &Connection, include_content: bool) -> OpResult<JobView> {
        let documents = load_documents(tx, &self.id, include_content)?;
        Ok(JobView {
            status: parse_status(&self.status)?,
            id: self.id,
            attempts: self.attempts,
            error: self.error,
            progress: self.progress,
            current_step: self.current_step,
            repo_url: Some(self.repo_url),
            branch: Some(self.branch),
            cancel_requested: self.cancel_requested,
            locked_by: self.locked_by,
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            documents,
        })
    }
}

fn load_documents(
    tx: &Connection,
    job_id: &str,
    include_content: bool,
) -> OpResult<Vec<StoredDocument>> {
    // Without content, select an empty string so large contents are never read.
    let content = if include_content { "content" } else { "''" };
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT slug, title, kind, chapter_index, {content}, size_bytes FROM documents
         WHERE job_id = ?1 ORDER BY position"
    ))?;
    let rows = stmt
        .query_map([job_id], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, Option<u32>>(3)?,
                row.get::<_, String>(4)?,
                row.get::<_, u64>(5)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(slug, title, kind, chapter_index, content, size_bytes)| {
            let kind = kind
                .parse::<DocumentKind>()
                .map_err(|err| OpError::Unusable(format!("stored document: {err}")))?;
            Ok(StoredDocument {
                document: Document {
                    slug,
                    title,
                    kind,
                    chapter_index,
                    content,
                },
                size_bytes,
            })
        })
        .collect()
}

fn parse_status(status: &str) -> OpResult<JobStatus> {
    status
        .parse()
        .map_err(|err: JobSourceError| OpError::Unusable(format!("stored job: {err}")))
}

/// Refuses what the Convex source refuses, by the same shared check and limits.
fn check_result_size(job_id: &str, result: &JobResult) -> Result<()> {
    limits::check_result(
        result
            .documents
            .iter()
            .map(|doc| (doc.slug.as_str(), doc.title.as_str(), doc.content.as_str())),
    )
    .map_err(|error| JobSourceError::TooLarge(format!("job {job_id}: {error}")))
}

/// A random id shaped like a Convex id.
fn new_id() -> String {
    let mut rng = rand::rng();
    (0..ID_LENGTH)
        .map(|_| char::from(ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())]))
        .collect()
}

/// A duration in (fractional) milliseconds, the unit of the store's timestamps and leases.
fn duration_ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests;
