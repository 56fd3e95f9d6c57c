//! The baseline of the job measurements: what an agent does for a job (a shallow clone, the
//! fixture CLI, reading its output tree, removing the workspace) done directly as child processes,
//! with no coordinator, agent or gRPC in between.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use tempfile::TempDir;

use crate::{
    fixture_cli::{DEFAULT_OUTPUT_DIR, ENV_AGENT_ID, ENV_RUN_LOG, ENV_STEP_DELAY_MS},
    support::cluster::read_tree,
};

use super::peak_rss_kib;

/// Runs jobs directly: clones of one repository analyzed by the fixture CLI.
pub struct DirectRunner {
    repo_url: String,
    fixture: PathBuf,
    /// Workspaces, the CLI's working directory and its run log (agents keep one too).
    root: TempDir,
    /// Numbers workspaces, so parallel runs never share one.
    next: AtomicUsize,
}

impl DirectRunner {
    pub fn new(repo_url: &str, fixture: PathBuf) -> anyhow::Result<Self> {
        let root = tempfile::tempdir().context("creating a temp folder for direct runs")?;
        std::fs::create_dir_all(root.path().join("workdir"))
            .context("creating the analyzer workdir")?;
        Ok(Self {
            repo_url: repo_url.to_owned(),
            fixture,
            root,
            next: AtomicUsize::new(0),
        })
    }

    /// One job: clone, analyze, read every output file, remove the workspace. Returns the number
    /// of files read.
    pub fn run(&self) -> anyhow::Result<usize> {
        let repo = self.clone_repo()?;
        let job_id = repo
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let output = self.analyzer(&repo, &job_id).output();
        checked("the fixture CLI", output)?;
        let files = read_tree(&repo.join(DEFAULT_OUTPUT_DIR)).len();
        std::fs::remove_dir_all(&repo)
            .with_context(|| format!("removing the workspace {}", repo.display()))?;
        Ok(files)
    }

    /// `jobs` runs, `parallelism` at a time (a plain loop per thread); returns the wall time.
    pub fn run_parallel(&self, jobs: usize, parallelism: usize) -> anyhow::Result<Duration> {
        let remaining = AtomicUsize::new(jobs);
        let start = Instant::now();
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..parallelism.max(1))
                .map(|_| {
                    scope.spawn(|| {
                        while remaining
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok()
                        {
                            self.run()?;
                        }
                        anyhow::Ok(())
                    })
                })
                .collect();
            for worker in workers {
                match worker.join() {
                    Ok(result) => result?,
                    Err(_) => bail!("a direct-run thread panicked"),
                }
            }
            Ok(())
        })?;
        Ok(start.elapsed())
    }

    /// A fresh shallow clone, with the arguments and environment an agent uses.
    fn clone_repo(&self) -> anyhow::Result<PathBuf> {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        let dest = self.root.path().join(format!("direct-{n}"));
        let output = Command::new("git")
            .args(["clone", "--depth", "1", "--single-branch", "--no-tags"])
            .args(["--branch", "main", "--", &self.repo_url])
            .arg(&dest)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .stdin(Stdio::null())
            .output();
        checked("git clone", output)?;
        Ok(dest)
    }

    /// The command an agent runs for a job (same argv shape, workdir and run log).
    fn analyzer(&self, repo: &Path, job_id: &str) -> Command {
        let mut command = Command::new(&self.fixture);
        command
            .arg("analyze")
            .arg(repo)
            .args(["--prompt", "explain this project", "--job-id", job_id])
            .current_dir(self.root.path().join("workdir"))
            .env(ENV_RUN_LOG, self.root.path().join("runs.log"))
            .env(ENV_AGENT_ID, "direct")
            .stdin(Stdio::null());
        command
    }
}

/// Peak RSS of one fixture CLI run, in KiB, sampled from `/proc` while it runs. The run is slowed
/// (a delay before each step) so there is time to sample; the writes of the last step, made after
/// the last sample, are the part it can miss.
pub fn fixture_peak_rss(runner: &DirectRunner) -> anyhow::Result<Option<u64>> {
    let repo = runner.clone_repo()?;
    let mut child = runner
        .analyzer(&repo, "rss-probe")
        .env(ENV_STEP_DELAY_MS, "40")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the fixture CLI")?;
    let mut peak = None;
    let status = loop {
        if let Some(kib) = peak_rss_kib(child.id()) {
            peak = peak.max(Some(kib));
        }
        if let Some(status) = child.try_wait().context("waiting for the fixture CLI")? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    if !status.success() {
        bail!("the fixture CLI failed while its memory was sampled: {status}");
    }
    std::fs::remove_dir_all(&repo).context("removing the sampled run's workspace")?;
    Ok(peak)
}

fn checked(what: &str, output: std::io::Result<Output>) -> anyhow::Result<()> {
    let output = output.with_context(|| format!("starting {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}
