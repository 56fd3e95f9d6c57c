//! The lease keeper: one task per in-flight job, from assignment to its final write.
//!
//! It keeps the job's lease alive every `HEARTBEAT_INTERVAL` whatever the CLI prints, turns agent
//! reports into job-source writes (status changes at once, step progress coalesced to one write per
//! `PROGRESS_INTERVAL`, both with the texts of [`crate::progress_text`]), watches for cancellation, and ends the job exactly once: completed with
//! its documents, failed (retry or dead), handed back when its agent is lost, or left canceled.
//! A run's end is journaled before the agent is released from it (the embedded store, in the
//! same database, records it directly), and the journal entry is only dropped once the job source
//! has the end: a restart or an outage delays a result, never loses it.
//! What the run does (accepted, each phase, how it ended) also goes to its attempt's history
//! through a [`Recorder`] ([`crate::history`]).

use std::{future::Future, sync::Arc, time::Duration};

use backon::{ExponentialBuilder, Retryable};
use fondation_proto::{
    limits,
    model::{CancelRun, Phase, ResultAck, RunEvent, RunOutcome, ToAgent},
};
use fondation_runtime::logging::escaped;
use tokio::{
    sync::mpsc,
    time::{interval_at, sleep_until, Instant, MissedTickBehavior},
};
use tracing::{debug, info, warn};

use crate::{
    assignments::AssignmentRecord,
    context::Context,
    history::{Outcome, Recorder, Stage},
    job_logs::JobLogs,
    job_source::{
        is_cancel_signal, ActiveStatus, Document, FailOutcome, JobResult, JobSourceError,
        ProgressUpdate,
    },
    journal::RunEnd,
};

/// Something that happened to an in-flight job.
#[derive(Debug)]
pub enum JobEvent {
    /// A report of the agent running the assignment, already checked and fenced by the gateway.
    Run(RunEvent),
    /// The agent's session ended; it may come back within the re-attach grace.
    AgentGone,
    /// The agent reconnected and still runs the assignment.
    AgentBack,
    /// The agent reconnected without the assignment: the run is lost.
    AgentLostRun,
    /// The job source handed the job out again (its lease lapsed): a newer assignment owns it,
    /// so this run stops and writes nothing more.
    Superseded,
    /// Check for cancellation now (an operator asked).
    CheckCancel,
}

/// How long a stopped run may take to report its end before its slot is freed anyway.
const STOP_REPORT_TIMEOUT: Duration = Duration::from_secs(60);
/// First wait before retrying a final write while the job source is unavailable; the waits
/// double from there up to [`FINAL_WRITE_MAX_DELAY`], and go on until shutdown.
const FINAL_WRITE_MIN_DELAY: Duration = Duration::from_secs(1);
const FINAL_WRITE_MAX_DELAY: Duration = Duration::from_secs(30);

/// How a keeper starts.
pub enum KeeperStart {
    /// The job was just assigned to its agent.
    Assigned,
    /// Recovered from the journal after a restart: the agent has to re-attach within the grace
    /// window, unless the run had already ended (then its end only needs delivering).
    Recovered { end: Option<RunEnd> },
}

pub fn spawn_keeper(
    ctx: Arc<Context>,
    record: AssignmentRecord,
    events: mpsc::UnboundedReceiver<JobEvent>,
    start: KeeperStart,
) -> tokio::task::JoinHandle<()> {
    let keeper = Keeper {
        attempt: ctx.history.recorder(&record),
        ctx,
        record,
        pending: ProgressUpdate::default(),
        last_write: None,
        documents: Vec::new(),
        result_bytes: 0,
        invalid_result: None,
        agent_gone_at: None,
        shown_step: None,
    };
    // Before the task runs: the agent's first lines must find the run.
    keeper.ctx.job_logs.run_started(&keeper.record);
    tokio::spawn(keeper.run(events, start))
}

/// How the keeper's loop ended.
enum End {
    /// The job reached its final state in the job source (or we lost it); the agent is done.
    Done,
    /// The run must be stopped on the agent; wait for it to report before freeing the slot.
    StopRun { reason: String },
    /// The coordinator is stopping: the journal keeps the job for the next start.
    Suspended,
}

struct Keeper {
    ctx: Arc<Context>,
    record: AssignmentRecord,
    /// What the attempt history learns of this run.
    attempt: Recorder,
    /// Fields to write with the next heartbeat.
    pending: ProgressUpdate,
    last_write: Option<Instant>,
    documents: Vec<Document>,
    result_bytes: u64,
    /// Why the documents received so far cannot be stored, if they cannot.
    invalid_result: Option<String>,
    agent_gone_at: Option<Instant>,
    /// The step whose text was last queued: a step's text is written once, however many lines
    /// the CLI prints during it.
    shown_step: Option<u32>,
}

impl Keeper {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<JobEvent>, start: KeeperStart) {
        let end = match start {
            KeeperStart::Recovered { end: Some(run_end) } => self.deliver(run_end).await,
            KeeperStart::Recovered { end: None } => {
                self.agent_gone_at = Some(Instant::now());
                self.keep(&mut events).await
            }
            KeeperStart::Assigned => self.keep(&mut events).await,
        };
        match end {
            End::Done => self.forget().await,
            End::StopRun { reason } => {
                self.stop_run(&reason, &mut events).await;
                self.forget().await;
            }
            End::Suspended => {
                debug!(job_id = %self.record.job_id, "keeper suspended; the journal keeps the job");
            }
        }
        self.ctx
            .job_logs
            .run_ended(&self.record.assignment_id)
            .await;
        self.ctx.assignments.remove(&self.record.assignment_id);
        self.ctx
            .agents
            .release(&self.record.agent_id, &self.record.assignment_id);
    }

    /// Drops the job from the journal once its end is recorded (or it is no longer ours), and
    /// writes the attempt's end to its history in the same transaction.
    async fn forget(&self) {
        if let Err(error) = self.attempt.finish().await {
            warn!(job_id = %self.record.job_id, %error, "could not remove the job from the journal; a restart will look at it again");
        }
    }

    /// Ends the loop with the run to stop on its agent, and the attempt's outcome.
    fn stop(&self, outcome: Outcome, reason: &str) -> End {
        self.attempt.ended(outcome, Some(reason));
        End::StopRun {
            reason: reason.to_owned(),
        }
    }

    /// The keeper's main loop, until the job's end is decided.
    async fn keep(&mut self, events: &mut mpsc::UnboundedReceiver<JobEvent>) -> End {
        let config = &self.ctx.config;
        let start = Instant::now();
        let mut heartbeat =
            interval_at(start + config.heartbeat_interval, config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut cancel_check = interval_at(
            start + config.cancel_check_interval,
            config.cancel_check_interval,
        );
        cancel_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let grace = config.reattach_grace;

        loop {
            let flush_at = self.flush_deadline();
            let gone_deadline = self.agent_gone_at.map(|at| at + grace);
            let step = tokio::select! {
                biased;
                _ = self.ctx.shutdown.cancelled() => Some(End::Suspended),
                event = events.recv() => match event {
                    Some(event) => self.on_event(event).await,
                    None => Some(End::Done),
                },
                _ = sleep_until(gone_deadline.unwrap_or(start)), if gone_deadline.is_some() => {
                    let message = format!(
                        "agent {} lost: it did not come back within the {} ms re-attach grace",
                        self.record.agent_id,
                        grace.as_millis()
                    );
                    self.attempt.ended(Outcome::Lost, Some(&message));
                    Some(self.fail(&message, true).await)
                }
                _ = heartbeat.tick() => self.write().await,
                _ = sleep_until(flush_at.unwrap_or(start)), if flush_at.is_some() => self.write().await,
                _ = cancel_check.tick() => self.check_cancel().await,
            };
            if let Some(end) = step {
                return end;
            }
        }
    }

    async fn on_event(&mut self, event: JobEvent) -> Option<End> {
        match event {
            JobEvent::Run(RunEvent::Accepted) => {
                info!(job_id = %self.record.job_id, agent_id = %self.record.agent_id, "assignment accepted");
                self.attempt.started();
                self.ctx
                    .metrics
                    .assignment_accepted(self.ctx.assignments.age(&self.record.assignment_id));
                let text = self.ctx.config.progress_language.started();
                self.set_status(ActiveStatus::Running, text.to_owned())
                    .await
            }
            JobEvent::Run(RunEvent::Phase(phase)) => {
                self.attempt.stage(Stage::from(phase));
                // A step's text still waiting for its coalescing window is written first: the
                // phase text would otherwise replace it and that step would never show.
                if self.pending.progress.is_some() {
                    if let Some(end) = self.write().await {
                        return Some(end);
                    }
                }
                let text = self.ctx.config.progress_language.phase(phase);
                self.set_status(status_of(phase), text.to_owned()).await
            }
            JobEvent::Run(RunEvent::Progress { step, message, .. }) => {
                // The CLI's own words are for the logs; the job shows the web app's text.
                debug!(job_id = %self.record.job_id, step, message = %escaped(&message), "step progress");
                if self.shown_step == Some(step) {
                    return None;
                }
                self.shown_step = Some(step);
                self.pending.current_step = Some(step);
                self.pending.progress = Some(self.ctx.config.progress_language.step(step));
                if self.flush_deadline().is_some_and(|at| at <= Instant::now()) {
                    self.write().await
                } else {
                    None
                }
            }
            JobEvent::Run(RunEvent::Document { index, document }) => {
                self.add_document(index, document);
                None
            }
            JobEvent::Run(RunEvent::Finished(outcome)) => Some(self.finish(outcome).await),
            // Never routed here: the gateway hands output lines to the job logs directly.
            JobEvent::Run(RunEvent::Output(_)) => None,
            JobEvent::AgentGone => {
                warn!(job_id = %self.record.job_id, agent_id = %self.record.agent_id, "agent gone; waiting for it to re-attach");
                self.agent_gone_at = Some(Instant::now());
                // A reconnecting agent re-sends its whole result.
                self.documents.clear();
                self.result_bytes = 0;
                self.invalid_result = None;
                None
            }
            JobEvent::AgentBack => {
                info!(job_id = %self.record.job_id, agent_id = %self.record.agent_id, "agent re-attached");
                self.agent_gone_at = None;
                JobLogs::agent_back(&self.ctx, &self.record.assignment_id);
                None
            }
            JobEvent::AgentLostRun => {
                let message = format!(
                    "agent {} reconnected without this run (it restarted)",
                    self.record.agent_id
                );
                self.attempt.ended(Outcome::Lost, Some(&message));
                Some(self.fail(&message, true).await)
            }
            JobEvent::Superseded => Some(self.stop(
                Outcome::Lost,
                "the job was claimed again after its lease lapsed",
            )),
            JobEvent::CheckCancel => self.check_cancel().await,
        }
    }

    /// When pending progress should be written: one `PROGRESS_INTERVAL` after the last write.
    fn flush_deadline(&self) -> Option<Instant> {
        if self.pending == ProgressUpdate::default() {
            return None;
        }
        Some(match self.last_write {
            Some(at) => at + self.ctx.config.progress_interval,
            None => Instant::now(),
        })
    }

    async fn set_status(&mut self, status: ActiveStatus, text: String) -> Option<End> {
        self.pending.status = Some(status);
        self.pending.progress = Some(text);
        self.write().await
    }

    /// Extends the lease and writes pending fields.
    async fn write(&mut self) -> Option<End> {
        // The source refuses to write over a canceled job (`JobSourceError::Canceled`).
        debug!(job_id = %self.record.job_id, update = ?self.pending, "heartbeat");
        let ctx = &self.ctx;
        let result = ctx
            .source
            .heartbeat(
                &self.record.job_id,
                &ctx.worker_id,
                &self.pending,
                ctx.config.lease_time,
            )
            .await;
        match result {
            Ok(()) => {
                self.pending = ProgressUpdate::default();
                self.last_write = Some(Instant::now());
                None
            }
            Err(error) => self.on_write_error(error),
        }
    }

    fn on_write_error(&mut self, error: JobSourceError) -> Option<End> {
        match error {
            JobSourceError::NotOwned { .. } => {
                warn!(job_id = %self.record.job_id, "lease lost to another worker; stopping the run");
                Some(self.stop(Outcome::Lost, "the job's lease was taken over"))
            }
            JobSourceError::Canceled(_) | JobSourceError::NotFound(_) => {
                info!(job_id = %self.record.job_id, "job canceled; stopping the run");
                self.ctx.metrics.job_canceled();
                Some(self.stop(Outcome::Canceled, "the job was canceled"))
            }
            error => {
                // Keep the pending fields: they go out with the next heartbeat.
                warn!(job_id = %self.record.job_id, %error, "heartbeat failed; will retry");
                self.last_write = Some(Instant::now());
                None
            }
        }
    }

    async fn check_cancel(&mut self) -> Option<End> {
        let view = match self.ctx.source.get_job(&self.record.job_id, false).await {
            Ok(Some(view)) => view,
            Ok(None) => return Some(self.stop(Outcome::Lost, "the job no longer exists")),
            Err(error) => {
                warn!(job_id = %self.record.job_id, %error, "could not check the job for cancellation");
                return None;
            }
        };
        if is_cancel_signal(&view) {
            info!(job_id = %self.record.job_id, status = %view.status, "job canceled; stopping the run");
            self.ctx.metrics.job_canceled();
            return Some(self.stop(Outcome::Canceled, "the job was canceled"));
        }
        let ours = view.locked_by.as_deref() == Some(self.ctx.worker_id.as_str());
        if view.status.is_terminal() || !ours {
            warn!(job_id = %self.record.job_id, status = %view.status, locked_by = ?view.locked_by, "job is no longer ours; stopping the run");
            return Some(self.stop(
                Outcome::Lost,
                "the job is no longer held by this coordinator",
            ));
        }
        None
    }

    fn add_document(&mut self, index: u32, document: Document) {
        // A result always starts at document 0: another 0 means the agent sends it again from the
        // start (it reconnected before this coordinator saw its old session end).
        if index == 0 {
            self.documents.clear();
            self.result_bytes = 0;
            self.invalid_result = None;
        }
        if self.invalid_result.is_some() {
            return;
        }
        let size = document.content.len() as u64;
        self.invalid_result = if index as usize != self.documents.len() {
            Some(format!(
                "document {index} arrived out of order (expected {})",
                self.documents.len()
            ))
        } else if self.documents.len() >= limits::MAX_DOCUMENTS {
            Some(format!(
                "more than {} documents in one result",
                limits::MAX_DOCUMENTS
            ))
        } else if size > limits::MAX_DOCUMENT_BYTES {
            Some(format!(
                "document {} is {size} bytes, over the {}-byte limit for one document",
                document.slug,
                limits::MAX_DOCUMENT_BYTES
            ))
        } else if self.result_bytes + size > limits::MAX_RESULT_BYTES {
            Some(format!(
                "the documents add up to more than the {}-byte limit for one result",
                limits::MAX_RESULT_BYTES
            ))
        } else {
            None
        };
        self.result_bytes += size;
        self.documents.push(document);
    }

    async fn finish(&mut self, outcome: RunOutcome) -> End {
        match &outcome {
            RunOutcome::Failed {
                message,
                agent_fault: true,
                ..
            } => {
                if self.release_after_agent_fault(message).await {
                    return End::Done;
                }
            }
            _ => self.ctx.agents.record_healthy_run(&self.record.agent_id),
        }
        let run_end = match outcome {
            RunOutcome::Failed {
                message, retryable, ..
            } => RunEnd::Failed { message, retryable },
            RunOutcome::Succeeded {
                document_count,
                message,
            } => {
                if let Some(problem) = self.invalid_result.take() {
                    RunEnd::Failed {
                        message: format!("the result cannot be stored: {problem}"),
                        retryable: false,
                    }
                } else if document_count as usize != self.documents.len() {
                    RunEnd::Failed {
                        message: format!(
                            "the agent announced {document_count} documents but sent {}",
                            self.documents.len()
                        ),
                        retryable: true,
                    }
                } else {
                    RunEnd::Succeeded(JobResult {
                        run_id: self.record.assignment_id.clone(),
                        message,
                        documents: std::mem::take(&mut self.documents),
                    })
                }
            }
        };
        // Durable first, then the agent may let go of its copy. Without the journal, the agent
        // keeps it until the job source has it; a source in the coordinator's own database is
        // as durable as the journal, so the end goes there directly.
        let journaled = if self.ctx.source.records_ends_locally() {
            false
        } else {
            match self
                .ctx
                .journal
                .record_end(&self.record.assignment_id, &run_end)
                .await
            {
                Ok(()) => {
                    self.ack(true, "");
                    true
                }
                Err(error) => {
                    warn!(job_id = %self.record.job_id, %error, "could not journal the result; the agent keeps it until it is delivered");
                    false
                }
            }
        };
        let end = self.deliver(run_end).await;
        if !journaled && matches!(end, End::Done) {
            self.ack(true, "");
        }
        end
    }

    /// The run failed for a reason of its agent: counts that against the agent (quarantine) and
    /// the job, and hands the job back without losing an attempt while the job has agent
    /// failures to spare and the job source can. Returns true when the job went back; otherwise
    /// the failure is recorded like any other (an attempt counts).
    async fn release_after_agent_fault(&self, message: &str) -> bool {
        let (job_id, agent_id) = (&self.record.job_id, &self.record.agent_id);
        let verdict = self
            .ctx
            .agents
            .record_agent_fault(agent_id, job_id, message);
        if !verdict.free_retry {
            warn!(job_id = %job_id, agent_id = %agent_id, job_faults = verdict.job_faults, "the job met too many agent failures; this one counts an attempt");
            return false;
        }
        match self.ctx.source.release(job_id, &self.ctx.worker_id).await {
            Ok(()) => {
                warn!(job_id = %job_id, agent_id = %agent_id, error = %escaped(message), job_faults = verdict.job_faults, "run failed for a reason of the agent; job handed back without losing an attempt, other agents first");
                self.attempt.ended(Outcome::Released, Some(message));
                self.ack(true, "");
                true
            }
            Err(JobSourceError::Unsupported(_)) => false,
            Err(error) => {
                warn!(job_id = %job_id, %error, "handing the job back failed; recording the failure instead");
                false
            }
        }
    }

    /// Records a run's end in the job source.
    async fn deliver(&mut self, run_end: RunEnd) -> End {
        match run_end {
            RunEnd::Succeeded(result) => self.complete(result).await,
            RunEnd::Failed { message, retryable } => self.fail(&message, retryable).await,
        }
    }

    async fn complete(&mut self, result: JobResult) -> End {
        self.attempt.stage(Stage::Uploading);
        let count = result.documents.len();
        let ctx = &self.ctx;
        let job_id = self.record.job_id.as_str();
        let outcome = self
            .final_write(|| ctx.source.complete(job_id, &ctx.worker_id, &result))
            .await;
        match outcome {
            Ok(()) => {
                info!(job_id = %self.record.job_id, documents = count, "job completed");
                self.attempt.ended(Outcome::Completed, None);
                self.ctx.agents.forget_job(&self.record.job_id);
                End::Done
            }
            Err(JobSourceError::TooLarge(problem)) => {
                self.fail(&format!("the result cannot be stored: {problem}"), false)
                    .await
            }
            Err(error) => self.final_error(error),
        }
    }

    /// Records a failed attempt (retry or dead), or a permanent failure.
    async fn fail(&mut self, message: &str, retryable: bool) -> End {
        let message = limits::cap_error_text(message);
        let ctx = &self.ctx;
        let job_id = self.record.job_id.as_str();
        let outcome = self
            .final_write(|| ctx.source.fail(job_id, &ctx.worker_id, &message, retryable))
            .await;
        match outcome {
            Ok(FailOutcome::Retrying {
                attempts,
                next_run_at_ms,
            }) => {
                warn!(job_id = %self.record.job_id, attempts, next_run_at_ms, error = %escaped(&message), "job failed; will be retried");
                self.attempt.ended(Outcome::Retried, Some(&message));
                End::Done
            }
            Ok(FailOutcome::Dead { attempts }) => {
                warn!(job_id = %self.record.job_id, attempts, error = %escaped(&message), "job failed for the last time; it is dead");
                self.attempt.ended(Outcome::Failed, Some(&message));
                self.ctx.agents.forget_job(&self.record.job_id);
                End::Done
            }
            Ok(FailOutcome::Failed) => {
                warn!(job_id = %self.record.job_id, error = %escaped(&message), "job failed; retrying cannot help");
                self.attempt.ended(Outcome::Failed, Some(&message));
                self.ctx.agents.forget_job(&self.record.job_id);
                End::Done
            }
            Err(error) => self.final_error(error),
        }
    }

    fn final_error(&self, error: JobSourceError) -> End {
        match error {
            JobSourceError::Canceled(_) => {
                info!(job_id = %self.record.job_id, "job was canceled before its end was recorded");
                self.attempt
                    .ended(Outcome::Canceled, Some("the job was canceled"));
                self.ctx.metrics.job_canceled();
            }
            JobSourceError::NotOwned { .. } => {
                warn!(job_id = %self.record.job_id, "job was taken over before its end was recorded; result dropped");
                self.attempt.ended(
                    Outcome::Lost,
                    Some("the job was taken over before its end was recorded"),
                );
            }
            error if error.is_transient() => {
                // Only returned once shutdown began: the journal delivers it after the restart.
                info!(job_id = %self.record.job_id, "job source unavailable at shutdown; the journal keeps the job's end");
                return End::Suspended;
            }
            error => {
                warn!(job_id = %self.record.job_id, %error, "recording the job's end failed");
                self.attempt.ended(
                    Outcome::Failed,
                    Some(&format!("recording the end failed: {error}")),
                );
            }
        }
        End::Done
    }

    /// Runs a final write (complete or fail), retrying while the job source is unavailable: a
    /// result is delayed by an outage, never dropped. Gives up only at shutdown, when a wait is
    /// cut short and the last attempt's error is returned.
    async fn final_write<T, F, Fut>(&self, call: F) -> Result<T, JobSourceError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, JobSourceError>>,
    {
        let shutdown = self.ctx.shutdown.clone();
        let backoff = ExponentialBuilder::default()
            .with_min_delay(FINAL_WRITE_MIN_DELAY)
            .with_max_delay(FINAL_WRITE_MAX_DELAY)
            .without_max_times();
        call.retry(backoff)
            .sleep(move |wait| {
                let shutdown = shutdown.clone();
                async move {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
            })
            .when(|error| error.is_transient() && !self.ctx.shutdown.is_cancelled())
            .notify(|error, wait| {
                warn!(job_id = %self.record.job_id, %error, wait_ms = wait.as_millis() as u64, "job source unavailable; retrying the final write");
            })
            .await
    }

    /// Tells the agent to stop the run and waits (bounded) for it to say it has.
    async fn stop_run(&self, reason: &str, events: &mut mpsc::UnboundedReceiver<JobEvent>) {
        self.send(ToAgent::Cancel(CancelRun {
            assignment_id: self.record.assignment_id.clone(),
            reason: reason.to_string(),
        }));
        let deadline = Instant::now() + STOP_REPORT_TIMEOUT;
        loop {
            tokio::select! {
                _ = self.ctx.shutdown.cancelled() => return,
                event = events.recv() => match event {
                    Some(JobEvent::Run(RunEvent::Finished(_))) => {
                        self.ack(false, reason);
                        return;
                    }
                    Some(JobEvent::AgentGone | JobEvent::AgentLostRun) | None => return,
                    Some(_) => {}
                },
                _ = sleep_until(deadline) => return,
            }
        }
    }

    fn ack(&self, accepted: bool, message: &str) {
        self.send(ToAgent::ResultAck(ResultAck {
            assignment_id: self.record.assignment_id.clone(),
            accepted,
            message: message.to_string(),
        }));
    }

    fn send(&self, message: ToAgent) {
        if let Some(sender) = self.ctx.agents.sender(&self.record.agent_id) {
            // A full or closed stream means the agent is going away; its re-attach sorts it out.
            let _ = sender.try_send(message);
        }
    }
}

/// The job status a run's phase shows as.
fn status_of(phase: Phase) -> ActiveStatus {
    match phase {
        Phase::Cloning => ActiveStatus::Cloning,
        Phase::Analyzing => ActiveStatus::Analyzing,
        Phase::Gathering => ActiveStatus::Gathering,
    }
}

#[cfg(test)]
mod tests;
