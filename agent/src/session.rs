//! The agent's session with the coordinator: dial out, say who we are and what we still run,
//! take assignments, stream reports, hold results until acknowledged, and reconnect with
//! exponential backoff and jitter whenever the coordinator is not there.
//!
//! This is the agent's end of the wire: messages are converted to and from the domain model
//! ([`fondation_proto::model`]) here and nowhere else.

use std::{collections::HashMap, sync::Arc, time::Duration};

use backon::{BackoffBuilder, ExponentialBuilder};
use fondation_proto::{
    limits::MAX_OUTPUT_LINES_PER_MESSAGE,
    model::{Assignment, FromAgent, HeldRun, Hello, RunEvent, RunOutcome, RunReport, ToAgent},
    pb::{self, agent_gateway_client::AgentGatewayClient},
};
use fondation_runtime::logging::escaped;
use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    metadata::MetadataValue,
    transport::{Channel, ClientTlsConfig, Endpoint},
    Request, Status, Streaming,
};
use tracing::{debug, error, info, warn};

use crate::{
    health::HealthState,
    metrics::RunTimer,
    output_tail::OutputTail,
    redact::Redactor,
    runner::{run_assignment, RunnerContext},
    self_check::Readiness,
};

/// Wait for the coordinator's `Welcome` after `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an exiting agent waits for the coordinator to close the stream.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages queued towards the coordinator.
const OUTBOUND_QUEUE: usize = 256;
/// Shortest heartbeat interval honoured, whatever `Welcome` asks for.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(100);
/// Followed output is sent only while the outbound queue holds at most this many messages: a
/// flood of lines never queues ahead of heartbeats and results, nor piles up in memory (each
/// batch is up to 200 lines of 4 KiB); what the stream cannot take is dropped by the run's
/// bounded tail instead ([`crate::output_tail`]).
const OUTPUT_MESSAGES_QUEUED: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid COORDINATOR_URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("cannot reach the coordinator at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("the coordinator refused the session: {0}")]
    Refused(String),
    /// Another live agent holds our AGENT_ID, or our client certificate names another id: an
    /// operator must fix the configuration; retried with the usual backoff meanwhile.
    #[error("the coordinator refused this agent's identity: {0}")]
    Identity(String),
}

/// A run this agent owns, from assignment to acknowledged result.
struct RunEntry {
    job_id: String,
    epoch: u64,
    cancel: CancellationToken,
    /// The run's documents and its `Finished`, once it has ended: re-sent after a reconnect until
    /// the coordinator acknowledges them.
    result: Option<Vec<RunReport>>,
    /// Documents (and the last output lines) reported so far, collected into `result` when
    /// `Finished` arrives.
    partial: Vec<RunReport>,
    /// Times the run's phases for the metrics.
    timer: RunTimer,
    /// The analyzer's output lines, sent while the coordinator follows the run and before its end.
    output: OutputTail,
}

/// How a session ended.
enum SessionEnd {
    /// Lost the coordinator: reconnect.
    Lost(String),
    /// Shut down and nothing left to run.
    Done,
}

pub struct Agent {
    ctx: Arc<RunnerContext>,
    agent_id: String,
    /// Random per process: a reconnect of ours replaces our old session, another process with
    /// the same AGENT_ID is refused while we are connected.
    instance_id: String,
    /// TLS towards the coordinator, for an https:// COORDINATOR_URL.
    tls: Option<ClientTlsConfig>,
    health: HealthState,
    /// The self-check's verdict: no work while it fails.
    readiness: Readiness,
    runs: HashMap<String, RunEntry>,
    reports_tx: mpsc::UnboundedSender<RunReport>,
    reports: mpsc::UnboundedReceiver<RunReport>,
    /// Notified when a followed run has new output lines to send.
    output_ready: Arc<Notify>,
    /// No new assignments: drained by an operator or shutting down.
    draining: bool,
    /// Running jobs were told to stop (grace over, or a second signal).
    stopping_all: bool,
}

/// The two steps of stopping an agent.
#[derive(Clone, Default)]
pub struct Shutdown {
    /// Take no new work; let running jobs finish.
    pub drain: CancellationToken,
    /// Stop running jobs now and hand them back (SHUTDOWN_GRACE over, or a second signal).
    pub now: CancellationToken,
}

impl Agent {
    pub fn new(
        ctx: Arc<RunnerContext>,
        agent_id: String,
        tls: Option<ClientTlsConfig>,
        health: HealthState,
        readiness: Readiness,
    ) -> Self {
        let (reports_tx, reports) = mpsc::unbounded_channel();
        Self {
            ctx,
            agent_id,
            instance_id: uuid::Uuid::new_v4().simple().to_string(),
            tls,
            health,
            readiness,
            runs: HashMap::new(),
            reports_tx,
            reports,
            output_ready: Arc::new(Notify::new()),
            draining: false,
            stopping_all: false,
        }
    }

    fn slots(&self) -> u32 {
        self.ctx.config.max_concurrent_jobs
    }

    /// Slots that may take work now: none while the self-check fails.
    fn free_slots(&self) -> u32 {
        if self.readiness.unready().is_some() {
            return 0;
        }
        self.slots().saturating_sub(self.runs.len() as u32)
    }

    fn heartbeat(&self) -> FromAgent {
        FromAgent::Heartbeat {
            free_slots: self.free_slots(),
            unready: self.readiness.unready(),
        }
    }

    /// Runs sessions until `shutdown.drain` and then until the running jobs have ended, or were
    /// stopped and handed back once `shutdown.now` fired.
    pub async fn run(mut self, shutdown: Shutdown) {
        let mut backoff = self.backoff();
        // Since when the coordinator has been unreachable (reset whenever a session ends).
        let mut offline_since = tokio::time::Instant::now();
        loop {
            if shutdown.drain.is_cancelled() && self.runs.is_empty() {
                break;
            }
            match self.connect().await {
                Ok((outbound, inbound, heartbeat)) => {
                    backoff = self.backoff();
                    self.health.set_connected(true).await;
                    let _session = self.ctx.metrics.session_opened();
                    let end = self.serve(outbound, inbound, heartbeat, &shutdown).await;
                    self.health.set_connected(false).await;
                    offline_since = tokio::time::Instant::now();
                    match end {
                        SessionEnd::Done => break,
                        SessionEnd::Lost(reason) => {
                            warn!(reason = %escaped(&reason), "lost the coordinator; reconnecting")
                        }
                    }
                }
                Err(error) => {
                    let wait = backoff
                        .next()
                        .unwrap_or(self.ctx.config.reconnect_max_backoff);
                    match &error {
                        SessionError::Identity(_) => {
                            error!(%error, agent_id = %self.agent_id, instance_id = %self.instance_id, retry_in_ms = wait.as_millis() as u64, "this agent cannot take its AGENT_ID; retrying")
                        }
                        _ => {
                            warn!(%error, retry_in_ms = wait.as_millis() as u64, "connecting to the coordinator failed")
                        }
                    }
                    if self.wait_offline(wait, &shutdown).await {
                        break;
                    }
                    if offline_since.elapsed() >= self.ctx.config.detach_timeout {
                        self.detach();
                    }
                }
            }
        }
        info!("agent stopped");
    }

    fn backoff(&self) -> backon::ExponentialBackoff {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(self.ctx.config.reconnect_max_backoff)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Reacts to the shutdown signals; call whenever one of them may have fired.
    async fn on_shutdown_signal(&mut self, shutdown: &Shutdown) {
        if shutdown.drain.is_cancelled() && !self.draining {
            self.draining = true;
            self.health.set_draining().await;
            info!(
                running = self.runs.len(),
                "shutting down: no new jobs; running jobs may finish within SHUTDOWN_GRACE"
            );
        }
        if shutdown.now.is_cancelled() && !self.stopping_all {
            self.stopping_all = true;
            warn!(
                running = self.runs.len(),
                "stopping running jobs now and handing them back"
            );
            for run in self.runs.values() {
                if run.result.is_none() {
                    run.cancel.cancel();
                }
            }
        }
    }

    /// Offline past DETACH_TIMEOUT: the coordinator has given these jobs to others, so the runs
    /// stop and their results are dropped.
    fn detach(&mut self) {
        if self.runs.is_empty() {
            return;
        }
        warn!(
            runs = self.runs.len(),
            timeout_ms = self.ctx.config.detach_timeout.as_millis() as u64,
            "coordinator unreachable past DETACH_TIMEOUT: stopping runs and dropping their results"
        );
        for (_, run) in self.runs.drain() {
            run.cancel.cancel();
        }
    }

    /// While disconnected: keep collecting run reports (results are held), for `wait` at most.
    /// Returns true when the agent should exit (shutting down, and every run has ended: results
    /// cannot be delivered while the coordinator is away, and it will retry those jobs).
    async fn wait_offline(&mut self, wait: Duration, shutdown: &Shutdown) -> bool {
        let until = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return false,
                _ = shutdown.drain.cancelled(), if !self.draining => {}
                _ = shutdown.now.cancelled(), if !self.stopping_all => {}
                Some(report) = self.reports.recv() => {
                    // Held with the result; sent once the coordinator is back.
                    self.record_report(report);
                }
            }
            self.on_shutdown_signal(shutdown).await;
            if self.draining && self.runs.values().all(|run| run.result.is_some()) {
                if !self.runs.is_empty() {
                    warn!(results = self.runs.len(), "exiting with results the coordinator never acknowledged; it will retry those jobs");
                }
                return true;
            }
        }
    }

    async fn connect(
        &mut self,
    ) -> Result<
        (
            mpsc::Sender<pb::AgentMessage>,
            Streaming<pb::CoordinatorMessage>,
            Duration,
        ),
        SessionError,
    > {
        let url = self.ctx.config.coordinator_url.clone();
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| SessionError::Url {
                url: url.clone(),
                message: e.to_string(),
            })?
            .connect_timeout(Duration::from_secs(5))
            // Explicit, as on the coordinator's side: small messages must not wait for Nagle.
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.ctx.config.keepalive_interval)
            .keep_alive_timeout(self.ctx.config.keepalive_interval * 2)
            .keep_alive_while_idle(true);
        let endpoint = match &self.tls {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| SessionError::Url {
                    url: url.clone(),
                    // `{:#}` writes the error and its causes, joined by ": ".
                    message: format!("{:#}", anyhow::Error::new(e)),
                })?,
            None => endpoint,
        };
        let channel: Channel = endpoint
            .connect()
            .await
            .map_err(|e| SessionError::Connect {
                url: url.clone(),
                message: format!("{:#}", anyhow::Error::new(e)),
            })?;
        let mut client = AgentGatewayClient::new(channel)
            .max_decoding_message_size(fondation_proto::limits::MAX_AGENT_INBOUND_MESSAGE_BYTES);

        let (outbound, outbound_rx) = mpsc::channel(OUTBOUND_QUEUE);
        outbound
            .send(FromAgent::Hello(self.hello()).into())
            .await
            .map_err(|_| SessionError::Refused("outbound queue closed".into()))?;
        let mut request = Request::new(ReceiverStream::new(outbound_rx));
        if let Some(token) = &self.ctx.config.agent_token {
            let value =
                MetadataValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
                    SessionError::Refused("AGENT_TOKEN is not a valid header value".into())
                })?;
            request.metadata_mut().insert("authorization", value);
        }
        let mut inbound = client.session(request).await.map_err(refusal)?.into_inner();
        let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
            .await
            .map_err(|_| SessionError::Refused("no Welcome from the coordinator".into()))?
            .map_err(refusal)?;
        let Some(Ok(ToAgent::Welcome(welcome))) = first.map(ToAgent::try_from) else {
            return Err(SessionError::Refused(
                "the coordinator did not answer Hello with Welcome".into(),
            ));
        };
        info!(coordinator = %welcome.coordinator_id, url = %url, "connected to the coordinator");
        let heartbeat = welcome.heartbeat_interval.max(MIN_HEARTBEAT_INTERVAL);
        Ok((outbound, inbound, heartbeat))
    }

    /// Who we are, and the runs we still work on or hold a result of.
    fn hello(&self) -> Hello {
        Hello {
            agent_id: self.agent_id.clone(),
            instance_id: self.instance_id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            slots: self.slots(),
            labels: Default::default(),
            running: self
                .runs
                .iter()
                .map(|(assignment_id, run)| HeldRun {
                    assignment_id: assignment_id.clone(),
                    job_id: run.job_id.clone(),
                    epoch: run.epoch,
                    result_pending: run.result.is_some(),
                })
                .collect(),
            unready: self.readiness.unready(),
        }
    }

    /// What a new session sends again first: the reports of every ended run not yet
    /// acknowledged (documents, then `Finished`), and the documents already reported of a run
    /// whose end has not come yet (its `Finished` then follows on the new session). The
    /// coordinator starts a result over at its document 0, so documents it already had from the
    /// old session are replaced, not counted twice.
    fn held_results(&self) -> Vec<RunReport> {
        self.runs
            .values()
            .flat_map(|run| match &run.result {
                Some(result) => result.clone(),
                None => run
                    .partial
                    .iter()
                    .filter(|report| matches!(report.event, RunEvent::Document { .. }))
                    .cloned()
                    .collect(),
            })
            .collect()
    }

    async fn serve(
        &mut self,
        outbound: mpsc::Sender<pb::AgentMessage>,
        mut inbound: impl Stream<Item = Result<pb::CoordinatorMessage, Status>> + Unpin,
        heartbeat_every: Duration,
        shutdown: &Shutdown,
    ) -> SessionEnd {
        // The coordinator follows nothing on a new session, and may have lost lines of the last.
        for run in self.runs.values() {
            run.output.new_session();
        }
        // Results that ended while we were away go out again.
        for report in self.held_results() {
            debug!(assignment_id = %report.assignment_id, "re-sending a held result");
            if outbound.send(report.into()).await.is_err() {
                return SessionEnd::Lost("the outbound stream closed".into());
            }
        }
        let mut heartbeat = tokio::time::interval(heartbeat_every);
        let mut readiness = self.readiness.subscribe();
        readiness.mark_unchanged();
        loop {
            self.on_shutdown_signal(shutdown).await;
            if self.draining && shutdown.drain.is_cancelled() && self.runs.is_empty() {
                // End our half of the stream and let the coordinator close its half, so it sees a
                // clean goodbye rather than a broken connection.
                drop(outbound);
                let goodbye = async { while let Some(Ok(_)) = inbound.next().await {} };
                let _ = tokio::time::timeout(GOODBYE_TIMEOUT, goodbye).await;
                return SessionEnd::Done;
            }
            let forwarding = self
                .runs
                .values()
                .any(|run| run.output.has_lines_to_forward());
            // Free room in the outbound queue that leaves at most OUTPUT_MESSAGES_QUEUED in it.
            let room = outbound
                .max_capacity()
                .saturating_sub(OUTPUT_MESSAGES_QUEUED)
                .max(1);
            tokio::select! {
                message = inbound.next() => match message.map(|m| m.map(ToAgent::try_from)) {
                    Some(Ok(Ok(message))) => self.on_message(message, &outbound).await,
                    // A kind this agent does not know (a newer coordinator): not ours to act on.
                    Some(Ok(Err(error))) => warn!(%error, "message from the coordinator ignored"),
                    None => return SessionEnd::Lost("the coordinator closed the stream".into()),
                    Some(Err(status)) => return SessionEnd::Lost(format!("stream error: {}", status.message())),
                },
                Some(report) = self.reports.recv() => {
                    let reports = self.record_report(report);
                    // A run that failed for a reason of the agent made it unready: the coordinator
                    // hears that before the failure, so it does not hand this agent the next job.
                    if readiness.has_changed().unwrap_or(false) {
                        readiness.mark_unchanged();
                        if outbound.send(self.heartbeat().into()).await.is_err() {
                            return SessionEnd::Lost("the outbound stream closed".into());
                        }
                    }
                    for report in reports {
                        if outbound.send(report.into()).await.is_err() {
                            return SessionEnd::Lost("the outbound stream closed".into());
                        }
                    }
                }
                // New lines of a followed run: looked at on the next turn.
                _ = self.output_ready.notified() => {}
                Ok(permits) = outbound.reserve_many(room), if forwarding => {
                    drop(permits);
                    if !self.forward_output(&outbound).await {
                        return SessionEnd::Lost("the outbound stream closed".into());
                    }
                }
                _ = heartbeat.tick() => {
                    if outbound.send(self.heartbeat().into()).await.is_err() {
                        return SessionEnd::Lost("the outbound stream closed".into());
                    }
                }
                // The coordinator hears of a change of readiness at once, not a heartbeat later.
                Ok(()) = readiness.changed() => {
                    readiness.mark_unchanged();
                    if outbound.send(self.heartbeat().into()).await.is_err() {
                        return SessionEnd::Lost("the outbound stream closed".into());
                    }
                }
                _ = shutdown.drain.cancelled(), if !self.draining => {}
                _ = shutdown.now.cancelled(), if !self.stopping_all => {}
            }
        }
    }

    async fn on_message(&mut self, message: ToAgent, outbound: &mpsc::Sender<pb::AgentMessage>) {
        match message {
            ToAgent::Assignment(assignment) => self.accept(*assignment, outbound).await,
            ToAgent::Cancel(cancel) => match self.runs.get(&cancel.assignment_id) {
                Some(run) if run.result.is_some() => {
                    self.runs.remove(&cancel.assignment_id);
                }
                Some(run) => {
                    info!(job_id = %run.job_id, reason = %escaped(&cancel.reason), "stopping a run at the coordinator's request");
                    run.cancel.cancel();
                }
                None => debug!(assignment_id = %cancel.assignment_id, "cancel for an unknown run"),
            },
            ToAgent::ResultAck(ack) => {
                if let Some(mut run) = self.runs.remove(&ack.assignment_id) {
                    run.timer.acknowledged();
                    run.cancel.cancel();
                    if ack.accepted {
                        info!(job_id = %run.job_id, "result acknowledged");
                    } else {
                        warn!(job_id = %run.job_id, reason = %escaped(&ack.message), "result refused by the coordinator; dropped");
                    }
                }
            }
            ToAgent::Drain(drain) => {
                info!(reason = %escaped(&drain.reason), "draining: no new jobs");
                self.draining = true;
                self.health.set_draining().await;
            }
            ToAgent::Welcome(_) => warn!("unexpected Welcome mid-session; ignored"),
            ToAgent::FollowOutput(follow) => match self.runs.get(&follow.assignment_id) {
                // An ended run already sent its last lines.
                Some(run) if run.epoch == follow.epoch && run.result.is_none() => {
                    debug!(job_id = %run.job_id, follow = follow.follow, "output follow changed");
                    run.output.follow(follow.follow);
                }
                _ => {
                    debug!(assignment_id = %follow.assignment_id, "follow request for no running run")
                }
            },
        }
    }

    async fn accept(&mut self, assignment: Assignment, outbound: &mpsc::Sender<pb::AgentMessage>) {
        let unready = self.readiness.unready();
        let refusal = if self.draining {
            Some("the agent is draining")
        } else if unready.is_some() {
            Some("the agent is not ready (its self-check fails)")
        } else if self.free_slots() == 0 {
            Some("the agent has no free slot")
        } else if self.runs.contains_key(&assignment.assignment_id) {
            Some("duplicate assignment id")
        } else {
            None
        };
        if let Some(reason) = refusal {
            warn!(job_id = %assignment.job_id, reason, "assignment refused");
            let refused = RunReport {
                assignment_id: assignment.assignment_id,
                epoch: assignment.epoch,
                event: RunEvent::Finished(RunOutcome::Failed {
                    message: match &unready {
                        Some(why) => format!("assignment refused: {reason}: {why}"),
                        None => format!("assignment refused: {reason}"),
                    },
                    retryable: true,
                    // Not the job's fault: it loses no attempt where the job source allows.
                    agent_fault: unready.is_some(),
                }),
            };
            let _ = outbound.send(refused.into()).await;
            return;
        }
        let cancel = CancellationToken::new();
        let redactor = Redactor::for_run(
            self.ctx
                .config
                .agent_token
                .as_ref()
                .map(|token| token.expose()),
            assignment.clone_credential.as_ref(),
            &self.ctx.sandbox.analyzer_env(&self.ctx.workspace_root, 0),
        );
        let output = OutputTail::new(redactor, self.output_ready.clone());
        self.runs.insert(
            assignment.assignment_id.clone(),
            RunEntry {
                job_id: assignment.job_id.clone(),
                epoch: assignment.epoch,
                cancel: cancel.clone(),
                result: None,
                partial: Vec::new(),
                timer: self.ctx.metrics.run_started(),
                output: output.clone(),
            },
        );
        tokio::spawn(run_assignment(
            self.ctx.clone(),
            assignment,
            self.reports_tx.clone(),
            output,
            cancel,
        ));
    }

    /// Sends one batch of new output lines of each followed run; false when the stream closed.
    async fn forward_output(&self, outbound: &mpsc::Sender<pb::AgentMessage>) -> bool {
        for (assignment_id, run) in &self.runs {
            if !run.output.has_lines_to_forward() {
                continue;
            }
            let lines = run.output.take_unsent(MAX_OUTPUT_LINES_PER_MESSAGE);
            let report = RunReport {
                assignment_id: assignment_id.clone(),
                epoch: run.epoch,
                event: RunEvent::Output(lines),
            };
            if outbound.send(report.into()).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Records a run's report, preceded by the run's output lines not sent yet when it is the
    /// run's `Finished` (so the coordinator keeps the last lines of every run); returns the
    /// reports to send, in order.
    fn record_report(&mut self, report: RunReport) -> Vec<RunReport> {
        let mut reports = Vec::new();
        if let (RunEvent::Finished(_), Some(run)) =
            (&report.event, self.runs.get(&report.assignment_id))
        {
            loop {
                let lines = run.output.take_unsent(MAX_OUTPUT_LINES_PER_MESSAGE);
                if lines.is_empty() {
                    break;
                }
                reports.push(RunReport {
                    assignment_id: report.assignment_id.clone(),
                    epoch: report.epoch,
                    event: RunEvent::Output(lines),
                });
            }
        }
        reports.push(report);
        for report in &reports {
            self.record(report);
        }
        reports
    }

    /// Keeps what must survive a disconnect: the documents, the last output lines and the end
    /// of each run.
    fn record(&mut self, report: &RunReport) {
        let Some(run) = self.runs.get_mut(&report.assignment_id) else {
            return;
        };
        run.timer.observe(&report.event);
        match &report.event {
            RunEvent::Document { .. } | RunEvent::Output(_) => run.partial.push(report.clone()),
            RunEvent::Finished(outcome) => {
                if let RunOutcome::Failed {
                    message,
                    agent_fault: true,
                    ..
                } = outcome
                {
                    self.readiness.recheck(message);
                }
                let mut result = std::mem::take(&mut run.partial);
                result.push(report.clone());
                run.result = Some(result);
            }
            _ => {}
        }
    }
}

/// The error for a session the coordinator closed with `status`.
fn refusal(status: Status) -> SessionError {
    let message = escaped(status.message()).to_string();
    match status.code() {
        tonic::Code::AlreadyExists | tonic::Code::PermissionDenied => {
            SessionError::Identity(message)
        }
        _ => SessionError::Refused(message),
    }
}

#[cfg(test)]
mod tests;
