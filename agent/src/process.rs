//! Running one child process (git, the analyzer CLI) safely and observably.
//!
//! - **argv only**: the program and its arguments are passed as a vector, never through a shell,
//!   so job data cannot become shell syntax.
//! - **own process group**: the child leads a new group, so a timeout or cancel reaches everything
//!   it started (node workers, git's transport helpers), not just the direct child.
//! - **bounded output**: stdout and stderr are read as bytes, split into lines, converted lossily
//!   (invalid UTF-8 never breaks anything) and capped per line, so a 1 GB line without a newline
//!   uses bounded memory. The last lines of both streams are kept for error reports.
//! - **termination**: cancel or timeout sends SIGTERM to the group, then SIGKILL after a grace
//!   period; when the direct child has exited the group is SIGKILLed too, because lingering
//!   grandchildren would keep our pipes open forever.
//! - **nothing inherited**: the child's environment is exactly [`ProcessSpec::env`] (the caller
//!   builds it from an allow-list), so the agent's token and settings never reach it.
//! - **its own user**: with [`ProcessSpec::user`] the child becomes that user before exec, and
//!   once the run is over every process of that user is swept ([`crate::sandbox::sweep`]), so
//!   `setsid` and double-forked descendants die with the run, before its output is collected.

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::sandbox::SlotUser;

/// After the child has exited, how long the output readers may keep delivering lines at the
/// receiver's pace before they switch to "deliver what fits, keep the rest for the tail only".
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// After that, how long readers get to empty what is already buffered in the pipes before they
/// are abandoned (a process outside our group may hold a pipe open and keep writing).
const FINAL_DRAIN: Duration = Duration::from_millis(500);

/// Size of one read from a pipe.
const READ_CHUNK: usize = 8 * 1024;

/// What to run and within which limits.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no '/'.
    pub argv: Vec<String>,
    /// Working directory of the child; must exist.
    pub workdir: PathBuf,
    /// The child's whole environment: nothing of the agent's is inherited.
    pub env: Vec<(String, String)>,
    /// The slot user to run as (every process of that user is swept after the run); `None`
    /// runs as the agent's own user.
    pub user: Option<SlotUser>,
    /// Wall-clock limit for the whole run.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL when stopping the group.
    pub kill_grace: Duration,
    /// Longest line kept, in bytes of UTF-8; the rest of a longer line is dropped.
    pub max_line_bytes: usize,
    /// How many of the last output lines (both streams) [`ProcessEnd`] carries.
    pub tail_lines: usize,
}

/// Which pipe a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// One line of output, without its line terminator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    pub stream: OutputStream,
    pub text: String,
}

/// How the direct child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitStatusKind {
    /// Normal exit with this code.
    Exited(i32),
    /// Killed by this signal number.
    Signaled(i32),
}

impl ExitStatusKind {
    /// True for a normal exit with code 0.
    pub fn success(&self) -> bool {
        *self == Self::Exited(0)
    }

    fn from_std(status: ExitStatus) -> Self {
        match (status.code(), status.signal()) {
            (Some(code), _) => Self::Exited(code),
            (None, Some(signal)) => Self::Signaled(signal),
            // Unix statuses are always one or the other; stay total anyway.
            (None, None) => Self::Exited(-1),
        }
    }
}

/// How a run ended, with the last output lines (oldest first).
#[derive(Debug, Clone)]
pub enum ProcessEnd {
    /// The child exited on its own.
    Exited {
        status: ExitStatusKind,
        tail: Vec<OutputLine>,
    },
    /// The timeout elapsed and the group was stopped.
    TimedOut { tail: Vec<OutputLine> },
    /// The cancel token fired and the group was stopped.
    Canceled { tail: Vec<OutputLine> },
}

impl ProcessEnd {
    /// The last output lines, whatever the outcome.
    pub fn tail(&self) -> &[OutputLine] {
        match self {
            Self::Exited { tail, .. } | Self::TimedOut { tail } | Self::Canceled { tail } => tail,
        }
    }
}

/// Why a process could not be run or supervised. A process that runs and fails is not an error:
/// it is a [`ProcessEnd`].
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("the command is empty; set ANALYZER_COMMAND to a program and its arguments")]
    EmptyArgv,

    #[error(
        "working directory {} is not usable: {source}; create it or fix the configured folder \
         (ANALYZER_WORKDIR, TEMP_DIR)",
        path.display()
    )]
    Workdir { path: PathBuf, source: io::Error },

    #[error("could not start {program}: {source}; check ANALYZER_COMMAND / that it is installed")]
    Spawn { program: String, source: io::Error },

    #[error("lost track of {program} while waiting for it: {source}")]
    Io { program: String, source: io::Error },
}

/// Runs the process to its end. Every output line is sent to `lines` (if the receiver is gone,
/// lines are dropped but the process keeps running). Cancel -> SIGTERM to the group, SIGKILL after
/// `kill_grace`. Timeout likewise.
///
/// A slow receiver slows the child down (its pipe fills up) rather than growing memory. Once the
/// child has exited, readers deliver at the receiver's pace for [`DRAIN_AFTER_EXIT`], then only
/// what fits in the channel; the tail always has the last lines either way.
pub async fn run(
    spec: ProcessSpec,
    lines: mpsc::Sender<OutputLine>,
    cancel: CancellationToken,
) -> Result<ProcessEnd, ProcessError> {
    let program = spec.argv.first().ok_or(ProcessError::EmptyArgv)?.clone();

    // Checked up front because a missing working directory makes spawn fail with the same
    // ENOENT as a missing program, and the two need different fixes.
    match tokio::fs::metadata(&spec.workdir).await {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(ProcessError::Workdir {
                path: spec.workdir.clone(),
                source: io::Error::other("not a directory"),
            })
        }
        Err(source) => {
            return Err(ProcessError::Workdir {
                path: spec.workdir.clone(),
                source,
            })
        }
    }

    let mut command = Command::new(&program);
    command
        .args(&spec.argv[1..])
        .current_dir(&spec.workdir)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // pgid = child's pid: one signal reaches everything it starts.
        .process_group(0)
        // Last resort if this future is dropped mid-run; `GroupGuard` covers the rest of the group.
        .kill_on_drop(true);
    // If the agent itself dies (SIGKILL, OOM), no destructor runs: the kernel then kills the
    // child, so no orphaned analyzer keeps working on a job that is already being retried.
    // Set after the user switch, which clears it.
    let user = spec.user;
    // SAFETY: the closure only makes async-signal-safe system calls (setgroups, setgid,
    // setuid, prctl) and does not allocate.
    unsafe {
        command.pre_exec(move || {
            if let Some(user) = user {
                crate::sandbox::users::become_user(user)?;
            }
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(io::Error::from)
        });
    }
    let mut child = command.spawn().map_err(|source| ProcessError::Spawn {
        program: program.clone(),
        source,
    })?;
    let Some(pid) = child.id() else {
        // Only happens once the child has been reaped, which we have not done yet.
        return Err(ProcessError::Io {
            program,
            source: io::Error::other("child has no pid right after spawn"),
        });
    };
    let mut group = GroupGuard::new(pid, spec.user);
    debug!(program = %program, pid, "process started");

    let tail = Arc::new(Mutex::new(Tail::new(spec.tail_lines)));
    let stop_readers = CancellationToken::new();
    let mut readers = JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(pump(
            out,
            OutputStream::Stdout,
            spec.max_line_bytes,
            Sink::new(lines.clone(), tail.clone()),
            stop_readers.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(pump(
            err,
            OutputStream::Stderr,
            spec.max_line_bytes,
            Sink::new(lines.clone(), tail.clone()),
            stop_readers.clone(),
        ));
    }
    drop(lines);

    enum Outcome {
        Exited(io::Result<ExitStatus>),
        TimedOut,
        Canceled,
    }
    let outcome = tokio::select! {
        status = child.wait() => Outcome::Exited(status),
        _ = tokio::time::sleep(spec.timeout) => Outcome::TimedOut,
        _ = cancel.cancelled() => Outcome::Canceled,
    };
    if matches!(outcome, Outcome::TimedOut | Outcome::Canceled) {
        terminate(&mut child, &group, spec.kill_grace).await;
    }
    // The direct child is gone; whatever is left in its group only keeps the pipes open, and
    // whatever its user still runs elsewhere must not outlive the run either.
    group.kill_rest();
    if let Some(user) = spec.user {
        crate::sandbox::sweep_slot(user).await;
    }
    drain(&mut readers, &stop_readers).await;

    let tail = take_tail(&tail);
    let end = match outcome {
        Outcome::Exited(Ok(status)) => ProcessEnd::Exited {
            status: ExitStatusKind::from_std(status),
            tail,
        },
        Outcome::Exited(Err(source)) => return Err(ProcessError::Io { program, source }),
        Outcome::TimedOut => ProcessEnd::TimedOut { tail },
        Outcome::Canceled => ProcessEnd::Canceled { tail },
    };
    debug!(program = %program, pid, end = ?end_kind(&end), "process ended");
    Ok(end)
}

fn end_kind(end: &ProcessEnd) -> String {
    match end {
        ProcessEnd::Exited { status, .. } => format!("{status:?}"),
        ProcessEnd::TimedOut { .. } => "timed out".to_owned(),
        ProcessEnd::Canceled { .. } => "canceled".to_owned(),
    }
}

/// SIGTERM to the group, wait up to `grace` for the child, then SIGKILL and reap it.
async fn terminate(child: &mut Child, group: &GroupGuard, grace: Duration) {
    group.signal(Signal::SIGTERM);
    let reaped = match tokio::time::timeout(grace, child.wait()).await {
        Ok(reaped) => reaped,
        Err(_) => {
            debug!(
                pgid = group.pgid,
                "process group ignored SIGTERM, sending SIGKILL"
            );
            group.signal(Signal::SIGKILL);
            child.wait().await
        }
    };
    // The outcome is already decided (timed out / canceled); a failed wait changes nothing but
    // is worth a trace. kill_on_drop and the group guard still cover the process.
    if let Err(e) = reaped {
        warn!(pgid = group.pgid, error = %e, "waiting for the stopped process failed");
    }
}

/// Lets the readers finish: first at the receiver's pace, then only what is already buffered,
/// then not at all. Bounded in every case, even if a pipe is held open by an escaped process.
async fn drain(readers: &mut JoinSet<()>, stop: &CancellationToken) {
    if tokio::time::timeout(DRAIN_AFTER_EXIT, join_all(readers))
        .await
        .is_ok()
    {
        return;
    }
    stop.cancel();
    if tokio::time::timeout(FINAL_DRAIN, join_all(readers))
        .await
        .is_err()
    {
        warn!("output pipes still open after the process group was killed; abandoning them");
        readers.abort_all();
    }
}

async fn join_all(readers: &mut JoinSet<()>) {
    while readers.join_next().await.is_some() {}
}

/// The process group of the child. Dropping it before `kill_rest` (the `run` future was dropped,
/// or returned early with an error) SIGKILLs the group and sweeps the child's user, so no path
/// leaves processes behind.
struct GroupGuard {
    pgid: i32,
    user: Option<SlotUser>,
    armed: bool,
}

impl GroupGuard {
    fn new(pid: u32, user: Option<SlotUser>) -> Self {
        Self {
            // Linux pids fit in i32 (pid_max <= 2^22).
            pgid: i32::try_from(pid).unwrap_or(i32::MAX),
            user,
            armed: true,
        }
    }

    /// Signals every process of the group. ESRCH means the group is already empty: fine.
    fn signal(&self, signal: Signal) {
        match killpg(Pid::from_raw(self.pgid), signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(e) => {
                warn!(pgid = self.pgid, %signal, error = %e, "could not signal process group")
            }
        }
    }

    /// SIGKILLs what is left of the group once the direct child has been reaped, and disarms the
    /// guard. Done right after the reap: the group id cannot be reused by another group while any
    /// member lives, and the window for pid reuse after that is negligible.
    fn kill_rest(&mut self) {
        self.signal(Signal::SIGKILL);
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.signal(Signal::SIGKILL);
            if let Some(user) = self.user {
                // No await in a destructor: sweep on a thread of its own.
                std::thread::spawn(move || {
                    if let Err(error) = crate::sandbox::sweep::sweep(user) {
                        warn!(uid = user.uid, %error, "sweeping the analyzer's processes failed");
                    }
                });
            }
        }
    }
}

/// Reads one pipe to its end (or until told to stop), turning bytes into capped lines.
async fn pump<R: AsyncRead + Unpin>(
    mut pipe: R,
    stream: OutputStream,
    max_line_bytes: usize,
    mut sink: Sink,
    stop: CancellationToken,
) {
    let mut splitter = LineSplitter::new(max_line_bytes);
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = tokio::select! {
            // Data already in the pipe wins over `stop`: after stop we only empty the buffer.
            biased;
            read = pipe.read(&mut buf) => match read {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!(?stream, error = %e, "reading child output failed");
                    break;
                }
            },
            _ = stop.cancelled() => break,
        };
        for text in splitter.push(&buf[..n]) {
            sink.deliver(OutputLine { stream, text }, &stop).await;
        }
    }
    if let Some(text) = splitter.finish() {
        sink.deliver(OutputLine { stream, text }, &stop).await;
    }
    if sink.dropped > 0 {
        warn!(
            ?stream,
            dropped = sink.dropped,
            "output lines not delivered: receiver too slow after the process ended"
        );
    }
}

/// Where a reader puts its lines: the shared tail, and the caller's channel.
struct Sink {
    tx: mpsc::Sender<OutputLine>,
    tail: Arc<Mutex<Tail>>,
    /// The receiver is gone: stop trying, keep reading so the child never blocks on a full pipe.
    closed: bool,
    /// Lines not delivered because the drain time was over and the channel was full.
    dropped: u64,
}

impl Sink {
    fn new(tx: mpsc::Sender<OutputLine>, tail: Arc<Mutex<Tail>>) -> Self {
        Self {
            tx,
            tail,
            closed: false,
            dropped: 0,
        }
    }

    async fn deliver(&mut self, line: OutputLine, stop: &CancellationToken) {
        // The tail first: it must hold the last lines even when delivery gives up.
        if let Ok(mut tail) = self.tail.lock() {
            tail.push(&line);
        }
        if self.closed {
            return;
        }
        if !stop.is_cancelled() {
            tokio::select! {
                biased;
                permit = self.tx.reserve() => {
                    match permit {
                        Ok(permit) => permit.send(line),
                        Err(_) => self.closed = true,
                    }
                    return;
                }
                _ = stop.cancelled() => {}
            }
        }
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => self.dropped += 1,
            Err(mpsc::error::TrySendError::Closed(_)) => self.closed = true,
        }
    }
}

/// The last `cap` lines of output, both streams interleaved in arrival order.
#[derive(Debug)]
struct Tail {
    cap: usize,
    lines: VecDeque<OutputLine>,
}

impl Tail {
    fn new(cap: usize) -> Self {
        Self {
            cap,
            lines: VecDeque::with_capacity(cap.min(1024)),
        }
    }

    fn push(&mut self, line: &OutputLine) {
        if self.cap == 0 {
            return;
        }
        if self.lines.len() == self.cap {
            self.lines.pop_front();
        }
        self.lines.push_back(line.clone());
    }
}

fn take_tail(tail: &Mutex<Tail>) -> Vec<OutputLine> {
    match tail.lock() {
        Ok(mut tail) => tail.lines.drain(..).collect(),
        // A reader panicked while holding the lock; the data is still usable.
        Err(poisoned) => poisoned.into_inner().lines.drain(..).collect(),
    }
}

/// Splits a byte stream into lines of at most `max` bytes of UTF-8.
///
/// Keeps at most `max + 3` raw bytes of the current line (3 = the longest incomplete UTF-8
/// sequence, so a character straddling the cap is not turned into U+FFFD), and drops the rest of
/// an over-long line until its newline: memory stays bounded whatever the child writes.
#[derive(Debug)]
struct LineSplitter {
    max: usize,
    current: Vec<u8>,
    /// The current line already hit the raw cap; its remaining bytes are skipped.
    overflowed: bool,
}

impl LineSplitter {
    fn new(max: usize) -> Self {
        Self {
            max,
            current: Vec::new(),
            overflowed: false,
        }
    }

    fn raw_cap(&self) -> usize {
        self.max.saturating_add(3)
    }

    /// Feeds bytes, returns the lines they complete.
    fn push(&mut self, mut bytes: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        while !bytes.is_empty() {
            let (segment, ended) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], Some(i + 1)),
                None => (bytes, None),
            };
            self.append(segment);
            match ended {
                Some(next) => {
                    done.push(self.take_line());
                    bytes = &bytes[next..];
                }
                None => break,
            }
        }
        done
    }

    /// The unterminated last line, if any, at end of stream.
    fn finish(&mut self) -> Option<String> {
        (!self.current.is_empty() || self.overflowed).then(|| self.take_line())
    }

    fn append(&mut self, segment: &[u8]) {
        if self.overflowed {
            return;
        }
        let room = self.raw_cap() - self.current.len();
        if segment.len() > room {
            self.current.extend_from_slice(&segment[..room]);
            self.overflowed = true;
        } else {
            self.current.extend_from_slice(segment);
        }
    }

    fn take_line(&mut self) -> String {
        let mut raw = std::mem::take(&mut self.current);
        if !self.overflowed && raw.last() == Some(&b'\r') {
            raw.pop();
        }
        self.overflowed = false;
        let mut text = String::from_utf8_lossy(&raw).into_owned();
        // Lossy conversion can grow the text (one bad byte becomes a 3-byte U+FFFD): cap after it.
        let kept = fondation_proto::limits::truncate_utf8(&text, self.max).len();
        text.truncate(kept);
        text
    }
}

#[cfg(test)]
mod tests;
