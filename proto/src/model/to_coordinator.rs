//! Agent -> coordinator: what an agent says up its session stream, above all what a run reports.
//! `From<FromAgent>` builds the wire message (agent side); `TryFrom<pb::AgentMessage>` checks and
//! reads it (coordinator side): a message that breaks the contract is a [`ModelError`], texts
//! longer than the limits are cut.

use std::collections::BTreeMap;

use super::{capped, Document, ModelError};
use crate::{
    limits,
    pb::{self, agent_message::Kind},
    validate,
};

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: pb::ProtocolVersion = pb::ProtocolVersion::ProtocolVersion1;

/// One message up an agent's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromAgent {
    /// The first message of every session.
    Hello(Hello),
    /// Sent when the agent has nothing else to say, and at once when its readiness changes.
    Heartbeat {
        free_slots: u32,
        /// Why the agent takes no work (its self-check fails); `None` when it is ready.
        unready: Option<String>,
    },
    /// Something about one run.
    Report(RunReport),
}

/// Who the agent is and what it still holds. The protocol version is checked on receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Checked with [`validate::check_agent_id`].
    pub agent_id: String,
    pub version: String,
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
    /// Runs the agent still works on or holds a result of (after a reconnect).
    pub running: Vec<HeldRun>,
    /// Why the agent takes no work (its self-check fails); `None` when it is ready.
    pub unready: Option<String>,
    /// Random id of the agent process, drawn at its start: tells a reconnect of the same process
    /// from another process announcing the same agent id. Checked with
    /// [`validate::check_instance_id`].
    pub instance_id: String,
}

/// A run an agent reports as its own in `Hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldRun {
    pub assignment_id: String,
    pub job_id: String,
    pub epoch: u64,
    /// The run has ended; the agent only waits for the acknowledgement of its result.
    pub result_pending: bool,
}

/// A report about one run, fenced by its assignment id and epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    pub assignment_id: String,
    pub epoch: u64,
    pub event: RunEvent,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEvent {
    /// The agent took the assignment and started it.
    Accepted,
    Phase(Phase),
    /// The analyzer reached `step` of `total_steps` (1-based).
    Progress {
        step: u32,
        total_steps: u32,
        message: String,
    },
    /// Document `index` (0-based) of a finished run's result, sent before `Finished`.
    Document {
        index: u32,
        document: Document,
    },
    /// The run ended.
    Finished(RunOutcome),
    /// Lines of the analyzer's output, in increasing `seq` order: while the coordinator follows
    /// the run, and the unsent tail once before `Finished`.
    Output(Vec<OutputLine>),
}

/// One line of the analyzer's output, as the agent forwards it (escapes stripped, secrets
/// redacted, capped at [`limits::MAX_OUTPUT_LINE_BYTES`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// Position in the run's output from 0, across both streams; a gap means lines were dropped.
    pub seq: u64,
    pub stream: OutputStream,
    pub text: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl OutputStream {
    /// The name the Admin API and the logs show.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }
}

/// The stages of a run, as the job's status shows them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Cloning,
    Analyzing,
    Gathering,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// `document_count` documents were sent before this.
    Succeeded {
        document_count: u32,
        message: String,
    },
    /// `retryable` is false when running again cannot help. `agent_fault` is true when the
    /// failure points at the agent (the analyzer or git could not start, the disk is full), not
    /// at the job.
    Failed {
        message: String,
        retryable: bool,
        agent_fault: bool,
    },
}

impl From<Phase> for pb::Phase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Cloning => pb::Phase::Cloning,
            Phase::Analyzing => pb::Phase::Analyzing,
            Phase::Gathering => pb::Phase::Gathering,
        }
    }
}

impl From<FromAgent> for pb::AgentMessage {
    fn from(message: FromAgent) -> Self {
        let kind = match message {
            FromAgent::Hello(hello) => Kind::Hello(pb::Hello {
                agent_id: hello.agent_id,
                version: hello.version,
                slots: hello.slots,
                labels: hello.labels.into_iter().collect(),
                running: hello
                    .running
                    .into_iter()
                    .map(|run| pb::RunningAssignment {
                        assignment_id: run.assignment_id,
                        job_id: run.job_id,
                        epoch: run.epoch,
                        result_pending: run.result_pending,
                    })
                    .collect(),
                protocol_version: PROTOCOL_VERSION as i32,
                unready_reason: hello.unready.unwrap_or_default(),
                instance_id: hello.instance_id,
            }),
            FromAgent::Heartbeat {
                free_slots,
                unready,
            } => Kind::Heartbeat(pb::AgentHeartbeat {
                free_slots,
                unready_reason: unready.unwrap_or_default(),
            }),
            FromAgent::Report(report) => report_kind(report),
        };
        pb::AgentMessage { kind: Some(kind) }
    }
}

impl From<RunReport> for pb::AgentMessage {
    fn from(report: RunReport) -> Self {
        FromAgent::Report(report).into()
    }
}

fn report_kind(report: RunReport) -> Kind {
    let RunReport {
        assignment_id,
        epoch,
        event,
    } = report;
    match event {
        RunEvent::Accepted => Kind::Accepted(pb::AssignmentAccepted {
            assignment_id,
            epoch,
        }),
        RunEvent::Phase(phase) => Kind::Phase(pb::PhaseChanged {
            assignment_id,
            epoch,
            phase: pb::Phase::from(phase) as i32,
        }),
        RunEvent::Progress {
            step,
            total_steps,
            message,
        } => Kind::Progress(pb::StepProgress {
            assignment_id,
            epoch,
            step,
            total_steps,
            message,
        }),
        RunEvent::Document { index, document } => Kind::Document(pb::ResultDocument {
            assignment_id,
            epoch,
            index,
            document: Some(document.into()),
        }),
        RunEvent::Output(lines) => Kind::Output(pb::OutputLines {
            assignment_id,
            epoch,
            lines: lines
                .into_iter()
                .map(|line| pb::OutputLine {
                    seq: line.seq,
                    stream: match line.stream {
                        OutputStream::Stdout => pb::OutputStream::Stdout,
                        OutputStream::Stderr => pb::OutputStream::Stderr,
                    } as i32,
                    text: line.text,
                })
                .collect(),
        }),
        RunEvent::Finished(outcome) => Kind::Finished(pb::AssignmentFinished {
            assignment_id,
            epoch,
            outcome: Some(match outcome {
                RunOutcome::Succeeded {
                    document_count,
                    message,
                } => pb::assignment_finished::Outcome::Succeeded(pb::RunSucceeded {
                    document_count,
                    message,
                }),
                RunOutcome::Failed {
                    message,
                    retryable,
                    agent_fault,
                } => pb::assignment_finished::Outcome::Failed(pb::RunFailed {
                    message,
                    retryable,
                    agent_fault,
                }),
            }),
        }),
    }
}

impl TryFrom<pb::AgentMessage> for FromAgent {
    type Error = ModelError;

    fn try_from(message: pb::AgentMessage) -> Result<Self, ModelError> {
        let kind = message
            .kind
            .ok_or(ModelError::MissingKind("AgentMessage"))?;
        let report = |assignment_id, epoch, event| {
            FromAgent::Report(RunReport {
                assignment_id,
                epoch,
                event,
            })
        };
        Ok(match kind {
            Kind::Hello(hello) => FromAgent::Hello(hello.try_into()?),
            Kind::Heartbeat(beat) => FromAgent::Heartbeat {
                free_slots: beat.free_slots,
                unready: unready_reason(beat.unready_reason),
            },
            Kind::Accepted(m) => report(m.assignment_id, m.epoch, RunEvent::Accepted),
            Kind::Phase(m) => {
                let phase = match pb::Phase::try_from(m.phase) {
                    Ok(pb::Phase::Cloning) => Phase::Cloning,
                    Ok(pb::Phase::Analyzing) => Phase::Analyzing,
                    Ok(pb::Phase::Gathering) => Phase::Gathering,
                    _ => return Err(ModelError::UnknownPhase(m.phase)),
                };
                report(m.assignment_id, m.epoch, RunEvent::Phase(phase))
            }
            Kind::Progress(m) => {
                if m.step == 0 || m.step > m.total_steps.max(1) {
                    return Err(ModelError::StepOutOfRange {
                        step: m.step,
                        total_steps: m.total_steps,
                    });
                }
                let event = RunEvent::Progress {
                    step: m.step,
                    total_steps: m.total_steps,
                    message: capped(m.message, limits::MAX_PROGRESS_BYTES),
                };
                report(m.assignment_id, m.epoch, event)
            }
            Kind::Document(m) => {
                let document = m.document.ok_or(ModelError::MissingDocument)?.try_into()?;
                let event = RunEvent::Document {
                    index: m.index,
                    document,
                };
                report(m.assignment_id, m.epoch, event)
            }
            Kind::Finished(m) => {
                let outcome = match m.outcome.ok_or(ModelError::MissingOutcome)? {
                    pb::assignment_finished::Outcome::Succeeded(s) => RunOutcome::Succeeded {
                        document_count: s.document_count,
                        message: capped(s.message, limits::MAX_MESSAGE_BYTES),
                    },
                    pb::assignment_finished::Outcome::Failed(f) => RunOutcome::Failed {
                        message: limits::cap_error_text(&f.message).into_owned(),
                        retryable: f.retryable,
                        agent_fault: f.agent_fault,
                    },
                };
                report(m.assignment_id, m.epoch, RunEvent::Finished(outcome))
            }
            Kind::Output(m) => {
                if m.lines.len() > limits::MAX_OUTPUT_LINES_PER_MESSAGE {
                    return Err(ModelError::TooManyOutputLines(m.lines.len()));
                }
                let mut lines = Vec::with_capacity(m.lines.len());
                for line in m.lines {
                    if lines
                        .last()
                        .is_some_and(|last: &OutputLine| line.seq <= last.seq)
                    {
                        return Err(ModelError::OutputOutOfOrder(line.seq));
                    }
                    let stream = match pb::OutputStream::try_from(line.stream) {
                        Ok(pb::OutputStream::Stdout) => OutputStream::Stdout,
                        Ok(pb::OutputStream::Stderr) => OutputStream::Stderr,
                        _ => return Err(ModelError::UnknownOutputStream(line.stream)),
                    };
                    lines.push(OutputLine {
                        seq: line.seq,
                        stream,
                        text: capped(line.text, limits::MAX_OUTPUT_LINE_BYTES),
                    });
                }
                report(m.assignment_id, m.epoch, RunEvent::Output(lines))
            }
        })
    }
}

/// Checks the protocol version and the agent id. Slot bounds and label caps are the
/// coordinator's policy, applied by its gateway.
impl TryFrom<pb::Hello> for Hello {
    type Error = ModelError;

    fn try_from(hello: pb::Hello) -> Result<Self, ModelError> {
        if hello.protocol_version != PROTOCOL_VERSION as i32 {
            return Err(ModelError::UnsupportedProtocol(hello.protocol_version));
        }
        validate::check_agent_id(&hello.agent_id).map_err(ModelError::InvalidAgentId)?;
        validate::check_instance_id(&hello.instance_id).map_err(ModelError::InvalidInstanceId)?;
        Ok(Hello {
            instance_id: hello.instance_id,
            agent_id: hello.agent_id,
            version: hello.version,
            slots: hello.slots,
            labels: hello.labels.into_iter().collect(),
            running: hello
                .running
                .into_iter()
                .map(|run| HeldRun {
                    assignment_id: run.assignment_id,
                    job_id: run.job_id,
                    epoch: run.epoch,
                    result_pending: run.result_pending,
                })
                .collect(),
            unready: unready_reason(hello.unready_reason),
        })
    }
}

/// An unready reason from the wire: empty means ready; the text is capped.
fn unready_reason(reason: String) -> Option<String> {
    (!reason.is_empty()).then(|| capped(reason, limits::MAX_MESSAGE_BYTES))
}
