//! TEMP STUB
use std::{path::PathBuf, time::Duration};
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub argv: Vec<String>,
    pub workdir: PathBuf,
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    pub kill_grace: Duration,
    pub max_line_bytes: usize,
    pub tail_lines: usize,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub stream: OutputStream,
    pub text: String,
}
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatusKind {
    Exited(i32),
    Signaled(i32),
}
#[derive(Debug, Clone)]
pub enum ProcessEnd {
    Exited {
        status: ExitStatusKind,
        tail: Vec<OutputLine>,
    },
    TimedOut {
        tail: Vec<OutputLine>,
    },
    Canceled {
        tail: Vec<OutputLine>,
    },
}
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct ProcessError;
pub async fn run(
    _s: ProcessSpec,
    _l: tokio::sync::mpsc::Sender<OutputLine>,
    _c: tokio_util::sync::CancellationToken,
) -> Result<ProcessEnd, ProcessError> {
    Err(ProcessError)
}
