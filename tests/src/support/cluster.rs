//! A coordinator and agents started as real processes, with timings shortened for tests, a git
//! repository to clone, and the fixture CLI as the analyzer.

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use fondation_proto::pb::{self, admin_client::AdminClient};
use tempfile::TempDir;
use tonic::transport::{Channel, ClientTlsConfig};

use super::{bin_path, git::GitFixture, process::Proc, wait};

/// For `CoordinatorProc::start`: let the coordinator bind any free port and read it back.
pub const ANY_PORT: u16 = 0;

/// Coordinator settings that make tests quick; each can be overridden.
pub const FAST_COORDINATOR_ENV: &[(&str, &str)] = &[
    ("POLL_INTERVAL", "200"),
    ("HEARTBEAT_INTERVAL", "1000"),
    ("LEASE_TIME", "30000"),
    ("PROGRESS_INTERVAL", "200"),
    ("CANCEL_CHECK_INTERVAL", "500"),
    ("AGENT_TIMEOUT", "3000"),
    ("REATTACH_GRACE", "3000"),
    ("RETRY_BACKOFF", "200"),
    ("MAX_ATTEMPTS", "3"),
    ("RUST_LOG", "info"),
];

/// Everything a test's processes share: a temp root, a repository, the run log of the fixture CLI.
pub struct Sandbox {
    pub root: TempDir,
    pub repo: GitFixture,
    pub run_log: PathBuf,
}

impl Sandbox {
    pub fn new() -> Self {
        let root = tempfile::tempdir().expect("a temp dir for the test");
        let run_log = root.path().join("runs.log");
        // Agents running as root start each analyzer as a slot user of its own: it must pass
        // through the root to reach its workspace and working folder, and append to the run log.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o711))
            .expect("opening the test's temp dir to slot users");
        std::fs::write(&run_log, "").expect("creating the run log");
        std::fs::set_permissions(&run_log, std::fs::Permissions::from_mode(0o666))
            .expect("opening the run log to slot users");
        Self {
            root,
            repo: GitFixture::new(),
            run_log,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// REPO_ALLOWLIST covering the test repository (and GitHub, like the default).
    pub fn allowlist(&self) -> String {
        format!("https://github.com/,{}", self.repo.allow_prefix)
    }
}

impl Default for Sandbox {
    fn default() -> Self {
        Self::new()
    }
}

fn env_with(base: &[(&str, &str)], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = base
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (key, value) in extra {
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }
    env
}

pub struct CoordinatorProc {
    pub proc: Proc,
    pub port: u16,
    pub data_dir: PathBuf,
    /// TLS to reach it with, when it serves TLS.
    pub tls: Option<ClientTlsConfig>,
    /// The ADMIN_TOKEN it was started with, which [`Admin`]'s helpers send.
    pub admin_token: Option<String>,
}

/// Waits until the process that was told to write its bound address to `file` has done so, and
/// returns that address. The binaries write the file whole (a rename), once they listen.
pub async fn reported_address(proc: &mut Proc, file: &Path) -> std::net::SocketAddr {
    let what = format!("{} to write its address to {}", proc.name, file.display());
    wait::until(&what, Duration::from_secs(30), || {
        proc.assert_running();
        let read = std::fs::read_to_string(file);
        async move {
            match read {
                Ok(text) => text
                    .trim()
                    .parse()
                    .map(Some)
                    .map_err(|e| format!("{text:?} is not an address: {e}")),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
}

/// A file name no other process of this test uses, for a process to write its address to.
fn address_file(sandbox: &Sandbox, name: &str) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    sandbox.path(&format!("{name}-{n}.address"))
}

impl CoordinatorProc {
    /// Starts a coordinator on `port` ([`ANY_PORT`]: one the coordinator picks and reports) and
    /// waits until it reports SERVING.
    pub async fn start(sandbox: &Sandbox, port: u16, extra: &[(&str, &str)]) -> Self {
        Self::start_with_tls(sandbox, port, extra, None).await
    }

    /// Like `start`, for a coordinator serving TLS that `tls` can reach.
    pub async fn start_with_tls(
        sandbox: &Sandbox,
        port: u16,
        extra: &[(&str, &str)],
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        let data_dir = sandbox.path("coordinator-data");
        let allowlist = sandbox.allowlist();
        let listen = format!("127.0.0.1:{port}");
        let mut base: Vec<(&str, &str)> = FAST_COORDINATOR_ENV.to_vec();
        base.push(("LISTEN_ADDR", &listen));
        base.push(("REPO_ALLOWLIST", &allowlist));
        let data = data_dir.to_string_lossy().into_owned();
        base.push(("DATA_DIR", &data));
        let address_file = address_file(sandbox, "coordinator");
        let address = address_file.to_string_lossy().into_owned();
        base.push(("ADDRESS_FILE", &address));
        let env = env_with(&base, extra);
        let mut proc = Proc::spawn("coordinator", &bin_path("fondation-coordinator"), &[], &env);
        let port = reported_address(&mut proc, &address_file).await.port();
        let admin_token = extra
            .iter()
            .find(|(key, _)| *key == "ADMIN_TOKEN")
            .map(|(_, value)| value.to_string());
        let mut coordinator = Self {
            proc,
            port,
            data_dir,
            tls,
            admin_token,
        };
        coordinator.wait_serving().await;
        coordinator
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub async fn wait_serving(&mut self) {
        let addr = self.addr();
        let tls = self.tls.clone();
        let proc = &mut self.proc;
        wait::until(
            "the coordinator to report SERVING",
            Duration::from_secs(30),
            || {
                proc.assert_running();
                let addr = addr.clone();
                let tls = tls.clone();
                async move {
                    match fondation_runtime::serving::probe_health_with(
                        &addr,
                        "",
                        Duration::from_secs(1),
                        tls,
                    )
                    .await
                    {
                        Ok(status) if status as i32 == 1 => Ok(Some(())),
                        Ok(status) => Err(format!("{status:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                }
            },
        )
        .await
    }

    pub async fn admin(&self) -> Admin {
        let mut endpoint = Channel::from_shared(self.url()).expect("a valid URL");
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).expect("client TLS");
        }
        let channel = endpoint
            .connect()
            .await
            .expect("connecting to the coordinator's admin service");
        Admin {
            client: AdminClient::new(channel),
            token: self.admin_token.clone(),
        }
    }
}

pub struct AgentProc {
    pub proc: Proc,
    pub id: String,
    /// Where the agent writes the address its health server bound (HEALTH_ADDR on port 0).
    address_file: PathBuf,
    /// ANALYZER_UID_BASE of this agent: slot N's analyzer runs as this + N.
    pub uid_base: u32,
    /// Keeps the uid range this agent's slot users use to itself while the agent lives.
    _uid_range: UidRange,
}

/// Slot counts per agent never exceed this (the agent's MAX_CONCURRENT_JOBS cap).
const UIDS_PER_AGENT: u32 = 64;
/// First uid handed to test agents, above the agent's default so no test collides with an agent
/// started by hand.
const FIRST_TEST_UID: u32 = 100_000;

/// A range of slot uids held by one agent of one test. Agents started as root sweep every process
/// of their slot users, so agents of tests running at once (nextest runs test binaries in
/// parallel) must never share a range: each takes one by locking a file shared by all tests.
struct UidRange {
    base: u32,
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl UidRange {
    fn take() -> Self {
        let dir = std::env::temp_dir().join("fondation-test-uid-ranges");
        std::fs::create_dir_all(&dir).expect("creating the uid range lock folder");
        for index in 0..1000u32 {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{index}.lock")))
                .expect("opening a uid range lock");
            if let Ok(lock) =
                nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock)
            {
                return Self {
                    base: FIRST_TEST_UID + index * UIDS_PER_AGENT,
                    _lock: lock,
                };
            }
        }
        panic!("no free uid range for a test agent: 1000 agents at once?");
    }
}

/// How to start an agent.
pub struct AgentOptions<'a> {
    pub id: &'a str,
    pub coordinator_url: String,
    pub slots: u32,
    pub extra: &'a [(&'a str, &'a str)],
}

impl AgentProc {
    /// Starts an agent running the fixture CLI; does not wait for it to connect.
    pub fn spawn(sandbox: &Sandbox, options: AgentOptions<'_>) -> Self {
        Self::spawn_with(sandbox, options, false)
    }

    /// Like `spawn`, with AGENT_USER set to the last uid of the agent's range (its slots use the
    /// first ones), so an agent started as root runs as a user of its own: see `agent_uid`.
    pub fn spawn_as_own_user(sandbox: &Sandbox, options: AgentOptions<'_>) -> Self {
        Self::spawn_with(sandbox, options, true)
    }

    /// The uid `spawn_as_own_user` gives the agent.
    pub fn agent_uid(&self) -> u32 {
        self.uid_base + UIDS_PER_AGENT - 1
    }

    fn spawn_with(sandbox: &Sandbox, options: AgentOptions<'_>, own_user: bool) -> Self {
        let address_file = address_file(sandbox, &format!("agent-{}", options.id));
        let address = address_file.to_string_lossy().into_owned();
        let temp_dir = sandbox.path("agents-tmp");
        let workdir = sandbox.path("analyzer-workdir");
        std::fs::create_dir_all(&workdir).expect("creating the analyzer workdir");
        let command = format!(
            "'{}' analyze {{repo}} --prompt {{prompt}} --job-id {{job_id}}",
            bin_path("fondation-fixture-cli").display()
        );
        let slots = options.slots.to_string();
        let allowlist = sandbox.allowlist();
        let temp = temp_dir.to_string_lossy().into_owned();
        let work = workdir.to_string_lossy().into_owned();
        let run_log = sandbox.run_log.to_string_lossy().into_owned();
        let analyzer_env = format!(
            "{},FIXTURE_*",
            fondation_agent::sandbox::DEFAULT_ANALYZER_ENV
        );
        let uid_range = UidRange::take();
        let uid_base = uid_range.base.to_string();
        let base: Vec<(&str, &str)> = vec![
            ("ANALYZER_ENV", &analyzer_env),
            ("ANALYZER_UID_BASE", &uid_base),
            ("COORDINATOR_URL", &options.coordinator_url),
            ("AGENT_ID", options.id),
            ("HEALTH_ADDR", "127.0.0.1:0"),
            ("ADDRESS_FILE", &address),
            ("MAX_CONCURRENT_JOBS", &slots),
            ("TEMP_DIR", &temp),
            ("ANALYZER_COMMAND", &command),
            ("ANALYZER_WORKDIR", &work),
            ("REPO_ALLOWLIST", &allowlist),
            ("RECONNECT_MAX_BACKOFF", "1000"),
            ("KILL_GRACE", "2000"),
            ("FIXTURE_RUN_LOG", &run_log),
            ("FIXTURE_AGENT_ID", options.id),
            ("RUST_LOG", "info"),
        ];
        let mut env = env_with(&base, options.extra);
        if own_user {
            let agent_uid = uid_range.base + UIDS_PER_AGENT - 1;
            env.push(("AGENT_USER".into(), agent_uid.to_string()));
        }
        let proc = Proc::spawn(
            &format!("agent-{}", options.id),
            &bin_path("fondation-agent"),
            &[],
            &env,
        );
        Self {
            proc,
            id: options.id.to_string(),
            address_file,
            uid_base: uid_range.base,
            _uid_range: uid_range,
        }
    }

    /// The address of the agent's health server, once it listens.
    pub async fn health_addr(&mut self) -> String {
        reported_address(&mut self.proc, &self.address_file)
            .await
            .to_string()
    }

    /// Starts an agent with one slot and `extra` settings, and waits until it is connected.
    pub async fn connected(
        sandbox: &Sandbox,
        id: &str,
        coordinator_url: String,
        extra: &[(&str, &str)],
    ) -> Self {
        let mut agent = Self::spawn(
            sandbox,
            AgentOptions {
                id,
                coordinator_url,
                slots: 1,
                extra,
            },
        );
        agent.wait_connected().await;
        agent
    }

    pub async fn wait_connected(&mut self) {
        self.proc
            .wait_for_log("connected to the coordinator", Duration::from_secs(30))
            .await;
    }
}

/// Admin client with the calls tests make most.
pub struct Admin {
    /// Sends no token: for calls that test refusals.
    pub client: AdminClient<Channel>,
    /// Sent by the helper methods (`Bearer <token>`), when set.
    pub token: Option<String>,
}

/// `message` with `token` as its bearer, if any.
/// A request carrying `Bearer <token>` when a token is given.
pub fn with_token<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        let value = format!("Bearer {token}").parse().expect("a header value");
        request.metadata_mut().insert("authorization", value);
    }
    request
}

impl Admin {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_token(self.token.as_deref(), message)
    }

    pub async fn submit(&mut self, repo_url: &str, branch: &str, prompt: &str) -> String {
        self.try_submit(repo_url, branch, prompt)
            .await
            .expect("SubmitJob")
    }

    /// SubmitJob, with its refusal as the error.
    pub async fn try_submit(
        &mut self,
        repo_url: &str,
        branch: &str,
        prompt: &str,
    ) -> Result<String, tonic::Status> {
        let request = self.request(pb::SubmitJobRequest {
            repo_url: repo_url.into(),
            branch: branch.into(),
            prompt: prompt.into(),
        });
        Ok(self.client.submit_job(request).await?.into_inner().job_id)
    }

    pub async fn job(&mut self, job_id: &str, include_content: bool) -> pb::Job {
        let request = self.request(pb::GetJobRequest {
            job_id: job_id.into(),
            include_content,
        });
        self.client
            .get_job(request)
            .await
            .expect("GetJob")
            .into_inner()
    }

    /// Waits until the job reaches one of `statuses`.
    pub async fn wait_status(
        &mut self,
        job_id: &str,
        statuses: &[&str],
        timeout: Duration,
    ) -> pb::Job {
        let what = format!("job {job_id} to reach {statuses:?}");
        let client = self.client.clone();
        let token = self.token.clone();
        wait::until(&what, timeout, || {
            let mut client = client.clone();
            let request = with_token(
                token.as_deref(),
                pb::GetJobRequest {
                    job_id: job_id.to_string(),
                    include_content: false,
                },
            );
            async move {
                let job = client
                    .get_job(request)
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner();
                if statuses.contains(&job.status.as_str()) {
                    Ok(Some(job))
                } else {
                    Err(format!(
                        "status {} attempts {} error {:?} step {}",
                        job.status, job.attempts, job.error, job.current_step
                    ))
                }
            }
        })
        .await
    }

    /// Waits until ListAgents shows at least `count` agents.
    pub async fn wait_agents_listed(&self, count: usize, timeout: Duration) {
        let client = self.client.clone();
        let token = self.token.clone();
        wait::until(&format!("{count} agents to be listed"), timeout, || {
            let mut client = client.clone();
            let request = with_token(token.as_deref(), pb::ListAgentsRequest {});
            async move {
                let listed = client
                    .list_agents(request)
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner()
                    .agents
                    .len();
                if listed >= count {
                    Ok(Some(()))
                } else {
                    Err(format!("{listed} listed"))
                }
            }
        })
        .await;
    }

    pub async fn agents(&mut self) -> Vec<pb::AgentInfo> {
        let request = self.request(pb::ListAgentsRequest {});
        self.client
            .list_agents(request)
            .await
            .expect("ListAgents")
            .into_inner()
            .agents
    }
}

/// Reads a whole folder tree as (relative path, bytes), sorted.
pub fn read_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("reading a folder").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let relative = path
                    .strip_prefix(root)
                    .expect("under the root")
                    .to_string_lossy()
                    .into_owned();
                files.push((relative, std::fs::read(&path).expect("reading a file")));
            }
        }
    }
    files.sort();
    files
}

/// Waits until the fixture CLI has logged at least `count` run starts for `job_id`; returns them.
pub async fn wait_runs_started(
    sandbox: &Sandbox,
    job_id: &str,
    count: usize,
    timeout: Duration,
) -> Vec<crate::fixture_cli::RunRecord> {
    wait_runs_started_in(&sandbox.run_log, job_id, count, timeout).await
}

/// Like [`wait_runs_started`], for the run log at `run_log` (a container's, shared with the host).
pub async fn wait_runs_started_in(
    run_log: &Path,
    job_id: &str,
    count: usize,
    timeout: Duration,
) -> Vec<crate::fixture_cli::RunRecord> {
    let what = format!("{count} run(s) of job {job_id} to start");
    wait::until(&what, timeout, || async {
        let records =
            crate::fixture_cli::read_run_log_if_any(run_log).map_err(|e| e.to_string())?;
        let starts: Vec<_> = records
            .into_iter()
            .filter(|r| r.kind == crate::fixture_cli::RunEventKind::Start && r.job_id == job_id)
            .collect();
        if starts.len() >= count {
            Ok(Some(starts))
        } else {
            Err(format!("{} started", starts.len()))
        }
    })
    .await
}

/// Whether a process id is still alive (and not a zombie).
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
