//! `fondation.v1.AgentGateway`: one bidirectional stream per agent.
//!
//! Authenticates the agent, registers its session, re-attaches the assignments it reports, routes
//! its reports to the lease keepers (refusing stale ones), and notices when it goes silent.

use std::{
    collections::{BTreeMap, BTreeSet},
    pin::Pin,
    sync::Arc,
};

use fondation_proto::{limits, logging::escaped, pb, settings::Secret, validate};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::{
    agents::{AgentDescription, AgentSender},
    context::Context,
    job_source::{ActiveStatus, Document, DocumentKind},
    lease::{JobEvent, RunOutcome},
};

/// Most slots one agent may announce.
const MAX_SLOTS: u32 = 64;
/// Messages queued towards one agent before sends fail.
const OUTBOUND_QUEUE: usize = 64;

pub struct Gateway {
    ctx: Arc<Context>,
}

impl Gateway {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

type OutboundStream = Pin<Box<dyn Stream<Item = Result<pb::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_gateway_server::AgentGateway for Gateway {
    type SessionStream = OutboundStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let ctx = &self.ctx;
        crate::auth::check_bearer(
            request.metadata(),
            ctx.config.agent_token.as_ref().map(Secret::expose),
            "AGENT_TOKEN",
        )?;
        if ctx.config.tls_client_ca.is_some()
            && request.peer_certs().is_none_or(|certs| certs.is_empty())
        {
            return Err(Status::unauthenticated(
                "agents must present a client certificate signed by the coordinator's TLS_CLIENT_CA \
                 (set TLS_CERT and TLS_KEY on the agent)",
            ));
        }
        if ctx.shutdown.is_cancelled() {
            return Err(Status::unavailable(
                "the coordinator is shutting down; reconnect later",
            ));
        }
        let peer = request
            .remote_addr()
            .map(|addr| addr.to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();

        let first = tokio::time::timeout(ctx.config.agent_timeout, inbound.next())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello within AGENT_TIMEOUT"))?;
        let hello = match first {
            Some(Ok(pb::AgentMessage {
                kind: Some(pb::agent_message::Kind::Hello(hello)),
            })) => hello,
            Some(Err(status)) => return Err(status),
            _ => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        let description = check_hello(&hello, peer)?;

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let welcome = pb::CoordinatorMessage {
            kind: Some(pb::coordinator_message::Kind::Welcome(pb::Welcome {
                coordinator_id: ctx.worker_id.clone(),
                heartbeat_interval_ms: ctx.config.agent_heartbeat_interval().as_millis() as u32,
            })),
        };
        tx.try_send(Ok(welcome))
            .map_err(|_| Status::internal("could not queue Welcome"))?;

        let agent_id = description.agent_id.clone();
        let adopted: BTreeSet<String> = hello
            .running
            .iter()
            .filter(|report| {
                ctx.assignments
                    .get(&report.assignment_id)
                    .is_some_and(|record| {
                        record.epoch == report.epoch && record.agent_id == agent_id
                    })
            })
            .map(|report| report.assignment_id.clone())
            .collect();
        let (session_id, replaced) =
            ctx.agents
                .connect(description.clone(), tx.clone(), adopted.clone());
        info!(agent_id = %agent_id, version = %description.version, slots = description.slots, peer = %description.peer, adopted = adopted.len(), "agent connected");
        reattach(ctx, &agent_id, &hello.running, &adopted, replaced, &tx);

        let ctx = ctx.clone();
        tokio::spawn(async move {
            let reason = read_reports(&ctx, &agent_id, &mut inbound, &tx).await;
            if let Some(running) = ctx.agents.disconnect(&agent_id, session_id) {
                warn!(agent_id = %agent_id, reason = %escaped(&reason), "agent disconnected");
                for assignment_id in running {
                    ctx.assignments.notify(&assignment_id, JobEvent::AgentGone);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn check_hello(hello: &pb::Hello, peer: String) -> Result<AgentDescription, Status> {
    if hello.protocol_version != pb::ProtocolVersion::ProtocolVersion1 as i32 {
        return Err(Status::failed_precondition(format!(
            "unsupported protocol version {}; this coordinator speaks PROTOCOL_VERSION_1",
            hello.protocol_version
        )));
    }
    validate::check_job_id(&hello.agent_id)
        .map_err(|e| Status::invalid_argument(format!("invalid agent id: {e} (set AGENT_ID)")))?;
    if hello.slots == 0 || hello.slots > MAX_SLOTS {
        return Err(Status::invalid_argument(format!(
            "agent {} announced {} slots; MAX_CONCURRENT_JOBS must be 1 to {MAX_SLOTS}",
            hello.agent_id, hello.slots
        )));
    }
    let labels: BTreeMap<String, String> = hello
        .labels
        .iter()
        .take(32)
        .map(|(k, v)| (cap(k, 64), cap(v, 256)))
        .collect();
    Ok(AgentDescription {
        agent_id: hello.agent_id.clone(),
        version: cap(&hello.version, 64),
        slots: hello.slots,
        labels,
        peer,
    })
}

fn cap(text: &str, max: usize) -> String {
    limits::truncate_utf8(text, max).to_string()
}

/// Tells the keepers of the runs a (re)connecting agent still has that it is back, stops the runs
/// it reports that are no longer its own, and ends the ones it no longer reports (it restarted).
/// `replaced` are the assignments credited to the agent's previous session.
fn reattach(
    ctx: &Context,
    agent_id: &str,
    running: &[pb::RunningAssignment],
    adopted: &BTreeSet<String>,
    replaced: BTreeSet<String>,
    tx: &AgentSender,
) {
    for report in running {
        if adopted.contains(&report.assignment_id) {
            ctx.assignments
                .notify(&report.assignment_id, JobEvent::AgentBack);
        } else {
            info!(agent_id, assignment_id = %report.assignment_id, "agent reported a run this coordinator no longer owns; stopping it");
            send(tx, refuse(&report.assignment_id, report.result_pending));
        }
    }
    let mut lost = replaced;
    lost.extend(
        ctx.assignments
            .of_agent(agent_id)
            .into_iter()
            .map(|record| record.assignment_id),
    );
    for assignment_id in lost.difference(adopted) {
        ctx.assignments
            .notify(assignment_id, JobEvent::AgentLostRun);
    }
}

/// What tells an agent to drop an assignment: a cancel for a running one, a refused
/// acknowledgement for one that only holds a result.
fn refuse(assignment_id: &str, result_pending: bool) -> pb::coordinator_message::Kind {
    let reason = "this coordinator no longer owns the assignment".to_string();
    if result_pending {
        pb::coordinator_message::Kind::ResultAck(pb::ResultAck {
            assignment_id: assignment_id.to_string(),
            accepted: false,
            message: reason,
        })
    } else {
        pb::coordinator_message::Kind::Cancel(pb::CancelAssignment {
            assignment_id: assignment_id.to_string(),
            reason,
        })
    }
}

fn send(tx: &AgentSender, kind: pb::coordinator_message::Kind) {
    let _ = tx.try_send(Ok(pb::CoordinatorMessage { kind: Some(kind) }));
}

/// Reads the agent's reports until its stream ends, errs or goes silent; returns why it ended.
async fn read_reports(
    ctx: &Context,
    agent_id: &str,
    inbound: &mut Streaming<pb::AgentMessage>,
    tx: &AgentSender,
) -> String {
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(ctx.config.agent_timeout, inbound.next()) => next,
            _ = tx.closed() => return "session replaced".into(),
            _ = ctx.sessions_closed.cancelled() => return "coordinator stopping".into(),
        };
        let message = match next {
            Err(_) => {
                return format!(
                    "silent for AGENT_TIMEOUT ({} ms)",
                    ctx.config.agent_timeout.as_millis()
                )
            }
            Ok(None) => return "stream closed".into(),
            Ok(Some(Err(status))) => return format!("stream error: {}", status.message()),
            Ok(Some(Ok(message))) => message,
        };
        ctx.agents.touch(agent_id);
        let Some(kind) = message.kind else { continue };
        let (assignment_id, epoch, event) = match into_event(kind) {
            Ok(Some(routed)) => routed,
            Ok(None) => continue,
            Err(problem) => {
                warn!(agent_id, %problem, "invalid report from agent; ignored");
                continue;
            }
        };
        let kind = EventKind::of(&event);
        if let Err(error) = ctx
            .assignments
            .route(&assignment_id, epoch, agent_id, event)
        {
            match kind {
                // Documents of a refused result: its `Finished` gets the one answer.
                EventKind::Document => debug!(agent_id, %error, "document of a stale run ignored"),
                EventKind::Finished => {
                    warn!(agent_id, %error, "result refused");
                    send(tx, refuse(&assignment_id, true));
                }
                EventKind::Other => {
                    warn!(agent_id, %error, "report refused; telling the agent to stop that run");
                    send(tx, refuse(&assignment_id, false));
                }
            }
        }
    }
}

/// What a refused report needs as an answer.
enum EventKind {
    Document,
    Finished,
    Other,
}

impl EventKind {
    fn of(event: &JobEvent) -> Self {
        match event {
            JobEvent::Document { .. } => EventKind::Document,
            JobEvent::Finished(_) => EventKind::Finished,
            _ => EventKind::Other,
        }
    }
}

/// Turns a report into a keeper event; `Ok(None)` for messages that need no routing.
fn into_event(kind: pb::agent_message::Kind) -> Result<Option<(String, u64, JobEvent)>, String> {
    use pb::agent_message::Kind;
    Ok(Some(match kind {
        Kind::Hello(_) => return Err("Hello may only be the first message".into()),
        Kind::Heartbeat(_) => return Ok(None),
        Kind::Accepted(m) => (m.assignment_id, m.epoch, JobEvent::Accepted),
        Kind::Phase(m) => {
            let status = match pb::Phase::try_from(m.phase) {
                Ok(pb::Phase::Cloning) => ActiveStatus::Cloning,
                Ok(pb::Phase::Analyzing) => ActiveStatus::Analyzing,
                Ok(pb::Phase::Gathering) => ActiveStatus::Gathering,
                _ => return Err(format!("unknown phase {}", m.phase)),
            };
            (m.assignment_id, m.epoch, JobEvent::Phase(status))
        }
        Kind::Progress(m) => {
            if m.step == 0 || m.step > m.total_steps.max(1) {
                return Err(format!(
                    "step {} of {} is out of range",
                    m.step, m.total_steps
                ));
            }
            let event = JobEvent::Progress {
                step: m.step,
                message: cap(&m.message, limits::MAX_MESSAGE_BYTES),
            };
            (m.assignment_id, m.epoch, event)
        }
        Kind::Document(m) => {
            let document = m
                .document
                .ok_or_else(|| "ResultDocument without a document".to_string())
                .and_then(into_document)?;
            let event = JobEvent::Document {
                index: m.index,
                document,
            };
            (m.assignment_id, m.epoch, event)
        }
        Kind::Finished(m) => {
            let outcome = match m.outcome {
                Some(pb::assignment_finished::Outcome::Succeeded(s)) => RunOutcome::Succeeded {
                    document_count: s.document_count,
                    message: cap(&s.message, limits::MAX_MESSAGE_BYTES),
                },
                Some(pb::assignment_finished::Outcome::Failed(f)) => RunOutcome::Failed {
                    message: cap(&f.message, limits::MAX_MESSAGE_BYTES),
                    retryable: f.retryable,
                },
                None => return Err("AssignmentFinished without an outcome".into()),
            };
            (m.assignment_id, m.epoch, JobEvent::Finished(outcome))
        }
    }))
}

/// Checks a document from the wire. Size limits are the keeper's (they fail the job, not the
/// message), names are checked here.
fn into_document(document: pb::Document) -> Result<Document, String> {
    let kind = match pb::DocumentKind::try_from(document.kind) {
        Ok(pb::DocumentKind::Chapter) => DocumentKind::Chapter,
        Ok(pb::DocumentKind::Tutorial) => DocumentKind::Tutorial,
        Ok(pb::DocumentKind::Toc) => DocumentKind::Toc,
        Ok(pb::DocumentKind::Yaml) => DocumentKind::Yaml,
        _ => return Err(format!("document {:?} has no valid kind", document.slug)),
    };
    if document.slug.is_empty() || document.slug.len() > limits::MAX_NAME_BYTES {
        return Err(format!(
            "document slug must be 1 to {} bytes",
            limits::MAX_NAME_BYTES
        ));
    }
    Ok(Document {
        slug: document.slug,
        title: cap(&document.title, limits::MAX_NAME_BYTES),
        kind,
        chapter_index: document.chapter_index,
        content: document.content,
    })
}
