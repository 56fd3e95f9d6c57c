//! Shallow, validated `git clone` of a job's repository.
//!
//! The URL and branch come from the network, so they are checked against the allow-list and git's
//! ref rules before anything runs, and git gets them as argv after `--` (no shell, no option
//! injection). `GIT_ALLOW_PROTOCOL` limits git to the allow-list's schemes even if something leads
//! it elsewhere (`ext::` remote helpers never run). Time is bounded by the process timeout, size by
//! a watchdog that measures the destination while git writes it.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fondation_proto::validate::{check_branch, RepoAllowlist, ValidationError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::process::{self, OutputStream, ProcessEnd, ProcessError, ProcessSpec};

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
            Self::Rejected(_) | Self::Dest { .. } | Self::TooLarge { .. } | Self::Canceled => false,
            Self::Failed { message, .. } => !is_permanent_git_failure(message),
            Self::TimedOut { .. } | Self::Process(_) => true,
        }
    }
}

/// git messages meaning "this repository/branch cannot be cloned", as opposed to transient
/// trouble. GitHub answers 401 for a repository that does not exist (or is private), which git
/// with prompts disabled reports as "could not read Username".
fn is_permanent_git_failure(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    (m.contains("remote branch") && m.contains("not found"))
        || m.contains("repository not found")
        || (m.contains("repository '") && m.contains("' not found"))
        || m.contains("does not appear to be a git repository")
        || m.contains("could not read username")
        || (m.contains("transport '") && m.contains("not allowed"))
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
        env: vec![
            // Never wait for a password nobody will type.
            ("GIT_TERMINAL_PROMPT".into(), "0".into()),
            ("GCM_INTERACTIVE".into(), "never".into()),
            ("GIT_ALLOW_PROTOCOL".into(), allowlist.git_protocols()),
            ("GIT_CONFIG_NOSYSTEM".into(), "1".into()),
        ],
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
        Ok(ProcessEnd::Exited { status, tail }) if !status.success() => Err(CloneError::Failed {
            url: url.clone(),
            branch: spec.branch.clone(),
            message: failure_message(&tail, &status),
        }),
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
mod tests {
    use std::process::Command;

    use tempfile::TempDir;

    use super::*;

    /// A local bare repository served through a `file://` URL, and an allow-list admitting it.
    struct Fixture {
        dir: TempDir,
        url: String,
        allowlist: RepoAllowlist,
    }

    fn git(cwd: &Path, args: &[&str]) {
        let out = Command::new("git")
            .args(args)
            .current_dir(cwd)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .output()
            .expect("git should be installed for these tests");
        assert!(
            out.status.success(),
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// `files` are (name, content) committed on branch `main`.
    fn fixture(files: &[(&str, &[u8])]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        git(
            dir.path(),
            &["-c", "init.defaultBranch=main", "init", "-q", "src"],
        );
        for (name, content) in files {
            std::fs::write(src.join(name), content).unwrap();
        }
        git(&src, &["add", "."]);
        git(
            &src,
            &[
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "-q",
                "-m",
                "init",
            ],
        );
        git(dir.path(), &["clone", "-q", "--bare", "src", "repo.git"]);
        let base = format!("file://{}", dir.path().display());
        let allowlist =
            RepoAllowlist::parse(&format!("https://github.com/,{base}/")).expect("allow-list");
        Fixture {
            url: format!("{base}/repo.git"),
            dir,
            allowlist,
        }
    }

    fn spec(fx: &Fixture, branch: &str) -> CloneSpec {
        CloneSpec {
            url: fx.url.clone(),
            branch: branch.into(),
            dest: fx.dir.path().join("checkout"),
            timeout: Duration::from_secs(60),
            max_bytes: 10 * 1024 * 1024,
        }
    }

    /// Incompressible bytes, so git cannot shrink them.
    fn noise(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[tokio::test]
    async fn clones_a_local_repository() {
        let fx = fixture(&[("README.md", b"hello\n")]);
        let spec = spec(&fx, "main");
        clone_repo(&spec, &fx.allowlist, CancellationToken::new())
            .await
            .expect("clone should succeed");
        assert_eq!(
            std::fs::read(spec.dest.join("README.md")).unwrap(),
            b"hello\n"
        );
        assert!(spec.dest.join(".git").is_dir());
    }

    #[tokio::test]
    async fn missing_branch_fails_permanently_with_gits_message() {
        let fx = fixture(&[("README.md", b"hello\n")]);
        let spec = spec(&fx, "nope");
        let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
            .await
            .unwrap_err();
        match &err {
            CloneError::Failed {
                message, branch, ..
            } => {
                assert_eq!(branch, "nope");
                assert!(
                    message.contains("Remote branch nope not found"),
                    "{message}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!err.is_retryable());
        assert!(!spec.dest.exists(), "partial clone should be removed");
    }

    #[tokio::test]
    async fn missing_repository_fails_permanently() {
        let fx = fixture(&[("README.md", b"hello\n")]);
        let mut spec = spec(&fx, "main");
        spec.url = format!("file://{}/missing.git", fx.dir.path().display());
        let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, CloneError::Failed { .. }), "{err:?}");
        assert!(!err.is_retryable(), "{err}");
    }

    #[tokio::test]
    async fn url_outside_allowlist_is_rejected_before_anything_runs() {
        let fx = fixture(&[("README.md", b"hello\n")]);
        for url in [
            "https://evil.example/x.git".to_owned(),
            "ext::sh -c touch% /tmp/pwned".to_owned(),
            // A file:// URL outside the configured file:// prefix.
            "file:///etc".to_owned(),
        ] {
            let mut spec = spec(&fx, "main");
            spec.url = url.clone();
            let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
                .await
                .unwrap_err();
            assert!(matches!(err, CloneError::Rejected(_)), "{url}: {err:?}");
            assert!(!err.is_retryable());
            assert!(!spec.dest.exists(), "{url}: dest must not be created");
        }
        // The default allow-list does not admit file:// at all.
        let err = clone_repo(
            &spec(&fx, "main"),
            &RepoAllowlist::default(),
            CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(
            err,
            CloneError::Rejected(ValidationError::UrlNotAllowed { .. })
        ));
    }

    #[tokio::test]
    async fn option_like_branch_is_rejected() {
        let fx = fixture(&[("README.md", b"hello\n")]);
        for branch in ["--upload-pack=touch /tmp/pwned", "main;rm -rf /", "-x"] {
            let spec = spec(&fx, branch);
            let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
                .await
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    CloneError::Rejected(ValidationError::InvalidBranch { .. })
                ),
                "{branch}: {err:?}"
            );
            assert!(!spec.dest.exists());
        }
    }

    #[tokio::test]
    async fn tiny_limit_is_too_large() {
        let fx = fixture(&[("README.md", b"hello, this is more than ten bytes\n")]);
        let mut spec = spec(&fx, "main");
        spec.max_bytes = 10;
        let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            matches!(err, CloneError::TooLarge { limit: 10, .. }),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert!(!spec.dest.exists(), "oversize clone should be removed");
    }

    #[tokio::test]
    async fn watchdog_stops_a_growing_clone() {
        let fx = fixture(&[("big.bin", &noise(8 * 1024 * 1024))]);
        let mut spec = spec(&fx, "main");
        spec.max_bytes = 64 * 1024;
        let err = clone_with_poll(
            &spec,
            &fx.allowlist,
            CancellationToken::new(),
            Duration::from_millis(5),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CloneError::TooLarge { .. }), "{err:?}");
        assert!(!spec.dest.exists());
    }

    #[tokio::test]
    async fn canceled_clone_is_canceled() {
        let fx = fixture(&[("README.md", b"hello\n")]);
        let spec = spec(&fx, "main");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = clone_repo(&spec, &fx.allowlist, cancel).await.unwrap_err();
        assert!(matches!(err, CloneError::Canceled), "{err:?}");
        assert!(!err.is_retryable());
        assert!(!spec.dest.exists());
    }

    #[tokio::test]
    async fn unresponsive_remote_times_out() {
        // A git:// server that accepts and then says nothing.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        let base = format!("git://127.0.0.1:{port}/");
        let allowlist = RepoAllowlist::parse(&base).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spec = CloneSpec {
            url: format!("{base}repo.git"),
            branch: "main".into(),
            dest: dir.path().join("checkout"),
            timeout: Duration::from_millis(500),
            max_bytes: 1024 * 1024,
        };
        let started = std::time::Instant::now();
        let err = clone_repo(&spec, &allowlist, CancellationToken::new())
            .await
            .unwrap_err();
        server.abort();
        assert!(matches!(err, CloneError::TimedOut { .. }), "{err:?}");
        assert!(err.is_retryable());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "took {:?}",
            started.elapsed()
        );
        assert!(!spec.dest.exists());
    }

    #[test]
    fn dir_size_counts_files_without_following_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("one"), [0u8; 100]).unwrap();
        std::fs::write(root.join("a/b/two"), [0u8; 50]).unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("huge"), vec![0u8; 10_000]).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        assert_eq!(dir_size(&root, u64::MAX), 150);
        assert!(dir_size(&root, 120) > 120);
        assert_eq!(dir_size(&dir.path().join("missing"), 10), 0);
    }

    #[test]
    fn retryability() {
        let failed = |message: &str| CloneError::Failed {
            url: "u".into(),
            branch: "b".into(),
            message: message.into(),
        };
        assert!(failed("fatal: unable to access 'https://github.com/o/r.git/': Could not resolve host: github.com").is_retryable());
        assert!(failed("fatal: early EOF").is_retryable());
        assert!(!failed("warning: Could not find remote branch x to clone.; fatal: Remote branch x not found in upstream origin").is_retryable());
        assert!(!failed("remote: Repository not found.; fatal: repository 'https://github.com/o/r.git/' not found").is_retryable());
        assert!(!failed(
            "fatal: could not read Username for 'https://github.com': terminal prompts disabled"
        )
        .is_retryable());
        assert!(!failed("fatal: transport 'file' not allowed").is_retryable());
        assert!(CloneError::TimedOut {
            url: "u".into(),
            timeout: Duration::from_secs(1)
        }
        .is_retryable());
        assert!(!CloneError::TooLarge {
            url: "u".into(),
            limit: 1
        }
        .is_retryable());
        assert!(CloneError::Process(ProcessError::EmptyArgv).is_retryable());
    }

    #[test]
    fn failure_message_keeps_last_stderr_lines() {
        let line = |stream, text: &str| process::OutputLine {
            stream,
            text: text.into(),
        };
        let tail = vec![
            line(OutputStream::Stderr, "Cloning into '/x'..."),
            line(OutputStream::Stdout, "ignored"),
            line(OutputStream::Stderr, "warning: w"),
            line(OutputStream::Stderr, ""),
            line(OutputStream::Stderr, "fatal: f"),
        ];
        let status = process::ExitStatusKind::Exited(128);
        assert_eq!(failure_message(&tail, &status), "warning: w; fatal: f");
        assert_eq!(
            failure_message(&[], &status),
            "git ended with Exited(128) without an error message"
        );
    }
}
