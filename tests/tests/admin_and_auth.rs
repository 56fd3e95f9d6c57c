//! Admin calls and credentials: an agent without the shared token gets no job, every Admin call
//! needs ADMIN_TOKEN (reads may use ADMIN_READ_TOKEN), secrets can be given as files, a drained
//! agent takes no new work and stops reporting SERVING (but stays alive); SubmitJob bounds its
//! inputs and never repeats a credential, ListJobs pages, and idle connections are closed.

use std::time::Duration;

use fondation_proto::pb;
use fondation_testkit::support::{
    cluster::{with_token, Admin, AgentOptions, AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
    process::rss_kib,
    wait,
};
use tonic::{metadata::MetadataValue, Code, Request};

#[tokio::test(flavor = "multi_thread")]
async fn agents_and_admin_calls_need_their_tokens() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(
        &sandbox,
        ANY_PORT,
        &[
            ("AGENT_TOKEN", "agent-secret"),
            ("ADMIN_TOKEN", "admin-secret"),
        ],
    )
    .await;
    let mut intruder = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "intruder",
            coordinator_url: coordinator.url(),
            slots: 1,
            extra: &[("AGENT_TOKEN", "wrong")],
        },
    );
    intruder
        .proc
        .wait_for_log("missing or wrong bearer token", Duration::from_secs(20))
        .await;

    let mut admin = coordinator.admin().await;
    let submit = pb::SubmitJobRequest {
        repo_url: sandbox.repo.url.clone(),
        branch: "main".into(),
        prompt: "explain".into(),
    };
    let refused = admin.client.submit_job(submit.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.message().contains("ADMIN_TOKEN"),
        "{}",
        refused.message()
    );
    // The helpers send ADMIN_TOKEN: reads need it too.
    assert!(
        admin.agents().await.is_empty(),
        "the intruder is not registered"
    );

    let mut request = Request::new(submit);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::from_static("Bearer admin-secret"),
    );
    let job_id = admin
        .client
        .submit_job(request)
        .await
        .unwrap()
        .into_inner()
        .job_id;

    let _member = AgentProc::connected(
        &sandbox,
        "member",
        coordinator.url(),
        &[("AGENT_TOKEN", "agent-secret")],
    )
    .await;
    let job = admin
        .wait_status(
            &job_id,
            &["completed", "failed", "dead"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert!(
        !intruder.proc.log_contains("run started"),
        "the intruder got no job"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_given_as_files_work_and_both_forms_are_refused() {
    let sandbox = Sandbox::new();
    let agent_token_file = sandbox.path("agent-token");
    std::fs::write(&agent_token_file, "agent-secret\n").unwrap();
    let agent_token_file = agent_token_file.to_string_lossy().into_owned();
    let admin_token_file = sandbox.path("admin-token");
    std::fs::write(&admin_token_file, "admin-secret\n").unwrap();
    let admin_token_file = admin_token_file.to_string_lossy().into_owned();

    let coordinator = CoordinatorProc::start(
        &sandbox,
        ANY_PORT,
        &[
            ("AGENT_TOKEN", "agent-secret"),
            ("ADMIN_TOKEN_FILE", &admin_token_file),
        ],
    )
    .await;
    // The file's trailing newline is not part of the token, or the agent would be refused.
    let _agent = AgentProc::connected(
        &sandbox,
        "from-file",
        coordinator.url(),
        &[("AGENT_TOKEN_FILE", &agent_token_file)],
    )
    .await;
    let mut admin = coordinator.admin().await;
    admin.token = Some("admin-secret".into());
    let submit = |token: &'static str| {
        let mut request = Request::new(pb::SubmitJobRequest {
            repo_url: sandbox.repo.url.clone(),
            branch: "main".into(),
            prompt: "explain".into(),
        });
        request
            .metadata_mut()
            .insert("authorization", MetadataValue::from_static(token));
        request
    };
    let refused = admin.client.submit_job(submit("Bearer wrong")).await;
    assert_eq!(refused.unwrap_err().code(), Code::Unauthenticated);
    let job_id = admin
        .client
        .submit_job(submit("Bearer admin-secret"))
        .await
        .expect("ADMIN_TOKEN read from ADMIN_TOKEN_FILE")
        .into_inner()
        .job_id;
    let job = admin
        .wait_status(
            &job_id,
            &["completed", "failed", "dead"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(job.status, "completed", "{job:?}");

    // Both forms of one secret: each binary refuses to start, naming both variables.
    for (binary, name, file) in [
        ("fondation-agent", "AGENT_TOKEN", &agent_token_file),
        ("fondation-coordinator", "ADMIN_TOKEN", &admin_token_file),
    ] {
        let output = std::process::Command::new(fondation_testkit::support::bin_path(binary))
            .env(name, "direct")
            .env(format!("{name}_FILE"), file)
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("HEALTH_ADDR", "127.0.0.1:0")
            .env("DATA_DIR", sandbox.path("refused-data"))
            .env("TEMP_DIR", sandbox.path("refused-tmp"))
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{binary} started: {stderr}");
        assert!(
            stderr.contains(&format!("{name} and {name}_FILE are both set")),
            "{binary}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn drained_agent_takes_no_new_job_and_reports_not_serving() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let mut agent = AgentProc::connected(&sandbox, "to-drain", coordinator.url(), &[]).await;
    let mut admin = coordinator.admin().await;
    admin
        .client
        .drain_agent(pb::DrainAgentRequest {
            agent_id: "to-drain".into(),
        })
        .await
        .expect("DrainAgent");
    agent
        .proc
        .wait_for_log("draining: no new jobs", Duration::from_secs(10))
        .await;
    let health_addr = agent.health_addr().await;
    let health = fondation_runtime::serving::probe_health(&health_addr, "", Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(health.as_str_name(), "NOT_SERVING");
    let probe = |service: &str| {
        std::process::Command::new(fondation_testkit::support::bin_path("fondation-agent"))
            .args(["health", "--service", service])
            .env("HEALTH_ADDR", &health_addr)
            .output()
            .unwrap()
    };
    let ready = probe("");
    assert!(
        !ready.status.success(),
        "a drained agent is not ready: {ready:?}"
    );
    // Not ready is not dead: restarts check liveness, which a drained agent still passes.
    let alive = probe("liveness");
    assert!(
        alive.status.success(),
        "a drained agent is alive: {alive:?}"
    );
    assert_eq!(String::from_utf8_lossy(&alive.stdout).trim(), "SERVING");
    let agents = admin.agents().await;
    assert!(agents[0].draining);

    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    // A fresh agent picks the job up; the drained one never does.
    let _fresh = AgentProc::connected(&sandbox, "fresh", coordinator.url(), &[]).await;
    let job = admin
        .wait_status(
            &job_id,
            &["completed", "failed", "dead"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(job.status, "completed");
    assert!(!agent.proc.log_contains("run started"));

    let unknown = admin
        .client
        .drain_agent(pb::DrainAgentRequest {
            agent_id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let listed = admin
        .client
        .list_jobs(pb::ListJobsRequest {
            status: "completed".into(),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].job_id, job_id);
}

/// The code of each Admin call made with `token`, reads first.
async fn admin_codes(admin: &mut Admin, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let code = |result: Result<Code, tonic::Status>| match result {
        Ok(code) => code,
        Err(status) => status.code(),
    };
    let client = &mut admin.client;
    let get = client
        .get_job(with_token(
            token,
            pb::GetJobRequest {
                job_id: "nope".into(),
                include_content: true,
            },
        ))
        .await
        .map(|_| Code::Ok);
    let list = client
        .list_jobs(with_token(token, pb::ListJobsRequest::default()))
        .await
        .map(|_| Code::Ok);
    let agents = client
        .list_agents(with_token(token, pb::ListAgentsRequest {}))
        .await
        .map(|_| Code::Ok);
    // Writes that would fail anyway past the token check (no such job or agent, a URL off the
    // allow-list), so a test never changes state by accident.
    let submit = client
        .submit_job(with_token(
            token,
            pb::SubmitJobRequest {
                repo_url: "https://elsewhere.invalid/o/r.git".into(),
                branch: "main".into(),
                prompt: "x".into(),
            },
        ))
        .await
        .map(|_| Code::Ok);
    let cancel = client
        .cancel_job(with_token(
            token,
            pb::CancelJobRequest {
                job_id: "nope".into(),
            },
        ))
        .await
        .map(|_| Code::Ok);
    let drain = client
        .drain_agent(with_token(
            token,
            pb::DrainAgentRequest {
                agent_id: "nobody".into(),
            },
        ))
        .await
        .map(|_| Code::Ok);
    vec![
        ("GetJob", code(get)),
        ("ListJobs", code(list)),
        ("ListAgents", code(agents)),
        ("SubmitJob", code(submit)),
        ("CancelJob", code(cancel)),
        ("DrainAgent", code(drain)),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn every_admin_call_needs_the_token_and_the_read_token_only_reads() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(
        &sandbox,
        ANY_PORT,
        &[
            ("ADMIN_TOKEN", "admin-secret"),
            ("ADMIN_READ_TOKEN", "read-secret"),
        ],
    )
    .await;
    let mut admin = coordinator.admin().await;
    use Code::{InvalidArgument, NotFound, Ok, Unauthenticated};
    for token in [None, Some("wrong")] {
        let codes = admin_codes(&mut admin, token).await;
        assert!(
            codes.iter().all(|(_, code)| *code == Unauthenticated),
            "{token:?}: {codes:?}"
        );
    }
    assert_eq!(
        admin_codes(&mut admin, Some("read-secret")).await,
        vec![
            ("GetJob", NotFound),
            ("ListJobs", Ok),
            ("ListAgents", Ok),
            ("SubmitJob", Unauthenticated),
            ("CancelJob", Unauthenticated),
            ("DrainAgent", Unauthenticated),
        ]
    );
    assert_eq!(
        admin_codes(&mut admin, Some("admin-secret")).await,
        vec![
            ("GetJob", NotFound),
            ("ListJobs", Ok),
            ("ListAgents", Ok),
            ("SubmitJob", InvalidArgument),
            ("CancelJob", NotFound),
            ("DrainAgent", NotFound),
        ]
    );
    // Health and reflection stay open.
    let health =
        fondation_runtime::serving::probe_health(&coordinator.addr(), "", Duration::from_secs(5))
            .await
            .expect("health needs no token");
    assert_eq!(health.as_str_name(), "SERVING");
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_bounds_its_inputs_redacts_credentials_and_list_jobs_pages() {
    let sandbox = Sandbox::new();
    let mut coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let mut admin = coordinator.admin().await;
    let submit = |repo_url: String, branch: String| pb::SubmitJobRequest {
        repo_url,
        branch,
        prompt: "explain".into(),
    };
    const SECRET: &str = "s3cr3t-pw";
    let credentialed = format!("https://user:{SECRET}@github.com/o/r.git");
    let cases = [
        (credentialed.clone(), "main".to_string(), "***@"),
        (
            "https://github.com/".to_string() + &"a".repeat(3000),
            "main".into(),
            "longer than 2048 bytes",
        ),
        (
            sandbox.repo.url.clone(),
            "b".repeat(300),
            "longer than 255 bytes",
        ),
        (
            sandbox.repo.url.clone(),
            "x;rm".into(),
            "shell metacharacter",
        ),
    ];
    for (repo_url, branch, expected) in cases {
        let refused = admin
            .client
            .submit_job(submit(repo_url, branch))
            .await
            .expect_err("refused at submit");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains(expected),
            "{}",
            refused.message()
        );
        assert!(!refused.message().contains(SECRET), "{}", refused.message());
        assert!(
            refused.message().len() < 1024,
            "bounded: {}",
            refused.message()
        );
    }

    // Three jobs (no agent, so they stay pending), two per page.
    let mut submitted = Vec::new();
    for _ in 0..3 {
        submitted.push(admin.submit(&sandbox.repo.url, "main", "explain").await);
    }
    let page = |page_token: String| pb::ListJobsRequest {
        limit: 2,
        page_token,
        ..Default::default()
    };
    let first = admin
        .client
        .list_jobs(page(String::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.jobs.len(), 2);
    assert!(!first.next_page_token.is_empty());
    let second = admin
        .client
        .list_jobs(page(first.next_page_token.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.jobs.len(), 1);
    assert!(second.next_page_token.is_empty(), "the last page");
    let mut listed: Vec<_> = first
        .jobs
        .iter()
        .chain(&second.jobs)
        .map(|job| job.job_id.clone())
        .collect();
    listed.reverse();
    assert_eq!(listed, submitted, "every job once, newest first");
    let bad = admin
        .client
        .list_jobs(page("garbage".into()))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);

    coordinator.proc.signal(nix::sys::signal::Signal::SIGTERM);
    coordinator.proc.wait_exit(Duration::from_secs(30)).await;
    let lines = coordinator.proc.lines();
    assert!(!lines.is_empty());
    for line in lines {
        assert!(
            !line.contains(SECRET),
            "a log line repeats a credential: {line}"
        );
    }
}

/// Open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("reading the coordinator's fd folder")
        .count()
}

/// Resident memory of a live process, in KiB.
fn rss(pid: u32) -> u64 {
    rss_kib(pid).unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_after_the_timeout() {
    const IDLE: usize = 2000;
    // The test holds the client ends: make sure its own limit allows them.
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    let wanted = (IDLE as u64 + 1024).min(hard);
    if soft < wanted {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, wanted, hard)
            .expect("raising the test's open file limit");
    }
    let sandbox = Sandbox::new();
    let coordinator =
        CoordinatorProc::start(&sandbox, ANY_PORT, &[("IDLE_CONNECTION_TIMEOUT", "8000")]).await;
    let pid = coordinator.proc.pid().expect("the coordinator runs");
    let _agent = AgentProc::connected(&sandbox, "busy", coordinator.url(), &[]).await;
    let baseline = open_fds(pid);
    let baseline_rss = rss(pid);

    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(
            tokio::net::TcpStream::connect(coordinator.addr())
                .await
                .expect("connecting"),
        );
    }
    wait_fds(pid, "every idle connection to be accepted", |fds| {
        fds >= baseline + IDLE
    })
    .await;
    let flooded_rss = rss(pid);
    assert!(
        flooded_rss < baseline_rss + 64 * 1024,
        "{IDLE} idle connections took the coordinator from {baseline_rss} KiB to {flooded_rss} KiB"
    );
    wait_fds(pid, "the idle connections to be closed", |fds| {
        fds <= baseline
    })
    .await;
    // The agent's session started a stream: it stays.
    let mut admin = coordinator.admin().await;
    let agents = admin.agents().await;
    assert_eq!(agents.len(), 1, "the agent kept its session: {agents:?}");
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    let job = admin
        .wait_status(
            &job_id,
            &["completed", "failed", "dead"],
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(job.status, "completed", "{job:?}");
    drop(idle);
}

/// Waits (30 s at most) until the coordinator's fd count satisfies `done`; returns it.
async fn wait_fds(pid: u32, what: &str, done: impl Fn(usize) -> bool) -> usize {
    wait::until(what, Duration::from_secs(30), || {
        let fds = open_fds(pid);
        let met = done(fds);
        async move {
            if met {
                Ok(Some(fds))
            } else {
                Err(format!("{fds} open fds"))
            }
        }
    })
    .await
}
