//! Attempt history: every attempt of a job this coordinator saw, for `Admin/GetJob`: the agent
//! that ran it, when it was claimed, started (the agent accepted it) and each phase began, and how
//! and when it ended.
//!
//! Rows live in the coordinator's database (table `attempt_history`), whichever job source runs:
//! beside the jobs on the embedded store, and on Convex in `DATA_DIR` too, since the deployment's
//! schema has no place for them. They ride on writes the coordinator makes anyway, so history
//! costs no commit of its own:
//! - an attempt's row starts in the transaction that journals its assignment ([`record_claim`],
//!   called by [`crate::journal`]); on the embedded store that is the claim's own transaction;
//! - while it runs, its start and phase times, and then how it ended, are kept in memory by its
//!   keeper's [`Recorder`], where `GetJob` reads them;
//! - its end (outcome, error, and those times) is written in the transaction that drops its
//!   journal entry ([`Recorder::finish`]), once the job source has the run's end. A coordinator
//!   that stops mid-attempt therefore loses that attempt's start and phase times, not the attempt:
//!   the journal brings its keeper back, which ends the row.
//!
//! History never stands in the way of the work: a history statement that fails is logged and
//! skipped, never the journal write it rides on. On Convex the table keeps at most
//! [`limits::MAX_KEPT_ATTEMPTS`] attempts, the oldest going first; on the embedded store a job's
//! history stays as long as the job.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use fondation_proto::{limits, model::Phase};
use rusqlite::{params, Connection, Row};
use tracing::warn;

use crate::{
    assignments::AssignmentRecord,
    database::{Database, DatabaseError},
    job_source::now_ms,
    journal,
};

/// How an attempt ended (or that it has not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Running,
    Completed,
    /// Failed for good: the job is failed or dead.
    Failed,
    /// Failed; the job runs again.
    Retried,
    Canceled,
    /// Handed back without counting an attempt, after a failure of its agent.
    Released,
    /// Its agent vanished or came back without it, or another claim took the job over.
    Lost,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Running,
        Outcome::Completed,
        Outcome::Failed,
        Outcome::Retried,
        Outcome::Canceled,
        Outcome::Released,
        Outcome::Lost,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Running => "running",
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Retried => "retried",
            Outcome::Canceled => "canceled",
            Outcome::Released => "released",
            Outcome::Lost => "lost",
        }
    }

    fn parse(text: &str) -> Option<Outcome> {
        Outcome::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == text)
    }
}

/// The parts of an attempt whose start is recorded: the agent's phases, then the coordinator
/// writing the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Cloning,
    Analyzing,
    Gathering,
    Uploading,
}

impl Stage {
    const ALL: [Stage; 4] = [
        Stage::Cloning,
        Stage::Analyzing,
        Stage::Gathering,
        Stage::Uploading,
    ];

    /// Its place in [`Stage::ALL`] (and in the table's columns).
    fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Cloning => "cloning",
            Stage::Analyzing => "analyzing",
            Stage::Gathering => "gathering",
            Stage::Uploading => "uploading",
        }
    }
}

impl From<Phase> for Stage {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Cloning => Stage::Cloning,
            Phase::Analyzing => Stage::Analyzing,
            Phase::Gathering => Stage::Gathering,
        }
    }
}

/// One attempt as `GetJob` shows it; times in ms since the Unix epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    pub number: u32,
    pub agent_id: String,
    pub claimed_at_ms: Option<f64>,
    pub started_at_ms: Option<f64>,
    /// In the order they began.
    pub phases: Vec<(Stage, f64)>,
    pub ended_at_ms: Option<f64>,
    pub outcome: Outcome,
    pub error: Option<String>,
    /// The assignment's fencing epoch: with the job id, what identifies the attempt.
    epoch: u64,
}

/// The schema, created by [`Database::open`] with the rest of the file. `UNIQUE (job_id, epoch)`:
/// an assignment moved to another agent before it was sent keeps its epoch, and so its row.
pub(crate) fn create_tables(conn: &mut Connection) -> Result<(), DatabaseError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS attempt_history (
            seq          INTEGER PRIMARY KEY AUTOINCREMENT,
            job_id       TEXT NOT NULL,
            epoch        INTEGER NOT NULL,
            number       INTEGER NOT NULL,
            agent_id     TEXT NOT NULL,
            -- ms since the Unix epoch
            claimed_at   REAL,
            started_at   REAL,
            cloning_at   REAL,
            analyzing_at REAL,
            gathering_at REAL,
            uploading_at REAL,
            ended_at     REAL,
            outcome      TEXT NOT NULL,
            error        TEXT,
            UNIQUE (job_id, epoch)
        );
        CREATE INDEX IF NOT EXISTS attempt_history_by_job ON attempt_history (job_id, seq);",
    )?;
    Ok(())
}

/// The agent of a job's current or last attempt, as an SQL expression over `jobs.id`: for the
/// embedded store's listing by agent.
pub(crate) const LAST_AGENT_SQL: &str = "(SELECT agent_id FROM attempt_history \
     WHERE attempt_history.job_id = jobs.id ORDER BY seq DESC LIMIT 1)";

/// Starts an assignment's row, in the transaction that journals the assignment. A row that exists
/// (the assignment moved to another agent before it was sent) takes the new agent.
pub(crate) fn record_claim(conn: &Connection, record: &AssignmentRecord) {
    let written = conn
        .prepare_cached(
            "INSERT INTO attempt_history (job_id, epoch, number, agent_id, claimed_at, outcome)
             VALUES (?1, ?2, ?3, ?4, ?5, 'running')
             ON CONFLICT (job_id, epoch) DO UPDATE SET agent_id = excluded.agent_id",
        )
        .and_then(|mut insert| {
            insert.execute(params![
                record.job_id,
                record.epoch as i64,
                record.attempt,
                record.agent_id,
                now_ms(),
            ])
        });
    if let Err(error) = written {
        warn!(job_id = %record.job_id, %error, "could not record the attempt's claim in its history");
    }
}

/// An attempt's end as written: what the keeper knew, merged into its row.
struct Ended {
    job_id: String,
    epoch: u64,
    number: u32,
    agent_id: String,
    started_at_ms: Option<f64>,
    /// By [`Stage`], in `Stage::ALL` order.
    stages: [Option<f64>; 4],
    ended_at_ms: f64,
    outcome: Outcome,
    error: Option<String>,
}

/// Writes an attempt's end and drops its journal entry, in one request (one transaction): the
/// journal entry goes, whatever becomes of the history.
async fn write_end(
    history: &History,
    assignment_id: String,
    ended: Ended,
) -> Result<(), DatabaseError> {
    let cap = history.inner.cap;
    history
        .inner
        .db
        .run(move |conn| {
            journal::delete_assignment(conn, &assignment_id)?;
            if let Err(error) = upsert_end(conn, &ended) {
                warn!(job_id = %ended.job_id, %error, "could not record the attempt's end in its history");
            }
            if let Some(cap) = cap {
                if let Err(error) = prune(conn, cap) {
                    warn!(%error, "could not drop the oldest attempts from the history");
                }
            }
            Ok(())
        })
        .await
}

fn upsert_end(conn: &Connection, ended: &Ended) -> rusqlite::Result<()> {
    let [cloning, analyzing, gathering, uploading] = ended.stages;
    conn.prepare_cached(
        "INSERT INTO attempt_history (job_id, epoch, number, agent_id, started_at, cloning_at,
             analyzing_at, gathering_at, uploading_at, ended_at, outcome, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
         ON CONFLICT (job_id, epoch) DO UPDATE SET
             agent_id = excluded.agent_id,
             started_at = COALESCE(excluded.started_at, started_at),
             cloning_at = COALESCE(excluded.cloning_at, cloning_at),
             analyzing_at = COALESCE(excluded.analyzing_at, analyzing_at),
             gathering_at = COALESCE(excluded.gathering_at, gathering_at),
             uploading_at = COALESCE(excluded.uploading_at, uploading_at),
             ended_at = excluded.ended_at,
             outcome = excluded.outcome,
             error = excluded.error",
    )?
    .execute(params![
        ended.job_id,
        ended.epoch as i64,
        ended.number,
        ended.agent_id,
        ended.started_at_ms,
        cloning,
        analyzing,
        gathering,
        uploading,
        ended.ended_at_ms,
        ended.outcome.as_str(),
        ended.error,
    ])?;
    Ok(())
}

/// Drops the oldest rows beyond `cap`.
fn prune(conn: &Connection, cap: usize) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "DELETE FROM attempt_history WHERE seq IN (
             SELECT seq FROM attempt_history ORDER BY seq
             LIMIT MAX(0, (SELECT COUNT(*) FROM attempt_history) - ?1))",
    )?
    .execute([i64::try_from(cap).unwrap_or(i64::MAX)])?;
    Ok(())
}

fn read_attempts(conn: &Connection, job_id: &str) -> Result<Vec<Attempt>, DatabaseError> {
    let mut select = conn.prepare_cached(
        "SELECT epoch, number, agent_id, claimed_at, started_at, cloning_at, analyzing_at,
             gathering_at, uploading_at, ended_at, outcome, error
         FROM attempt_history WHERE job_id = ?1 ORDER BY seq",
    )?;
    let rows = select
        .query_map([job_id], |row| {
            Ok((row_attempt(row)?, row.get::<_, String>(10)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(|(mut attempt, outcome)| {
            attempt.outcome = Outcome::parse(&outcome).ok_or_else(|| {
                DatabaseError::Unusable(format!("attempt history: unknown outcome {outcome:?}"))
            })?;
            Ok(attempt)
        })
        .collect()
}

/// A row, with its outcome still to be parsed (left as running).
fn row_attempt(row: &Row<'_>) -> rusqlite::Result<Attempt> {
    let mut stages = Vec::new();
    for (index, stage) in Stage::ALL.into_iter().enumerate() {
        if let Some(at) = row.get::<_, Option<f64>>(5 + index)? {
            stages.push((stage, at));
        }
    }
    Ok(Attempt {
        epoch: row.get::<_, i64>(0)? as u64,
        number: row.get(1)?,
        agent_id: row.get(2)?,
        claimed_at_ms: row.get(3)?,
        started_at_ms: row.get(4)?,
        phases: in_order(stages),
        ended_at_ms: row.get(9)?,
        outcome: Outcome::Running,
        error: row.get(11)?,
    })
}

/// Phases sorted by when they began (a stable sort keeps the stage order on equal times).
fn in_order(mut phases: Vec<(Stage, f64)>) -> Vec<(Stage, f64)> {
    phases.sort_by(|a, b| a.1.total_cmp(&b.1));
    phases
}

/// What the keeper of a running attempt knows that is not written yet.
#[derive(Debug, Clone)]
struct Live {
    job_id: String,
    epoch: u64,
    number: u32,
    agent_id: String,
    started_at_ms: Option<f64>,
    /// By [`Stage`], in `Stage::ALL` order.
    stages: [Option<f64>; 4],
    /// Decided once; the first decision stands (an agent lost, then the job retried, is lost).
    end: Option<Decided>,
}

/// How and when an attempt ended, as its keeper decided it.
#[derive(Debug, Clone)]
struct Decided {
    outcome: Outcome,
    error: Option<String>,
    at_ms: f64,
}

impl Live {
    /// Adds what the keeper knows to the attempt's row (or makes one, when there is none).
    fn merge_into(&self, attempts: &mut Vec<Attempt>) {
        let index = match attempts.iter().position(|a| a.epoch == self.epoch) {
            Some(index) => index,
            None => {
                attempts.push(Attempt {
                    number: self.number,
                    agent_id: self.agent_id.clone(),
                    claimed_at_ms: None,
                    started_at_ms: None,
                    phases: Vec::new(),
                    ended_at_ms: None,
                    outcome: Outcome::Running,
                    error: None,
                    epoch: self.epoch,
                });
                attempts.len() - 1
            }
        };
        let attempt = &mut attempts[index];
        attempt.started_at_ms = attempt.started_at_ms.or(self.started_at_ms);
        for (stage, at) in Stage::ALL.into_iter().zip(self.stages) {
            if let Some(at) = at {
                if !attempt.phases.iter().any(|(known, _)| *known == stage) {
                    attempt.phases.push((stage, at));
                }
            }
        }
        attempt.phases = in_order(std::mem::take(&mut attempt.phases));
        // Decided, not written yet: shown as it will be.
        if let Some(decided) = &self.end {
            attempt.outcome = decided.outcome;
            attempt.error = decided.error.clone();
            attempt.ended_at_ms = Some(decided.at_ms);
        }
    }
}

/// The history in the coordinator's database, and the attempts running now. Cheap to clone.
#[derive(Clone)]
pub struct History {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Attempts kept at most (Convex); `None` keeps every attempt of the jobs the store keeps.
    cap: Option<usize>,
    /// Running attempts by assignment id.
    live: Mutex<HashMap<String, Live>>,
}

impl History {
    /// `cap`: see [`limits::MAX_KEPT_ATTEMPTS`].
    pub fn new(db: Database, cap: Option<usize>) -> Self {
        History {
            inner: Arc::new(Inner {
                db,
                cap,
                live: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The history of a coordinator whose jobs live elsewhere (Convex): capped.
    pub fn capped(db: Database) -> Self {
        Self::new(db, Some(limits::MAX_KEPT_ATTEMPTS))
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Live>> {
        self.inner.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The recorder of the attempt an assignment's keeper looks after.
    pub fn recorder(&self, record: &AssignmentRecord) -> Recorder {
        self.live().insert(
            record.assignment_id.clone(),
            Live {
                job_id: record.job_id.clone(),
                epoch: record.epoch,
                number: record.attempt,
                agent_id: record.agent_id.clone(),
                started_at_ms: None,
                stages: [None; 4],
                end: None,
            },
        );
        Recorder {
            history: self.clone(),
            record: record.clone(),
        }
    }

    /// Ends the attempt of an assignment refused before it was sent (its job failed at once), and
    /// drops its journal entry if it has one.
    pub async fn refused(
        &self,
        record: &AssignmentRecord,
        error: &str,
    ) -> Result<(), DatabaseError> {
        let ended = Ended {
            job_id: record.job_id.clone(),
            epoch: record.epoch,
            number: record.attempt,
            agent_id: record.agent_id.clone(),
            started_at_ms: None,
            stages: [None; 4],
            ended_at_ms: now_ms(),
            outcome: Outcome::Failed,
            error: Some(error.to_owned()),
        };
        write_end(self, record.assignment_id.clone(), ended).await
    }

    /// Every attempt of `job_id` this coordinator saw, oldest first, with what the keepers of the
    /// running ones know.
    pub async fn of_job(&self, job_id: &str) -> Result<Vec<Attempt>, DatabaseError> {
        let mut by_job = self.of_jobs(vec![job_id.to_owned()]).await?;
        Ok(by_job.remove(job_id).unwrap_or_default())
    }

    /// [`History::of_job`] for several jobs, in one request.
    pub async fn of_jobs(
        &self,
        job_ids: Vec<String>,
    ) -> Result<HashMap<String, Vec<Attempt>>, DatabaseError> {
        let mut by_job = self
            .inner
            .db
            .run(move |conn| {
                let mut by_job = HashMap::with_capacity(job_ids.len());
                for job_id in job_ids {
                    let attempts = read_attempts(conn, &job_id)?;
                    by_job.insert(job_id, attempts);
                }
                Ok::<_, DatabaseError>(by_job)
            })
            .await?;
        for live in self.live().values() {
            if let Some(attempts) = by_job.get_mut(&live.job_id) {
                live.merge_into(attempts);
            }
        }
        Ok(by_job)
    }
}

/// What a lease keeper tells the history about its attempt. Dropped with the keeper: an attempt
/// whose keeper stops without finishing (the coordinator shuts down) is no longer shown as live.
pub struct Recorder {
    history: History,
    record: AssignmentRecord,
}

impl Recorder {
    fn update(&self, change: impl FnOnce(&mut Live)) {
        if let Some(live) = self.history.live().get_mut(&self.record.assignment_id) {
            change(live);
        }
    }

    /// The agent accepted the assignment.
    pub fn started(&self) {
        self.update(|live| {
            live.started_at_ms.get_or_insert_with(now_ms);
        });
    }

    /// A stage began; only its first start counts.
    pub fn stage(&self, stage: Stage) {
        self.update(|live| {
            live.stages[stage.index()].get_or_insert_with(now_ms);
        });
    }

    /// How the attempt ended, now; the first call decides. Shown at once, written by
    /// [`Recorder::finish`].
    pub fn ended(&self, outcome: Outcome, error: Option<&str>) {
        self.update(|live| {
            live.end.get_or_insert_with(|| Decided {
                outcome,
                error: error.map(str::to_owned),
                at_ms: now_ms(),
            });
        });
    }

    /// Writes the attempt's end (lost, when nothing was decided) and drops the assignment's
    /// journal entry, in one transaction; see the module header.
    pub async fn finish(&self) -> Result<(), DatabaseError> {
        let live = self.history.live().get(&self.record.assignment_id).cloned();
        let (started_at_ms, stages, end) = live
            .map(|live| (live.started_at_ms, live.stages, live.end))
            .unwrap_or_default();
        let Decided {
            outcome,
            error,
            at_ms,
        } = end.unwrap_or_else(|| Decided {
            outcome: Outcome::Lost,
            error: None,
            at_ms: now_ms(),
        });
        let record = &self.record;
        let ended = Ended {
            job_id: record.job_id.clone(),
            epoch: record.epoch,
            number: record.attempt,
            agent_id: record.agent_id.clone(),
            started_at_ms,
            stages,
            ended_at_ms: at_ms,
            outcome,
            error,
        };
        // Shown live until the end is written, so a reader never sees the attempt lose its times.
        let written = write_end(&self.history, record.assignment_id.clone(), ended).await;
        self.history.live().remove(&record.assignment_id);
        written
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.history.live().remove(&self.record.assignment_id);
    }
}

#[cfg(test)]
mod tests;
