//! The coordinator's journal: what it must not forget across a restart.
//!
//! Two facts per in-flight job, written durably *before* the action they protect:
//! - the assignment (job, agent, epoch), before the assignment is sent, so a restarted coordinator
//!   keeps the lease alive and re-adopts the run when its agent reconnects;
//! - the run's outcome, before the agent is told its result was taken, so a result survives a
//!   restart (or a job-source outage) until the job source has accepted it.
//!
//! It lives in the coordinator's one database file ([`crate::database`]), in tables of its own,
//! beside the embedded store's.

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};

use crate::{
    assignments::AssignmentRecord,
    database::{Database, DatabaseError},
    job_source::{ClaimedJob, JobResult},
};

#[derive(Debug, thiserror::Error)]
#[error("coordinator journal ({action}): {source}; check that DATA_DIR is writable and not full")]
pub struct JournalError {
    action: &'static str,
    source: DatabaseError,
}

pub type Result<T> = std::result::Result<T, JournalError>;

/// A run's end, kept until the job source has recorded it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RunEnd {
    Succeeded(JobResult),
    Failed { message: String, retryable: bool },
}

/// One journaled in-flight job.
#[derive(Debug, Clone)]
pub struct JournalEntry {
    pub record: AssignmentRecord,
    pub end: Option<RunEnd>,
}

/// An assignment decided before its job is claimed (its id, fencing epoch and agent), so that a
/// claim can journal it in the claim's own transaction ([`JobSource::claim_journaled`]).
///
/// [`JobSource::claim_journaled`]: crate::job_source::JobSource::claim_journaled
#[derive(Debug, Clone)]
pub struct PlannedAssignment {
    pub assignment_id: String,
    pub epoch: u64,
    pub agent_id: String,
}

impl PlannedAssignment {
    /// The journal record of this assignment for `job`.
    pub fn record(&self, job: &ClaimedJob) -> AssignmentRecord {
        AssignmentRecord {
            assignment_id: self.assignment_id.clone(),
            job_id: job.id.clone(),
            epoch: self.epoch,
            attempt: job.attempt,
            agent_id: self.agent_id.clone(),
        }
    }
}

/// The journal's table, created by [`Database::open`] with the rest of the file.
pub(crate) fn create_tables(conn: &mut Connection) -> std::result::Result<(), DatabaseError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS journal_assignments (
            assignment_id TEXT PRIMARY KEY,
            job_id        TEXT NOT NULL,
            epoch         INTEGER NOT NULL,
            attempt       INTEGER NOT NULL,
            agent_id      TEXT NOT NULL,
            -- JSON of RunEnd once the run has ended and until the job source took it
            run_end       TEXT
        );",
    )?;
    Ok(())
}

/// Writes the assignment's entry; for the dispatcher's own request and for a claim that journals
/// in the same transaction ([`crate::job_source::embedded_store`]). The attempt's history row
/// starts in the same transaction ([`crate::history`]).
pub(crate) fn insert_assignment(
    conn: &Connection,
    record: &AssignmentRecord,
) -> rusqlite::Result<()> {
    crate::history::record_claim(conn, record);
    conn.prepare_cached(
        "INSERT OR REPLACE INTO journal_assignments
         (assignment_id, job_id, epoch, attempt, agent_id, run_end)
         VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
    )?
    .execute(params![
        record.assignment_id,
        record.job_id,
        record.epoch as i64,
        record.attempt,
        record.agent_id
    ])?;
    Ok(())
}

/// Drops an assignment's entry; for [`Journal::remove`] and for the history, which ends the
/// attempt's row in the same transaction.
pub(crate) fn delete_assignment(conn: &Connection, assignment_id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM journal_assignments WHERE assignment_id = ?1")?
        .execute(params![assignment_id])?;
    Ok(())
}

/// The journal's tables in the coordinator's [`Database`]; cheap to clone.
#[derive(Clone, Debug)]
pub struct Journal {
    db: Database,
}

impl Journal {
    pub fn new(db: Database) -> Self {
        Self { db }
    }

    /// The database the journal shares with the embedded store (its commit counter, for the
    /// metrics).
    pub fn database(&self) -> &Database {
        &self.db
    }

    async fn with<T: Send + 'static>(
        &self,
        action: &'static str,
        work: impl FnOnce(&Connection) -> std::result::Result<T, DatabaseError> + Send + 'static,
    ) -> Result<T> {
        self.db
            .run(work)
            .await
            .map_err(|source| JournalError { action, source })
    }

    /// Records an assignment before it is sent.
    pub async fn record_assignment(&self, record: &AssignmentRecord) -> Result<()> {
        let record = record.clone();
        self.with("recording an assignment", move |conn| {
            Ok(insert_assignment(conn, &record)?)
        })
        .await
    }

    /// Records how a run ended, before the agent is told its result was taken.
    pub async fn record_end(&self, assignment_id: &str, end: &RunEnd) -> Result<()> {
        let json = serde_json::to_string(end).map_err(|e| JournalError {
            action: "encoding a run's end",
            source: DatabaseError::Unusable(e.to_string()),
        })?;
        let assignment_id = assignment_id.to_string();
        self.with("recording a run's end", move |conn| {
            conn.prepare_cached(
                "UPDATE journal_assignments SET run_end = ?2 WHERE assignment_id = ?1",
            )?
            .execute(params![assignment_id, json])?;
            Ok(())
        })
        .await
    }

    /// Forgets an assignment once the job source has its end (or it is no longer ours).
    pub async fn remove(&self, assignment_id: &str) -> Result<()> {
        let assignment_id = assignment_id.to_string();
        self.with("removing an assignment", move |conn| {
            Ok(delete_assignment(conn, &assignment_id)?)
        })
        .await
    }

    /// Everything journaled, for recovery at start-up. An entry whose end cannot be decoded is
    /// returned without it (the job is then retried rather than forgotten).
    pub async fn load(&self) -> Result<Vec<JournalEntry>> {
        let rows = self
            .with("loading", |conn| {
                let mut statement = conn.prepare_cached(
                    "SELECT assignment_id, job_id, epoch, attempt, agent_id, run_end
                     FROM journal_assignments ORDER BY epoch",
                )?;
                let rows = statement
                    .query_map([], |row| {
                        Ok((
                            AssignmentRecord {
                                assignment_id: row.get(0)?,
                                job_id: row.get(1)?,
                                epoch: row.get::<_, i64>(2)? as u64,
                                attempt: row.get(3)?,
                                agent_id: row.get(4)?,
                            },
                            row.get::<_, Option<String>>(5)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                Ok(rows)
            })
            .await?;
        Ok(rows
            .into_iter()
            .map(|(record, end)| {
                let end = end.and_then(|json| match serde_json::from_str(&json) {
                    Ok(end) => Some(end),
                    Err(error) => {
                        tracing::warn!(job_id = %record.job_id, %error, "journaled run end unreadable; the job will be retried");
                        None
                    }
                });
                JournalEntry { record, end }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job_source::{Document, DocumentKind};

    fn record(id: &str, epoch: u64) -> AssignmentRecord {
        AssignmentRecord {
            assignment_id: id.into(),
            job_id: format!("job-{id}"),
            epoch,
            attempt: 1,
            agent_id: "agent-1".into(),
        }
    }

    #[tokio::test]
    async fn survives_reopening_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(Database::open(dir.path()).unwrap());
        journal.record_assignment(&record("a", 2)).await.unwrap();
        journal.record_assignment(&record("b", 1)).await.unwrap();
        let result = JobResult {
            run_id: "a".into(),
            message: "done".into(),
            documents: vec![Document {
                slug: "chapters/x.md".into(),
                title: "X".into(),
                kind: DocumentKind::Chapter,
                chapter_index: Some(0),
                content: "# X\n".into(),
            }],
        };
        journal
            .record_end("a", &RunEnd::Succeeded(result))
            .await
            .unwrap();
        drop(journal);

        let journal = Journal::new(Database::open(dir.path()).unwrap());
        let entries = journal.load().await.unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].record.assignment_id, "b", "ordered by epoch");
        assert!(entries[0].end.is_none());
        match &entries[1].end {
            Some(RunEnd::Succeeded(result)) => assert_eq!(result.documents[0].content, "# X\n"),
            other => panic!("unexpected {other:?}"),
        }
        journal.remove("a").await.unwrap();
        let left = journal.load().await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].record.assignment_id, "b");
    }
}
