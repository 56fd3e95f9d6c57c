//! The agent's Prometheus metrics (`METRICS_ADDR`, served by [`fondation_runtime::metrics`]).
//!
//! A run's timings come from the reports it already sends: the session hands each report to the
//! run's [`RunTimer`], which lives in the session's entry for the run (so it goes when the run
//! goes), and tells it when the coordinator acknowledged the result. Besides that the runner
//! reports how the analyzer ended and the session reports its connections. The README's
//! "Metrics" section lists every metric.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use fondation_proto::model::{Phase, RunEvent, RunOutcome};
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
use tokio::time::Instant;

use crate::process::{ExitStatusKind, ProcessEnd, ProcessError};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    /// exited, signaled, timed_out, canceled or not_started.
    status: &'static str,
    /// The exit code or signal number; empty for the others.
    code: String,
}

/// Runs and their phases last from seconds (a fixture, a failed clone) to hours.
fn duration_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.05, 2.0, 19))
}

/// The agent's registry and its metrics. Shared (`Arc`) by the session, the runner and the
/// metrics endpoint.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    runs: Family<OutcomeLabels, Counter>,
    run_duration: Family<OutcomeLabels, Histogram, fn() -> Histogram>,
    phase_duration: Family<PhaseLabels, Histogram, fn() -> Histogram>,
    analyzer_exits: Family<ExitLabels, Counter>,
    jobs_running: Gauge,
    connected: Gauge,
    reconnects: Counter,
    /// Whether a session was ever established: the ones after the first are reconnects.
    ever_connected: AtomicBool,
}

impl AgentMetrics {
    /// The registry of an agent with `slots` slots.
    pub fn new(slots: u32) -> Arc<Self> {
        let mut registry = Registry::with_prefix("fondation_agent");
        let runs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "runs",
            "Runs by how they ended on this agent: succeeded, failed, agent_failure",
            runs.clone(),
        );
        let run_duration: Family<_, _, fn() -> Histogram> =
            Family::new_with_constructor(duration_buckets);
        registry.register(
            "run_duration_seconds",
            "From an assignment accepted to its run's end, by outcome",
            run_duration.clone(),
        );
        let phase_duration: Family<_, _, fn() -> Histogram> =
            Family::new_with_constructor(duration_buckets);
        registry.register(
            "phase_duration_seconds",
            "Time spent in each phase of a run: clone, analyze, collect, upload (result sent to \
             acknowledged)",
            phase_duration.clone(),
        );
        let analyzer_exits = Family::<ExitLabels, Counter>::default();
        registry.register(
            "analyzer_exits",
            "Analyzer runs by how the process ended (status) and its exit code or signal (code)",
            analyzer_exits.clone(),
        );
        let jobs_running = Gauge::default();
        registry.register(
            "jobs_running",
            "Runs in progress (their result not sent yet)",
            jobs_running.clone(),
        );
        let slots_gauge = Gauge::<i64>::default();
        slots_gauge.set(slots.into());
        registry.register("slots", "Jobs this agent runs at once", slots_gauge);
        let connected = Gauge::default();
        registry.register(
            "connected",
            "1 while a session with the coordinator is open",
            connected.clone(),
        );
        let reconnects = Counter::default();
        registry.register(
            "reconnects",
            "Sessions with the coordinator opened after the first one",
            reconnects.clone(),
        );
        Arc::new(Self {
            registry,
            runs,
            run_duration,
            phase_duration,
            analyzer_exits,
            jobs_running,
            connected,
            reconnects,
            ever_connected: AtomicBool::new(false),
        })
    }

    /// A run was accepted: its timer, kept with the run.
    pub fn run_started(self: &Arc<Self>) -> RunTimer {
        self.jobs_running.inc();
        let now = Instant::now();
        RunTimer {
            metrics: self.clone(),
            accepted: now,
            phase: None,
            running: true,
        }
    }

    /// A session with the coordinator opened; it counts as closed when the guard drops.
    pub fn session_opened(self: &Arc<Self>) -> SessionGuard {
        if self.ever_connected.swap(true, Ordering::Relaxed) {
            self.reconnects.inc();
        }
        self.connected.set(1);
        SessionGuard {
            metrics: self.clone(),
        }
    }

    /// How an analyzer process ended (or why it never started).
    pub fn analyzer_ended(&self, end: &Result<ProcessEnd, ProcessError>) {
        let (status, code) = match end {
            Ok(ProcessEnd::Exited {
                status: ExitStatusKind::Exited(code),
                ..
            }) => ("exited", code.to_string()),
            Ok(ProcessEnd::Exited {
                status: ExitStatusKind::Signaled(signal),
                ..
            }) => ("signaled", signal.to_string()),
            Ok(ProcessEnd::TimedOut { .. }) => ("timed_out", String::new()),
            Ok(ProcessEnd::Canceled { .. }) => ("canceled", String::new()),
            Err(_) => ("not_started", String::new()),
        };
        self.analyzer_exits
            .get_or_create(&ExitLabels { status, code })
            .inc();
    }

    fn phase_ended(&self, phase: &'static str, started: Instant) {
        self.phase_duration
            .get_or_create(&PhaseLabels { phase })
            .observe(started.elapsed().as_secs_f64());
    }
}

impl fondation_runtime::metrics::Exposition for AgentMetrics {
    async fn render(&self) -> String {
        fondation_runtime::metrics::encode(&self.registry)
    }
}

/// Marks the session closed when dropped.
pub struct SessionGuard {
    metrics: Arc<AgentMetrics>,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.metrics.connected.set(0);
    }
}

/// The metric name of a run's phase.
fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Cloning => "clone",
        Phase::Analyzing => "analyze",
        Phase::Gathering => "collect",
    }
}

const UPLOAD: &str = "upload";

/// One run's clock: which phase it is in, since when. Fed the run's reports by the session.
pub struct RunTimer {
    metrics: Arc<AgentMetrics>,
    accepted: Instant,
    /// The phase under way and when it began.
    phase: Option<(&'static str, Instant)>,
    /// Until the run's end is reported (counted in `jobs_running`).
    running: bool,
}

impl RunTimer {
    /// A report of the run: a phase change closes the phase before it; the end closes the last
    /// one, counts the run, and a successful run's upload begins.
    pub fn observe(&mut self, event: &RunEvent) {
        match event {
            RunEvent::Phase(phase) => self.enter(Some(phase_name(*phase))),
            RunEvent::Finished(outcome) if self.running => {
                let outcome = match outcome {
                    RunOutcome::Succeeded { .. } => "succeeded",
                    RunOutcome::Failed {
                        agent_fault: true, ..
                    } => "agent_failure",
                    RunOutcome::Failed { .. } => "failed",
                };
                let succeeded = outcome == "succeeded";
                self.enter(succeeded.then_some(UPLOAD));
                let labels = OutcomeLabels { outcome };
                self.metrics.runs.get_or_create(&labels).inc();
                self.metrics
                    .run_duration
                    .get_or_create(&labels)
                    .observe(self.accepted.elapsed().as_secs_f64());
                self.stop_running();
            }
            _ => {}
        }
    }

    /// The coordinator acknowledged the result: the upload is over.
    pub fn acknowledged(&mut self) {
        self.enter(None);
    }

    fn enter(&mut self, next: Option<&'static str>) {
        let now = Instant::now();
        if let Some((phase, started)) = self.phase.take() {
            self.metrics.phase_ended(phase, started);
        }
        self.phase = next.map(|phase| (phase, now));
    }

    fn stop_running(&mut self) {
        if std::mem::take(&mut self.running) {
            self.metrics.jobs_running.dec();
        }
    }
}

impl Drop for RunTimer {
    /// A run dropped before its end was reported (the agent detached from it) runs no more.
    fn drop(&mut self) {
        self.stop_running();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn phase_seconds(metrics: &AgentMetrics, phase: &'static str) -> (u64, f64) {
        let histogram = metrics.phase_duration.get_or_create(&PhaseLabels { phase });
        (histogram.count(), histogram.sum())
    }

    fn runs(metrics: &AgentMetrics, outcome: &'static str) -> u64 {
        metrics.runs.get_or_create(&OutcomeLabels { outcome }).get()
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_s_phases_are_timed_from_its_reports() {
        let metrics = AgentMetrics::new(2);
        let mut timer = metrics.run_started();
        assert_eq!(metrics.jobs_running.get(), 1);
        timer.observe(&RunEvent::Accepted);
        timer.observe(&RunEvent::Phase(Phase::Cloning));
        tokio::time::advance(Duration::from_secs(2)).await;
        timer.observe(&RunEvent::Phase(Phase::Analyzing));
        tokio::time::advance(Duration::from_secs(30)).await;
        timer.observe(&RunEvent::Phase(Phase::Gathering));
        tokio::time::advance(Duration::from_millis(100)).await;
        timer.observe(&RunEvent::Finished(RunOutcome::Succeeded {
            document_count: 3,
            message: String::new(),
        }));
        assert_eq!(
            metrics.jobs_running.get(),
            0,
            "the run ended; its upload goes on"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        timer.acknowledged();
        drop(timer);

        for (phase, seconds) in [
            ("clone", 2.0),
            ("analyze", 30.0),
            ("collect", 0.1),
            ("upload", 1.0),
        ] {
            let (count, sum) = phase_seconds(&metrics, phase);
            assert_eq!(count, 1, "{phase}");
            assert!((sum - seconds).abs() < 1e-6, "{phase}: {sum} s");
        }
        assert_eq!(runs(&metrics, "succeeded"), 1);
        assert_eq!(metrics.jobs_running.get(), 0);
    }

    #[test]
    fn a_failed_run_has_no_upload_and_a_dropped_one_stops_running() {
        let metrics = AgentMetrics::new(1);
        let mut failed = metrics.run_started();
        failed.observe(&RunEvent::Phase(Phase::Cloning));
        failed.observe(&RunEvent::Finished(RunOutcome::Failed {
            message: "no".into(),
            retryable: true,
            agent_fault: true,
        }));
        failed.acknowledged();
        let detached = metrics.run_started();
        assert_eq!(metrics.jobs_running.get(), 1);
        drop(detached);
        assert_eq!(phase_seconds(&metrics, "clone").0, 1);
        assert_eq!(phase_seconds(&metrics, "upload").0, 0);
        assert_eq!(runs(&metrics, "agent_failure"), 1);
        assert_eq!(metrics.jobs_running.get(), 0);
    }

    #[test]
    fn sessions_after_the_first_are_reconnects() {
        let metrics = AgentMetrics::new(1);
        drop(metrics.session_opened());
        assert_eq!(
            metrics.reconnects.get(),
            0,
            "the first session is no reconnect"
        );
        let second = metrics.session_opened();
        assert_eq!(metrics.connected.get(), 1);
        drop(second);
        assert_eq!(metrics.reconnects.get(), 1);
        assert_eq!(metrics.connected.get(), 0);
    }
}
