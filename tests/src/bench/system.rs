//! The system side of the job measurements: a coordinator on the embedded store and agents with
//! one slot each, started as processes by the test-support helpers, fed through the Admin API.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use fondation_proto::pb;

use crate::support::cluster::{Admin, AgentOptions, AgentProc, CoordinatorProc, Sandbox, ANY_PORT};

use super::{peak_rss_kib, MemoryLine};

/// The coordinator's own defaults for every timing the test helpers shorten: the bench measures
/// the configuration that ships, not the one that keeps tests quick. Logs: warnings only, so the
/// processes do not echo every line through the bench.
const SHIPPED_TIMINGS: &[(&str, &str)] = &[
    ("POLL_INTERVAL", "5000"),
    ("HEARTBEAT_INTERVAL", "60000"),
    ("LEASE_TIME", "300000"),
    ("PROGRESS_INTERVAL", "2000"),
    ("CANCEL_CHECK_INTERVAL", "5000"),
    ("AGENT_TIMEOUT", "10000"),
    ("REATTACH_GRACE", "15000"),
    ("RETRY_BACKOFF", "5000"),
    ("MAX_ATTEMPTS", "5"),
    ("RUST_LOG", "warn"),
];

/// How often a waited-for job is looked at: tokio's timer granularity, so the wait adds at most
/// about a millisecond to the measured latency (a GetJob costs the coordinator a few µs).
const POLL: Duration = Duration::from_millis(1);
const PROMPT: &str = "explain this project";
const FAILED: &[&str] = &["failed", "dead", "canceled"];

/// A coordinator and its agents, all connected.
pub struct Cluster {
    /// Owns the repository, the coordinator's data and the agents' workspaces.
    pub sandbox: Sandbox,
    coordinator: CoordinatorProc,
    agents: Vec<AgentProc>,
    admin: Admin,
}

impl Cluster {
    /// Starts a coordinator and `agents` agents (one slot each) and waits until all are connected.
    pub async fn start(agents: usize) -> anyhow::Result<Self> {
        let sandbox = Sandbox::new();
        let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, SHIPPED_TIMINGS).await;
        let agents: Vec<_> = (1..=agents)
            .map(|n| {
                AgentProc::spawn(
                    &sandbox,
                    AgentOptions {
                        id: &format!("agent-{n}"),
                        coordinator_url: coordinator.url(),
                        slots: 1,
                        extra: &[("RUST_LOG", "warn")],
                    },
                )
            })
            .collect();
        let mut admin = coordinator.admin().await;
        admin
            .wait_agents_listed(agents.len(), Duration::from_secs(30))
            .await;
        // Make sure the admin channel is warm before anything is timed.
        admin.agents().await;
        Ok(Self {
            sandbox,
            coordinator,
            agents,
            admin,
        })
    }

    pub fn repo_url(&self) -> &str {
        &self.sandbox.repo.url
    }

    /// One job, from submission until the store says it is completed.
    pub async fn job_latency(&mut self) -> anyhow::Result<Duration> {
        let url = self.sandbox.repo.url.clone();
        let start = Instant::now();
        let job_id = self.admin.submit(&url, "main", PROMPT).await;
        loop {
            let job = self.job(&job_id).await?;
            if job.status == "completed" {
                return Ok(start.elapsed());
            }
            if FAILED.contains(&job.status.as_str()) {
                bail!("job {job_id} ended {}: {}", job.status, job.error);
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("job {job_id} still {} after 60 s", job.status);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `jobs` jobs submitted at once; the time until the last one is completed.
    pub async fn run_batch(&mut self, jobs: usize) -> anyhow::Result<Duration> {
        let url = self.sandbox.repo.url.clone();
        let start = Instant::now();
        let mut pending = Vec::with_capacity(jobs);
        for n in 0..jobs {
            let prompt = format!("{PROMPT} ({n})");
            pending.push(self.admin.submit(&url, "main", &prompt).await);
        }
        let deadline = Duration::from_secs(60 + 10 * jobs as u64);
        while !pending.is_empty() {
            let statuses = self.statuses(jobs).await?;
            let mut still = Vec::with_capacity(pending.len());
            for job_id in pending {
                match statuses.get(&job_id).map(String::as_str) {
                    Some("completed") => {}
                    Some(status) if FAILED.contains(&status) => {
                        let job = self.job(&job_id).await?;
                        bail!("job {job_id} ended {status}: {}", job.error);
                    }
                    _ => still.push(job_id),
                }
            }
            pending = still;
            if start.elapsed() > deadline {
                bail!(
                    "{} of {jobs} jobs unfinished after {deadline:?}",
                    pending.len()
                );
            }
            if !pending.is_empty() {
                tokio::time::sleep(POLL * 20).await;
            }
        }
        Ok(start.elapsed())
    }

    /// Peak RSS of the coordinator and of each agent.
    pub fn peak_memory(&self) -> Vec<MemoryLine> {
        let line = |what: String, pid: Option<u32>| MemoryLine {
            what,
            peak_kib: pid.and_then(peak_rss_kib),
        };
        std::iter::once(line("coordinator".into(), self.coordinator.proc.pid()))
            .chain(
                self.agents
                    .iter()
                    .map(|agent| line(agent.id.clone(), agent.proc.pid())),
            )
            .collect()
    }

    /// SIGTERM to the agents, then to the coordinator; waits for each to exit.
    pub async fn stop(mut self) {
        for agent in &self.agents {
            agent.proc.signal(nix::sys::signal::Signal::SIGTERM);
        }
        for agent in &mut self.agents {
            agent.proc.wait_exit(Duration::from_secs(30)).await;
        }
        self.coordinator
            .proc
            .signal(nix::sys::signal::Signal::SIGTERM);
        self.coordinator
            .proc
            .wait_exit(Duration::from_secs(30))
            .await;
    }

    async fn job(&mut self, job_id: &str) -> anyhow::Result<pb::Job> {
        Ok(self
            .admin
            .client
            .get_job(pb::GetJobRequest {
                job_id: job_id.to_owned(),
                include_content: false,
            })
            .await
            .context("GetJob")?
            .into_inner())
    }

    /// Status of the `limit` newest jobs, by id.
    async fn statuses(&mut self, limit: usize) -> anyhow::Result<BTreeMap<String, String>> {
        let jobs = self
            .admin
            .client
            .list_jobs(pb::ListJobsRequest {
                limit: u32::try_from(limit).unwrap_or(u32::MAX),
                ..Default::default()
            })
            .await
            .context("ListJobs")?
            .into_inner()
            .jobs;
        Ok(jobs
            .into_iter()
            .map(|job| (job.job_id, job.status))
            .collect())
    }
}
