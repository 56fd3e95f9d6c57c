//! `fondation.v1.AgentGateway`: one bidirectional stream per agent.
//!
//! Authenticates the agent (token, client certificate and the agent id it names), registers its
//! session (one live agent process per agent id: see [`crate::agents`]), re-attaches the
//! assignments it reports, routes its reports to the lease keepers (refusing stale ones), and
//! notices when it goes silent. This is
//! the coordinator's end of the wire: messages are converted to and from the domain model
//! ([`fondation_proto::model`]) here, and a malformed one ends the session with
//! `INVALID_ARGUMENT`.

use std::{
    collections::{BTreeMap, BTreeSet},
    pin::Pin,
    sync::Arc,
};

use fondation_proto::{
    limits,
    model::{
        CancelRun, FromAgent, HeldRun, Hello, ResultAck, RunEvent, RunReport, ToAgent, Welcome,
    },
    pb,
};
use fondation_runtime::{logging::escaped, settings::Secret};
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};

use crate::{
    agents::{AgentDescription, AgentSender, ConnectError},
    context::Context,
    lease::JobEvent,
};

use fondation_proto::limits::{
    MAX_LABELS, MAX_LABEL_KEY_BYTES, MAX_LABEL_VALUE_BYTES, MAX_VERSION_BYTES,
};
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
        // The leaf certificate's agent names, when mutual TLS is on.
        let certificate_names = match ctx.config.tls_client_ca.is_some() {
            false => None,
            true => match request
                .peer_certs()
                .as_deref()
                .and_then(|certs| certs.first())
            {
                Some(leaf) => Some(crate::auth::certificate_agent_ids(leaf)?),
                None => {
                    return Err(Status::unauthenticated(
                        "agents must present a client certificate signed by the coordinator's \
                         TLS_CLIENT_CA (set TLS_CERT and TLS_KEY on the agent)",
                    ))
                }
            },
        };
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
            Some(Ok(message)) => match FromAgent::try_from(message)? {
                FromAgent::Hello(hello) => hello,
                _ => return Err(Status::invalid_argument("the first message must be Hello")),
            },
            Some(Err(status)) => return Err(status),
            None => return Err(Status::invalid_argument("the first message must be Hello")),
        };
        if let Some(names) = &certificate_names {
            crate::auth::check_certificate_names(names, &hello.agent_id)?;
        }
        let description = check_hello(&hello, peer, ctx.config.max_agent_slots)?;

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let welcome = ToAgent::Welcome(Welcome {
            coordinator_id: ctx.worker_id.clone(),
            heartbeat_interval: ctx.config.agent_heartbeat_interval(),
        });
        tx.try_send(welcome)
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
        let (session_id, replaced) = ctx
            .agents
            .connect(description.clone(), tx.clone(), adopted.clone())
            .map_err(|error| {
                let ConnectError::HeldByAnother {
                    holder_instance, ..
                } = &error;
                warn!(agent_id = %agent_id, instance_id = %description.instance_id, holder_instance_id = %holder_instance, peer = %description.peer, "refused a second agent process with the id of a live one");
                Status::already_exists(error.to_string())
            })?;
        info!(agent_id = %agent_id, instance_id = %description.instance_id, version = %escaped(&description.version), slots = description.slots, peer = %description.peer, adopted = adopted.len(), "agent connected");
        reattach(ctx, &agent_id, &hello.running, &adopted, replaced, &tx);

        // A protocol violation ends the response stream with its status.
        let (violation_tx, violation_rx) = oneshot::channel::<Status>();
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let (reason, violation) = match read_reports(&ctx, &agent_id, &mut inbound, &tx).await {
                Ok(reason) => (reason, None),
                Err(status) => {
                    warn!(agent_id = %agent_id, error = %status.message(), "invalid message from agent; closing its session");
                    (
                        format!("invalid message: {}", status.message()),
                        Some(status),
                    )
                }
            };
            if let Some(running) = ctx.agents.disconnect(&agent_id, session_id) {
                warn!(agent_id = %agent_id, reason = %escaped(&reason), "agent disconnected");
                for assignment_id in running {
                    ctx.assignments.notify(&assignment_id, JobEvent::AgentGone);
                }
            }
            // Told only once its session is gone, so the agent's reconnect finds a clean slate.
            if let Some(status) = violation {
                let _ = violation_tx.send(status);
            }
        });
        let messages = ReceiverStream::new(rx).map(|message| Ok(message.into()));
        let violation = futures::stream::once(violation_rx)
            .filter_map(|status| status.ok().map(Err::<pb::CoordinatorMessage, Status>));
        Ok(Response::new(Box::pin(messages.merge(violation))))
    }
}

/// The coordinator's policy on what an agent may announce (the model checked the protocol
/// version, the agent id and the instance id): at most `max_slots` (`MAX_AGENT_SLOTS`) slots.
fn check_hello(hello: &Hello, peer: String, max_slots: u32) -> Result<AgentDescription, Status> {
    if hello.slots == 0 || hello.slots > max_slots {
        return Err(Status::invalid_argument(format!(
            "agent {} announced {} slots; MAX_CONCURRENT_JOBS must be 1 to {max_slots} (the \
             coordinator's MAX_AGENT_SLOTS)",
            hello.agent_id, hello.slots
        )));
    }
    let labels: BTreeMap<String, String> = hello
        .labels
        .iter()
        .take(MAX_LABELS)
        .map(|(k, v)| (cap(k, MAX_LABEL_KEY_BYTES), cap(v, MAX_LABEL_VALUE_BYTES)))
        .collect();
    Ok(AgentDescription {
        agent_id: hello.agent_id.clone(),
        instance_id: hello.instance_id.clone(),
        version: cap(&hello.version, MAX_VERSION_BYTES),
        slots: hello.slots,
        labels,
        peer,
        unready: hello.unready.clone(),
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
    running: &[HeldRun],
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
fn refuse(assignment_id: &str, result_pending: bool) -> ToAgent {
    let reason = "this coordinator no longer owns the assignment".to_string();
    let assignment_id = assignment_id.to_string();
    if result_pending {
        ToAgent::ResultAck(ResultAck {
            assignment_id,
            accepted: false,
            message: reason,
        })
    } else {
        ToAgent::Cancel(CancelRun {
            assignment_id,
            reason,
        })
    }
}

fn send(tx: &AgentSender, message: ToAgent) {
    let _ = tx.try_send(message);
}

/// Reads the agent's reports until its stream ends, errs or goes silent; returns why it ended, or
/// the status that ends it when the agent broke the protocol.
async fn read_reports(
    ctx: &Context,
    agent_id: &str,
    inbound: &mut Streaming<pb::AgentMessage>,
    tx: &AgentSender,
) -> Result<String, Status> {
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(ctx.config.agent_timeout, inbound.next()) => next,
            _ = tx.closed() => return Ok("session replaced".into()),
            _ = ctx.sessions_closed.cancelled() => return Ok("coordinator stopping".into()),
        };
        let message = match next {
            Err(_) => {
                return Ok(format!(
                    "silent for AGENT_TIMEOUT ({} ms)",
                    ctx.config.agent_timeout.as_millis()
                ))
            }
            Ok(None) => return Ok("stream closed".into()),
            Ok(Some(Err(status))) => return Ok(format!("stream error: {}", status.message())),
            Ok(Some(Ok(message))) => message,
        };
        ctx.agents.touch(agent_id);
        let RunReport {
            assignment_id,
            epoch,
            event,
        } = match FromAgent::try_from(message)? {
            FromAgent::Report(report) => report,
            FromAgent::Heartbeat { unready, .. } => {
                ctx.agents.set_unready(agent_id, unready);
                continue;
            }
            FromAgent::Hello(_) => {
                return Err(Status::invalid_argument(
                    "Hello may only be the first message",
                ))
            }
        };
        let kind = EventKind::of(&event);
        let routed = match event {
            // Straight to the job logs: a flood of lines never queues behind the keeper's writes.
            RunEvent::Output(lines) => ctx
                .assignments
                .check(&assignment_id, epoch, agent_id)
                .map(|()| ctx.job_logs.append(&assignment_id, lines)),
            event => ctx
                .assignments
                .route(&assignment_id, epoch, agent_id, JobEvent::Run(event)),
        };
        if let Err(error) = routed {
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
    fn of(event: &RunEvent) -> Self {
        match event {
            RunEvent::Document { .. } => EventKind::Document,
            RunEvent::Finished(_) => EventKind::Finished,
            _ => EventKind::Other,
        }
    }
}

#[cfg(test)]
mod tests;
