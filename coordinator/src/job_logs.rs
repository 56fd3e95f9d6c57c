//! Job logs: the analyzer's output lines of each job, for `GetJobLogs`.
//!
//! While a job runs, the lines its agent sends are kept here in memory, bounded per job
//! ([`limits::JOB_LOG_LINES`], [`limits::JOB_LOG_BYTES`]), and fed to the callers following the
//! job. The agent sends lines only while somebody follows the run: the first follower makes the
//! coordinator send it `FollowOutput(true)`, the last one leaving `FollowOutput(false)` (and a
//! re-attached agent hears `true` again while followers remain); once before the run's end the
//! agent sends the lines the coordinator has not received, so every run's last lines arrive.
//!
//! When a run ends its lines are stored in the coordinator's database in `DATA_DIR` (table
//! `job_logs`, whichever job source runs), after those of the job's earlier attempts and
//! bounded like the live ones; all stored lines together are bounded too
//! ([`limits::JOB_LOGS_TOTAL_BYTES`], [`limits::JOB_LOGS_MAX_JOBS`]): the jobs that ended first
//! lose theirs first. That is one write per run end, riding the database's batched commits,
//! never one per line. The embedded store never deletes a job, so these bounds are what drops
//! a job's lines.
//!
//! Lines come from an agent: the gateway checked the assignment's fencing and the model the
//! message's size and `seq` order. Here lines not after the last one kept are dropped (a tail
//! sent again after a reconnect), and control characters and URL credentials are taken out
//! again, since a misbehaving agent's text ends up on an operator's terminal.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, MutexGuard},
};

use fondation_proto::{
    limits,
    model::{FollowOutput, OutputLine, OutputStream, ToAgent},
    validate::redact_credentials,
};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::{
    assignments::AssignmentRecord,
    context::Context,
    database::{Database, DatabaseError},
    job_source::now_ms,
};

/// Lines a follower may fall behind before it misses some (it sees a gap in `seq`): a follower
/// reading slower than the analyzer prints must not make the coordinator hold a flood.
const FOLLOW_BUFFER_LINES: usize = 1024;

/// One kept line of a job's output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    /// The attempt whose run printed it, from 1.
    pub attempt: u32,
    /// Position in that run's output, from 0; a gap means lines were dropped.
    pub seq: u64,
    pub stream: LogStream,
    pub text: String,
    /// When the coordinator received it, in milliseconds since the Unix epoch.
    pub received_ms: f64,
}

/// Which stream of the analyzer a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    /// The name the Admin API shows.
    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => OutputStream::Stdout.as_str(),
            LogStream::Stderr => OutputStream::Stderr.as_str(),
        }
    }
}

/// Why stored lines could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JobLogsError {
    #[error(transparent)]
    Database(#[from] DatabaseError),
    #[error("job logs table: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("encoding job log lines: {0}")]
    Json(#[from] serde_json::Error),
}

/// How much is kept; [`Default`] is the limits of [`limits`].
#[derive(Debug, Clone, Copy)]
pub struct LogLimits {
    pub job_lines: usize,
    pub job_bytes: usize,
    pub total_bytes: usize,
    pub max_jobs: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            job_lines: limits::JOB_LOG_LINES,
            job_bytes: limits::JOB_LOG_BYTES,
            total_bytes: limits::JOB_LOGS_TOTAL_BYTES,
            max_jobs: limits::JOB_LOGS_MAX_JOBS,
        }
    }
}

/// The job logs: live lines of running jobs, stored lines of ended runs.
pub struct JobLogs {
    db: Database,
    limits: LogLimits,
    /// Running assignments, by assignment id.
    live: Mutex<HashMap<String, Live>>,
}

/// The lines of one running assignment, and who follows them.
struct Live {
    record: AssignmentRecord,
    lines: VecDeque<Arc<LogLine>>,
    /// Bytes of text in `lines`.
    bytes: usize,
    /// The highest `seq` received: anything not after it is a repeat.
    last_seq: Option<u64>,
    /// Each new line, to the followers; dropped with the entry, which ends their streams.
    feed: broadcast::Sender<Arc<LogLine>>,
    followers: usize,
}

/// What `GetJobLogs` returns: the last lines, and with `follow` on a running job, the new ones.
pub struct Logs {
    pub lines: Vec<LogLine>,
    pub follow: Option<Follow>,
}

/// A follower of a running job; leaving (drop) may stop the agent's forwarding.
pub struct Follow {
    ctx: Arc<Context>,
    assignment_id: String,
    feed: broadcast::Receiver<Arc<LogLine>>,
}

impl Follow {
    /// The next line, or `None` once the run has ended. A follower that fell behind by more than
    /// [`FOLLOW_BUFFER_LINES`] skips what it missed.
    pub async fn next(&mut self) -> Option<Arc<LogLine>> {
        loop {
            match self.feed.recv().await {
                Ok(line) => return Some(line),
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    debug!(assignment_id = %self.assignment_id, missed, "a log follower fell behind");
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        if let Some(stop) = self.ctx.job_logs.unfollow(&self.assignment_id) {
            tell_agent(&self.ctx, stop);
        }
    }
}

impl JobLogs {
    pub fn new(db: Database) -> Self {
        Self::with_limits(db, LogLimits::default())
    }

    pub fn with_limits(db: Database, limits: LogLimits) -> Self {
        Self {
            db,
            limits,
            live: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A run was assigned (or recovered after a restart): its lines are kept from now on.
    pub fn run_started(&self, record: &AssignmentRecord) {
        let (feed, _) = broadcast::channel(FOLLOW_BUFFER_LINES);
        self.lock().insert(
            record.assignment_id.clone(),
            Live {
                record: record.clone(),
                lines: VecDeque::new(),
                bytes: 0,
                last_seq: None,
                feed,
                followers: 0,
            },
        );
    }

    /// Lines an agent sent for a running assignment (the gateway checked that it is one).
    pub fn append(&self, assignment_id: &str, lines: Vec<OutputLine>) {
        let received_ms = now_ms();
        let mut live = self.lock();
        let Some(entry) = live.get_mut(assignment_id) else {
            return;
        };
        for line in lines {
            if entry.last_seq.is_some_and(|last| line.seq <= last) {
                continue;
            }
            entry.last_seq = Some(line.seq);
            let line = Arc::new(LogLine {
                attempt: entry.record.attempt,
                seq: line.seq,
                stream: match line.stream {
                    OutputStream::Stdout => LogStream::Stdout,
                    OutputStream::Stderr => LogStream::Stderr,
                },
                text: sanitize(&line.text),
                received_ms,
            });
            entry.bytes += line.text.len();
            entry.lines.push_back(line.clone());
            while entry.lines.len() > self.limits.job_lines || entry.bytes > self.limits.job_bytes {
                match entry.lines.pop_front() {
                    Some(old) => entry.bytes -= old.text.len(),
                    None => break,
                }
            }
            // No follower is not an error: the line is kept all the same.
            let _ = entry.feed.send(line);
        }
    }

    /// A run ended (or its keeper stopped at shutdown): its lines are stored with the job's, then
    /// its followers' streams end.
    pub async fn run_ended(&self, assignment_id: &str) {
        let kept = self.lock().get(assignment_id).map(|entry| {
            (
                entry.record.job_id.clone(),
                entry
                    .lines
                    .iter()
                    .map(|line| LogLine::clone(line))
                    .collect::<Vec<_>>(),
            )
        });
        if let Some((job_id, lines)) = kept {
            if !lines.is_empty() {
                let limits = self.limits;
                let store_id = job_id.clone();
                let stored = self
                    .db
                    .run(move |conn| store(conn, &store_id, lines, &limits, now_ms()))
                    .await;
                if let Err(error) = stored {
                    warn!(job_id = %job_id, %error, "could not store the job's last output lines");
                }
            }
        }
        // Dropping the entry drops its feed: followers read what is left, then their end.
        self.lock().remove(assignment_id);
    }

    /// The job's last `tail` lines (stored, then live), and a follower of its running run when
    /// `follow` is asked and it runs.
    pub async fn read(
        ctx: &Arc<Context>,
        job_id: &str,
        tail: usize,
        follow: bool,
    ) -> Result<Logs, JobLogsError> {
        let logs = &ctx.job_logs;
        let load_id = job_id.to_owned();
        let mut lines = logs.db.run(move |conn| load(conn, &load_id)).await?;
        let mut start_agent = None;
        let mut follower = None;
        {
            let mut live = logs.lock();
            if let Some((assignment_id, entry)) = live
                .iter_mut()
                .find(|(_, entry)| entry.record.job_id == job_id)
            {
                // Stored lines of this very run (kept at a shutdown) come again live.
                if let Some(first) = entry.lines.front() {
                    lines.retain(|line| (line.attempt, line.seq) < (first.attempt, first.seq));
                }
                lines.extend(entry.lines.iter().map(|line| LogLine::clone(line)));
                if follow {
                    // Subscribed under the lock that `append` takes: no line is missed or repeated
                    // between the tail and the feed.
                    let feed = entry.feed.subscribe();
                    entry.followers += 1;
                    if entry.followers == 1 {
                        start_agent = Some(follow_message(&entry.record, true));
                    }
                    follower = Some((assignment_id.clone(), feed));
                }
            }
        }
        if let Some(start) = start_agent {
            tell_agent(ctx, start);
        }
        let skip = lines.len().saturating_sub(tail);
        lines.drain(..skip);
        Ok(Logs {
            lines,
            follow: follower.map(|(assignment_id, feed)| Follow {
                ctx: ctx.clone(),
                assignment_id,
                feed,
            }),
        })
    }

    /// Whether `job_id` has a run going on here.
    pub fn is_running(&self, job_id: &str) -> bool {
        self.lock()
            .values()
            .any(|entry| entry.record.job_id == job_id)
    }

    /// A follower left; the message that stops the agent's forwarding when it was the last one.
    fn unfollow(&self, assignment_id: &str) -> Option<Target> {
        let mut live = self.lock();
        let entry = live.get_mut(assignment_id)?;
        entry.followers = entry.followers.saturating_sub(1);
        (entry.followers == 0).then(|| follow_message(&entry.record, false))
    }

    /// The agent of a followed run came back on a new session, which follows nothing yet.
    pub fn agent_back(ctx: &Context, assignment_id: &str) {
        let resume = ctx
            .job_logs
            .lock()
            .get(assignment_id)
            .filter(|entry| entry.followers > 0)
            .map(|entry| follow_message(&entry.record, true));
        if let Some(resume) = resume {
            tell_agent(ctx, resume);
        }
    }
}

/// A `FollowOutput` for the agent running an assignment.
struct Target {
    agent_id: String,
    message: ToAgent,
}

fn follow_message(record: &AssignmentRecord, follow: bool) -> Target {
    Target {
        agent_id: record.agent_id.clone(),
        message: ToAgent::FollowOutput(FollowOutput {
            assignment_id: record.assignment_id.clone(),
            epoch: record.epoch,
            follow,
        }),
    }
}

fn tell_agent(ctx: &Context, target: Target) {
    let Some(sender) = ctx.agents.sender(&target.agent_id) else {
        return;
    };
    // A full stream means the agent is not reading: its lines would not come anyway.
    if sender.try_send(target.message).is_err() {
        warn!(agent_id = %target.agent_id, "could not tell the agent to start or stop sending output lines");
    }
}

/// An agent's text as shown to operators: control characters (bar tabs) and URL credentials out.
fn sanitize(text: &str) -> String {
    let text: String = text
        .chars()
        .filter(|c| !c.is_control() || *c == '\t')
        .collect();
    redact_credentials(&text).into_owned()
}

/// The table of stored lines, in the coordinator's database.
pub(crate) fn create_tables(conn: &mut Connection) -> Result<(), DatabaseError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS job_logs (
            job_id   TEXT PRIMARY KEY,
            -- when the job's last run ended (ms since the epoch): the oldest go first
            ended_at REAL NOT NULL,
            -- length of `lines`, counted against the total bound
            bytes    INTEGER NOT NULL,
            -- JSON array of the job's last lines (LogLine), oldest first
            lines    TEXT NOT NULL
        );
        CREATE INDEX IF NOT EXISTS job_logs_by_end ON job_logs (ended_at);",
    )?;
    Ok(())
}

/// The stored lines of a job, oldest first (none when they cannot be decoded: they are only
/// logs, and the next store replaces them).
fn load(conn: &Connection, job_id: &str) -> Result<Vec<LogLine>, JobLogsError> {
    let stored: Option<String> = conn
        .prepare_cached("SELECT lines FROM job_logs WHERE job_id = ?1")?
        .query_row([job_id], |row| row.get(0))
        .optional()?;
    Ok(match stored {
        None => Vec::new(),
        Some(json) => serde_json::from_str(&json).unwrap_or_else(|error| {
            warn!(job_id = %job_id, %error, "stored job log lines are unreadable; ignored");
            Vec::new()
        }),
    })
}

/// Stores a run's lines after the job's earlier ones, within the bounds of one job, then drops
/// the lines of the jobs that ended first while the total is over its bounds.
fn store(
    conn: &Connection,
    job_id: &str,
    lines: Vec<LogLine>,
    limits: &LogLimits,
    ended_at: f64,
) -> Result<(), JobLogsError> {
    let mut kept = load(conn, job_id)?;
    if let Some(first) = lines.first() {
        kept.retain(|line| (line.attempt, line.seq) < (first.attempt, first.seq));
    }
    kept.extend(lines);
    let mut bytes: usize = kept.iter().map(|line| line.text.len()).sum();
    let mut drop_count = 0;
    while kept.len() - drop_count > limits.job_lines || bytes > limits.job_bytes {
        bytes -= kept[drop_count].text.len();
        drop_count += 1;
    }
    kept.drain(..drop_count);
    let json = serde_json::to_string(&kept)?;
    conn.prepare_cached(
        "INSERT OR REPLACE INTO job_logs (job_id, ended_at, bytes, lines) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![job_id, ended_at, json.len() as i64, json])?;
    // Newest first; rowid orders the jobs that ended in the same millisecond.
    let evicted = conn
        .prepare_cached(
            "DELETE FROM job_logs WHERE job_id IN (
                SELECT job_id FROM (
                    SELECT job_id,
                           SUM(bytes) OVER newest AS running,
                           ROW_NUMBER() OVER newest AS position
                    FROM job_logs
                    WINDOW newest AS (ORDER BY ended_at DESC, rowid DESC)
                )
                WHERE running > ?1 OR position > ?2
            )",
        )?
        .execute(params![limits.total_bytes as i64, limits.max_jobs as i64])?;
    if evicted > 0 {
        debug!(evicted, "stored output lines of the oldest jobs dropped");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
