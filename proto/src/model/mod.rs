//! The domain model of the agent link: what the coordinator tells an agent and what an agent
//! reports, in plain Rust types the coordinator's and the agent's logic work with. The generated
//! [`crate::pb`] types stay at the gRPC edge (the coordinator's gateway, the agent's session),
//! which converts with the impls below: `TryFrom<pb::X>` for what comes in, refusing a malformed
//! message with a [`ModelError`] (mapped to a gRPC status), and `From<model> for pb::X` for what
//! goes out.
//!
//! Layout:
//! - [`to_agent`]: coordinator -> agent (welcome, assignment, cancel, drain, result ack);
//! - [`to_coordinator`]: agent -> coordinator (hello, heartbeat, run reports);
//! - here: [`Document`] and [`DocumentKind`], shared by both directions and by the job sources.

pub mod to_agent;
pub mod to_coordinator;

use std::{fmt, str::FromStr};

use crate::{limits, pb, validate::ValidationError};

pub use to_agent::{
    Assignment, CancelRun, CloneCredential, Drain, FollowOutput, ResultAck, ToAgent, Welcome,
};
pub use to_coordinator::{
    FromAgent, HeldRun, Hello, OutputLine, OutputStream, Phase, RunEvent, RunOutcome, RunReport,
    PROTOCOL_VERSION,
};

/// Why a message from the wire was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// A `oneof` was empty: the sender left it out, or speaks a newer protocol.
    #[error("{0} carries none of the kinds this side knows")]
    MissingKind(&'static str),
    #[error("unsupported protocol version {0}; this side speaks PROTOCOL_VERSION_1")]
    UnsupportedProtocol(i32),
    #[error("invalid agent id: {0} (set AGENT_ID)")]
    InvalidAgentId(ValidationError),
    #[error("invalid agent instance id: {0}")]
    InvalidInstanceId(ValidationError),
    #[error("unknown phase {0}")]
    UnknownPhase(i32),
    #[error("step {step} of {total_steps} is out of range")]
    StepOutOfRange { step: u32, total_steps: u32 },
    #[error("ResultDocument without a document")]
    MissingDocument,
    #[error("document {slug:?} has no valid kind ({kind})")]
    UnknownDocumentKind { slug: String, kind: i32 },
    #[error("document slug must be 1 to {max} bytes, got {len}", max = limits::MAX_NAME_BYTES)]
    InvalidSlug { len: usize },
    #[error("document slug {slug:?} contains a control character; slugs are file paths of printable characters")]
    SlugControlCharacter { slug: String },
    #[error("AssignmentFinished without an outcome")]
    MissingOutcome,
    #[error("unknown document kind {0:?}")]
    UnknownKindName(String),
    #[error("OutputLines with {0} lines; at most {max} per message", max = limits::MAX_OUTPUT_LINES_PER_MESSAGE)]
    TooManyOutputLines(usize),
    #[error("output line {0} is not after the line before it; lines go in increasing seq order")]
    OutputOutOfOrder(u64),
    #[error("unknown output stream {0}")]
    UnknownOutputStream(i32),
}

impl From<ModelError> for tonic::Status {
    fn from(error: ModelError) -> Self {
        match error {
            ModelError::UnsupportedProtocol(_) => {
                tonic::Status::failed_precondition(error.to_string())
            }
            error => tonic::Status::invalid_argument(error.to_string()),
        }
    }
}

/// What a document is, as stored in Convex's `kind` field (`docs:upsertFromJob`). The one
/// definition for the collector, the wire and the job sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DocumentKind {
    Chapter,
    Tutorial,
    /// Part of the Convex contract; the analyzer's output folder holds no table of contents, so
    /// the agent's collector never produces one.
    Toc,
    Yaml,
}

impl DocumentKind {
    pub const ALL: [DocumentKind; 4] = [
        DocumentKind::Chapter,
        DocumentKind::Tutorial,
        DocumentKind::Toc,
        DocumentKind::Yaml,
    ];

    /// The name Convex uses for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentKind::Chapter => "chapter",
            DocumentKind::Tutorial => "tutorial",
            DocumentKind::Toc => "toc",
            DocumentKind::Yaml => "yaml",
        }
    }
}

impl fmt::Display for DocumentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DocumentKind {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, ModelError> {
        DocumentKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| ModelError::UnknownKindName(s.to_string()))
    }
}

impl From<DocumentKind> for pb::DocumentKind {
    fn from(kind: DocumentKind) -> Self {
        match kind {
            DocumentKind::Chapter => pb::DocumentKind::Chapter,
            DocumentKind::Tutorial => pb::DocumentKind::Tutorial,
            DocumentKind::Toc => pb::DocumentKind::Toc,
            DocumentKind::Yaml => pb::DocumentKind::Yaml,
        }
    }
}

impl TryFrom<pb::DocumentKind> for DocumentKind {
    /// `DOCUMENT_KIND_UNSPECIFIED` has no domain kind.
    type Error = ();

    fn try_from(kind: pb::DocumentKind) -> Result<Self, ()> {
        match kind {
            pb::DocumentKind::Chapter => Ok(DocumentKind::Chapter),
            pb::DocumentKind::Tutorial => Ok(DocumentKind::Tutorial),
            pb::DocumentKind::Toc => Ok(DocumentKind::Toc),
            pb::DocumentKind::Yaml => Ok(DocumentKind::Yaml),
            pb::DocumentKind::Unspecified => Err(()),
        }
    }
}

/// One generated document, as the agent collects it and `docs:upsertFromJob` stores it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Document {
    /// Path within the output folder, e.g. `chapters/chapter_1_intro.md`.
    pub slug: String,
    pub title: String,
    pub kind: DocumentKind,
    /// Position within its folder in natural order; None for YAML documents.
    pub chapter_index: Option<u32>,
    pub content: String,
}

impl From<Document> for pb::Document {
    fn from(document: Document) -> Self {
        pb::Document {
            slug: document.slug,
            title: document.title,
            kind: pb::DocumentKind::from(document.kind) as i32,
            chapter_index: document.chapter_index,
            content: document.content,
        }
    }
}

/// Checks names and kind; sizes are the receiver's to judge (an oversize document fails the
/// job, it does not make the message malformed). The title is capped.
impl TryFrom<pb::Document> for Document {
    type Error = ModelError;

    fn try_from(document: pb::Document) -> Result<Self, ModelError> {
        let kind = pb::DocumentKind::try_from(document.kind)
            .ok()
            .and_then(|kind| DocumentKind::try_from(kind).ok())
            .ok_or_else(|| ModelError::UnknownDocumentKind {
                slug: limits::truncate_utf8(&document.slug, limits::MAX_NAME_BYTES).to_string(),
                kind: document.kind,
            })?;
        if document.slug.is_empty() || document.slug.len() > limits::MAX_NAME_BYTES {
            return Err(ModelError::InvalidSlug {
                len: document.slug.len(),
            });
        }
        if document.slug.chars().any(char::is_control) {
            return Err(ModelError::SlugControlCharacter {
                slug: document.slug,
            });
        }
        Ok(Document {
            slug: document.slug,
            title: capped(document.title, limits::MAX_NAME_BYTES),
            kind,
            chapter_index: document.chapter_index,
            content: document.content,
        })
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn capped(text: String, max: usize) -> String {
    if text.len() <= max {
        text
    } else {
        limits::truncate_utf8(&text, max).to_string()
    }
}

#[cfg(test)]
mod tests;
