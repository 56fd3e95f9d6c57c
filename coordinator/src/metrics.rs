//! The coordinator's Prometheus metrics (`METRICS_ADDR`, served by
//! [`fondation_runtime::metrics`]): the registry, the few calls the rest of the coordinator makes
//! to count something, and the gauges read from shared state at scrape time.
//!
//! Counting happens in three places only: [`crate::job_source::observed`] sees every job-source
//! call (latency, result, errors, renewed leases, and the job outcomes the source decides), the
//! lease keeper reports acceptances and cancellations, and a scrape reads the fleet, the
//! in-flight assignments, the source's health and (embedded store) the queue depth. The README's
//! "Metrics" section lists every metric.

use std::sync::Arc;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};
use tokio::time::{Duration, Instant};

use crate::{
    context::Context,
    job_source::{FailOutcome, JobSourceError},
    source_health::is_source_failure,
};

/// How a job's run ended, as far as the coordinator recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOutcome {
    Completed,
    /// Failed for good without using up its attempts (a job that cannot succeed).
    Failed,
    /// Failed, back to pending for another attempt.
    Retried,
    /// Failed its last attempt.
    Dead,
    /// Stopped because it was canceled (or deleted) while it ran.
    Canceled,
    /// Handed back without losing an attempt after a failure of its agent.
    Released,
}

impl JobOutcome {
    fn as_str(self) -> &'static str {
        match self {
            JobOutcome::Completed => "completed",
            JobOutcome::Failed => "failed",
            JobOutcome::Retried => "retried",
            JobOutcome::Dead => "dead",
            JobOutcome::Canceled => "canceled",
            JobOutcome::Released => "released",
        }
    }

    /// What a recorded failure became.
    pub fn of_failure(outcome: &FailOutcome) -> Self {
        match outcome {
            FailOutcome::Retrying { .. } => JobOutcome::Retried,
            FailOutcome::Dead { .. } => JobOutcome::Dead,
            FailOutcome::Failed => JobOutcome::Failed,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    function: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    function: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    function: &'static str,
    kind: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Job-source calls: milliseconds for the embedded store, up to a retry budget for Convex.
fn call_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.5, 14))
}

/// The counters the job source's calls move; cheap to clone (shared handles).
#[derive(Debug, Clone)]
pub struct SourceMetrics {
    jobs: Family<OutcomeLabels, Counter>,
    calls: Family<CallLabels, Counter>,
    call_duration: HistogramFamily<FunctionLabels>,
    errors: Family<ErrorLabels, Counter>,
    leases_renewed: Counter,
}

impl SourceMetrics {
    /// One call of `function` that began at `started` ended with `error` (none: success).
    pub fn call(&self, function: &'static str, started: Instant, error: Option<&JobSourceError>) {
        let result = match error {
            None => "ok",
            Some(error) if is_source_failure(error) => "error",
            Some(_) => "refused",
        };
        self.calls
            .get_or_create(&CallLabels { function, result })
            .inc();
        self.call_duration
            .get_or_create(&FunctionLabels { function })
            .observe(started.elapsed().as_secs_f64());
        if let Some(error) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    function,
                    kind: error_kind(error),
                })
                .inc();
        }
    }

    /// A heartbeat extended a job's lease.
    pub fn lease_renewed(&self) {
        self.leases_renewed.inc();
    }

    pub fn job_ended(&self, outcome: JobOutcome) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }
}

fn error_kind(error: &JobSourceError) -> &'static str {
    match error {
        JobSourceError::NotOwned { .. } => "not_owned",
        JobSourceError::Canceled(_) => "canceled",
        JobSourceError::NotFound(_) => "not_found",
        JobSourceError::Unsupported(_) => "unsupported",
        JobSourceError::Invalid(_) => "invalid",
        JobSourceError::TooLarge(_) => "too_large",
        JobSourceError::Unavailable(_) => "unavailable",
        JobSourceError::Failed(_) => "failed",
    }
}

/// The coordinator's registry and its metrics.
#[derive(Debug)]
pub struct CoordinatorMetrics {
    registry: Registry,
    source: SourceMetrics,
    assignment_latency: Histogram,
    agents_connected: Gauge,
    agents_ready: Gauge,
    slots_total: Gauge,
    slots_free: Gauge,
    jobs_running: Gauge,
    /// Only for a source that counts its pending jobs.
    pending_jobs: Option<Gauge>,
    source_healthy: Gauge,
    source_consecutive_errors: Gauge,
    /// Follows the database's own commit counter at each scrape.
    database_commits: Counter,
}

impl CoordinatorMetrics {
    /// The registry; `queue_depth` registers `pending_jobs`, for a source that can count its
    /// pending jobs (the embedded store).
    pub fn new(queue_depth: bool) -> Self {
        let mut registry = Registry::with_prefix("fondation_coordinator");
        let source = SourceMetrics {
            jobs: Family::default(),
            calls: Family::default(),
            call_duration: Family::new_with_constructor(call_buckets),
            errors: Family::default(),
            leases_renewed: Counter::default(),
        };
        registry.register(
            "jobs",
            "Job runs by how they ended: completed, failed, retried, dead, canceled, released",
            source.jobs.clone(),
        );
        registry.register(
            "source_calls",
            "Job-source calls by function and result (ok, refused, error)",
            source.calls.clone(),
        );
        registry.register(
            "source_call_duration_seconds",
            "Latency of job-source calls by function, retries included",
            source.call_duration.clone(),
        );
        registry.register(
            "source_errors",
            "Job-source calls that returned an error, by function and kind",
            source.errors.clone(),
        );
        registry.register(
            "leases_renewed",
            "Heartbeats that extended a job's lease",
            source.leases_renewed.clone(),
        );
        let database_commits = Counter::default();
        registry.register(
            "database_commits",
            "Transactions committed to coordinator.sqlite3 with a change (each one fsync with \
             synchronous=FULL; group commit shares one among concurrent writes)",
            database_commits.clone(),
        );
        let assignment_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "assignment_latency_seconds",
            "From an assignment sent to an agent to its acceptance received",
            assignment_latency.clone(),
        );
        let mut gauge = |name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let agents_connected = gauge("agents_connected", "Agents with an open session");
        let agents_ready = gauge(
            "agents_ready",
            "Connected agents that take work (not draining, unready or quarantined)",
        );
        let slots_total = gauge("slots_total", "Slots announced by connected agents");
        let slots_free = gauge("slots_free", "Slots free on agents that take work");
        let jobs_running = gauge(
            "jobs_running",
            "Jobs assigned to an agent and not yet ended",
        );
        let source_healthy = gauge(
            "source_healthy",
            "1 while the job source is healthy, 0 once it failed for longer than \
             SOURCE_UNHEALTHY_AFTER",
        );
        let source_consecutive_errors = gauge(
            "source_consecutive_errors",
            "Failed job-source calls since the last successful one",
        );
        let pending_jobs = queue_depth.then(|| {
            gauge(
                "pending_jobs",
                "Jobs waiting to be claimed (the queue depth; embedded store)",
            )
        });
        Self {
            source,
            assignment_latency,
            agents_connected,
            agents_ready,
            slots_total,
            slots_free,
            jobs_running,
            pending_jobs,
            source_healthy,
            source_consecutive_errors,
            database_commits,
            registry,
        }
    }

    /// The handles the observed job source counts with.
    pub fn source(&self) -> SourceMetrics {
        self.source.clone()
    }

    /// An agent accepted an assignment handed out `latency` ago (`None`: not known, the
    /// assignment was recovered after a restart).
    pub fn assignment_accepted(&self, latency: Option<Duration>) {
        if let Some(latency) = latency {
            self.assignment_latency.observe(latency.as_secs_f64());
        }
    }

    /// A running job was found canceled (or deleted) and its run stopped.
    pub fn job_canceled(&self) {
        self.source.job_ended(JobOutcome::Canceled);
    }
}

/// The connected agents and their slots, as `GetStats` and the gauges show them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fleet {
    pub agents_connected: u32,
    pub agents_ready: u32,
    pub slots_total: u32,
    pub slots_free: u32,
    pub jobs_running: u32,
}

impl Fleet {
    pub fn of(ctx: &Context) -> Self {
        let agents = ctx.agents.snapshot();
        Self {
            agents_connected: agents.len() as u32,
            agents_ready: agents
                .iter()
                .filter(|agent| {
                    !agent.draining && agent.unready.is_none() && agent.quarantine.is_none()
                })
                .count() as u32,
            slots_total: agents.iter().map(|agent| agent.description.slots).sum(),
            slots_free: ctx.agents.free_slots(),
            jobs_running: ctx.assignments.len() as u32,
        }
    }
}

/// What `METRICS_ADDR` serves: the registry, with its gauges read at each scrape.
pub struct Scrape(pub Arc<Context>);

impl fondation_runtime::metrics::Exposition for Scrape {
    async fn render(&self) -> String {
        let ctx = &self.0;
        let metrics = &ctx.metrics;
        let fleet = Fleet::of(ctx);
        metrics.agents_connected.set(fleet.agents_connected.into());
        metrics.agents_ready.set(fleet.agents_ready.into());
        metrics.slots_total.set(fleet.slots_total.into());
        metrics.slots_free.set(fleet.slots_free.into());
        metrics.jobs_running.set(fleet.jobs_running.into());
        let commits = ctx.journal.database().commits();
        metrics
            .database_commits
            .inc_by(commits.saturating_sub(metrics.database_commits.get()));
        let health = ctx.source_health.snapshot();
        metrics.source_healthy.set(health.healthy.into());
        metrics
            .source_consecutive_errors
            .set(health.consecutive_errors.into());
        if let Some(gauge) = &metrics.pending_jobs {
            // One indexed COUNT through the database's owner.
            match ctx.source.pending_count().await {
                Ok(Some(pending)) => {
                    gauge.set(i64::try_from(pending).unwrap_or(i64::MAX));
                }
                Ok(None) => {}
                Err(error) => tracing::debug!(%error, "counting pending jobs for a scrape failed"),
            }
        }
        fondation_runtime::metrics::encode(&metrics.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        job_source::{observed::ObservedSource, JobResult, JobSource, ProgressUpdate},
        source_health::SourceHealth,
        testing::FakeSource,
    };

    fn calls(metrics: &SourceMetrics, function: &'static str, result: &'static str) -> u64 {
        metrics
            .calls
            .get(&CallLabels { function, result })
            .map_or(0, |counter| counter.get())
    }

    fn jobs(metrics: &SourceMetrics, outcome: JobOutcome) -> u64 {
        metrics
            .jobs
            .get(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .map_or(0, |counter| counter.get())
    }

    #[tokio::test(start_paused = true)]
    async fn the_observed_source_counts_calls_outcomes_and_renewed_leases() {
        let metrics = CoordinatorMetrics::new(false);
        let health = Arc::new(SourceHealth::new("fake", Duration::from_secs(60)));
        let fake = Arc::new(FakeSource::default());
        fake.heartbeat_replies
            .lock()
            .unwrap()
            .push_back(Err(JobSourceError::Canceled("job".into())));
        fake.fail_replies.lock().unwrap().extend([
            Ok(FailOutcome::Retrying {
                attempts: 1,
                next_run_at_ms: 0.0,
            }),
            Ok(FailOutcome::Dead { attempts: 5 }),
            Err(JobSourceError::Unavailable("down".into())),
        ]);
        let source = ObservedSource::new(fake, metrics.source(), health.clone());
        let update = ProgressUpdate::default();
        let lease = Duration::from_secs(60);
        assert!(source.heartbeat("job", "w", &update, lease).await.is_err());
        source.heartbeat("job", "w", &update, lease).await.unwrap();
        for _ in 0..3 {
            let _ = source.fail("job", "w", "boom", true).await;
        }
        let result = JobResult {
            run_id: "run".into(),
            message: String::new(),
            documents: Vec::new(),
        };
        source.complete("job", "w", &result).await.unwrap();
        // Answered without a call by a source that cannot tell: not recorded.
        assert_eq!(source.next_due_at_ms().await.unwrap(), None);

        let counted = &metrics.source;
        assert_eq!(calls(counted, "heartbeat", "refused"), 1);
        assert_eq!(calls(counted, "heartbeat", "ok"), 1);
        assert_eq!(
            counted.leases_renewed.get(),
            1,
            "only the heartbeat that succeeded"
        );
        assert_eq!(calls(counted, "fail", "ok"), 2);
        assert_eq!(calls(counted, "fail", "error"), 1);
        assert_eq!(jobs(counted, JobOutcome::Retried), 1);
        assert_eq!(jobs(counted, JobOutcome::Dead), 1);
        assert_eq!(jobs(counted, JobOutcome::Completed), 1);
        assert_eq!(jobs(counted, JobOutcome::Failed), 0);
        assert_eq!(calls(counted, "next_due_at", "ok"), 0);
        let heartbeat_latency = counted
            .call_duration
            .get_or_create(&FunctionLabels {
                function: "heartbeat",
            })
            .count();
        assert_eq!(heartbeat_latency, 2);
        let unavailable = counted
            .errors
            .get(&ErrorLabels {
                function: "fail",
                kind: "unavailable",
            })
            .map_or(0, |counter| counter.get());
        assert_eq!(unavailable, 1);
        // The refusal is the source answering; the outage after the last success counts.
        let snapshot = health.snapshot();
        assert_eq!(
            snapshot.consecutive_errors, 0,
            "the complete after it succeeded"
        );
        assert!(snapshot.last_error.unwrap().contains("down"));
    }
}
