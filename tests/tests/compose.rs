//! Issue 5 on the real Docker engine: the images build offline (no pull) and run as non-root;
//! `docker-compose.yml` with the test override runs a coordinator, agents running the fixture
//! CLI, a git server and the fake Convex; jobs complete and spread over the agents; agents scale
//! up while jobs run; a killed agent's job is finished by another agent, once; a restarted
//! coordinator finishes a running job without re-running its CLI; `down -v` leaves nothing.
//!
//! Needs Docker and a compose CLI: without them the test fails saying what to install.
//! `FONDATION_COMPOSE_JOB_SOURCE=embedded` runs it on the embedded store (jobs submitted with
//! grpcurl) instead of the fake Convex.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use fondation_testkit::{
    fake_convex::FakeConvexClient,
    fixture_cli::{read_run_log, RunEventKind, RunRecord},
    support::{
        compose::{self, ComposeProject, ContainerState},
        grpcurl, wait,
    },
};
use serde_json::json;

const OVERRIDE: &str = "tests/compose/docker-compose.test.yml";
const CONVEX_OVERRIDE: &str = "tests/compose/docker-compose.test-convex.yml";
/// The repository baked into the gitserver image, as the coordinator's CLONE_URL_TEMPLATE
/// (`git://gitserver/{fullName}.git`) and the embedded store see it.
const REPO_FULL_NAME: &str = "fondation/demo";
const REPO_URL: &str = "git://gitserver/fondation/demo.git";
const COORDINATOR_PORT: u16 = 50051;
const FAKE_CONVEX_PORT: u16 = 3210;
/// Per-step delay of the fixture CLI: six steps make a run of about 9 s, long enough for agents
/// to join while jobs are still queued.
const STEP_DELAY_MS: &str = "1500";
/// A job that runs about 18 s: time to kill or restart something in the middle of it.
const SLOW_PROMPT: &str = "explain this project fixture:slow=3000";
/// Documents of one fixture run: 3 YAML files, 11 chapters, 11 reviewed chapters, 11 tutorials.
const SAMPLE_DOCUMENTS: usize = 36;
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(120);
const JOBS_TIMEOUT: Duration = Duration::from_secs(300);

/// Where jobs come from: the fake Convex over its HTTP API (the production path), or the
/// coordinator's embedded store through Admin/SubmitJob.
enum JobSource {
    Convex { fake: FakeConvexClient },
    Embedded,
}

struct Cluster {
    project: ComposeProject,
    run_log: PathBuf,
    source: JobSource,
}

impl Cluster {
    fn coordinator_addr(&self) -> Result<String, String> {
        self.project.published("coordinator", COORDINATOR_PORT)
    }

    async fn create_job(&self, prompt: &str, n: usize) -> String {
        match &self.source {
            // `jobs:create` allows one active job per repository: each job gets its own.
            JobSource::Convex { fake } => {
                let repository_id = fake
                    .create_repository(REPO_FULL_NAME, Some("main"))
                    .await
                    .unwrap_or_else(|e| {
                        panic!("creating repository {n} in the fake Convex: {e:#}")
                    });
                fake.create_job(&repository_id, prompt)
                    .await
                    .unwrap_or_else(|e| panic!("creating job {n} in the fake Convex: {e:#}"))
            }
            JobSource::Embedded => {
                let addr = self.coordinator_addr().expect("the coordinator's port");
                let request = json!({ "repo_url": REPO_URL, "branch": "main", "prompt": prompt });
                let reply = grpcurl::call(&addr, "fondation.v1.Admin/SubmitJob", Some(&request))
                    .unwrap_or_else(|e| panic!("submitting job {n}: {e}"));
                reply["jobId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("SubmitJob returned no jobId: {reply}"))
                    .to_string()
            }
        }
    }

    /// The job's status as its source records it.
    async fn job_status(&self, job_id: &str) -> Result<String, String> {
        let job = match &self.source {
            JobSource::Convex { fake, .. } => fake
                .query("jobs:getJob", json!({ "jobId": job_id }))
                .await
                .map_err(|e| format!("jobs:getJob: {e:#}"))?,
            JobSource::Embedded => grpcurl::call(
                &self.coordinator_addr()?,
                "fondation.v1.Admin/GetJob",
                Some(&json!({ "job_id": job_id })),
            )?,
        };
        job["status"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| format!("job {job_id} has no status: {job}"))
    }

    /// How many documents the job's source holds for it.
    async fn document_count(&self, job_id: &str) -> usize {
        match &self.source {
            JobSource::Convex { fake, .. } => fake
                .docs(job_id)
                .await
                .unwrap_or_else(|e| panic!("reading job {job_id}'s documents: {e:#}"))
                .len(),
            JobSource::Embedded => {
                let addr = self.coordinator_addr().expect("the coordinator's port");
                let job = grpcurl::call(
                    &addr,
                    "fondation.v1.Admin/GetJob",
                    Some(&json!({ "job_id": job_id })),
                )
                .unwrap_or_else(|e| panic!("GetJob {job_id}: {e}"));
                job["documents"].as_array().map_or(0, Vec::len)
            }
        }
    }

    /// Waits until every job is `completed`; fails at once if one ends otherwise.
    async fn wait_completed(&self, job_ids: &[String], timeout: Duration) {
        let what = format!("{} job(s) to complete", job_ids.len());
        wait::until(&what, timeout, || async move {
            let mut pending = BTreeMap::new();
            for job_id in job_ids {
                let status = self.job_status(job_id).await?;
                assert!(
                    !["failed", "dead", "canceled"].contains(&status.as_str()),
                    "job {job_id} ended {status}"
                );
                if status != "completed" {
                    pending.insert(job_id.clone(), status);
                }
            }
            if pending.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!("not completed: {pending:?}"))
            }
        })
        .await
    }

    fn runs(&self) -> Vec<RunRecord> {
        if !self.run_log.exists() {
            return Vec::new();
        }
        read_run_log(&self.run_log).expect("the fixture CLI's run log parses")
    }

    /// Waits for a run of `job_id` to start; returns the agent (container host name) running it.
    async fn wait_run_started(&self, job_id: &str) -> String {
        wait::until(
            &format!("the fixture CLI to start job {job_id}"),
            Duration::from_secs(60),
            || async move {
                Ok(self
                    .runs()
                    .into_iter()
                    .find(|r| r.kind == RunEventKind::Start && r.job_id == job_id)
                    .map(|r| r.agent))
            },
        )
        .await
    }

    /// Waits until the running containers are exactly `expected` (service, count), all healthy.
    async fn wait_healthy(&self, expected: &[(&str, usize)]) -> Vec<ContainerState> {
        let what = format!("containers {expected:?} to be running and healthy");
        wait::until(&what, HEALTHY_TIMEOUT, || async move {
            let running: Vec<ContainerState> = self
                .project
                .containers()?
                .into_iter()
                .filter(|c| c.status == "running")
                .collect();
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for container in &running {
                *counts.entry(container.service.as_str()).or_default() += 1;
            }
            let wanted: BTreeMap<&str, usize> = expected.iter().copied().collect();
            let all_healthy = running.iter().all(|c| c.health == "healthy");
            if counts == wanted && all_healthy {
                Ok(Some(running.clone()))
            } else {
                Err(wait::state(
                    &running
                        .iter()
                        .map(|c| format!("{}:{}:{}", c.service, c.hostname, c.health))
                        .collect::<Vec<_>>(),
                ))
            }
        })
        .await
    }

    /// Waits like `wait_healthy`; the host names (agent ids) of the healthy agents.
    async fn wait_healthy_agents(&self, expected: &[(&str, usize)]) -> BTreeSet<String> {
        self.wait_healthy(expected)
            .await
            .into_iter()
            .filter(|c| c.service == "agent")
            .map(|c| c.hostname)
            .collect()
    }

    /// Agent ids ListAgents shows, through grpcurl on the published port.
    async fn wait_listed_agents(&self, count: usize) -> BTreeSet<String> {
        wait::until(
            &format!("ListAgents to show {count} agents"),
            Duration::from_secs(60),
            || async move {
                let reply = grpcurl::call(
                    &self.coordinator_addr()?,
                    "fondation.v1.Admin/ListAgents",
                    None,
                )?;
                let agents: BTreeSet<String> = reply["agents"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|a| a["agentId"].as_str().map(String::from))
                    .collect();
                if agents.len() == count {
                    Ok(Some(agents))
                } else {
                    Err(format!("{agents:?}"))
                }
            },
        )
        .await
    }
}

fn use_convex() -> bool {
    match std::env::var("FONDATION_COMPOSE_JOB_SOURCE").as_deref() {
        Err(_) | Ok("convex") => true,
        Ok("embedded") => false,
        Ok(other) => panic!("FONDATION_COMPOSE_JOB_SOURCE={other:?}: use convex or embedded"),
    }
}

/// Runs per job, ends per job with exit code 0, and the agents involved.
fn starts_of(runs: &[RunRecord], job_id: &str) -> Vec<RunRecord> {
    runs.iter()
        .filter(|r| r.kind == RunEventKind::Start && r.job_id == job_id)
        .cloned()
        .collect()
}

fn successes_of(runs: &[RunRecord], job_id: &str) -> Vec<RunRecord> {
    runs.iter()
        .filter(|r| r.kind == RunEventKind::End && r.job_id == job_id && r.exit_code == Some(0))
        .cloned()
        .collect()
}

fn check_images_run_as_non_root(tag: &str) {
    for image in [
        format!("fondation-coordinator:{tag}"),
        format!("fondation-agent:{tag}"),
        format!("fondation-agent-fixture:{tag}"),
        format!("fondation-testkit:{tag}"),
    ] {
        let uid = compose::docker(&["run", "--rm", "--entrypoint", "id", &image, "-u"])
            .unwrap_or_else(|e| panic!("running `id -u` in {image}: {e}"));
        let uid: u32 = uid
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{image}: `id -u` printed {uid:?}"));
        assert_ne!(uid, 0, "{image} runs as root");
        let size = compose::docker(&["image", "inspect", "--format", "{{.Size}}", &image])
            .expect("inspecting an image");
        let megabytes = size.trim().parse::<u64>().unwrap_or(0) / 1_000_000;
        println!("image {image}: {megabytes} MB, uid {uid}");
    }
}

/// A host folder the containers' uid 10001 can write the run log into.
fn shared_run_log_dir(root: &Path) -> PathBuf {
    let dir = root.join("run-log");
    std::fs::create_dir(&dir).expect("creating the run log folder");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        .expect("opening the run log folder to the containers' user");
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_cluster_builds_offline_scales_and_survives_kills_and_restarts() {
    let compose_command = compose::require_docker();
    let convex = use_convex();
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let tag = format!("test-{suffix}");
    let scratch = tempfile::tempdir().expect("a temp dir for the test");

    // The project comes first, images included, so that its guard cleans up after any failure
    // from the image build on.
    let run_log_dir = shared_run_log_dir(scratch.path());
    let mut files = vec!["docker-compose.yml", OVERRIDE];
    if convex {
        files.push(CONVEX_OVERRIDE);
    }
    let env = vec![
        ("FONDATION_TAG".to_string(), tag.clone()),
        ("COORDINATOR_BIND".into(), "127.0.0.1".into()),
        // Docker picks a free host port; `compose port` tells which.
        ("COORDINATOR_PORT".into(), "0".into()),
        (
            "FONDATION_TEST_RUN_LOG_DIR".into(),
            run_log_dir.to_string_lossy().into_owned(),
        ),
        ("FIXTURE_STEP_DELAY_MS".into(), STEP_DELAY_MS.into()),
    ];
    let mut project = ComposeProject::new(
        compose_command,
        format!("fondation-test-{suffix}"),
        &files,
        env,
        scratch.path(),
    );
    project.remove_images_on_drop(
        [
            "fondation-coordinator",
            "fondation-agent",
            "fondation-agent-fixture",
            "fondation-testkit",
        ]
        .iter()
        .map(|name| format!("{name}:{tag}"))
        .collect(),
    );

    // 1. Images, offline, from the dev build; all non-root.
    let build_time = compose::build_images(&tag);
    println!("scripts/build-images took {build_time:?}");
    check_images_run_as_non_root(&tag);

    // 2. Up with 3 agents, all healthy.
    let started = Instant::now();
    project.must(&["up", "--detach", "--no-build", "--scale", "agent=3"]);
    let mut expected = vec![("agent", 3), ("coordinator", 1), ("gitserver", 1)];
    if convex {
        expected.push(("fake-convex", 1));
    }
    expected.sort();
    let mut cluster = Cluster {
        project,
        run_log: run_log_dir.join("runs.log"),
        source: JobSource::Embedded,
    };
    let first_agents: BTreeSet<String> = cluster.wait_healthy_agents(&expected).await;
    println!("3 agents healthy after {:?}", started.elapsed());
    if convex {
        let addr = cluster
            .project
            .published("fake-convex", FAKE_CONVEX_PORT)
            .expect("the fake Convex's published port");
        let fake = FakeConvexClient::new(&format!("http://{addr}"));
        cluster.source = JobSource::Convex { fake };
    }

    // 3. Twelve jobs; three more agents join while they run and take work.
    let mut job_ids = Vec::new();
    for n in 0..12 {
        job_ids.push(
            cluster
                .create_job(&format!("explain this project ({n})"), n)
                .await,
        );
    }
    let cluster_ref = &cluster;
    wait::until(
        "the first agents to start three jobs",
        Duration::from_secs(60),
        || async move {
            let started = cluster_ref
                .runs()
                .iter()
                .filter(|r| r.kind == RunEventKind::Start)
                .count();
            if started >= 3 {
                Ok(Some(()))
            } else {
                Err(format!("{started} started"))
            }
        },
    )
    .await;
    cluster.project.must(&[
        "up",
        "--detach",
        "--no-build",
        "--no-recreate",
        "--scale",
        "agent=6",
    ]);
    for entry in &mut expected {
        if entry.0 == "agent" {
            entry.1 = 6;
        }
    }
    let all_agents: BTreeSet<String> = cluster.wait_healthy_agents(&expected).await;
    let listed = cluster.wait_listed_agents(6).await;
    assert_eq!(
        listed, all_agents,
        "ListAgents shows the 6 agent containers"
    );
    // The operators' command ships in the coordinator's image and reads its settings.
    let shown = cluster.project.must(&[
        "exec",
        "-T",
        "coordinator",
        "fondation",
        "--output",
        "json",
        "agents",
    ]);
    let shown: serde_json::Value = serde_json::from_str(shown.trim())
        .unwrap_or_else(|e| panic!("`fondation agents` printed {shown:?}: {e}"));
    assert_eq!(
        shown["agents"].as_array().map(Vec::len),
        Some(6),
        "`fondation agents` in the coordinator's container: {shown}"
    );
    let addr = cluster.coordinator_addr().expect("the coordinator's port");
    let health = grpcurl::call(&addr, "grpc.health.v1.Health/Check", None).unwrap();
    assert_eq!(health["status"], "SERVING", "{health}");

    cluster.wait_completed(&job_ids, JOBS_TIMEOUT).await;
    let runs = cluster.runs();
    let mut per_agent: BTreeMap<String, usize> = BTreeMap::new();
    for job_id in &job_ids {
        let starts = starts_of(&runs, job_id);
        assert_eq!(starts.len(), 1, "job {job_id} ran once: {starts:?}");
        assert_eq!(
            successes_of(&runs, job_id).len(),
            1,
            "job {job_id} succeeded"
        );
        *per_agent.entry(starts[0].agent.clone()).or_default() += 1;
    }
    println!("jobs per agent: {per_agent:?}");
    assert_eq!(
        cluster.document_count(&job_ids[0]).await,
        SAMPLE_DOCUMENTS,
        "every file the CLI wrote reached the job source"
    );
    let new_agents: BTreeSet<&String> = all_agents.difference(&first_agents).collect();
    assert_eq!(new_agents.len(), 3);
    for agent in &new_agents {
        assert!(
            per_agent.contains_key(*agent),
            "new agent {agent} took work: {per_agent:?}"
        );
    }
    assert!(
        per_agent.keys().all(|agent| all_agents.contains(agent)),
        "runs came from the project's agents: {per_agent:?}"
    );

    // 4. An agent killed mid-job: another agent finishes the job, once.
    let job_id = cluster.create_job(SLOW_PROMPT, 100).await;
    let victim = cluster.wait_run_started(&job_id).await;
    compose::docker(&["kill", &victim]).expect("docker kill of the agent running the job");
    println!("killed agent {victim} while it ran job {job_id}");
    cluster
        .wait_completed(std::slice::from_ref(&job_id), JOBS_TIMEOUT)
        .await;
    let runs = cluster.runs();
    let successes = successes_of(&runs, &job_id);
    assert_eq!(successes.len(), 1, "completed once: {runs:?}");
    assert_ne!(successes[0].agent, victim, "completed by another agent");
    assert_eq!(starts_of(&runs, &job_id).len(), 2, "one run per agent");
    for entry in &mut expected {
        if entry.0 == "agent" {
            entry.1 = 5;
        }
    }
    cluster.wait_healthy(&expected).await;

    // 5. The coordinator restarted mid-job: the job completes without its CLI being restarted
    //    (agents re-attach their running assignments; the coordinator adopts them).
    let job_id = cluster.create_job(SLOW_PROMPT, 200).await;
    let runner = cluster.wait_run_started(&job_id).await;
    cluster
        .project
        .must(&["restart", "--timeout", "20", "coordinator"]);
    println!("restarted the coordinator while agent {runner} ran job {job_id}");
    cluster.wait_healthy(&expected).await;
    cluster
        .wait_completed(std::slice::from_ref(&job_id), JOBS_TIMEOUT)
        .await;
    let runs = cluster.runs();
    assert_eq!(
        starts_of(&runs, &job_id).len(),
        1,
        "the CLI ran once across the coordinator's restart: {:?}",
        starts_of(&runs, &job_id)
    );
    assert_eq!(successes_of(&runs, &job_id).len(), 1);

    if let JobSource::Convex { fake, .. } = &cluster.source {
        let violations = fake
            .violations()
            .await
            .expect("reading the fake's violations");
        assert!(violations.is_empty(), "{violations:?}");
    }

    // 6. Down: no container, network or volume of the project is left.
    cluster.project.down().expect("compose down");
    let left = cluster.project.leftovers().expect("listing leftovers");
    assert!(left.is_empty(), "compose down left behind: {left:?}");
    println!("whole run took {:?}", started.elapsed() + build_time);
}
