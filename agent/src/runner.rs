//! The agent runner: one assignment from start to result.
//!
//! Fresh workspace under `TEMP_DIR` -> checked clone -> analyzer CLI (argv, its own process group,
//! timeout, cancel) with its progress turned into step reports -> documents collected from its
//! output folder -> result reported. The workspace is removed when the run ends, whatever happened.

use std::{path::Path, sync::Arc, time::Duration};

use fondation_proto::{
    model::{Assignment, Document, OutputStream, Phase, RunEvent, RunOutcome, RunReport},
    validate,
};
use fondation_runtime::logging::escaped;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    analyzer::{CommandTemplate, TemplateValues},
    clone::{clone_repo, CloneError, CloneSpec},
    collector::{self, CollectLimits, CollectedDocument},
    config::AgentConfig,
    metrics::AgentMetrics,
    output_tail::OutputTail,
    process::{self, ExitStatusKind, OutputLine, ProcessEnd, ProcessError, ProcessSpec},
    progress::{self, TOTAL_STEPS},
    sandbox::{Sandbox, SlotLease},
};

/// Folder of the CLI's output, relative to the analyzed repository (DESIGN.md section 3).
pub const OUTPUT_FOLDER: &str = ".claude-tutorial-output";
/// Prefix of workspace folders, so leftovers of a crashed agent can be recognised and removed.
pub const WORKSPACE_PREFIX: &str = "fondation-job-";
use fondation_proto::limits::MAX_OUTPUT_LINE_BYTES as MAX_LINE_BYTES;
/// Lines of CLI output kept for the error message of a failed run.
const TAIL_LINES: usize = 60;
/// Error lines quoted in a failed job's error.
const ERROR_LINES_QUOTED: usize = 10;
/// How often the output folder is looked at for progress evidence from a silent CLI.
const OUTPUT_POLL: Duration = Duration::from_secs(1);
/// Progress text with no new step is sent at most this often.
const MESSAGE_INTERVAL: Duration = Duration::from_secs(1);

/// Failure text of a run stopped on request. Retryable: when the agent stops a run for its own
/// shutdown the job must go to another agent; when the coordinator asked, it ignores the outcome.
const STOPPED: &str = "the run was stopped before it finished";

/// Where a run's reports go: the session sends them, and holds the result until acknowledged.
pub type ReportSink = mpsc::UnboundedSender<RunReport>;

/// What every run needs from the agent's configuration.
#[derive(Debug)]
pub struct RunnerContext {
    pub config: AgentConfig,
    /// `TEMP_DIR/<agent id>`: agents sharing a TEMP_DIR never touch each other's workspaces.
    pub workspace_root: std::path::PathBuf,
    pub allowlist: validate::RepoAllowlist,
    pub template: CommandTemplate,
    /// The analyzer's environment, slot users and sweeps.
    pub sandbox: Sandbox,
    pub metrics: Arc<AgentMetrics>,
}

/// Why a run failed.
#[derive(Debug)]
struct RunFailure {
    message: String,
    retryable: bool,
    /// The failure points at the agent, not at the job (see [`RunOutcome::Failed`]).
    agent_fault: bool,
}

impl RunFailure {
    fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
            agent_fault: false,
        }
    }

    fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            agent_fault: false,
        }
    }

    /// The agent cannot run jobs (disk full, git or the analyzer cannot start): another agent
    /// may, and this one re-checks itself.
    fn agent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
            agent_fault: true,
        }
    }
}

/// Exit codes of a program that could not be started: 126 found but not executable, 127 not
/// found (shells, `env`, `timeout` and `nice` use them so).
const COULD_NOT_START: [i32; 2] = [126, 127];

/// Whether an analyzer that ended with `status` failed for a reason of the agent: it exited with
/// a "could not start" code before it printed anything or wrote any output. An analyzer that got
/// as far as printing failed on the job (an expired credential fails after output, for one).
fn analyzer_could_not_start(status: &ExitStatusKind, printed: bool, wrote_output: bool) -> bool {
    matches!(status, ExitStatusKind::Exited(code) if COULD_NOT_START.contains(code))
        && !printed
        && !wrote_output
}

/// Whether a clone failed for a reason of the agent rather than of the repository: git could not
/// be started, or the local disk is full.
fn clone_failed_on_agent(error: &CloneError) -> bool {
    match error {
        CloneError::Process(_) => true,
        CloneError::Failed { message, .. } => {
            let message = message.to_ascii_lowercase();
            message.contains("no space left on device") || message.contains("disk quota exceeded")
        }
        _ => false,
    }
}

/// Runs one assignment and reports everything about it on `reports`, ending with `Finished`;
/// the analyzer's output lines go to `output` (the session sends them).
pub async fn run_assignment(
    ctx: Arc<RunnerContext>,
    assignment: Assignment,
    reports: ReportSink,
    output: OutputTail,
    cancel: CancellationToken,
) {
    let reporter = Reporter {
        assignment_id: assignment.assignment_id.clone(),
        epoch: assignment.epoch,
        sink: reports,
        output,
    };
    reporter.send(RunEvent::Accepted);
    info!(job_id = %assignment.job_id, attempt = assignment.attempt, "run started");
    let outcome = execute(&ctx, &assignment, &reporter, &cancel).await;
    let finished = match outcome {
        Ok((documents, workspace)) => {
            let count = documents.len() as u32;
            // The documents travel while the workspace is removed; the end follows both (a
            // reconnect in between re-sends the documents: see the session's held results).
            for (index, document) in documents.into_iter().enumerate() {
                reporter.send(RunEvent::Document {
                    index: index as u32,
                    document: into_document(document),
                });
            }
            workspace.remove().await;
            info!(job_id = %assignment.job_id, documents = count, "run succeeded");
            RunOutcome::Succeeded {
                document_count: count,
                message: format!("{count} documents generated"),
            }
        }
        Err(failure) => {
            // The error quotes the analyzer's last lines: no secret of theirs goes further.
            let message = reporter.output.redact(&failure.message).into_owned();
            warn!(job_id = %assignment.job_id, error = %escaped(&message), retryable = failure.retryable, agent_fault = failure.agent_fault, "run failed");
            RunOutcome::Failed {
                message,
                retryable: failure.retryable,
                agent_fault: failure.agent_fault,
            }
        }
    };
    reporter.send(RunEvent::Finished(finished));
}

struct Reporter {
    assignment_id: String,
    epoch: u64,
    sink: ReportSink,
    /// The analyzer's output lines, for the job's logs.
    output: OutputTail,
}

impl Reporter {
    fn send(&self, event: RunEvent) {
        // The session outlives its runs; a closed sink means the agent is exiting anyway.
        let _ = self.sink.send(RunReport {
            assignment_id: self.assignment_id.clone(),
            epoch: self.epoch,
            event,
        });
    }

    fn phase(&self, phase: Phase) {
        self.send(RunEvent::Phase(phase));
    }

    fn step(&self, step: u32, message: String) {
        self.send(RunEvent::Progress {
            step,
            total_steps: TOTAL_STEPS,
            message,
        });
    }
}

async fn execute(
    ctx: &RunnerContext,
    assignment: &Assignment,
    reporter: &Reporter,
    cancel: &CancellationToken,
) -> Result<(Vec<CollectedDocument>, Workspace), RunFailure> {
    // The coordinator checked these too; an agent trusts nothing it did not check itself.
    ctx.allowlist
        .check(&assignment.repo_url)
        .map_err(|e| RunFailure::permanent(e.to_string()))?;
    validate::check_job_branch(&assignment.branch)
        .map_err(|e| RunFailure::permanent(e.to_string()))?;
    validate::check_prompt(&assignment.prompt).map_err(|e| RunFailure::permanent(e.to_string()))?;
    validate::check_job_id(&assignment.job_id).map_err(|e| RunFailure::permanent(e.to_string()))?;

    let config = &ctx.config;
    // Held until the end of the run, after the slot user's processes were swept.
    let lease = tokio::select! {
        lease = ctx.sandbox.acquire_slot() => lease,
        _ = cancel.cancelled() => return Err(RunFailure::transient(STOPPED)),
    };
    let slot = lease.index();
    let workspace = tempfile::Builder::new()
        .prefix(WORKSPACE_PREFIX)
        .tempdir_in(&ctx.workspace_root)
        .map_err(|e| {
            RunFailure::agent(format!(
                "cannot create a workspace in {} (under TEMP_DIR): {e}",
                ctx.workspace_root.display()
            ))
        })?;
    let workspace = Workspace {
        dir: workspace,
        _slot: lease,
    };
    ctx.sandbox
        .prepare_workspace(workspace.path(), slot)
        .map_err(|e| RunFailure::agent(e.to_string()))?;
    let repo = workspace.path().join("repo");

    reporter.phase(Phase::Cloning);
    let clone = CloneSpec {
        url: assignment.repo_url.clone(),
        branch: assignment.branch.clone(),
        dest: repo.clone(),
        timeout: config.clone_timeout,
        max_bytes: config.clone_max_bytes,
        // Held in memory for this clone only; the analyzer never sees it.
        credential: assignment.clone_credential.clone(),
    };
    clone_repo(&clone, &ctx.allowlist, cancel.clone())
        .await
        .map_err(|error| match error {
            CloneError::Canceled => RunFailure::transient(STOPPED),
            error if clone_failed_on_agent(&error) => RunFailure::agent(error.to_string()),
            error => RunFailure {
                retryable: error.is_retryable(),
                message: error.to_string(),
                agent_fault: false,
            },
        })?;

    reporter.phase(Phase::Analyzing);
    let output_dir = repo.join(OUTPUT_FOLDER);
    ctx.sandbox
        .prepare_output(&output_dir, slot)
        .map_err(|e| RunFailure::agent(e.to_string()))?;
    let run = AnalyzerRun {
        repo: &repo,
        output_dir: &output_dir,
        workspace: workspace.path(),
        slot,
    };
    analyze(ctx, assignment, &run, reporter, cancel).await?;

    reporter.phase(Phase::Gathering);
    let limits = CollectLimits::default();
    let documents = tokio::task::spawn_blocking(move || collector::collect(&output_dir, &limits))
        .await
        .map_err(|e| RunFailure::transient(format!("collecting the output panicked: {e}")))?
        .map_err(|e| RunFailure {
            retryable: !e.is_permanent(),
            message: e.to_string(),
            agent_fault: false,
        })?;
    Ok((documents, workspace))
}

/// A run's workspace and the slot it was prepared for. Dropped on a failed run (removed on the
/// spot); a successful run removes it off the runtime's threads while its documents are sent.
struct Workspace {
    dir: tempfile::TempDir,
    /// Released after the folder is gone (fields drop in order).
    _slot: SlotLease,
}

impl Workspace {
    fn path(&self) -> &Path {
        self.dir.path()
    }

    async fn remove(self) {
        let Workspace { dir, _slot } = self;
        let path = dir.path().to_path_buf();
        match tokio::task::spawn_blocking(move || dir.close()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                warn!(workspace = %path.display(), %error, "could not remove the workspace; it is removed at the next start")
            }
            Err(error) => warn!(%error, "removing the workspace panicked"),
        }
    }
}

/// Where one analyzer run happens.
struct AnalyzerRun<'a> {
    repo: &'a Path,
    output_dir: &'a Path,
    workspace: &'a Path,
    slot: u32,
}

/// Runs the analyzer CLI, reporting its progress, until it ends.
async fn analyze(
    ctx: &RunnerContext,
    assignment: &Assignment,
    run: &AnalyzerRun<'_>,
    reporter: &Reporter,
    cancel: &CancellationToken,
) -> Result<(), RunFailure> {
    let output_dir = run.output_dir;
    let repo_arg = run.repo.to_string_lossy();
    let argv = ctx.template.render(TemplateValues {
        repo: &repo_arg,
        prompt: &assignment.prompt,
        job_id: &assignment.job_id,
    });
    let spec = ProcessSpec {
        argv,
        workdir: ctx.config.analyzer_workdir.clone(),
        env: ctx.sandbox.analyzer_env(run.workspace, run.slot),
        user: ctx.sandbox.user(run.slot),
        timeout: ctx.config.analyzer_timeout,
        kill_grace: ctx.config.kill_grace,
        max_line_bytes: MAX_LINE_BYTES,
        tail_lines: TAIL_LINES,
    };
    let (lines_tx, mut lines) = mpsc::channel::<OutputLine>(1024);
    let child = process::run(spec, lines_tx, cancel.clone());
    tokio::pin!(child);

    let mut tracker = StepTracker::default();
    let mut output_poll = tokio::time::interval(OUTPUT_POLL);
    let mut lines_open = true;
    let end = loop {
        tokio::select! {
            end = &mut child => break end,
            line = lines.recv(), if lines_open => match line {
                Some(line) => {
                    if let Some(report) = progress::parse_line(&line.text) {
                        tracker.on_report(report.step, report.message, reporter);
                    }
                    keep_output(reporter, &line);
                }
                None => lines_open = false,
            },
            _ = output_poll.tick() => {
                let dir = output_dir.to_path_buf();
                if let Ok(Some(step)) = tokio::task::spawn_blocking(move || progress::last_step_with_output(&dir)).await {
                    tracker.on_output_evidence(step, reporter);
                }
            }
        }
    };
    // Lines still queued after the child ended are progress too, and so are files written since
    // the last look.
    while let Ok(line) = lines.try_recv() {
        if let Some(report) = progress::parse_line(&line.text) {
            tracker.on_report(report.step, report.message, reporter);
        }
        keep_output(reporter, &line);
    }
    let dir = output_dir.to_path_buf();
    if let Ok(Some(step)) =
        tokio::task::spawn_blocking(move || progress::last_step_with_output(&dir)).await
    {
        tracker.on_output_evidence(step, reporter);
    }

    ctx.metrics.analyzer_ended(&end);
    let end = end.map_err(|e| match e {
        // Nothing of the job ran: the program or its working folder is missing on this agent.
        ProcessError::EmptyArgv | ProcessError::Workdir { .. } | ProcessError::Spawn { .. } => {
            RunFailure::agent(e.to_string())
        }
        ProcessError::Io { .. } => RunFailure::transient(e.to_string()),
    })?;
    match end {
        ProcessEnd::Exited {
            status: ExitStatusKind::Exited(0),
            ..
        } => Ok(()),
        ProcessEnd::Exited { status, tail } => {
            let how = match status {
                ExitStatusKind::Exited(code) => format!("exited with code {code}"),
                ExitStatusKind::Signaled(signal) => format!("was killed by signal {signal}"),
            };
            let message = format!("the analyzer {how}: {}", error_text(&tail));
            let dir = output_dir.to_path_buf();
            let wrote_output = tokio::task::spawn_blocking(move || folder_has_entries(&dir))
                .await
                .unwrap_or(true);
            if analyzer_could_not_start(&status, !tail.is_empty(), wrote_output) {
                Err(RunFailure::agent(format!(
                    "{message} (it could not start: see the agent's self-check)"
                )))
            } else {
                Err(RunFailure::transient(message))
            }
        }
        ProcessEnd::TimedOut { tail } => Err(RunFailure::transient(format!(
            "the analyzer ran longer than ANALYZER_TIMEOUT ({} ms) and was stopped; last output: {}",
            ctx.config.analyzer_timeout.as_millis(),
            error_text(&tail)
        ))),
        ProcessEnd::Canceled { .. } => Err(RunFailure::transient(STOPPED)),
    }
}

/// One line of the analyzer's output into the job's logs.
fn keep_output(reporter: &Reporter, line: &OutputLine) {
    let stream = match line.stream {
        process::OutputStream::Stdout => OutputStream::Stdout,
        process::OutputStream::Stderr => OutputStream::Stderr,
    };
    reporter.output.push(stream, &line.text);
}

/// Whether `dir` holds anything (an unreadable folder counts as written: not the agent's fault).
fn folder_has_entries(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_some(),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// The CLI's last error lines, else its last lines.
fn error_text(tail: &[OutputLine]) -> String {
    let errors: Vec<&str> = tail
        .iter()
        .map(|line| line.text.as_str())
        .filter(|text| progress::is_error_line(text))
        .collect();
    let chosen: Vec<&str> = if errors.is_empty() {
        tail.iter().map(|line| line.text.as_str()).collect()
    } else {
        errors
    };
    let start = chosen.len().saturating_sub(ERROR_LINES_QUOTED);
    let text = chosen[start..].join("\n");
    if text.trim().is_empty() {
        "(no output)".to_string()
    } else {
        text
    }
}

/// Turns parsed lines and output-file evidence into step reports: a new step at once, new text
/// for the same step at most once per `MESSAGE_INTERVAL`.
#[derive(Default)]
struct StepTracker {
    step: u32,
    last_sent: Option<tokio::time::Instant>,
}

impl StepTracker {
    fn on_report(&mut self, step: Option<u32>, message: String, reporter: &Reporter) {
        let now = tokio::time::Instant::now();
        match step {
            Some(step) if step > self.step => {
                self.step = step;
                self.last_sent = Some(now);
                reporter.step(step, message);
            }
            _ if self.step > 0
                && self
                    .last_sent
                    .is_none_or(|at| now.duration_since(at) >= MESSAGE_INTERVAL) =>
            {
                self.last_sent = Some(now);
                reporter.step(self.step, message);
            }
            _ => {}
        }
    }

    fn on_output_evidence(&mut self, done_step: u32, reporter: &Reporter) {
        if done_step > self.step {
            self.step = done_step;
            self.last_sent = Some(tokio::time::Instant::now());
            reporter.step(
                done_step,
                format!("step {done_step}/{TOTAL_STEPS} output written"),
            );
        }
    }
}

fn into_document(document: CollectedDocument) -> Document {
    Document {
        slug: document.slug,
        title: document.title,
        kind: document.kind,
        chapter_index: document.chapter_index,
        content: document.content,
    }
}

/// The lock file in a workspace root, held (flock) by the agent process that owns the root.
pub const WORKSPACE_LOCK: &str = ".agent.lock";

/// Why the workspace root could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("cannot prepare the workspace folder {path} (TEMP_DIR): {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the workspace folder {path} is in use by another live agent process with the same \
         AGENT_ID and TEMP_DIR; give each agent its own AGENT_ID (or TEMP_DIR)"
    )]
    Held { path: String },
}

/// The owning agent's hold on its workspace root: while it lives, no other agent process with
/// the same root sweeps it. Released when the process exits, however it exits (an flock dies
/// with its file descriptor).
#[derive(Debug)]
pub struct WorkspaceLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Creates the agent's workspace root, locks it for this process, and removes workspaces a
/// previous run of this agent left behind when it died mid-run: only once the lock is held, so a
/// live agent's workspaces are never swept as stale.
pub fn prepare_workspace_root(root: &Path) -> Result<WorkspaceLock, WorkspaceError> {
    let path = || root.display().to_string();
    let io = |source| WorkspaceError::Io {
        path: path(),
        source,
    };
    std::fs::create_dir_all(root).map_err(io)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(root.join(WORKSPACE_LOCK))
        .map_err(io)?;
    let lock = match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => lock,
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
            return Err(WorkspaceError::Held { path: path() })
        }
        Err((_, errno)) => return Err(io(errno.into())),
    };
    sweep_stale_workspaces(root).map_err(io)?;
    Ok(WorkspaceLock { _lock: lock })
}

fn sweep_stale_workspaces(root: &Path) -> std::io::Result<()> {
    let entries = std::fs::read_dir(root)?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with(WORKSPACE_PREFIX) {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => info!(path = %entry.path().display(), "removed a stale workspace"),
                Err(error) => {
                    warn!(path = %entry.path().display(), %error, "could not remove a stale workspace")
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn could_not_start_needs_the_code_and_silence() {
        let exited = ExitStatusKind::Exited;
        assert!(analyzer_could_not_start(&exited(127), false, false));
        assert!(analyzer_could_not_start(&exited(126), false, false));
        // It printed, or wrote output: it ran, so the job (or a credential) is at fault.
        assert!(!analyzer_could_not_start(&exited(127), true, false));
        assert!(!analyzer_could_not_start(&exited(127), false, true));
        // Other codes and signals are the job's.
        assert!(!analyzer_could_not_start(&exited(1), false, false));
        assert!(!analyzer_could_not_start(&exited(0), false, false));
        assert!(!analyzer_could_not_start(
            &ExitStatusKind::Signaled(9),
            false,
            false
        ));
    }

    #[test]
    fn clone_failures_of_the_agent_are_told_from_the_repository_s() {
        let failed = |message: &str| CloneError::Failed {
            url: "https://github.com/o/r".into(),
            branch: "main".into(),
            message: message.into(),
        };
        assert!(clone_failed_on_agent(&failed(
            "fatal: write error: No space left on device"
        )));
        assert!(clone_failed_on_agent(&CloneError::Process(
            ProcessError::Spawn {
                program: "git".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            }
        )));
        assert!(!clone_failed_on_agent(&failed(
            "fatal: Remote branch nope not found in upstream origin"
        )));
        assert!(!clone_failed_on_agent(&failed(
            "fatal: unable to access: timeout"
        )));
        assert!(!clone_failed_on_agent(&CloneError::TooLarge {
            url: "u".into(),
            limit: 1,
        }));
    }

    #[test]
    fn a_live_agents_workspaces_are_not_swept() {
        let temp = tempfile::tempdir().unwrap();
        let root = temp.path().join("agent-1");
        let live = prepare_workspace_root(&root).expect("the first agent takes the root");
        let workspace = root.join(format!("{WORKSPACE_PREFIX}busy"));
        std::fs::create_dir(&workspace).unwrap();

        // A second agent with the same id and TEMP_DIR (flock conflicts between two open files,
        // in one process as between two).
        let refused = prepare_workspace_root(&root).unwrap_err().to_string();
        assert!(
            refused.contains("in use by another live agent") && refused.contains("AGENT_ID"),
            "{refused}"
        );
        assert!(
            workspace.exists(),
            "the live agent's workspace is left alone"
        );

        // Once the owner is gone its leftovers are stale.
        drop(live);
        let _next = prepare_workspace_root(&root).expect("the root is free again");
        assert!(!workspace.exists(), "a dead agent's workspace is swept");
    }
}
