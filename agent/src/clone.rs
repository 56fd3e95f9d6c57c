//! Shallow, validated `git clone` of a job's repository.
//!
//! The URL and branch come from the network, so they are checked against the allow-list and git's
//! ref rules before anything runs, and git gets them as argv after `--` (no shell, no option
//! injection). `GIT_ALLOW_PROTOCOL` limits git to the allow-list's schemes even if something leads
//! it elsewhere (`ext::` remote helpers never run). Time is bounded by the process timeout, size by
//! a watchdog that measures the destination while git writes it.
//!
//! A private repository's token (the assignment's clone credential) reaches git as an
//! `http.extraHeader` set through `GIT_CONFIG_COUNT`/`GIT_CONFIG_KEY_0`/`GIT_CONFIG_VALUE_0` in the
//! environment of that one git process: never in argv (other users can read it in `/proc`), the
//! URL, `.git/config` (environment settings are not written there) or any file, and never in the
//! analyzer's environment. A clone the host refuses for lack of (valid) credentials is its own
//! error, told from git's exit and its stderr (our own git's, so trusted).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use fondation_proto::{
    model::CloneCredential,
    validate::{check_branch, RepoAllowlist, ValidationError},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::process::{self, OutputStream, ProcessEnd, ProcessError, ProcessSpec};
use crate::sandbox::EnvAllowlist;

/// How often the watchdog measures the destination while git runs.
const SIZE_POLL: Duration = Duration::from_millis(500);

/// SIGTERM to SIGKILL delay for git: on SIGTERM it removes its half-written clone itself.
const GIT_KILL_GRACE: Duration = Duration::from_secs(3);

/// How many of git's last stderr lines make up a failure message.
const MESSAGE_LINES: usize = 5;

/// What to clone, where, and within which limits.
#[derive(Debug, Clone)]
pub struct CloneSpec {
    /// Repository URL, untrusted; checked against the allow-list.
    pub url: String,
    /// Branch to check out, untrusted; checked against git's ref rules.
    pub branch: String,
    /// Folder to create; its parent must exist. Removed again if the clone fails.
    pub dest: PathBuf,
    /// Wall-clock limit for the clone.
    pub timeout: Duration,
    /// Largest size of the clone on disk (objects and checkout), in bytes.
    pub max_bytes: u64,
    /// Token for a private repository; `None` clones anonymously. Redacted in `Debug`.
    pub credential: Option<CloneCredential>,
}

/// Why a clone did not produce a checkout.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// URL or branch refused before running anything.
    #[error("clone refused: {0}")]
    Rejected(ValidationError),

    /// The destination path cannot be handed to git.
    #[error("clone destination {} is not usable: {reason}; use an absolute UTF-8 path under TEMP_DIR", path.display())]
    Dest { path: PathBuf, reason: String },

    /// git ran and failed; `message` is its last stderr lines.
    #[error("git clone of {url} (branch {branch}) failed: {message}")]
    Failed {
        url: String,
        branch: String,
        message: String,
    },

    /// The host refused the clone for authentication: 401/403, or GitHub's 404 "Repository not
    /// found", which is how it answers for a private repository it will not show. The messages
    /// are the old worker's, which the web app shows to the user.
    #[error("{}", auth_message(*had_credential))]
    AuthRefused {
        url: String,
        /// Whether git presented a token.
        had_credential: bool,
    },

    /// git did not finish in time and was stopped.
    #[error(
        "git clone of {url} did not finish within {timeout:?}; the remote may be slow or the \
         repository large: retry later or raise the clone timeout"
    )]
    TimedOut { url: String, timeout: Duration },

    /// The clone grew past `max_bytes` and was stopped.
    #[error(
        "repository {url} is larger than the clone limit of {limit} bytes; raise the limit if \
         such repositories are expected"
    )]
    TooLarge { url: String, limit: u64 },

    /// The caller's cancel token fired.
    #[error("git clone was canceled")]
    Canceled,

    /// git could not be started or supervised.
    #[error(transparent)]
    Process(#[from] ProcessError),
}

impl CloneError {
    /// Whether another attempt (later, or on another agent) could succeed.
    ///
    /// A refused input, an oversize repository, a missing branch or repository will fail the same
    /// way every time; network trouble, timeouts and local problems may not.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Rejected(_)
            | Self::Dest { .. }
            | Self::TooLarge { .. }
            | Self::AuthRefused { .. }
            | Self::Canceled => false,
            Self::Failed { message, .. } => !is_permanent_git_failure(message),
            Self::TimedOut { .. } | Self::Process(_) => true,
        }
    }
}

/// The old worker's message when there was no token, and ours when the token was refused.
fn auth_message(had_credential: bool) -> &'static str {
    if had_credential {
        "GitHub refused the access token for this repository. Please reconnect your GitHub account."
    } else {
        "GitHub access token not found. Please reconnect your GitHub account."
    }
}

/// git messages meaning "this repository/branch cannot be cloned", as opposed to transient
/// trouble (refusals for authentication are told apart before, by [`is_auth_refusal`]).
fn is_permanent_git_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    (m.contains("remote branch") && m.contains("not found"))
        || m.contains("does not appear to be a git repository")
        || (m.contains("transport '") && m.contains("not allowed"))
}

/// git's stderr when the host wants (other) credentials: a 401 with prompts disabled ("could not
/// read Username"), a refused login, HTTP 401 or 403, or the 404 GitHub gives for a repository
/// it will not show ("Repository not found").
fn is_auth_refusal(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("could not read username")
        || m.contains("could not read password")
        || m.contains("authentication failed")
        || m.contains("the requested url returned error: 401")
        || m.contains("the requested url returned error: 403")
        || m.contains("repository not found")
        || (m.contains("repository '") && m.contains("' not found"))
}

/// The environment that makes git send the token (HTTP Basic with GitHub's `x-access-token`
/// user) on its requests to the repository's host. Only for the clone's own git process.
fn credential_env(credential: &CloneCredential) -> [(String, String); 3] {
    [
        ("GIT_CONFIG_COUNT".into(), "1".into()),
        ("GIT_CONFIG_KEY_0".into(), "http.extraHeader".into()),
        (
            "GIT_CONFIG_VALUE_0".into(),
            format!("Authorization: Basic {}", basic_credential(credential)),
        ),
    ]
}

/// The token as git sends it (HTTP Basic, base64 of `x-access-token:<token>`): a secret in its
/// own right, which [`crate::redact`] hides as well as the token.
pub fn basic_credential(credential: &CloneCredential) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(format!("x-access-token:{}", credential.expose()))
}

/// Clones `spec.branch` of `spec.url` into `spec.dest`, shallow and single-branch.
///
/// URL and branch are validated first; when they fail nothing runs and `dest` is not created. On
/// any failure after git started, `dest` is removed again (unless it existed before the call).
pub async fn clone_repo(
    spec: &CloneSpec,
    allowlist: &RepoAllowlist,
    cancel: CancellationToken,
) -> Result<(), CloneError> {
    clone_with_poll(spec, allowlist, cancel, SIZE_POLL).await
}

async fn clone_with_poll(
    spec: &CloneSpec,
    allowlist: &RepoAllowlist,
    cancel: CancellationToken,
    poll: Duration,
) -> Result<(), CloneError> {
    // git gets the normalized URL: exactly the string the allow-list approved.
    let url = allowlist
        .normalize(&spec.url)
        .map_err(CloneError::Rejected)?;
    check_branch(&spec.branch).map_err(CloneError::Rejected)?;

    let dest_error = |reason: &str| CloneError::Dest {
        path: spec.dest.clone(),
        reason: reason.to_owned(),
    };
    // Absolute, because git runs in the parent folder and would resolve a relative path again.
    let dest = std::path::absolute(&spec.dest).map_err(|e| dest_error(&e.to_string()))?;
    let parent = dest
        .parent()
        .ok_or_else(|| dest_error("it has no parent folder"))?
        .to_path_buf();
    let dest_arg = dest
        .to_str()
        .ok_or_else(|| dest_error("it is not valid UTF-8"))?
        .to_owned();
    let existed = tokio::fs::symlink_metadata(&dest).await.is_ok();

    let process_spec = ProcessSpec {
        argv: [
            "git",
            "clone",
            "--depth",
            "1",
            "--single-branch",
            "--no-tags",
            "--branch",
            spec.branch.as_str(),
            "--",
            url.as_str(),
            dest_arg.as_str(),
        ]
        .map(str::to_owned)
        .to_vec(),
        workdir: parent,
        // git gets what it needs of the agent's environment, never the agent's settings.
        env: EnvAllowlist::for_git()
            .from_current()
            .into_iter()
            .chain([
                // Never wait for a password nobody will type.
                ("GIT_TERMINAL_PROMPT".into(), "0".into()),
                ("GCM_INTERACTIVE".into(), "never".into()),
                ("GIT_ALLOW_PROTOCOL".into(), allowlist.git_protocols()),
                ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
            ])
            .chain(spec.credential.iter().flat_map(credential_env))
            .collect(),
        // git runs as the agent: the clone is the agent's, the analyzer only reads it.
        user: None,
        timeout: spec.timeout,
        kill_grace: GIT_KILL_GRACE,
        max_line_bytes: 4096,
        tail_lines: 40,
    };

    // git's output is only needed for the failure message, which the tail carries.
    let (lines, _) = mpsc::channel(1);
    let stop = cancel.child_token();
    let too_large = Arc::new(AtomicBool::new(false));
    let watchdog = tokio::spawn(watch_size(
        dest.clone(),
        spec.max_bytes,
        poll,
        stop.clone(),
        too_large.clone(),
    ));
    debug!(url = %url, branch = %spec.branch, dest = %dest.display(), "cloning");
    let ended = process::run(process_spec, lines, stop).await;
    watchdog.abort();

    let result = match ended {
        Err(e) => Err(CloneError::Process(e)),
        Ok(_) if too_large.load(Ordering::SeqCst) => Err(CloneError::TooLarge {
            url: url.clone(),
            limit: spec.max_bytes,
        }),
        Ok(ProcessEnd::Canceled { .. }) => Err(CloneError::Canceled),
        Ok(ProcessEnd::TimedOut { .. }) => Err(CloneError::TimedOut {
            url: url.clone(),
            timeout: spec.timeout,
        }),
        Ok(ProcessEnd::Exited { status, tail }) if !status.success() => {
            let message = failure_message(&tail, &status);
            if is_auth_refusal(&message) {
                warn!(url = %url, had_credential = spec.credential.is_some(), git = %message, "the host refused the clone for authentication");
                Err(CloneError::AuthRefused {
                    url: url.clone(),
                    had_credential: spec.credential.is_some(),
                })
            } else {
                Err(CloneError::Failed {
                    url: url.clone(),
                    branch: spec.branch.clone(),
                    message,
                })
            }
        }
        Ok(ProcessEnd::Exited { .. }) => {
            // The clone may have finished between two polls: measure once more.
            let limit = spec.max_bytes;
            let measured = dest.clone();
            let size = tokio::task::spawn_blocking(move || dir_size(&measured, limit))
                .await
                .unwrap_or(0);
            if size > limit {
                Err(CloneError::TooLarge {
                    url: url.clone(),
                    limit,
                })
            } else {
                Ok(())
            }
        }
    };

    if result.is_err() && !existed {
        remove_partial(&dest).await;
    }
    result
}

/// Cancels `stop` and raises `too_large` once `dest` grows past `limit`. Runs until aborted.
async fn watch_size(
    dest: PathBuf,
    limit: u64,
    poll: Duration,
    stop: CancellationToken,
    too_large: Arc<AtomicBool>,
) {
    loop {
        tokio::time::sleep(poll).await;
        let measured = dest.clone();
        let size = tokio::task::spawn_blocking(move || dir_size(&measured, limit))
            .await
            .unwrap_or(0);
        if size > limit {
            warn!(dest = %dest.display(), limit, "clone exceeds its size limit, stopping git");
            too_large.store(true, Ordering::SeqCst);
            stop.cancel();
            return;
        }
    }
}

/// Total size of the regular files under `root`, without following symlinks (a clone may contain
/// symlinks to anywhere). Stops counting once past `limit`. Entries that vanish while git works
/// (temporary pack files) are skipped.
fn dir_size(root: &Path, limit: u64) -> u64 {
    match std::fs::symlink_metadata(root) {
        Ok(meta) if meta.is_dir() => {}
        Ok(meta) if meta.is_file() => return meta.len(),
        _ => return 0,
    }
    let mut total: u64 = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // DirEntry::metadata does not follow symlinks on Unix.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
                if total > limit {
                    return total;
                }
            }
        }
    }
    total
}

/// The last few meaningful lines git printed on stderr, on one line.
fn failure_message(tail: &[process::OutputLine], status: &process::ExitStatusKind) -> String {
    let lines: Vec<&str> = tail
        .iter()
        .filter(|l| l.stream == OutputStream::Stderr)
        .map(|l| l.text.trim())
        .filter(|t| !t.is_empty() && !t.starts_with("Cloning into"))
        .collect();
    if lines.is_empty() {
        return format!("git ended with {status:?} without an error message");
    }
    lines[lines.len().saturating_sub(MESSAGE_LINES)..].join("; ")
}

/// Removes a half-made clone; it is ours (it did not exist before) and useless.
async fn remove_partial(dest: &Path) {
    match tokio::fs::remove_dir_all(dest).await {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => warn!(dest = %dest.display(), error = %e, "could not remove partial clone"),
    }
}

#[cfg(test)]
mod tests;
