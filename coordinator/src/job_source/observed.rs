//! The job source as the rest of the coordinator calls it: every call goes through to the real
//! source unchanged, and its function, latency and result are recorded once, here, for the
//! metrics ([`crate::metrics::SourceMetrics`]) and the source's health
//! ([`crate::source_health`]). The outcomes the source decides (completed, retried, dead,
//! failed, released) and the leases a heartbeat renewed are counted here too, from the calls'
//! replies, so that no other module has to.
//!
//! The optional queries (`next_due_at`, `count_by_status`, `pending_count`) are answered `None`
//! without any call by a source that cannot answer them (Convex): a `None` is not recorded, or
//! every idle poll would count as a successful call to a deployment that may be down.

use std::{future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    ClaimedJob, FailOutcome, JobId, JobQuery, JobResult, JobSource, JobSourceError, JobStatus,
    JobView, NewJob, ProgressUpdate, ReclaimCounts, Result,
};
use crate::{
    journal::PlannedAssignment,
    metrics::{JobOutcome, SourceMetrics},
    source_health::SourceHealth,
};

pub struct ObservedSource {
    inner: Arc<dyn JobSource>,
    metrics: SourceMetrics,
    health: Arc<SourceHealth>,
}

impl ObservedSource {
    pub fn new(
        inner: Arc<dyn JobSource>,
        metrics: SourceMetrics,
        health: Arc<SourceHealth>,
    ) -> Self {
        Self {
            inner,
            metrics,
            health,
        }
    }

    /// Runs one call of `function`, recording how it went.
    async fn observe<T>(
        &self,
        function: &'static str,
        call: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let result = call.await;
        self.record(function, started, result.as_ref().err());
        result
    }

    /// Like [`Self::observe`] for an optional query: a `None` reply is not recorded.
    async fn observe_optional<T>(
        &self,
        function: &'static str,
        call: impl Future<Output = Result<Option<T>>>,
    ) -> Result<Option<T>> {
        let started = Instant::now();
        let result = call.await;
        if !matches!(result, Ok(None)) {
            self.record(function, started, result.as_ref().err());
        }
        result
    }

    fn record(&self, function: &'static str, started: Instant, error: Option<&JobSourceError>) {
        self.metrics.call(function, started, error);
        match error {
            None => self.health.record_success(),
            Some(error) => self.health.record_error(started, error),
        }
    }
}

#[async_trait]
impl JobSource for ObservedSource {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn parallel_claims(&self) -> usize {
        self.inner.parallel_claims()
    }

    fn records_ends_locally(&self) -> bool {
        self.inner.records_ends_locally()
    }

    async fn claim(&self, worker_id: &str, lease: Duration) -> Result<Option<ClaimedJob>> {
        self.observe("claim", self.inner.claim(worker_id, lease))
            .await
    }

    async fn claim_journaled(
        &self,
        worker_id: &str,
        lease: Duration,
        planned: &PlannedAssignment,
    ) -> Result<Option<(ClaimedJob, bool)>> {
        self.observe(
            "claim",
            self.inner.claim_journaled(worker_id, lease, planned),
        )
        .await
    }

    async fn heartbeat(
        &self,
        job_id: &str,
        worker_id: &str,
        update: &ProgressUpdate,
        lease: Duration,
    ) -> Result<()> {
        self.observe(
            "heartbeat",
            self.inner.heartbeat(job_id, worker_id, update, lease),
        )
        .await?;
        self.metrics.lease_renewed();
        Ok(())
    }

    async fn complete(&self, job_id: &str, worker_id: &str, result: &JobResult) -> Result<()> {
        self.observe("complete", self.inner.complete(job_id, worker_id, result))
            .await?;
        self.metrics.job_ended(JobOutcome::Completed);
        Ok(())
    }

    async fn fail(
        &self,
        job_id: &str,
        worker_id: &str,
        error: &str,
        retryable: bool,
    ) -> Result<FailOutcome> {
        let outcome = self
            .observe("fail", self.inner.fail(job_id, worker_id, error, retryable))
            .await?;
        self.metrics.job_ended(JobOutcome::of_failure(&outcome));
        Ok(outcome)
    }

    async fn release(&self, job_id: &str, worker_id: &str) -> Result<()> {
        self.observe("release", self.inner.release(job_id, worker_id))
            .await?;
        self.metrics.job_ended(JobOutcome::Released);
        Ok(())
    }

    async fn get_job(&self, job_id: &str, include_content: bool) -> Result<Option<JobView>> {
        self.observe("get_job", self.inner.get_job(job_id, include_content))
            .await
    }

    async fn submit(&self, job: NewJob) -> Result<JobId> {
        self.observe("submit", self.inner.submit(job)).await
    }

    async fn submit_and_claim(
        &self,
        job: NewJob,
        worker_id: &str,
        lease: Duration,
        planned: &PlannedAssignment,
    ) -> Result<(JobId, Option<ClaimedJob>)> {
        self.observe(
            "submit",
            self.inner.submit_and_claim(job, worker_id, lease, planned),
        )
        .await
    }

    async fn list_jobs(&self, query: &JobQuery) -> Result<Vec<JobView>> {
        self.observe("list_jobs", self.inner.list_jobs(query)).await
    }

    async fn request_cancel(&self, job_id: &str) -> Result<JobStatus> {
        self.observe("request_cancel", self.inner.request_cancel(job_id))
            .await
    }

    async fn next_due_at_ms(&self) -> Result<Option<f64>> {
        self.observe_optional("next_due_at", self.inner.next_due_at_ms())
            .await
    }

    async fn count_by_status(&self) -> Result<Option<Vec<(JobStatus, u64)>>> {
        self.observe_optional("count_by_status", self.inner.count_by_status())
            .await
    }

    async fn pending_count(&self) -> Result<Option<u64>> {
        self.observe_optional("pending_count", self.inner.pending_count())
            .await
    }

    fn can_reclaim(&self) -> bool {
        self.inner.can_reclaim()
    }

    async fn reclaim_expired(&self) -> Result<ReclaimCounts> {
        self.observe("reclaim_expired", self.inner.reclaim_expired())
            .await
    }
}
