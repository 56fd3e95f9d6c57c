//! Coordinator -> agent: what the coordinator tells an agent down its session stream.
//! `From<ToAgent>` builds the wire message (coordinator side); `TryFrom<pb::CoordinatorMessage>`
//! reads it back (agent side).

use std::{fmt, time::Duration};

use super::ModelError;
use crate::pb::{self, coordinator_message::Kind};

/// One message down an agent's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToAgent {
    /// The answer to `Hello`.
    Welcome(Welcome),
    /// Run a job. Boxed: it is by far the largest message, and every agent's outbound queue on
    /// the coordinator allocates its slots at the size of the largest variant.
    Assignment(Box<Assignment>),
    /// Stop a run (or drop a held result).
    Cancel(CancelRun),
    /// Take no new assignments.
    Drain(Drain),
    /// The answer to a finished run.
    ResultAck(ResultAck),
    /// Start or stop forwarding a run's output lines.
    FollowOutput(FollowOutput),
}

/// While `follow` is true the agent sends its kept tail of the run's output, then each new line;
/// otherwise it only keeps a bounded tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowOutput {
    pub assignment_id: String,
    pub epoch: u64,
    pub follow: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The coordinator's identity (`WORKER_ID`).
    pub coordinator_id: String,
    /// How often the agent should send a heartbeat when it has nothing else to say.
    pub heartbeat_interval: Duration,
}

/// A job to run. Carries no job-source credential or callback token; the only secret is the
/// job's own clone credential, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// Unique per handing-out of a job; every report about the run carries it.
    pub assignment_id: String,
    pub job_id: String,
    /// Checked against `REPO_ALLOWLIST` on both sides.
    pub repo_url: String,
    /// Checked against git's ref rules on both sides.
    pub branch: String,
    pub prompt: String,
    /// 1 for the first attempt of the job.
    pub attempt: u32,
    /// Fencing token: reports with an older epoch than the job's current one are refused.
    pub epoch: u64,
    /// Token git presents to clone a private repository; `None` clones anonymously.
    pub clone_credential: Option<CloneCredential>,
}

/// A token that lets git clone one job's private repository (a GitHub token). Kept in memory
/// only; `Debug` never shows it, and [`CloneCredential::expose`] is the one way to read it.
#[derive(Clone, PartialEq, Eq)]
pub struct CloneCredential(String);

impl CloneCredential {
    pub fn new(token: String) -> Self {
        CloneCredential(token)
    }

    /// The token itself: for the HTTP header git sends, nowhere else.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CloneCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CloneCredential(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRun {
    pub assignment_id: String,
    /// Why, for the agent's log.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drain {
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultAck {
    pub assignment_id: String,
    /// False when the result was refused; the agent drops it either way.
    pub accepted: bool,
    /// Why it was refused, when it was.
    pub message: String,
}

impl From<ToAgent> for pb::CoordinatorMessage {
    fn from(message: ToAgent) -> Self {
        let kind = match message {
            ToAgent::Welcome(w) => Kind::Welcome(pb::Welcome {
                coordinator_id: w.coordinator_id,
                heartbeat_interval_ms: u32::try_from(w.heartbeat_interval.as_millis())
                    .unwrap_or(u32::MAX),
            }),
            ToAgent::Assignment(a) => Kind::Assignment(pb::Assignment {
                assignment_id: a.assignment_id,
                job_id: a.job_id,
                repo_url: a.repo_url,
                branch: a.branch,
                prompt: a.prompt,
                attempt: a.attempt,
                epoch: a.epoch,
                clone_credential: a
                    .clone_credential
                    .map(|credential| credential.0)
                    .unwrap_or_default(),
            }),
            ToAgent::Cancel(c) => Kind::Cancel(pb::CancelAssignment {
                assignment_id: c.assignment_id,
                reason: c.reason,
            }),
            ToAgent::Drain(d) => Kind::Drain(pb::DrainRequest { reason: d.reason }),
            ToAgent::ResultAck(a) => Kind::ResultAck(pb::ResultAck {
                assignment_id: a.assignment_id,
                accepted: a.accepted,
                message: a.message,
            }),
            ToAgent::FollowOutput(f) => Kind::FollowOutput(pb::FollowOutput {
                assignment_id: f.assignment_id,
                epoch: f.epoch,
                follow: f.follow,
            }),
        };
        pb::CoordinatorMessage { kind: Some(kind) }
    }
}

impl TryFrom<pb::CoordinatorMessage> for ToAgent {
    type Error = ModelError;

    fn try_from(message: pb::CoordinatorMessage) -> Result<Self, ModelError> {
        Ok(
            match message
                .kind
                .ok_or(ModelError::MissingKind("CoordinatorMessage"))?
            {
                Kind::Welcome(w) => ToAgent::Welcome(Welcome {
                    coordinator_id: w.coordinator_id,
                    heartbeat_interval: Duration::from_millis(u64::from(w.heartbeat_interval_ms)),
                }),
                Kind::Assignment(a) => ToAgent::Assignment(Box::new(Assignment {
                    assignment_id: a.assignment_id,
                    job_id: a.job_id,
                    repo_url: a.repo_url,
                    branch: a.branch,
                    prompt: a.prompt,
                    attempt: a.attempt,
                    epoch: a.epoch,
                    clone_credential: Some(a.clone_credential)
                        .filter(|token| !token.is_empty())
                        .map(CloneCredential),
                })),
                Kind::Cancel(c) => ToAgent::Cancel(CancelRun {
                    assignment_id: c.assignment_id,
                    reason: c.reason,
                }),
                Kind::Drain(d) => ToAgent::Drain(Drain { reason: d.reason }),
                Kind::ResultAck(a) => ToAgent::ResultAck(ResultAck {
                    assignment_id: a.assignment_id,
                    accepted: a.accepted,
                    message: a.message,
                }),
                Kind::FollowOutput(f) => ToAgent::FollowOutput(FollowOutput {
                    assignment_id: f.assignment_id,
                    epoch: f.epoch,
                    follow: f.follow,
                }),
            },
        )
    }
}
