//! The scale rows: a coordinator process serving many agents. The agents are simulated in this
//! process, one gRPC connection each over loopback, speaking the real protocol (Hello, heartbeats,
//! Accepted, an empty successful result) so that the coordinator does all of its work for each
//! job except waiting for an analyzer: "zero-work" jobs. What is measured is the coordinator's:
//! its memory and CPU with 1 to 1,000 agents, the time from SubmitJob to the assignment reaching
//! an agent, jobs per second with the database on disk and on tmpfs (with its commits per job,
//! from its own counter), and the job-source calls an idle fleet costs against the old model of
//! one poller per worker.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use fondation_coordinator::job_source::now_ms;
use fondation_proto::{
    model::{FromAgent, Hello, RunEvent, RunOutcome, RunReport, ToAgent},
    pb::{self, agent_gateway_client::AgentGatewayClient},
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use crate::{
    fake_convex::FakeOptions,
    support::{
        cluster::{Admin, AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
        convex_world::ConvexWorld,
        free_port,
        process::{pss_kib, rss_kib, status_kib},
    },
};

/// Connections opened at once while a fleet connects: more would overflow the listen backlog.
const CONNECT_BATCH: usize = 100;

/// Agents simulated in this process.
pub struct SimFleet {
    stop: CancellationToken,
    /// Names this fleet's agents apart from another fleet's on the same coordinator.
    run: String,
    assigned_tx: mpsc::UnboundedSender<(String, Instant)>,
    /// (job id, when its assignment reached an agent), in arrival order.
    assigned: mpsc::UnboundedReceiver<(String, Instant)>,
    acknowledged_tx: watch::Sender<usize>,
    /// Results the coordinator acknowledged so far.
    acknowledged: watch::Receiver<usize>,
    ack_latency_tx: mpsc::UnboundedSender<Duration>,
    /// For each acknowledged result: from the result sent to its ResultAck received.
    ack_latency: mpsc::UnboundedReceiver<Duration>,
    pub size: usize,
}

impl Drop for SimFleet {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl SimFleet {
    /// Connects `size` agents of one slot each to the coordinator at `url` and waits until the
    /// coordinator lists them all.
    pub async fn connect(url: &str, admin: &Admin, size: usize) -> anyhow::Result<Self> {
        let (assigned_tx, assigned) = mpsc::unbounded_channel();
        let (acknowledged_tx, acknowledged) = watch::channel(0);
        let (ack_latency_tx, ack_latency) = mpsc::unbounded_channel();
        let mut fleet = SimFleet {
            stop: CancellationToken::new(),
            run: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            assigned_tx,
            assigned,
            acknowledged_tx,
            acknowledged,
            ack_latency_tx,
            ack_latency,
            size: 0,
        };
        fleet.grow_to(url, admin, size).await?;
        Ok(fleet)
    }

    /// Connects more agents until the fleet has `size`, and waits until the coordinator lists
    /// them all.
    pub async fn grow_to(&mut self, url: &str, admin: &Admin, size: usize) -> anyhow::Result<()> {
        for first in (self.size..size).step_by(CONNECT_BATCH) {
            let mut batch = tokio::task::JoinSet::new();
            for _ in first..(first + CONNECT_BATCH).min(size) {
                let endpoint = Endpoint::from_shared(url.to_string())?.tcp_nodelay(true);
                batch.spawn(async move { endpoint.connect().await });
            }
            let mut n = first;
            while let Some(channel) = batch.join_next().await {
                let channel = channel?.context("connecting a simulated agent")?;
                let agent = SimAgent {
                    id: format!("sim-{}-{n}", self.run),
                    assigned: self.assigned_tx.clone(),
                    acknowledged: self.acknowledged_tx.clone(),
                    ack_latency: self.ack_latency_tx.clone(),
                    stop: self.stop.clone(),
                };
                n += 1;
                tokio::spawn(agent.run(AgentGatewayClient::new(channel)));
            }
        }
        self.size = self.size.max(size);
        admin
            .wait_agents_listed(self.size, Duration::from_secs(120))
            .await;
        Ok(())
    }

    /// Waits for the assignment of `job_id` to reach an agent; when it did.
    async fn assignment_of(&mut self, job_id: &str) -> anyhow::Result<Instant> {
        let deadline = tokio::time::sleep(Duration::from_secs(30));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                next = self.assigned.recv() => match next {
                    Some((assigned, at)) if assigned == job_id => return Ok(at),
                    Some(_) => {}
                    None => bail!("the simulated agents stopped"),
                },
                _ = &mut deadline => bail!("job {job_id} was not assigned within 30 s"),
            }
        }
    }

    fn acknowledged(&self) -> usize {
        *self.acknowledged.borrow()
    }
}

struct SimAgent {
    id: String,
    assigned: mpsc::UnboundedSender<(String, Instant)>,
    acknowledged: watch::Sender<usize>,
    ack_latency: mpsc::UnboundedSender<Duration>,
    stop: CancellationToken,
}

impl SimAgent {
    async fn run(self, mut client: AgentGatewayClient<tonic::transport::Channel>) {
        let (up, up_rx) = mpsc::channel::<pb::AgentMessage>(16);
        let hello = FromAgent::Hello(Hello {
            agent_id: self.id.clone(),
            version: "bench".into(),
            slots: 1,
            labels: BTreeMap::new(),
            running: Vec::new(),
            unready: None,
            instance_id: uuid::Uuid::new_v4().simple().to_string(),
        });
        if up.send(hello.into()).await.is_err() {
            return;
        }
        let Ok(response) = client.session(ReceiverStream::new(up_rx)).await else {
            return;
        };
        let mut down = response.into_inner();
        let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
        // When the last result went out (one slot: one result at a time).
        let mut result_sent: Option<Instant> = None;
        loop {
            let message = tokio::select! {
                message = down.message() => message,
                _ = heartbeat.tick() => {
                    let beat = FromAgent::Heartbeat { free_slots: 1, unready: None };
                    if up.send(beat.into()).await.is_err() {
                        return;
                    }
                    continue;
                }
                _ = self.stop.cancelled() => return,
            };
            let Ok(Some(message)) = message else { return };
            match ToAgent::try_from(message) {
                Ok(ToAgent::Welcome(welcome)) => {
                    heartbeat = tokio::time::interval(welcome.heartbeat_interval);
                }
                Ok(ToAgent::Assignment(assignment)) => {
                    let _ = self
                        .assigned
                        .send((assignment.job_id.clone(), Instant::now()));
                    let report = |event| RunReport {
                        assignment_id: assignment.assignment_id.clone(),
                        epoch: assignment.epoch,
                        event,
                    };
                    let finished = RunEvent::Finished(RunOutcome::Succeeded {
                        document_count: 0,
                        message: String::new(),
                    });
                    for event in [RunEvent::Accepted, finished] {
                        if up.send(report(event).into()).await.is_err() {
                            return;
                        }
                    }
                    result_sent = Some(Instant::now());
                }
                Ok(ToAgent::ResultAck(_)) => {
                    if let Some(sent) = result_sent.take() {
                        let _ = self.ack_latency.send(sent.elapsed());
                    }
                    self.acknowledged.send_modify(|count| *count += 1);
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    }
}

/// CPU time (user + system) a live process used so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, inside parentheses).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / per_second))
}

/// The coordinator with a fleet of `size` idle agents: its resident memory and its CPU use per
/// second of idling over `window`.
pub struct Idle {
    pub agents: usize,
    pub rss_kib: u64,
    /// The private part of the RSS (`RssAnon`: heap and stacks); the rest is the binary's
    /// clean, shared file pages.
    pub anon_kib: u64,
    pub cpu_per_second: Duration,
}

pub async fn idle(pid: u32, fleet: &SimFleet, window: Duration) -> anyhow::Result<Idle> {
    // Let the connection burst settle before sampling.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = cpu_time(pid).context("reading the coordinator's CPU time")?;
    tokio::time::sleep(window).await;
    let after = cpu_time(pid).context("reading the coordinator's CPU time")?;
    Ok(Idle {
        agents: fleet.size,
        rss_kib: rss_kib(pid).context("reading the coordinator's RSS")?,
        anon_kib: status_kib(pid, "RssAnon").context("reading the coordinator's RssAnon")?,
        cpu_per_second: (after - before).div_f64(window.as_secs_f64()),
    })
}

/// Latencies of `samples` jobs run one at a time, as (p50, p99) pairs.
pub struct Latencies {
    /// SubmitJob -> the assignment at an agent.
    pub assignment: (Duration, Duration),
    /// The result sent by the agent -> its ResultAck received.
    pub result_ack: (Duration, Duration),
}

pub async fn latencies(
    admin: &mut Admin,
    fleet: &mut SimFleet,
    repo_url: &str,
    samples: usize,
) -> anyhow::Result<Latencies> {
    while fleet.ack_latency.try_recv().is_ok() {}
    let mut assignment = Vec::with_capacity(samples);
    let mut result_ack = Vec::with_capacity(samples);
    for _ in 0..samples {
        let start = Instant::now();
        let job_id = admin.submit(repo_url, "main", "zero work").await;
        let at = fleet.assignment_of(&job_id).await?;
        assignment.push(at - start);
        let acked = tokio::time::timeout(Duration::from_secs(30), fleet.ack_latency.recv());
        match acked.await {
            Ok(Some(latency)) => result_ack.push(latency),
            _ => bail!("the result of job {job_id} was not acknowledged within 30 s"),
        }
    }
    let p50_p99 = |mut samples: Vec<Duration>| {
        samples.sort();
        (percentile(&samples, 50), percentile(&samples, 99))
    };
    Ok(Latencies {
        assignment: p50_p99(assignment),
        result_ack: p50_p99(result_ack),
    })
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * p).div_ceil(100).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Zero-work throughput: `jobs` submitted at once (from 8 clients), until every result is
/// acknowledged.
pub struct Throughput {
    pub jobs_per_second: f64,
    pub cpu_per_job: Duration,
    pub commits_per_job: Option<f64>,
}

pub async fn throughput(
    coordinator: &CoordinatorProc,
    admin: &Admin,
    fleet: &SimFleet,
    repo_url: &str,
    jobs: usize,
    commits: impl AsyncFn() -> Option<u64>,
) -> anyhow::Result<Throughput> {
    const SUBMITTERS: usize = 8;
    let pid = coordinator
        .proc
        .pid()
        .context("the coordinator is running")?;
    let done_before = fleet.acknowledged();
    let commits_before = commits().await;
    let cpu_before = cpu_time(pid).context("reading the coordinator's CPU time")?;
    let start = Instant::now();
    let mut submitters = tokio::task::JoinSet::new();
    for submitter in 0..SUBMITTERS {
        let mut client = admin.client.clone();
        let repo_url = repo_url.to_string();
        let count = jobs / SUBMITTERS + usize::from(submitter < jobs % SUBMITTERS);
        submitters.spawn(async move {
            for _ in 0..count {
                client
                    .submit_job(pb::SubmitJobRequest {
                        repo_url: repo_url.clone(),
                        branch: "main".into(),
                        prompt: "zero work".into(),
                    })
                    .await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(result) = submitters.join_next().await {
        result?.context("SubmitJob")?;
    }
    let mut acknowledged = fleet.acknowledged.clone();
    let all_done = acknowledged.wait_for(|count| count - done_before >= jobs);
    if tokio::time::timeout(Duration::from_secs(300), all_done)
        .await
        .is_err()
    {
        bail!(
            "{} of {jobs} zero-work jobs done after 300 s",
            fleet.acknowledged() - done_before
        );
    }
    let elapsed = start.elapsed();
    let cpu = cpu_time(pid).context("reading the coordinator's CPU time")? - cpu_before;
    let commits_per_job = match (commits_before, commits().await) {
        (Some(before), Some(after)) => Some((after - before) as f64 / jobs as f64),
        _ => None,
    };
    Ok(Throughput {
        jobs_per_second: jobs as f64 / elapsed.as_secs_f64(),
        cpu_per_job: cpu / jobs as u32,
        commits_per_job,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_rank_at_or_above() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 50), Duration::from_millis(50));
        assert_eq!(percentile(&ms, 99), Duration::from_millis(99));
        assert_eq!(percentile(&ms[..1], 99), Duration::from_millis(1));
    }

    #[test]
    fn own_cpu_time_and_memory_are_readable() {
        let me = std::process::id();
        assert!(cpu_time(me).is_some());
        let rss = rss_kib(me).expect("VmRSS");
        let pss = pss_kib(me).expect("Pss");
        assert!(pss > 0 && pss <= rss, "PSS {pss} KiB, RSS {rss} KiB");
    }
}

/// How much the scale rows do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleSettings {
    /// Fleet sizes measured idle and for assignment latency, ascending.
    pub fleets: &'static [usize],
    /// Jobs timed one at a time for each latency row.
    pub latency_samples: usize,
    /// Zero-work jobs of each throughput row (100 agents).
    pub jobs: usize,
    /// Idle sampling window, and the window claim calls are counted over.
    pub window: Duration,
    /// Fleet sizes of the claim-call rows.
    pub claim_fleets: &'static [usize],
}

impl ScaleSettings {
    pub const FULL: ScaleSettings = ScaleSettings {
        fleets: &[1, 100, 1000],
        latency_samples: 200,
        jobs: 2000,
        window: Duration::from_secs(20),
        claim_fleets: &[1, 10, 100],
    };
    pub const QUICK: ScaleSettings = ScaleSettings {
        fleets: &[1, 100],
        latency_samples: 20,
        jobs: 200,
        window: Duration::from_secs(3),
        claim_fleets: &[1, 10],
    };
}

/// The coordinator's settings for the scale rows: the shipped timings, room for 1,000 agent
/// connections, warnings only, and its metrics (for the commit counter) on a port of its own.
fn scale_env(metrics_addr: &str) -> Vec<(&'static str, String)> {
    vec![
        ("POLL_INTERVAL", "5000".into()),
        ("LEASE_TIME", "300000".into()),
        ("AGENT_TIMEOUT", "10000".into()),
        ("MAX_CONNECTIONS", "5000".into()),
        ("RUST_LOG", "warn".into()),
        ("METRICS_ADDR", metrics_addr.into()),
    ]
}

/// One row of the scale table.
pub struct ScaleRow {
    pub what: String,
    pub value: String,
    /// The target, or the baseline measured in the same run and the ratio to it.
    pub against: String,
}

/// Runs every scale row; progress goes to stderr.
pub async fn run(settings: ScaleSettings) -> anyhow::Result<Vec<ScaleRow>> {
    let mut rows = Vec::new();
    let sandbox = Sandbox::new();
    let (coordinator, _metrics) = start_coordinator(&sandbox, None).await;
    let mut admin = coordinator.admin().await;
    let pid = coordinator
        .proc
        .pid()
        .context("the coordinator is running")?;
    let repo_url = sandbox.repo.url.clone();

    let mut fleet: Option<SimFleet> = None;
    // The coordinator's private memory with the smallest fleet, to tell what each agent adds.
    let mut first_anon: Option<(usize, u64)> = None;
    for &size in settings.fleets {
        eprintln!(
            "[scale] {size} simulated agents: idle {:?}, latency x{}",
            settings.window, settings.latency_samples
        );
        let fleet = match &mut fleet {
            Some(fleet) => {
                fleet.grow_to(&coordinator.url(), &admin, size).await?;
                fleet
            }
            None => fleet.insert(SimFleet::connect(&coordinator.url(), &admin, size).await?),
        };
        let idle = idle(pid, fleet, settings.window).await?;
        rows.push(ScaleRow {
            what: format!("coordinator RSS, {size} agents idle"),
            value: format!("{:.1} MiB", idle.rss_kib as f64 / 1024.0),
            against: if size == 1000 {
                "target <= 40 MiB".into()
            } else {
                String::new()
            },
        });
        match first_anon {
            None => first_anon = Some((size, idle.anon_kib)),
            Some((first_size, first_kib)) => rows.push(ScaleRow {
                what: format!("  private memory per agent, {first_size} -> {size} agents"),
                value: format!(
                    "{:.1} KiB",
                    idle.anon_kib.saturating_sub(first_kib) as f64 / (size - first_size) as f64
                ),
                against: format!(
                    "RssAnon {:.1} MiB of the RSS",
                    idle.anon_kib as f64 / 1024.0
                ),
            }),
        }
        rows.push(ScaleRow {
            what: format!("coordinator CPU, {size} agents idle"),
            value: format!("{:.2} ms/s", idle.cpu_per_second.as_secs_f64() * 1e3),
            against: String::new(),
        });
        let latencies = latencies(&mut admin, fleet, &repo_url, settings.latency_samples).await?;
        let (p50, p99) = latencies.assignment;
        rows.push(ScaleRow {
            what: format!("assignment latency p50 / p99, {size} agents"),
            value: format!("{} / {}", ms(p50), ms(p99)),
            against: "target p99 < 5 ms".into(),
        });
        let (p50, p99) = latencies.result_ack;
        rows.push(ScaleRow {
            what: format!("result sent -> ResultAck p50 / p99, {size} agents"),
            value: format!("{} / {}", ms(p50), ms(p99)),
            against: "target <= 3 ms".into(),
        });
    }
    drop(fleet);

    for (place, data_dir) in [("disk", None), ("tmpfs", Some("/dev/shm"))] {
        eprintln!(
            "[scale] zero-work throughput, 100 agents, {} jobs, DATA_DIR on {place}",
            settings.jobs
        );
        let sandbox = Sandbox::new();
        let shm = data_dir.map(tempfile::tempdir_in).transpose()?;
        let (coordinator, metrics) =
            start_coordinator(&sandbox, shm.as_ref().map(|dir| dir.path())).await;
        let mut admin = coordinator.admin().await;
        let mut fleet = SimFleet::connect(&coordinator.url(), &admin, 100).await?;
        if data_dir.is_some() {
            // The same latencies without the disk: what the fsyncs on their path cost.
            let repo_url = sandbox.repo.url.clone();
            let latencies =
                latencies(&mut admin, &mut fleet, &repo_url, settings.latency_samples).await?;
            let ((a50, a99), (r50, r99)) = (latencies.assignment, latencies.result_ack);
            rows.push(ScaleRow {
                what: format!("  assignment latency p50 / p99, 100 agents, {place}"),
                value: format!("{} / {}", ms(a50), ms(a99)),
                against: String::new(),
            });
            rows.push(ScaleRow {
                what: format!("  result -> ResultAck p50 / p99, 100 agents, {place}"),
                value: format!("{} / {}", ms(r50), ms(r99)),
                against: String::new(),
            });
        }
        let commits = async || metrics.commits().await;
        let result = throughput(
            &coordinator,
            &admin,
            &fleet,
            &sandbox.repo.url,
            settings.jobs,
            commits,
        )
        .await?;
        rows.push(ScaleRow {
            what: format!("zero-work jobs/s, 100 agents, {place}"),
            value: format!("{:.0} jobs/s", result.jobs_per_second),
            against: if place == "disk" {
                "target >= 1,000".into()
            } else {
                String::new()
            },
        });
        rows.push(ScaleRow {
            what: format!("  coordinator CPU per job, {place}"),
            value: format!("{:.2} ms", result.cpu_per_job.as_secs_f64() * 1e3),
            against: String::new(),
        });
        rows.push(ScaleRow {
            what: format!("  commits (fsyncs) per job, {place}"),
            value: result
                .commits_per_job
                .map_or_else(|| "n/a".into(), |c| format!("{c:.2}")),
            against: "target <= 2".into(),
        });
    }

    for &size in settings.claim_fleets {
        eprintln!(
            "[scale] Convex claim calls, {size} idle agents, {:?}",
            settings.window
        );
        let (ours, old) = claim_calls(size, settings.window).await?;
        let per_minute = |calls: usize| calls as f64 * 60.0 / settings.window.as_secs_f64();
        rows.push(ScaleRow {
            what: format!("claimOne calls / idle minute, {size} agents"),
            value: format!("{:.0}", per_minute(ours)),
            against: format!(
                "old model {:.0} ({:.2}x)",
                per_minute(old),
                ours as f64 / old.max(1) as f64
            ),
        });
    }

    eprintln!("[scale] idle agent memory, {IDLE_AGENTS} real agents");
    let mut agents = Vec::with_capacity(IDLE_AGENTS);
    for n in 1..=IDLE_AGENTS {
        let id = format!("idle-agent-{n}");
        agents.push(AgentProc::connected(&sandbox, &id, coordinator.url(), &[]).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pids: Vec<u32> = agents.iter().filter_map(|agent| agent.proc.pid()).collect();
    let mib = |kib: Option<u64>| {
        kib.map_or_else(
            || "n/a".into(),
            |kib| format!("{:.1} MiB", kib as f64 / 1024.0),
        )
    };
    let first = pids.first().copied();
    rows.push(ScaleRow {
        what: "idle agent RSS (the real agent)".into(),
        value: mib(first.and_then(rss_kib)),
        against: "target <= 5 MiB (stretch)".into(),
    });
    rows.push(ScaleRow {
        what: "  of which private (RssAnon)".into(),
        value: mib(first.and_then(|pid| status_kib(pid, "RssAnon"))),
        against: "the rest: the binary's clean file pages".into(),
    });
    let pss: Option<Vec<u64>> = pids.iter().map(|pid| pss_kib(*pid)).collect();
    rows.push(ScaleRow {
        what: format!("  PSS per agent, {} agents of one binary", pids.len()),
        value: mib(pss.map(|pss| pss.iter().sum::<u64>() / pss.len().max(1) as u64)),
        against: "file pages counted once per host".into(),
    });
    Ok(rows)
}

/// Real agents started for the idle memory rows: their code pages are shared, their heaps not.
const IDLE_AGENTS: usize = 4;

fn ms(duration: Duration) -> String {
    format!("{:.2} ms", duration.as_secs_f64() * 1e3)
}

/// Where the coordinator serves its metrics, to read its database commit counter.
struct Metrics {
    url: String,
}

impl Metrics {
    /// `fondation_coordinator_database_commits_total`, when the coordinator exports it.
    async fn commits(&self) -> Option<u64> {
        let text = reqwest::get(&self.url).await.ok()?.text().await.ok()?;
        text.lines().find_map(|line| {
            line.strip_prefix("fondation_coordinator_database_commits_total ")?
                .trim()
                .parse::<f64>()
                .ok()
                .map(|value| value as u64)
        })
    }
}

async fn start_coordinator(
    sandbox: &Sandbox,
    data_dir: Option<&std::path::Path>,
) -> (CoordinatorProc, Metrics) {
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let mut env = scale_env(&metrics_addr);
    if let Some(dir) = data_dir {
        env.push(("DATA_DIR", dir.to_string_lossy().into_owned()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let coordinator = CoordinatorProc::start(sandbox, ANY_PORT, &env).await;
    let metrics = Metrics {
        url: format!("http://{metrics_addr}/metrics"),
    };
    (coordinator, metrics)
}

/// `queue:claimOne` calls the fake Convex received over `window` with `size` idle agents: from
/// our coordinator serving them, and from `size` pollers of the old model (one per worker, each
/// claiming every POLL_INTERVAL), measured one after the other on the same fake.
async fn claim_calls(size: usize, window: Duration) -> anyhow::Result<(usize, usize)> {
    const POLL_INTERVAL: Duration = Duration::from_millis(5000);
    let world = ConvexWorld::new(FakeOptions::default()).await;
    let coordinator = world
        .coordinator(
            None,
            &[
                ("POLL_INTERVAL", "5000"),
                ("RUST_LOG", "warn"),
                ("MAX_CONNECTIONS", "5000"),
            ],
        )
        .await;
    let admin = coordinator.admin().await;
    let fleet = SimFleet::connect(&coordinator.url(), &admin, size).await?;
    let count = async |from_ms: f64, to_ms: f64| -> anyhow::Result<usize> {
        Ok(world
            .client
            .calls()
            .await?
            .iter()
            .filter(|call| call.path.as_deref() == Some("queue:claimOne"))
            .filter(|call| call.at_ms >= from_ms && call.at_ms < to_ms)
            .count())
    };
    let from = now_ms();
    tokio::time::sleep(window).await;
    let ours = count(from, now_ms()).await?;
    drop(fleet);
    drop(coordinator);

    // The old model: every worker polls on its own.
    let stop = CancellationToken::new();
    let from = now_ms();
    for n in 0..size {
        let client = world.client.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            let worker_id = format!("old-worker-{n}");
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let args = serde_json::json!({ "workerId": worker_id });
                        let _ = client.mutation("queue:claimOne", args).await;
                    }
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    tokio::time::sleep(window).await;
    stop.cancel();
    let old = count(from, now_ms()).await?;
    Ok((ours, old))
}

/// The scale table.
pub fn render(rows: &[ScaleRow]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "scale: a coordinator process, simulated agents over loopback gRPC (real protocol)\n"
    );
    let _ = writeln!(
        out,
        "    {:<44} {:>17}   target / baseline",
        "measurement", "value"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "    {:<44} {:>17}   {}",
            row.what, row.value, row.against
        );
    }
    out
}
