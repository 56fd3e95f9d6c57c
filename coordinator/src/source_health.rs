//! How the coordinator's calls to its job source fare, and the readiness that follows from it.
//!
//! Every call's result is recorded here (by [`crate::job_source::observed`]): the last success,
//! the errors since then, and since when the source has been failing. A coordinator whose source
//! has failed for longer than `SOURCE_UNHEALTHY_AFTER` cannot start or finish jobs, so its
//! readiness (`""`) turns NOT_SERVING; the first successful call turns it back. Only failures of
//! the source count ([`JobSourceError::Unavailable`], [`JobSourceError::Failed`]): a refusal
//! (a job canceled, a lease taken over) is the source answering.
//!
//! "Failing since" is the start of the first failed call after the last success: a call to an
//! unreachable Convex retries for up to its retry budget before it reports, and the outage began
//! when that call did.

use std::{future::Future, time::SystemTime};

use tokio::{
    sync::watch,
    time::{Duration, Instant},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::job_source::JobSourceError;

/// An error text kept for `GetStats`: the first bytes are enough to tell what went wrong.
const MAX_ERROR_BYTES: usize = 512;

/// Whether an error of the job source means the source itself is failing.
pub fn is_source_failure(error: &JobSourceError) -> bool {
    matches!(
        error,
        JobSourceError::Unavailable(_) | JobSourceError::Failed(_)
    )
}

#[derive(Debug, Clone, Default)]
struct State {
    last_success: Option<SystemTime>,
    consecutive_errors: u32,
    last_error: Option<String>,
    /// Start of the first failed call since the last success; `None` while calls succeed.
    failing_since: Option<Instant>,
    /// When the last success was recorded, to tell a call that failed after it from one that
    /// started before it.
    last_success_at: Option<Instant>,
}

/// What `GetStats` shows of the source's health.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSnapshot {
    pub kind: &'static str,
    pub healthy: bool,
    pub last_success: Option<SystemTime>,
    pub consecutive_errors: u32,
    pub last_error: Option<String>,
}

/// The job source's health as its calls tell it. Shared by the observed source (which records)
/// and the readiness task, `GetStats` and the metrics (which read).
#[derive(Debug)]
pub struct SourceHealth {
    kind: &'static str,
    unhealthy_after: Duration,
    /// Watched by the readiness task; it wakes only when `failing_since` changes.
    state: watch::Sender<State>,
}

impl SourceHealth {
    pub fn new(kind: &'static str, unhealthy_after: Duration) -> Self {
        Self {
            kind,
            unhealthy_after,
            state: watch::Sender::new(State::default()),
        }
    }

    /// A call succeeded: the source is healthy from now on.
    pub fn record_success(&self) {
        let now = Instant::now();
        self.state.send_if_modified(|state| {
            let was_failing = state.failing_since.is_some();
            state.last_success = Some(SystemTime::now());
            state.last_success_at = Some(now);
            state.consecutive_errors = 0;
            state.failing_since = None;
            was_failing
        });
    }

    /// A call that began at `started` failed with `error`; only failures of the source count.
    pub fn record_error(&self, started: Instant, error: &JobSourceError) {
        if !is_source_failure(error) {
            return;
        }
        let text = error.to_string();
        let text = fondation_proto::limits::truncate_utf8(&text, MAX_ERROR_BYTES).to_string();
        self.state.send_if_modified(|state| {
            state.consecutive_errors = state.consecutive_errors.saturating_add(1);
            state.last_error = Some(text);
            if state.failing_since.is_some() {
                return false;
            }
            // A call that started before the last success only tells about the time after it.
            let since = state
                .last_success_at
                .map_or(started, |success| started.max(success));
            state.failing_since = Some(since);
            true
        });
    }

    /// When the source turns unhealthy if nothing succeeds until then; `None` while it is not
    /// failing.
    fn unhealthy_at(&self, state: &State) -> Option<Instant> {
        state
            .failing_since
            .map(|since| since + self.unhealthy_after)
    }

    pub fn is_healthy(&self) -> bool {
        let state = self.state.borrow();
        self.unhealthy_at(&state)
            .is_none_or(|at| Instant::now() < at)
    }

    pub fn snapshot(&self) -> HealthSnapshot {
        let healthy = self.is_healthy();
        let state = self.state.borrow();
        HealthSnapshot {
            kind: self.kind,
            healthy,
            last_success: state.last_success,
            consecutive_errors: state.consecutive_errors,
            last_error: state.last_error.clone(),
        }
    }

    /// Calls `set_ready` with the coordinator's readiness whenever it changes, until `shutdown`:
    /// ready while the source is healthy, and never again once shutting down (the last call
    /// says not ready).
    pub async fn drive_readiness<F, Fut>(&self, shutdown: CancellationToken, mut set_ready: F)
    where
        F: FnMut(bool) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut changes = self.state.subscribe();
        let mut shown = None;
        loop {
            let unhealthy_at = {
                let state = changes.borrow_and_update();
                self.unhealthy_at(&state)
            };
            let healthy = unhealthy_at.is_none_or(|at| Instant::now() < at);
            let ready = healthy && !shutdown.is_cancelled();
            if shown != Some(ready) {
                if shown.is_some() && !shutdown.is_cancelled() {
                    if ready {
                        info!(source = self.kind, "job source answers again: SERVING");
                    } else {
                        warn!(source = self.kind, after_ms = self.unhealthy_after.as_millis() as u64, "job source failing for longer than SOURCE_UNHEALTHY_AFTER: NOT_SERVING");
                    }
                }
                set_ready(ready).await;
                shown = Some(ready);
            }
            if shutdown.is_cancelled() {
                return;
            }
            // While failing but not yet unhealthy, wake when the threshold passes.
            let turn_at = unhealthy_at.filter(|_| healthy);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = changes.changed() => {}
                _ = tokio::time::sleep_until(turn_at.unwrap_or_else(Instant::now)), if turn_at.is_some() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    const AFTER: Duration = Duration::from_secs(60);

    fn unavailable() -> JobSourceError {
        JobSourceError::Unavailable("connection refused".into())
    }

    /// The readiness task on `health`, with the states it reported.
    fn watch_readiness(
        health: &Arc<SourceHealth>,
        shutdown: &CancellationToken,
    ) -> (Arc<Mutex<Vec<bool>>>, tokio::task::JoinHandle<()>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let (health, shutdown, seen) = (health.clone(), shutdown.clone(), seen.clone());
            tokio::spawn(async move {
                health
                    .drive_readiness(shutdown, |ready| {
                        seen.lock().unwrap().push(ready);
                        async {}
                    })
                    .await
            })
        };
        (seen, task)
    }

    /// Lets the readiness task run up to the current (virtual) time.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn unhealthy_only_after_failing_for_the_threshold_and_healthy_at_the_next_success() {
        let health = Arc::new(SourceHealth::new("convex", AFTER));
        let shutdown = CancellationToken::new();
        let (seen, task) = watch_readiness(&health, &shutdown);
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [true], "ready from the start");

        health.record_success();
        let outage = Instant::now();
        tokio::time::advance(Duration::from_secs(10)).await;
        // The call that reports now began when the outage did.
        health.record_error(outage, &unavailable());
        health.record_error(Instant::now(), &unavailable());
        tokio::time::advance(AFTER - Duration::from_secs(11)).await;
        settle().await;
        assert!(
            health.is_healthy(),
            "59 s of failures are below the threshold"
        );
        assert_eq!(*seen.lock().unwrap(), [true]);

        tokio::time::advance(Duration::from_secs(2)).await;
        settle().await;
        assert!(!health.is_healthy());
        assert_eq!(
            *seen.lock().unwrap(),
            [true, false],
            "NOT_SERVING once the threshold passed, with no call needed"
        );
        let snapshot = health.snapshot();
        assert_eq!(snapshot.consecutive_errors, 2);
        assert!(!snapshot.healthy);
        assert!(snapshot.last_error.unwrap().contains("connection refused"));
        assert!(snapshot.last_success.is_some());

        health.record_success();
        settle().await;
        assert_eq!(*seen.lock().unwrap(), [true, false, true]);
        assert_eq!(health.snapshot().consecutive_errors, 0);

        shutdown.cancel();
        task.await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [true, false, true, false],
            "not ready once shutting down"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_do_not_count_and_a_success_in_between_restarts_the_clock() {
        let health = SourceHealth::new("embedded", AFTER);
        let started = Instant::now();
        health.record_error(started, &JobSourceError::Canceled("job".into()));
        health.record_error(
            started,
            &JobSourceError::NotOwned {
                job_id: "job".into(),
                worker_id: "w".into(),
            },
        );
        assert_eq!(health.snapshot().consecutive_errors, 0);

        // A call that began before a success and failed after it: failing counts from the success.
        let long_call = Instant::now();
        tokio::time::advance(Duration::from_secs(50)).await;
        health.record_success();
        tokio::time::advance(Duration::from_secs(20)).await;
        health.record_error(long_call, &JobSourceError::Failed("boom".into()));
        assert!(
            health.is_healthy(),
            "20 s since the last success, not 70 s since the call began"
        );
        tokio::time::advance(Duration::from_secs(41)).await;
        assert!(!health.is_healthy());
    }
}
