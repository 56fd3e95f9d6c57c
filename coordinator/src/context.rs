//! State shared by the coordinator's tasks and services.

use std::sync::Arc;

use fondation_proto::validate::RepoAllowlist;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::{
    agents::AgentRegistry, assignments::AssignmentTable, config::CoordinatorConfig,
    history::History, job_logs::JobLogs, job_source::JobSource, journal::Journal,
    metrics::CoordinatorMetrics, source_health::SourceHealth,
};

pub struct Context {
    pub config: CoordinatorConfig,
    pub allowlist: RepoAllowlist,
    /// Our `lockedBy` towards the job source.
    pub worker_id: String,
    /// The job source, observed: every call is counted in `metrics` and `source_health`.
    pub source: Arc<dyn JobSource>,
    /// How the job source's calls fare; the coordinator's readiness follows it.
    pub source_health: Arc<SourceHealth>,
    pub metrics: CoordinatorMetrics,
    /// When this coordinator started, for `GetStats`' uptime.
    pub started: std::time::Instant,
    pub agents: AgentRegistry,
    /// Durable record of in-flight assignments and undelivered results.
    pub journal: Journal,
    /// Every attempt this coordinator saw, and what the running ones did so far.
    pub history: History,
    pub assignments: AssignmentTable,
    /// The analyzer's output lines of running and ended jobs.
    pub job_logs: JobLogs,
    /// Wakes the claim loop early (a job was submitted).
    pub wake_claimer: Notify,
    /// Cancelled when the coordinator shuts down.
    pub shutdown: CancellationToken,
    /// Cancelled once in-flight jobs are handed back at shutdown: agent streams then close.
    pub sessions_closed: CancellationToken,
}
