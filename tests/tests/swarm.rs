//! Issue 14 on the real Docker engine: `deploy/swarm/stack.yml` on a single-node swarm this test
//! creates (and leaves, whatever happens), from the offline-built images, with Docker secrets
//! (tokens, TLS material made by `scripts/make-certs`) and mutual TLS between agents and the
//! coordinator. Jobs complete; agents scale 2 -> 5 and all five register; a forced rolling update
//! of the agents while a job runs completes that job exactly once; a forced update of the
//! coordinator (stop-first) replaces no agent task (agents are alive while their coordinator is
//! away: the image's health check is liveness); `docker stack rm` plus the volumes leaves nothing.
//!
//! Refuses to run when the engine is already part of a swarm: leaving it would break someone
//! else's cluster. Needs Docker 20.10+ (capabilities for services); fails saying what is missing.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use fondation_proto::pb::{self, admin_client::AdminClient};
use fondation_testkit::{
    fixture_cli::{read_run_log, RunEventKind, RunRecord},
    support::{
        compose::{self, docker, repo_root},
        free_port, wait,
    },
};
use tonic::{metadata::MetadataValue, transport::Channel, Code, Request};

const STACK_FILE: &str = "deploy/swarm/stack.yml";
const TEST_FILE: &str = "tests/compose/swarm.test.yml";
const REPO_URL: &str = "git://gitserver/fondation/demo.git";
/// Label Swarm puts on everything a stack creates.
const STACK_LABEL: &str = "com.docker.stack.namespace";
const ADMIN_TOKEN: &str = "swarm-test-admin-token";
const AGENT_TOKEN: &str = "swarm-test-agent-token";
/// A job that runs about 18 s: time to roll the agents or the coordinator in the middle of it.
const SLOW_PROMPT: &str = "explain this project fixture:slow=3000";
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);
const JOBS_TIMEOUT: Duration = Duration::from_secs(300);

/// The swarm this test created: `docker swarm leave --force` on drop, and the bridge network
/// Swarm adds to the host (`docker_gwbridge`) removed when it was not there before.
struct SwarmGuard {
    had_gwbridge: bool,
}

impl SwarmGuard {
    /// Initialises a single-node swarm on loopback; panics if the engine is already in one.
    fn init() -> Self {
        let state =
            docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]).expect("docker info");
        assert_eq!(
            state.trim(),
            "inactive",
            "this Docker engine is already part of a swarm (state {:?}); the swarm test creates \
             and leaves its own, so it refuses to touch this one. Run it on an engine outside any \
             swarm (or leave with `docker swarm leave` if that swarm is yours and disposable)",
            state.trim()
        );
        let had_gwbridge = network_exists("docker_gwbridge");
        docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"])
            .unwrap_or_else(|e| panic!("docker swarm init: {e}"));
        Self { had_gwbridge }
    }

    fn node_id(&self) -> String {
        docker(&["info", "--format", "{{.Swarm.NodeID}}"])
            .expect("docker info")
            .trim()
            .to_string()
    }

    /// Leaves the swarm and removes what it left on the host; what remains, as an error.
    fn leave(&self) -> Result<(), String> {
        docker(&["swarm", "leave", "--force"])?;
        if !self.had_gwbridge && network_exists("docker_gwbridge") {
            docker(&["network", "rm", "docker_gwbridge"])?;
        }
        let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])?;
        if state.trim() != "inactive" {
            return Err(format!("still in a swarm after leaving: {}", state.trim()));
        }
        Ok(())
    }
}

impl Drop for SwarmGuard {
    fn drop(&mut self) {
        let state = docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"]);
        if state.as_deref().map(str::trim) == Ok("inactive") {
            return;
        }
        if let Err(e) = self.leave() {
            eprintln!("leaving the test's swarm failed: {e}; run `docker swarm leave --force`");
        }
    }
}

fn network_exists(name: &str) -> bool {
    docker(&[
        "network",
        "ls",
        "--quiet",
        "--filter",
        &format!("name=^{name}$"),
    ])
    .is_ok_and(|out| !out.trim().is_empty())
}

/// A deployed stack: `docker stack rm` on drop, then its volumes and images, whatever happened.
struct StackGuard {
    name: String,
    env: Vec<(String, String)>,
    images: Vec<String>,
    /// Volumes present before the deploy: every other one afterwards is the stack's.
    volumes_before: BTreeSet<String>,
    /// Set once `remove` succeeded: nothing left for the guard but the images.
    removed: bool,
}

impl StackGuard {
    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("docker");
        command.args(args).current_dir(repo_root()).env_clear();
        for name in compose::PASSED_ENV {
            if let Some(value) = std::env::var_os(name) {
                command.env(name, value);
            }
        }
        command.envs(self.env.iter().map(|(k, v)| (k, v)));
        command
    }

    fn deploy(&self) {
        let args = [
            "stack",
            "deploy",
            "--resolve-image",
            "never",
            "--compose-file",
            STACK_FILE,
            "--compose-file",
            TEST_FILE,
            &self.name,
        ];
        eprintln!("$ docker {}", args.join(" "));
        let output = self.command(&args).output().expect("running docker");
        assert!(
            output.status.success(),
            "docker stack deploy failed: {}{}",
            String::from_utf8_lossy(&output.stderr),
            String::from_utf8_lossy(&output.stdout)
        );
    }

    fn service(&self, name: &str) -> String {
        format!("{}_{name}", self.name)
    }

    /// Running task containers of a service: (container id, host name = agent id, health).
    fn containers(&self, service: &str) -> Result<Vec<(String, String, String)>, String> {
        let filter = format!(
            "label=com.docker.swarm.service.name={}",
            self.service(service)
        );
        let ids = docker(&["ps", "--quiet", "--no-trunc", "--filter", &filter])?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let format = "{{.Id}} {{.Config.Hostname}} {{.State.Status}} \
                      {{if .State.Health}}{{.State.Health.Status}}{{else}}none{{end}}";
        let mut args = vec!["inspect", "--format", format];
        args.extend(ids);
        let out = docker(&args)?;
        Ok(out
            .lines()
            .filter_map(
                |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                    [id, host, "running", health] => Some((id.into(), host.into(), health.into())),
                    _ => None,
                },
            )
            .collect())
    }

    /// Ids of the service's tasks that should be running.
    fn running_tasks(&self, service: &str) -> Result<BTreeSet<String>, String> {
        let out = docker(&[
            "service",
            "ps",
            "--quiet",
            "--no-trunc",
            "--filter",
            "desired-state=running",
            &self.service(service),
        ])?;
        Ok(out.split_whitespace().map(String::from).collect())
    }

    /// Waits until exactly `count` containers of `service` run, all healthy; their host names.
    async fn wait_healthy(&self, service: &str, count: usize) -> BTreeSet<String> {
        let what = format!("{count} healthy task(s) of {service}");
        wait::until(&what, CONVERGE_TIMEOUT, || async move {
            let running = self.containers(service)?;
            if running.len() == count && running.iter().all(|(_, _, h)| h == "healthy") {
                Ok(Some(running.into_iter().map(|(_, host, _)| host).collect()))
            } else {
                Err(wait::state(&running))
            }
        })
        .await
    }

    /// Everything still carrying the stack's label, and volumes created since the deploy.
    fn leftovers(&self) -> Result<Vec<String>, String> {
        let filter = format!("label={STACK_LABEL}={}", self.name);
        let mut found = Vec::new();
        for (kind, args) in [
            (
                "service",
                vec!["service", "ls", "--quiet", "--filter", &filter],
            ),
            (
                "container",
                vec!["ps", "--all", "--quiet", "--filter", &filter],
            ),
            (
                "network",
                vec!["network", "ls", "--quiet", "--filter", &filter],
            ),
            (
                "secret",
                vec!["secret", "ls", "--quiet", "--filter", &filter],
            ),
            (
                "config",
                vec!["config", "ls", "--quiet", "--filter", &filter],
            ),
        ] {
            // Out of the swarm, service/secret/config listings fail: nothing of them is left.
            if let Ok(out) = docker(&args) {
                found.extend(out.split_whitespace().map(|id| format!("{kind} {id}")));
            }
        }
        for volume in self.new_volumes()? {
            found.push(format!("volume {volume}"));
        }
        Ok(found)
    }

    fn new_volumes(&self) -> Result<Vec<String>, String> {
        Ok(docker(&["volume", "ls", "--quiet"])?
            .split_whitespace()
            .filter(|v| !self.volumes_before.contains(*v))
            .map(String::from)
            .collect())
    }

    /// `docker stack rm`, then waits for its containers and networks to go (Swarm removes them
    /// after the command returns) and removes the volumes it leaves by design. Blocking, polling
    /// with a deadline: it also runs from `Drop`, inside the test's runtime, where nothing can be
    /// awaited.
    fn remove(&mut self) -> Result<(), String> {
        docker(&["stack", "rm", &self.name])?;
        let filter = format!("label={STACK_LABEL}={}", self.name);
        let filter = filter.as_str();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let containers = docker(&["ps", "--all", "--quiet", "--filter", filter])?;
            let networks = docker(&["network", "ls", "--quiet", "--filter", filter])?;
            if containers.trim().is_empty() && networks.trim().is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "stack {} still has containers {containers:?} and networks {networks:?}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        for volume in self.new_volumes()? {
            docker(&["volume", "rm", &volume])?;
        }
        self.removed = true;
        Ok(())
    }

    fn print_logs(&self) {
        for service in ["coordinator", "agent", "gitserver"] {
            // The services log to stderr, which `docker service logs` replays on its stderr.
            let name = self.service(service);
            let args = ["service", "logs", "--no-task-ids", "--tail", "80", &name];
            match Command::new("docker").args(args).output() {
                Ok(out) => eprintln!(
                    "---- logs of {name} ----\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
                Err(e) => eprintln!("could not read the logs of {service}: {e}"),
            }
        }
        if let Ok(ps) = docker(&["stack", "ps", "--no-trunc", &self.name]) {
            eprintln!("---- docker stack ps ----\n{ps}");
        }
    }
}

impl Drop for StackGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        if self.removed {
            self.remove_images();
            return;
        }
        if let Err(e) = self.remove() {
            eprintln!("removing stack {} failed: {e}", self.name);
        }
        self.remove_images();
    }
}

impl StackGuard {
    /// Children before parents (the fixture agent image is built on the agent image).
    fn remove_images(&self) {
        for image in self.images.iter().rev() {
            if let Err(e) = docker(&["image", "rm", image]) {
                eprintln!("could not remove image {image}: {e}");
            }
        }
    }
}

/// Admin over mutual-TLS-capable TLS (server authentication only: Admin needs no client
/// certificate) with the stack's ADMIN_TOKEN.
struct Admin {
    client: AdminClient<Channel>,
}

impl Admin {
    async fn connect(port: u16, ca: &Path) -> Result<Self, String> {
        let ca = std::fs::read(ca).map_err(|e| format!("reading the CA: {e}"))?;
        let tls = fondation_runtime::tls::client_config(Some(ca), None, Some("localhost"));
        let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
            .map_err(|e| e.to_string())?
            .tls_config(tls)
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .map_err(|e| format!("connecting to the coordinator: {e:?}"))?;
        Ok(Self {
            client: AdminClient::new(channel),
        })
    }

    fn authorized<T>(message: T, token: &str) -> Request<T> {
        let mut request = Request::new(message);
        let value: MetadataValue<_> = format!("Bearer {token}").parse().expect("an ASCII token");
        request.metadata_mut().insert("authorization", value);
        request
    }

    async fn submit(&mut self, prompt: &str) -> String {
        let message = pb::SubmitJobRequest {
            repo_url: REPO_URL.into(),
            branch: "main".into(),
            prompt: prompt.into(),
        };
        self.client
            .submit_job(Self::authorized(message, ADMIN_TOKEN))
            .await
            .unwrap_or_else(|e| panic!("SubmitJob: {e}"))
            .into_inner()
            .job_id
    }

    async fn job(&mut self, job_id: &str) -> Result<pb::Job, String> {
        let message = pb::GetJobRequest {
            job_id: job_id.into(),
            include_content: false,
        };
        self.client
            .get_job(Self::authorized(message, ADMIN_TOKEN))
            .await
            .map(|r| r.into_inner())
            .map_err(|e| format!("GetJob {job_id}: {e}"))
    }

    async fn agents(&mut self) -> Result<BTreeSet<String>, String> {
        let message = pb::ListAgentsRequest {};
        let reply = self
            .client
            .list_agents(Self::authorized(message, ADMIN_TOKEN))
            .await
            .map_err(|e| format!("ListAgents: {e}"))?;
        Ok(reply
            .into_inner()
            .agents
            .into_iter()
            .map(|a| a.agent_id)
            .collect())
    }
}

struct Deployment {
    stack: StackGuard,
    port: u16,
    ca: PathBuf,
    run_log: PathBuf,
}

impl Deployment {
    /// A fresh Admin client: the coordinator's task may have been replaced since the last one.
    async fn admin(&self) -> Result<Admin, String> {
        Admin::connect(self.port, &self.ca).await
    }

    async fn wait_admin(&self) -> Admin {
        wait::until(
            "the coordinator's published port to answer over TLS",
            CONVERGE_TIMEOUT,
            || async move { self.admin().await.map(Some) },
        )
        .await
    }

    async fn wait_listed_agents(&self, expected: &BTreeSet<String>) {
        let what = format!("ListAgents to show exactly {expected:?}");
        wait::until(&what, CONVERGE_TIMEOUT, || async move {
            let listed = self.admin().await?.agents().await?;
            if &listed == expected {
                Ok(Some(()))
            } else {
                Err(format!("{listed:?}"))
            }
        })
        .await
    }

    async fn wait_completed(&self, job_ids: &[String]) {
        let what = format!("{} job(s) to complete", job_ids.len());
        wait::until(&what, JOBS_TIMEOUT, || async move {
            let mut admin = self.admin().await?;
            let mut pending = BTreeMap::new();
            for job_id in job_ids {
                let job = admin.job(job_id).await?;
                assert!(
                    !["failed", "dead", "canceled"].contains(&job.status.as_str()),
                    "job {job_id} ended {}: {}",
                    job.status,
                    job.error
                );
                if job.status != "completed" {
                    pending.insert(job_id.clone(), job.status);
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

    /// Starts and successful ends of the CLI for `job_id`.
    fn counts(&self, job_id: &str) -> (usize, usize) {
        let runs = self.runs();
        let starts = runs
            .iter()
            .filter(|r| r.kind == RunEventKind::Start && r.job_id == job_id)
            .count();
        let successes = runs
            .iter()
            .filter(|r| r.kind == RunEventKind::End && r.job_id == job_id && r.exit_code == Some(0))
            .count();
        (starts, successes)
    }

    async fn wait_update_completed(&self, service: &str) {
        let name = self.stack.service(service);
        let what = format!("the rolling update of {name} to complete");
        let name = name.as_str();
        wait::until(&what, CONVERGE_TIMEOUT, || async move {
            let state = docker(&[
                "service",
                "inspect",
                "--format",
                "{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}",
                name,
            ])?;
            match state.trim() {
                "completed" => Ok(Some(())),
                "rollback_started" | "rollback_completed" | "paused" => {
                    panic!("the update of {name} failed: {}", state.trim())
                }
                other => Err(other.to_string()),
            }
        })
        .await
    }
}

/// A host folder the slot users of the agents can write the run log into.
fn shared_run_log_dir(root: &Path) -> PathBuf {
    let dir = root.join("run-log");
    std::fs::create_dir(&dir).expect("creating the run log folder");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
        .expect("opening the run log folder to the containers' users");
    dir
}

/// The stack's secrets: TLS material from `scripts/make-certs`, and the two tokens.
fn make_secrets(dir: &Path) {
    let script = repo_root().join("scripts/make-certs");
    let status = Command::new(&script)
        .arg("--out")
        .arg(dir)
        .arg("--days")
        .arg("2")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(status.success(), "scripts/make-certs failed ({status})");
    // Written with a trailing newline, as `echo` would: the <NAME>_FILE reader trims it.
    std::fs::write(dir.join("admin-token"), format!("{ADMIN_TOKEN}\n")).unwrap();
    std::fs::write(dir.join("agent-token"), format!("{AGENT_TOKEN}\n")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn swarm_stack_deploys_with_mtls_scales_rolls_and_leaves_nothing() {
    compose::require_docker();
    let suffix = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    let tag = format!("test-{suffix}");
    let name = format!("fondation-swarm-{suffix}");
    let scratch = tempfile::tempdir().expect("a temp dir for the test");
    let secrets = scratch.path().join("secrets");
    make_secrets(&secrets);
    let run_log_dir = shared_run_log_dir(scratch.path());
    let port = free_port();

    // The swarm first, so it is left last (guards drop in reverse order).
    let swarm = SwarmGuard::init();
    let volumes_before = docker(&["volume", "ls", "--quiet"])
        .expect("docker volume ls")
        .split_whitespace()
        .map(String::from)
        .collect();
    let stack = StackGuard {
        name: name.clone(),
        env: vec![
            ("FONDATION_TAG".into(), tag.clone()),
            ("SECRETS_DIR".into(), secrets.to_string_lossy().into_owned()),
            ("STACK_SECRET_PREFIX".into(), name.clone()),
            ("COORDINATOR_PORT".into(), port.to_string()),
            (
                "FONDATION_TEST_RUN_LOG_DIR".into(),
                run_log_dir.to_string_lossy().into_owned(),
            ),
            ("FIXTURE_STEP_DELAY_MS".into(), "1000".into()),
            ("AGENT_REPLICAS".into(), "2".into()),
        ],
        images: [
            "fondation-coordinator",
            "fondation-agent",
            "fondation-agent-fixture",
            "fondation-testkit",
        ]
        .iter()
        .map(|image| format!("{image}:{tag}"))
        .collect(),
        volumes_before,
        removed: false,
    };

    // 1. Images offline (no registry: the stack deploys with --resolve-image never).
    let build_time = compose::build_images(&tag);
    println!("scripts/build-images took {build_time:?}");

    // 2. Deploy on the node labelled for the coordinator's volume; 2 agents register over mTLS.
    let started = Instant::now();
    docker(&[
        "node",
        "update",
        "--label-add",
        "fondation.coordinator=true",
        &swarm.node_id(),
    ])
    .expect("labelling the node for the coordinator");
    stack.deploy();
    let cluster = Deployment {
        stack,
        port,
        ca: secrets.join("ca.pem"),
        run_log: run_log_dir.join("runs.log"),
    };
    cluster.stack.wait_healthy("coordinator", 1).await;
    let agents = cluster.stack.wait_healthy("agent", 2).await;
    cluster.wait_listed_agents(&agents).await;
    println!("stack up with 2 agents after {:?}", started.elapsed());

    // Admin requires the token: Swarm publishes the port on every interface.
    let mut admin = cluster.wait_admin().await;
    let refused = admin
        .client
        .submit_job(Request::new(pb::SubmitJobRequest {
            repo_url: REPO_URL.into(),
            branch: "main".into(),
            prompt: "explain".into(),
        }))
        .await
        .expect_err("SubmitJob without ADMIN_TOKEN");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");

    // 3. Jobs run to completion, each once.
    let mut job_ids = Vec::new();
    for n in 0..4 {
        job_ids.push(admin.submit(&format!("explain this project ({n})")).await);
    }
    cluster.wait_completed(&job_ids).await;
    for job_id in &job_ids {
        assert_eq!(cluster.counts(job_id), (1, 1), "job {job_id} ran once");
    }

    // 4. Scale 2 -> 5: all five register.
    docker(&[
        "service",
        "scale",
        "--detach",
        &format!("{}=5", cluster.stack.service("agent")),
    ])
    .expect("docker service scale");
    let agents = cluster.stack.wait_healthy("agent", 5).await;
    cluster.wait_listed_agents(&agents).await;
    println!("5 agents listed after {:?}", started.elapsed());

    // 5. A forced rolling update of the agents while a job runs: start-first, one at a time; the
    //    replaced agent drains and finishes its job: completed exactly once.
    let job_id = admin.submit(SLOW_PROMPT).await;
    let runner = cluster.wait_run_started(&job_id).await;
    docker(&[
        "service",
        "update",
        "--force",
        "--detach",
        &cluster.stack.service("agent"),
    ])
    .expect("docker service update --force on the agents");
    println!("rolling the agents while {runner} runs job {job_id}");
    cluster.wait_completed(std::slice::from_ref(&job_id)).await;
    cluster.wait_update_completed("agent").await;
    let agents = cluster.stack.wait_healthy("agent", 5).await;
    assert!(
        !agents.contains(&runner),
        "every agent was replaced, {runner} too: {agents:?}"
    );
    assert_eq!(
        cluster.counts(&job_id),
        (1, 1),
        "the job ran and completed exactly once across the rolling update: {:?}",
        cluster.runs()
    );
    cluster.wait_listed_agents(&agents).await;

    // 6. The coordinator's task replaced (stop-first) while a job runs: no agent task replaced
    //    meanwhile (liveness, not readiness, decides restarts), the job completes once.
    let agent_tasks = cluster
        .stack
        .running_tasks("agent")
        .expect("the agents' tasks");
    let coordinator_tasks = cluster
        .stack
        .running_tasks("coordinator")
        .expect("the coordinator's task");
    let job_id = admin.submit(SLOW_PROMPT).await;
    let runner = cluster.wait_run_started(&job_id).await;
    docker(&[
        "service",
        "update",
        "--force",
        "--detach",
        &cluster.stack.service("coordinator"),
    ])
    .expect("docker service update --force on the coordinator");
    println!("replacing the coordinator while {runner} runs job {job_id}");
    cluster.wait_update_completed("coordinator").await;
    cluster.stack.wait_healthy("coordinator", 1).await;
    let new_coordinator_tasks = cluster.stack.running_tasks("coordinator").unwrap();
    assert!(
        new_coordinator_tasks.is_disjoint(&coordinator_tasks),
        "the coordinator's task was replaced: {coordinator_tasks:?} -> {new_coordinator_tasks:?}"
    );
    cluster.wait_completed(std::slice::from_ref(&job_id)).await;
    assert_eq!(
        cluster.counts(&job_id),
        (1, 1),
        "the CLI ran once across the coordinator's replacement"
    );
    cluster.wait_listed_agents(&agents).await;
    assert_eq!(
        cluster.stack.running_tasks("agent").unwrap(),
        agent_tasks,
        "no agent task was replaced while the coordinator was"
    );

    // 7. Remove the stack and what it leaves by design; leave the swarm; nothing is left.
    let Deployment { mut stack, .. } = cluster;
    stack.remove().expect("removing the stack");
    let left = stack.leftovers().expect("listing leftovers");
    assert!(left.is_empty(), "the stack left behind: {left:?}");
    swarm.leave().expect("leaving the swarm");
    assert!(
        !network_exists("ingress") && (swarm.had_gwbridge || !network_exists("docker_gwbridge")),
        "leaving the swarm left its networks"
    );
    println!("whole run took {:?}", started.elapsed() + build_time);
}
