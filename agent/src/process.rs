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
    /// Variables added to (or overriding) the inherited environment.
    pub env: Vec<(String, String)>,
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
    // SAFETY: the closure only makes one async-signal-safe system call (prctl).
    unsafe {
        command.pre_exec(|| {
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
    let mut group = GroupGuard::new(pid);
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
    // The direct child is gone; whatever is left in its group only keeps the pipes open.
    group.kill_rest();
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
/// or returned early with an error) SIGKILLs the group, so no path leaves processes behind.
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl GroupGuard {
    fn new(pid: u32) -> Self {
        Self {
            // Linux pids fit in i32 (pid_max <= 2^22).
            pgid: i32::try_from(pid).unwrap_or(i32::MAX),
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
        if text.len() > self.max {
            let mut cut = self.max;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use nix::sys::signal::kill;

    use super::*;

    /// A shell as a stand-in child, in tests only.
    fn sh(script: &str) -> ProcessSpec {
        ProcessSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
            workdir: std::env::temp_dir(),
            env: Vec::new(),
            timeout: Duration::from_secs(30),
            kill_grace: Duration::from_secs(5),
            max_line_bytes: 4096,
            tail_lines: 100,
        }
    }

    /// Runs to the end and returns the end plus every line the receiver got.
    async fn run_collect(spec: ProcessSpec) -> (ProcessEnd, Vec<OutputLine>) {
        let (tx, mut rx) = mpsc::channel(64);
        let collector = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(line) = rx.recv().await {
                got.push(line);
            }
            got
        });
        let end = run(spec, tx, CancellationToken::new())
            .await
            .expect("run should succeed");
        let got = tokio::time::timeout(Duration::from_secs(10), collector)
            .await
            .expect("receiver should see the channel close")
            .expect("collector task");
        (end, got)
    }

    fn texts(lines: &[OutputLine], stream: OutputStream) -> Vec<&str> {
        lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text.as_str())
            .collect()
    }

    /// Waits for the first line from `rx`, with a deadline.
    async fn first_line(rx: &mut mpsc::Receiver<OutputLine>) -> OutputLine {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("waiting for the child's first output line")
            .expect("channel closed before the first line")
    }

    /// True when `pid` no longer runs (gone, or a zombie waiting for a reaper we do not control).
    fn is_gone(pid: i32) -> bool {
        if kill(Pid::from_raw(pid), None) == Err(Errno::ESRCH) {
            return true;
        }
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                // Format: "pid (comm) S ...": the state follows the last ')'.
                stat.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                    .unwrap_or(false)
            })
            .unwrap_or(true)
    }

    async fn wait_gone(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_gone(pid) {
            assert!(
                Instant::now() < deadline,
                "process {pid} still alive after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn lines_from_both_streams_and_exit_code() {
        let (end, got) = run_collect(sh("echo out1; echo err1 >&2; echo out2; exit 3")).await;
        assert_eq!(texts(&got, OutputStream::Stdout), ["out1", "out2"]);
        assert_eq!(texts(&got, OutputStream::Stderr), ["err1"]);
        match end {
            ProcessEnd::Exited { status, tail } => {
                assert_eq!(status, ExitStatusKind::Exited(3));
                assert!(!status.success());
                assert_eq!(tail.len(), 3);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn success_and_signal_statuses() {
        let (end, _) = run_collect(sh("true")).await;
        assert!(matches!(end, ProcessEnd::Exited { status, .. } if status.success()));
        let (end, _) = run_collect(sh("kill -9 $$")).await;
        assert!(
            matches!(
                end,
                ProcessEnd::Exited {
                    status: ExitStatusKind::Signaled(9),
                    ..
                }
            ),
            "{end:?}"
        );
    }

    #[tokio::test]
    async fn env_is_inherited_plus_spec_env_and_stdin_is_null() {
        let mut spec = sh(
            "echo \"$FONDATION_TEST_VAR\"; test -n \"$PATH\" && echo has-path; cat; echo after-cat",
        );
        spec.env = vec![("FONDATION_TEST_VAR".into(), "hello world".into())];
        let (end, got) = run_collect(spec).await;
        assert!(matches!(
            end,
            ProcessEnd::Exited {
                status: ExitStatusKind::Exited(0),
                ..
            }
        ));
        assert_eq!(
            texts(&got, OutputStream::Stdout),
            ["hello world", "has-path", "after-cat"]
        );
    }

    #[tokio::test]
    async fn workdir_is_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = sh("pwd");
        spec.workdir = dir.path().to_path_buf();
        let (_, got) = run_collect(spec).await;
        let expected = dir.path().canonicalize().unwrap();
        assert_eq!(
            texts(&got, OutputStream::Stdout),
            [expected.to_str().unwrap()]
        );
    }

    #[tokio::test]
    async fn invalid_utf8_and_crlf_are_tolerated() {
        let (end, got) = run_collect(sh(
            r"printf 'a\377b\n'; printf 'crlf\r\n'; printf 'no-newline'",
        ))
        .await;
        assert_eq!(
            texts(&got, OutputStream::Stdout),
            ["a\u{fffd}b", "crlf", "no-newline"]
        );
        assert!(matches!(
            end,
            ProcessEnd::Exited {
                status: ExitStatusKind::Exited(0),
                ..
            }
        ));
    }

    #[tokio::test]
    async fn long_line_is_capped() {
        let mut spec = sh("head -c 3000000 /dev/zero | tr '\\0' x; echo; echo after");
        spec.max_line_bytes = 1000;
        let (_, got) = run_collect(spec).await;
        let out = texts(&got, OutputStream::Stdout);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], "x".repeat(1000));
        assert_eq!(out[1], "after");
    }

    #[tokio::test]
    async fn timeout_stops_the_group_quickly() {
        let mut spec = sh("echo started; sleep 60");
        spec.timeout = Duration::from_millis(300);
        spec.kill_grace = Duration::from_secs(5);
        let started = Instant::now();
        let (end, _) = run_collect(spec).await;
        // sleep dies on SIGTERM: no need to wait for the grace period.
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "took {:?}",
            started.elapsed()
        );
        match end {
            ProcessEnd::TimedOut { tail } => assert_eq!(tail[0].text, "started"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn cancel_escalates_to_sigkill_after_grace() {
        // The shell and its sleep ignore SIGTERM (an ignored signal stays ignored across exec).
        let mut spec = sh("trap '' TERM; echo ready; sleep 60");
        let grace = Duration::from_millis(500);
        spec.kill_grace = grace;
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(run(spec, tx, cancel.clone()));
        assert_eq!(first_line(&mut rx).await.text, "ready");
        let started = Instant::now();
        cancel.cancel();
        let end = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("run should return after cancel")
            .unwrap()
            .unwrap();
        let took = started.elapsed();
        assert!(matches!(end, ProcessEnd::Canceled { .. }), "{end:?}");
        assert!(took >= grace, "SIGKILL came before the grace: {took:?}");
        assert!(took < grace + Duration::from_secs(4), "took {took:?}");
    }

    #[tokio::test]
    async fn grandchildren_are_killed_on_cancel() {
        let spec = sh("sleep 60 & echo $!; wait");
        let (tx, mut rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let handle = tokio::spawn(run(spec, tx, cancel.clone()));
        let pid: i32 = first_line(&mut rx).await.text.parse().expect("a pid");
        assert!(!is_gone(pid), "grandchild should be running");
        cancel.cancel();
        let end = tokio::time::timeout(Duration::from_secs(10), handle)
            .await
            .expect("run should return after cancel")
            .unwrap()
            .unwrap();
        assert!(matches!(end, ProcessEnd::Canceled { .. }));
        wait_gone(pid).await;
    }

    #[tokio::test]
    async fn grandchildren_left_behind_are_killed_and_do_not_hold_the_run() {
        // The grandchild keeps stdout open; the run must not wait for it to close.
        let started = Instant::now();
        let (end, got) = run_collect(sh("sleep 60 & echo $!; exit 0")).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(matches!(
            end,
            ProcessEnd::Exited {
                status: ExitStatusKind::Exited(0),
                ..
            }
        ));
        let pid: i32 = texts(&got, OutputStream::Stdout)[0].parse().unwrap();
        wait_gone(pid).await;
    }

    #[tokio::test]
    async fn escaped_process_holding_the_pipe_does_not_hang_the_run() {
        // setsid leaves our group, so the final SIGKILL cannot reach it; the drain bound must.
        let started = Instant::now();
        // The fifo makes the shell exit only once the escaped process exists (setsid done).
        let script = r#"f=$(mktemp -u); mkfifo "$f"
            setsid sh -c 'echo $$; echo up > "$1"; exec sleep 60' sh "$f" &
            read _ < "$f"; rm -f "$f"; exit 0"#;
        let (end, got) = run_collect(sh(script)).await;
        let took = started.elapsed();
        let pid: i32 = texts(&got, OutputStream::Stdout)[0].parse().unwrap();
        // Clean up the process this test started.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        assert!(matches!(
            end,
            ProcessEnd::Exited {
                status: ExitStatusKind::Exited(0),
                ..
            }
        ));
        // The readers waited for the open pipe, but only as long as the drain bounds allow.
        assert!(
            took >= DRAIN_AFTER_EXIT,
            "took {took:?}: the pipe was not held open"
        );
        assert!(
            took < DRAIN_AFTER_EXIT + FINAL_DRAIN + Duration::from_secs(3),
            "took {took:?}"
        );
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error() {
        let spec = ProcessSpec {
            argv: vec!["/nonexistent/fondation-analyzer".into(), "x".into()],
            ..sh("")
        };
        let (tx, _rx) = mpsc::channel(1);
        let err = run(spec, tx, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, ProcessError::Spawn { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.starts_with("could not start /nonexistent/fondation-analyzer: "),
            "{msg}"
        );
        assert!(msg.contains("ANALYZER_COMMAND"), "{msg}");
    }

    #[tokio::test]
    async fn missing_workdir_and_empty_argv_are_errors() {
        let mut spec = sh("true");
        spec.workdir = PathBuf::from("/nonexistent/fondation-workdir");
        let (tx, _rx) = mpsc::channel(1);
        let err = run(spec, tx.clone(), CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, ProcessError::Workdir { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent/fondation-workdir"),
            "{err}"
        );

        let spec = ProcessSpec {
            argv: Vec::new(),
            ..sh("")
        };
        let err = run(spec, tx, CancellationToken::new()).await.unwrap_err();
        assert!(matches!(err, ProcessError::EmptyArgv));
    }

    #[tokio::test]
    async fn dropped_receiver_does_not_stop_the_process() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut spec = sh("seq 1 5000; echo done");
        spec.tail_lines = 2;
        let end = run(spec, tx, CancellationToken::new()).await.unwrap();
        match end {
            ProcessEnd::Exited { status, tail } => {
                assert!(status.success());
                let tail: Vec<_> = tail.iter().map(|l| l.text.as_str()).collect();
                assert_eq!(tail, ["5000", "done"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[tokio::test]
    async fn flood_with_slow_receiver_keeps_every_line_and_the_tail() {
        let mut spec = sh("seq 1 100000");
        spec.tail_lines = 10;
        let (tx, mut rx) = mpsc::channel::<OutputLine>(16);
        let receiver = tokio::spawn(async move {
            let mut count = 0u64;
            let mut last = String::new();
            while let Some(line) = rx.recv().await {
                count += 1;
                last = line.text;
                if count.is_multiple_of(500) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            (count, last)
        });
        let end = run(spec, tx, CancellationToken::new()).await.unwrap();
        let tail: Vec<String> = end.tail().iter().map(|l| l.text.clone()).collect();
        let expected: Vec<String> = (99_991..=100_000).map(|n| n.to_string()).collect();
        assert_eq!(tail, expected);
        let (count, last) = receiver.await.unwrap();
        assert_eq!(count, 100_000);
        assert_eq!(last, "100000");
    }

    #[test]
    fn splitter_handles_chunk_boundaries() {
        let mut s = LineSplitter::new(100);
        assert!(s.push(b"hel").is_empty());
        assert_eq!(s.push(b"lo\nwor"), ["hello"]);
        assert_eq!(s.push(b"ld\r\n\n"), ["world", ""]);
        assert_eq!(s.finish(), None);
        assert!(s.push(b"tail").is_empty());
        assert_eq!(s.finish().as_deref(), Some("tail"));
    }

    #[test]
    fn splitter_caps_on_char_boundary_and_resyncs() {
        let mut s = LineSplitter::new(5);
        // "abcd" + 'é' (2 bytes) = 6 bytes: the é does not fit and is dropped whole.
        assert_eq!(s.push("abcdé\n".as_bytes()), ["abcd"]);
        // Over-long line across chunks: the rest is skipped until the newline.
        assert!(s.push(b"0123456789").is_empty());
        assert!(s.push(&[b'z'; 10_000]).is_empty());
        assert_eq!(s.current.len(), s.raw_cap(), "memory must stay bounded");
        assert_eq!(s.push(b"zzz\nnext\n"), ["01234", "next"]);
        // A 4-byte character straddling the cap is not turned into U+FFFD.
        assert_eq!(s.push("abc\u{1f600}\n".as_bytes()), ["abc"]);
        // Invalid bytes become U+FFFD, and the cap holds after that expansion.
        assert_eq!(s.push(b"\xff\xff\xff\n"), ["\u{fffd}"]);
    }

    #[test]
    fn splitter_with_zero_cap_yields_empty_lines() {
        let mut s = LineSplitter::new(0);
        assert_eq!(s.push(b"abc\n\n"), ["", ""]);
    }

    #[test]
    fn tail_keeps_last_lines_only() {
        let line = |t: &str| OutputLine {
            stream: OutputStream::Stdout,
            text: t.into(),
        };
        let mut tail = Tail::new(2);
        for t in ["a", "b", "c"] {
            tail.push(&line(t));
        }
        assert_eq!(tail.lines, [line("b"), line("c")]);
        let mut none = Tail::new(0);
        none.push(&line("a"));
        assert!(none.lines.is_empty());
    }
}
