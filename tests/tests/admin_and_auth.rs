//! Admin calls and credentials: an agent without the shared token gets no job, state-changing
//! admin calls need ADMIN_TOKEN, secrets can be given as files, a drained agent takes no new work
//! and stops reporting SERVING (but stays alive).

use std::time::Duration;

use fondation_proto::pb;
use fondation_testkit::support::cluster::{
    AgentOptions, AgentProc, CoordinatorProc, Sandbox, ANY_PORT,
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
    // Reading needs no token.
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
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].job_id, job_id);
}
