//! The agent's self-check: what every job needs, checked before the agent takes work, so a broken
//! agent stops taking jobs instead of failing them one after the other (a "black hole").
//!
//! Checked: `TEMP_DIR` writable with more than `MIN_FREE_DISK` free, `git` runnable,
//! `ANALYZER_WORKDIR` present, the analyzer's program resolvable and executable (by the slot user
//! when analyzers run as slot users), for a `node`/`bun` command its script file and the Claude
//! SDK beside it (`node_modules/@anthropic-ai/claude-code`, DESIGN.md section 3), and
//! `ANALYZER_CHECK_COMMAND` exiting 0 within `ANALYZER_CHECK_TIMEOUT` when it is set.
//!
//! [`supervise`] runs the checks at start, retries them with backoff (1 s doubling to 60 s) while
//! they fail, and again whenever a run failed for a reason of the agent ([`Readiness::recheck`]).
//! The outcome is published through [`Readiness`]: the session announces it to the coordinator
//! and refuses work while it is unready; the health service reports `""` NOT_SERVING.

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use fondation_runtime::logging::escaped;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    health::HealthState,
    process::{self, ExitStatusKind, ProcessEnd, ProcessSpec},
    sandbox::{EnvAllowlist, SlotUser},
};

/// First wait before checking again after a failed check; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);
/// Longest `git --version` may take.
const GIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The SDK the bundled CLI imports at its first line (it is built with `--external`).
const CLAUDE_SDK: &str = "node_modules/@anthropic-ai/claude-code";
/// Search path of `execvp` when the analyzer's environment has no `PATH`.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Why the agent cannot take work; the text names what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckFailure {
    #[error("TEMP_DIR {path} is not writable: {message}")]
    TempDir { path: String, message: String },
    #[error("TEMP_DIR {path} has {free} free, below MIN_FREE_DISK ({min}): free some space or lower MIN_FREE_DISK")]
    DiskFull {
        path: String,
        free: bytesize::ByteSize,
        min: bytesize::ByteSize,
    },
    #[error("git cannot run: {0}; install git in the agent's image")]
    Git(String),
    #[error("ANALYZER_WORKDIR {path} is not usable: {message}")]
    Workdir { path: String, message: String },
    #[error("the analyzer program {program:?} (ANALYZER_COMMAND) {message}")]
    Program { program: String, message: String },
    #[error("the analyzer script {path} (ANALYZER_COMMAND) is missing: {message}")]
    Script { path: String, message: String },
    #[error("the Claude SDK ({CLAUDE_SDK}) is not reachable from {script} nor through NODE_PATH: the bundled CLI fails at its first import")]
    Sdk { script: String },
    #[error("ANALYZER_CHECK_COMMAND failed: {0}")]
    CheckCommand(String),
}

/// What the checks look at, taken from the agent's configuration once.
#[derive(Debug, Clone)]
pub struct SelfCheck {
    /// `TEMP_DIR/<agent id>`, where workspaces are made.
    pub workspace_root: PathBuf,
    pub min_free_disk: u64,
    pub workdir: PathBuf,
    /// The analyzer's argv template (placeholders unreplaced).
    pub analyzer_argv: Vec<String>,
    /// The analyzer's environment (for `PATH` and `NODE_PATH`, and the check command).
    pub analyzer_env: Vec<(String, String)>,
    /// The user the analyzer runs as, when not the agent's own.
    pub slot_user: Option<SlotUser>,
    pub check_command: Option<Vec<String>>,
    pub check_timeout: Duration,
}

impl SelfCheck {
    /// Runs every check, cheapest first; the first failure is the reason.
    pub async fn run(&self) -> Result<(), CheckFailure> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.check_files())
            .await
            .map_err(|e| CheckFailure::TempDir {
                path: self.workspace_root.display().to_string(),
                message: format!("the check panicked: {e}"),
            })??;
        self.check_git().await?;
        if let Some(argv) = &self.check_command {
            self.check_command(argv).await?;
        }
        Ok(())
    }

    /// The checks that only look at the file system.
    fn check_files(&self) -> Result<(), CheckFailure> {
        self.check_temp_dir()?;
        let workdir = &self.workdir;
        match std::fs::metadata(workdir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(CheckFailure::Workdir {
                    path: workdir.display().to_string(),
                    message: "not a directory".into(),
                })
            }
            Err(e) => {
                return Err(CheckFailure::Workdir {
                    path: workdir.display().to_string(),
                    message: e.to_string(),
                })
            }
        }
        let Some(program) = self.analyzer_argv.first() else {
            return Err(CheckFailure::Program {
                program: String::new(),
                message: "is empty".into(),
            });
        };
        let path_var = self
            .env("PATH")
            .map(str::to_owned)
            .or_else(|| std::env::var("PATH").ok())
            .unwrap_or_else(|| DEFAULT_PATH.to_owned());
        resolve_program(program, workdir, &path_var, self.slot_user).map_err(|message| {
            CheckFailure::Program {
                program: program.clone(),
                message,
            }
        })?;
        if let Some(script) = node_script(&self.analyzer_argv) {
            let script = workdir.join(script);
            match std::fs::metadata(&script) {
                Ok(meta) if meta.is_file() => {}
                Ok(_) => {
                    return Err(CheckFailure::Script {
                        path: script.display().to_string(),
                        message: "not a file".into(),
                    })
                }
                Err(e) => {
                    return Err(CheckFailure::Script {
                        path: script.display().to_string(),
                        message: e.to_string(),
                    })
                }
            }
            let node_path = self.env("NODE_PATH").unwrap_or_default();
            if !sdk_reachable(&script, node_path) {
                return Err(CheckFailure::Sdk {
                    script: script.display().to_string(),
                });
            }
        }
        Ok(())
    }

    fn env(&self, name: &str) -> Option<&str> {
        self.analyzer_env
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The workspace root exists (it is made again if it was removed), takes a file, and its file
    /// system has more than `MIN_FREE_DISK` available.
    fn check_temp_dir(&self) -> Result<(), CheckFailure> {
        let root = &self.workspace_root;
        let failed = |message: String| CheckFailure::TempDir {
            path: root.display().to_string(),
            message,
        };
        std::fs::create_dir_all(root).map_err(|e| failed(e.to_string()))?;
        let mut probe = tempfile::tempfile_in(root).map_err(|e| failed(e.to_string()))?;
        std::io::Write::write_all(&mut probe, b"fondation self-check")
            .map_err(|e| failed(e.to_string()))?;
        let stat = nix::sys::statvfs::statvfs(root.as_path()).map_err(|e| failed(e.to_string()))?;
        #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
        let free = stat.blocks_available() as u64 * stat.fragment_size() as u64;
        if free < self.min_free_disk {
            return Err(CheckFailure::DiskFull {
                path: root.display().to_string(),
                free: bytesize::ByteSize(free),
                min: bytesize::ByteSize(self.min_free_disk),
            });
        }
        Ok(())
    }

    async fn check_git(&self) -> Result<(), CheckFailure> {
        let spec = ProcessSpec {
            argv: vec!["git".into(), "--version".into()],
            workdir: self.workspace_root.clone(),
            env: EnvAllowlist::for_git().from_current(),
            user: None,
            timeout: GIT_TIMEOUT,
            kill_grace: Duration::from_secs(1),
            max_line_bytes: 1024,
            tail_lines: 5,
        };
        run_to_success(spec).await.map_err(CheckFailure::Git)
    }

    async fn check_command(&self, argv: &[String]) -> Result<(), CheckFailure> {
        let spec = ProcessSpec {
            argv: argv.to_vec(),
            workdir: self.workdir.clone(),
            env: self.analyzer_env.clone(),
            user: None,
            timeout: self.check_timeout,
            kill_grace: Duration::from_secs(1),
            max_line_bytes: 1024,
            tail_lines: 5,
        };
        run_to_success(spec)
            .await
            .map_err(CheckFailure::CheckCommand)
    }
}

/// Runs a short command; Ok when it exits 0, else what happened with its last lines.
async fn run_to_success(spec: ProcessSpec) -> Result<(), String> {
    let timeout = spec.timeout;
    let (lines, _) = mpsc::channel(1);
    let end = process::run(spec, lines, CancellationToken::new())
        .await
        .map_err(|e| e.to_string())?;
    let last_lines = |tail: &[process::OutputLine]| {
        tail.iter()
            .map(|line| line.text.as_str())
            .collect::<Vec<_>>()
            .join(" / ")
    };
    match end {
        ProcessEnd::Exited {
            status: ExitStatusKind::Exited(0),
            ..
        } => Ok(()),
        ProcessEnd::Exited { status, tail } => Err(format!(
            "it ended with {status:?}: {}",
            escaped(&last_lines(&tail))
        )),
        ProcessEnd::TimedOut { .. } => Err(format!(
            "it did not finish within {} ms",
            timeout.as_millis()
        )),
        ProcessEnd::Canceled { .. } => Err("it was stopped".into()),
    }
}

/// Finds `program` like `execvp` does (a name with a '/' is a path, relative to `workdir` where
/// the analyzer starts; otherwise the first match along `path_var`) and checks that it is a file
/// the analyzer's user may execute. Returns why not.
pub fn resolve_program(
    program: &str,
    workdir: &Path,
    path_var: &str,
    user: Option<SlotUser>,
) -> Result<PathBuf, String> {
    if program.contains('/') {
        let path = workdir.join(program);
        return executable(&path, user).map(|()| path);
    }
    let mut last_problem = None;
    for dir in path_var.split(':') {
        // An empty entry means the current folder, as for execvp.
        let dir = if dir.is_empty() {
            workdir.to_path_buf()
        } else {
            workdir.join(dir)
        };
        let candidate = dir.join(program);
        if std::fs::symlink_metadata(&candidate).is_err() {
            continue;
        }
        match executable(&candidate, user) {
            Ok(()) => return Ok(candidate),
            // execvp goes on after EACCES, and reports it when nothing else matches.
            Err(problem) => last_problem = Some(problem),
        }
    }
    Err(last_problem.unwrap_or_else(|| format!("is not found along PATH ({path_var})")))
}

/// Whether `path` is a regular file `user` (or the agent itself) may execute.
fn executable(path: &Path, user: Option<SlotUser>) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("at {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("at {} is not a file", path.display()));
    }
    let mode = meta.permissions().mode();
    let allowed = match user {
        // The slot user has only its own uid and gid: the owner, group or other bit applies.
        Some(user) => {
            let bit = if meta.uid() == user.uid {
                0o100
            } else if meta.gid() == user.gid {
                0o010
            } else {
                0o001
            };
            let reachable = path
                .ancestors()
                .skip(1)
                .filter_map(|dir| std::fs::metadata(dir).ok())
                .all(|dir| dir.permissions().mode() & 0o001 != 0);
            mode & bit != 0 && reachable
        }
        None => nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_ok(),
    };
    if allowed {
        Ok(())
    } else {
        let who = match user {
            Some(user) => format!("the analyzer's slot user (uid {})", user.uid),
            None => "the agent's user".to_string(),
        };
        Err(format!(
            "at {} is not executable by {who} (mode {:o})",
            path.display(),
            mode & 0o7777
        ))
    }
}

/// For a `node`/`bun` command, its script argument (the bundle), if it names one.
fn node_script(argv: &[String]) -> Option<&str> {
    let program = argv.first()?;
    let name = Path::new(program).file_name()?.to_str()?;
    if !matches!(name, "node" | "bun") {
        return None;
    }
    argv[1..]
        .iter()
        .map(String::as_str)
        .find(|arg| [".mjs", ".cjs", ".js"].iter().any(|ext| arg.ends_with(ext)))
}

/// Whether Node's resolution finds the SDK from `script`: a `node_modules` beside it or in one of
/// its parent folders, or under a `NODE_PATH` entry.
fn sdk_reachable(script: &Path, node_path: &str) -> bool {
    let beside = script
        .ancestors()
        .skip(1)
        .any(|dir| dir.join(CLAUDE_SDK).is_dir());
    let sdk_in_path = CLAUDE_SDK.trim_start_matches("node_modules/");
    beside
        || node_path
            .split(':')
            .filter(|entry| !entry.is_empty())
            .any(|entry| Path::new(entry).join(sdk_in_path).is_dir())
}

/// Whether the agent may take work: `None` when its last self-check passed, else why not.
#[derive(Clone)]
pub struct Readiness {
    state: watch::Sender<Option<String>>,
    recheck: Arc<Notify>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self {
            state: watch::Sender::new(Some("the self-check has not run yet".into())),
            recheck: Arc::default(),
        }
    }
}

impl Readiness {
    /// Why the agent takes no work now, or `None` when it does.
    pub fn unready(&self) -> Option<String> {
        self.state.borrow().clone()
    }

    /// Follows the readiness as it changes.
    pub fn subscribe(&self) -> watch::Receiver<Option<String>> {
        self.state.subscribe()
    }

    /// A run failed for a reason of the agent: no more work until the checks pass again.
    pub fn recheck(&self, failure: &str) {
        warn!(failure = %escaped(failure), "a run failed for a reason of the agent: NOT_SERVING until the self-check passes again");
        self.state.send_replace(Some(format!(
            "re-checking after a run failed for a reason of the agent: {}",
            fondation_proto::limits::truncate_utf8(failure, 512)
        )));
        self.recheck.notify_one();
    }

    pub(crate) fn set(&self, unready: Option<String>) {
        self.state.send_replace(unready);
    }
}

/// Runs the self-check at start, with backoff while it fails, and whenever a recheck is asked,
/// until `stop`. Publishes every outcome to `readiness` and `health`.
pub async fn supervise(
    check: SelfCheck,
    readiness: Readiness,
    health: HealthState,
    stop: CancellationToken,
) {
    let mut retry = FIRST_RETRY;
    loop {
        let outcome = tokio::select! {
            outcome = check.run() => outcome,
            _ = stop.cancelled() => return,
        };
        let wait = match outcome {
            Ok(()) => {
                if readiness.unready().is_some() {
                    info!("self-check passed: taking work");
                }
                readiness.set(None);
                health.set_checks_passed(true).await;
                retry = FIRST_RETRY;
                None
            }
            Err(failure) => {
                let reason = failure.to_string();
                // Warn on a new reason only: a check failing the same way every minute says
                // nothing new.
                if readiness.unready().as_deref() != Some(reason.as_str()) {
                    warn!(reason = %escaped(&reason), retry_in_ms = retry.as_millis() as u64, "self-check failed: NOT_SERVING, taking no work");
                }
                readiness.set(Some(reason));
                health.set_checks_passed(false).await;
                let wait = retry;
                retry = (retry * 2).min(MAX_RETRY);
                Some(wait)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = readiness.recheck.notified() => {
                health.set_checks_passed(false).await;
            }
            _ = tokio::time::sleep(wait.unwrap_or(MAX_RETRY)), if wait.is_some() => {}
        }
    }
}

#[cfg(test)]
mod tests;
