//! Canceling a running job: the analyzer's process group is gone within seconds, the job stays
//! canceled, and the agent is free for the next job.

use std::time::Duration;

use fondation_proto::pb;
use fondation_testkit::support::{
    cluster::{
        process_alive, wait_runs_started, AgentOptions, AgentProc, CoordinatorProc, Sandbox,
        ANY_PORT,
    },
    wait,
};

#[tokio::test(flavor = "multi_thread")]
async fn cancel_job_stops_the_cli_and_the_job_stays_canceled() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let mut agent = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "agent-1",
            coordinator_url: coordinator.url(),
            slots: 1,
            // The analyzer ignores SIGTERM: only the SIGKILL after KILL_GRACE stops it.
            extra: &[
                ("FIXTURE_DIRECTIVES", "hang,ignore-term"),
                ("KILL_GRACE", "1000"),
            ],
        },
    );
    agent.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    let runs = wait_runs_started(&sandbox, &job_id, 1, Duration::from_secs(30)).await;
    let pid = runs[0].pid;

    let status = admin
        .client
        .cancel_job(pb::CancelJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .expect("CancelJob")
        .into_inner()
        .status;
    assert_eq!(status, "canceled");
    wait::until(
        "the canceled analyzer to be gone",
        Duration::from_secs(10),
        || async { Ok((!process_alive(pid)).then_some(())) },
    )
    .await;
    agent
        .proc
        .wait_for_log(
            "stopping a run at the coordinator's request",
            Duration::from_secs(5),
        )
        .await;

    // The slot is free again: the next job goes to the same agent.
    let next = admin.submit(&sandbox.repo.url, "main", "explain").await;
    wait_runs_started(&sandbox, &next, 1, Duration::from_secs(30)).await;
    // The canceled job was not written since.
    let job = admin.job(&job_id, false).await;
    assert_eq!(job.status, "canceled", "{job:?}");
    assert!(job.documents.is_empty());
}
