//! In-flight assignments: which job runs under which assignment id and epoch, on which agent, and
//! the channel to the lease keeper that owns it. This table is what makes "never assign one job
//! twice at once" checkable and what routes agent reports to the right keeper.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};

use tokio::sync::{mpsc, Notify};

use crate::lease::JobEvent;

/// One handing-out of a job to an agent.
#[derive(Debug, Clone)]
pub struct AssignmentRecord {
    pub assignment_id: String,
    pub job_id: String,
    pub epoch: u64,
    pub attempt: u32,
    pub agent_id: String,
}

#[derive(Clone)]
struct Entry {
    record: AssignmentRecord,
    events: mpsc::UnboundedSender<JobEvent>,
    /// When it entered the table: just before the assignment is sent (or was recovered).
    since: tokio::time::Instant,
}

/// Why a report from an agent was not routed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    #[error(
        "assignment {0} is unknown to this coordinator (finished, handed back or never issued)"
    )]
    Unknown(String),
    #[error(
        "assignment {assignment_id} has epoch {current}, the report carries stale epoch {reported}"
    )]
    StaleEpoch {
        assignment_id: String,
        current: u64,
        reported: u64,
    },
    #[error("assignment {assignment_id} belongs to agent {owner}, not {reporter}")]
    WrongAgent {
        assignment_id: String,
        owner: String,
        reporter: String,
    },
}

#[derive(Default)]
pub struct AssignmentTable {
    inner: Mutex<HashMap<String, Entry>>,
    /// Epochs only grow, also across restarts: seeded from the wall clock in microseconds.
    last_epoch: AtomicU64,
    /// Signalled whenever an assignment leaves the table, for [`AssignmentTable::emptied`].
    removed: Notify,
}

impl AssignmentTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh epoch, greater than every one handed out before by this process and (through the
    /// clock) by earlier ones.
    pub fn next_epoch(&self) -> u64 {
        let clock = (crate::job_source::now_ms() * 1000.0) as u64;
        let mut previous = self.last_epoch.load(Ordering::Relaxed);
        loop {
            let next = clock.max(previous + 1);
            match self.last_epoch.compare_exchange(
                previous,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(actual) => previous = actual,
            }
        }
    }

    /// Makes later epochs exceed one already handed out (by an earlier run of the coordinator).
    pub fn observe_epoch(&self, epoch: u64) {
        self.last_epoch.fetch_max(epoch, Ordering::Relaxed);
    }

    pub fn insert(&self, record: AssignmentRecord, events: mpsc::UnboundedSender<JobEvent>) {
        let since = tokio::time::Instant::now();
        self.lock().insert(
            record.assignment_id.clone(),
            Entry {
                record,
                events,
                since,
            },
        );
    }

    pub fn remove(&self, assignment_id: &str) {
        self.lock().remove(assignment_id);
        self.removed.notify_waiters();
    }

    /// Waits until no assignment is left (every keeper ended or suspended).
    pub async fn emptied(&self) {
        loop {
            let removed = self.removed.notified();
            tokio::pin!(removed);
            // Registered before looking, so a removal between the look and the wait is not missed.
            removed.as_mut().enable();
            if self.is_empty() {
                return;
            }
            removed.await;
        }
    }

    /// The assignment currently running `job_id`, if any.
    pub fn by_job(&self, job_id: &str) -> Option<AssignmentRecord> {
        self.lock()
            .values()
            .find(|entry| entry.record.job_id == job_id)
            .map(|entry| entry.record.clone())
    }

    /// How long ago the assignment was handed out (or recovered), while it is in the table.
    pub fn age(&self, assignment_id: &str) -> Option<std::time::Duration> {
        self.lock()
            .get(assignment_id)
            .map(|entry| entry.since.elapsed())
    }

    pub fn get(&self, assignment_id: &str) -> Option<AssignmentRecord> {
        self.lock()
            .get(assignment_id)
            .map(|entry| entry.record.clone())
    }

    /// Assignments credited to an agent.
    pub fn of_agent(&self, agent_id: &str) -> Vec<AssignmentRecord> {
        self.lock()
            .values()
            .filter(|entry| entry.record.agent_id == agent_id)
            .map(|entry| entry.record.clone())
            .collect()
    }

    pub fn all(&self) -> Vec<AssignmentRecord> {
        self.lock()
            .values()
            .map(|entry| entry.record.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Delivers an event to the keeper of an assignment after checking the fencing token and the
    /// reporting agent.
    pub fn route(
        &self,
        assignment_id: &str,
        epoch: u64,
        agent_id: &str,
        event: JobEvent,
    ) -> Result<(), RouteError> {
        let entry = self.checked(assignment_id, epoch, agent_id)?;
        // A keeper that already ended has nothing left to do with the report.
        let _ = entry.events.send(event);
        Ok(())
    }

    /// Checks a report's fencing token and reporting agent, as [`AssignmentTable::route`] does,
    /// for a report handled without the keeper (output lines).
    pub fn check(&self, assignment_id: &str, epoch: u64, agent_id: &str) -> Result<(), RouteError> {
        self.checked(assignment_id, epoch, agent_id).map(|_| ())
    }

    fn checked(
        &self,
        assignment_id: &str,
        epoch: u64,
        agent_id: &str,
    ) -> Result<Entry, RouteError> {
        let entry = self
            .lock()
            .get(assignment_id)
            .cloned()
            .ok_or_else(|| RouteError::Unknown(assignment_id.to_string()))?;
        if entry.record.epoch != epoch {
            return Err(RouteError::StaleEpoch {
                assignment_id: assignment_id.to_string(),
                current: entry.record.epoch,
                reported: epoch,
            });
        }
        if entry.record.agent_id != agent_id {
            return Err(RouteError::WrongAgent {
                assignment_id: assignment_id.to_string(),
                owner: entry.record.agent_id,
                reporter: agent_id.to_string(),
            });
        }
        Ok(entry)
    }

    /// Delivers an event that needs no fencing check (agent gone, cancel requested...).
    pub fn notify(&self, assignment_id: &str, event: JobEvent) {
        if let Some(entry) = self.lock().get(assignment_id) {
            let _ = entry.events.send(event);
        }
    }
}
