//! Admin calls and credentials: an agent without the shared token gets no job, state-changing
//! admin calls need ADMIN_TOKEN, a drained agent takes no new work and stops reporting SERVING.

use std::time::Duration;

use fondation_proto::pb;
use fondation_testkit::support::{
    cluster::{AgentOptions, AgentProc, CoordinatorProc, Sandbox},
    free_port,
};
use tonic::{metadata::MetadataValue, Code, Request};

#[tokio::test(flavor = "multi_thread")]
async fn agents_and_admin_calls_need_their_tokens() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(
        &sandbox,
        free_port(),
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

    let mut member = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "member",
            coordinator_url: coordinator.url(),
            slots: 1,
            extra: &[("AGENT_TOKEN", "agent-secret")],
        },
    );
    member.wait_connected().await;
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
async fn drained_agent_takes_no_new_job_and_reports_not_serving() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, free_port(), &[]).await;
    let mut agent = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "to-drain",
            coordinator_url: coordinator.url(),
            slots: 1,
            extra: &[],
        },
    );
    agent.wait_connected().await;
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
    let health = fondation_proto::serving::probe_health(
        &format!("127.0.0.1:{}", agent.health_port),
        "",
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    assert_eq!(health.as_str_name(), "NOT_SERVING");
    let agents = admin.agents().await;
    assert!(agents[0].draining);

    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    // A fresh agent picks the job up; the drained one never does.
    let mut fresh = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "fresh",
            coordinator_url: coordinator.url(),
            slots: 1,
            extra: &[],
        },
    );
    fresh.wait_connected().await;
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
