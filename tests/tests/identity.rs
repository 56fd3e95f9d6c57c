//! One agent id, one live agent process: a second agent announcing the id of a connected one is
//! refused (and retries with backoff) while the first keeps its job and gets new work; a second
//! agent with the same id and TEMP_DIR refuses to start rather than sweep the first one's live
//! workspace.

use std::time::Duration;

use fondation_testkit::{
    fixture_cli::{read_run_log, RunEventKind},
    support::cluster::{
        wait_runs_started, AgentOptions, AgentProc, CoordinatorProc, Sandbox, ANY_PORT,
    },
};

const FINAL: &[&str] = &["completed", "failed", "dead"];

#[tokio::test(flavor = "multi_thread")]
async fn a_second_agent_with_a_live_agents_id_is_refused_and_orphans_nothing() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let mut first = AgentProc::connected(&sandbox, "shared", coordinator.url(), &[]).await;
    let mut admin = coordinator.admin().await;
    // Slow enough to still run while the second and third agents try their luck.
    let busy = admin
        .submit(&sandbox.repo.url, "main", "explain fixture:slow=800")
        .await;
    wait_runs_started(&sandbox, &busy, 1, Duration::from_secs(30)).await;

    // Same id and TEMP_DIR: the live workspace is locked, so it refuses to start.
    let mut same_dir = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "shared",
            coordinator_url: coordinator.url(),
            slots: 1,
            extra: &[("FIXTURE_AGENT_ID", "same-dir")],
        },
    );
    let status = same_dir.proc.wait_exit(Duration::from_secs(30)).await;
    assert!(
        !status.success(),
        "a second agent on a locked workspace exits"
    );
    assert!(
        same_dir
            .proc
            .log_contains("in use by another live agent process"),
        "{:?}",
        same_dir.proc.lines()
    );

    // Same id, its own TEMP_DIR: the coordinator refuses the session, and keeps refusing.
    let other_dir = sandbox.path("other-tmp");
    let other_dir = other_dir.to_string_lossy().into_owned();
    let mut second = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "shared",
            coordinator_url: coordinator.url(),
            slots: 3,
            extra: &[("FIXTURE_AGENT_ID", "second"), ("TEMP_DIR", &other_dir)],
        },
    );
    let refusal = second
        .proc
        .wait_for_log("held by another live agent", Duration::from_secs(30))
        .await;
    assert!(
        refusal.contains("cannot take its AGENT_ID")
            && refusal.contains("give each agent its own AGENT_ID"),
        "{refusal}"
    );
    assert!(
        refusal.contains("retry_in_ms"),
        "retried with backoff: {refusal}"
    );

    // The first keeps its job and its session, and gets the next job.
    let job = admin
        .wait_status(&busy, FINAL, Duration::from_secs(60))
        .await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 1, "never reassigned: {job:?}");
    let next = admin.submit(&sandbox.repo.url, "main", "explain").await;
    let job = admin
        .wait_status(&next, FINAL, Duration::from_secs(60))
        .await;
    assert_eq!(job.status, "completed", "{job:?}");
    let runs = read_run_log(&sandbox.run_log).expect("the run log");
    let ran_by: Vec<_> = runs
        .iter()
        .filter(|run| run.kind == RunEventKind::Start)
        .map(|run| (run.job_id.as_str(), run.agent.as_str()))
        .collect();
    assert_eq!(
        ran_by,
        vec![(busy.as_str(), "shared"), (next.as_str(), "shared")],
        "every run on the first agent"
    );
    let agents = admin.agents().await;
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(
        agents[0].slots, 1,
        "still the first agent's session: {agents:?}"
    );
    assert!(!second.proc.log_contains("connected to the coordinator"));
    first.proc.assert_running();

    // Once the first is gone, the id is free for another process.
    first.proc.kill9().await;
    second.wait_connected().await;
    let agents = admin.agents().await;
    assert_eq!(agents.len(), 1, "{agents:?}");
    assert_eq!(
        agents[0].slots, 3,
        "the second agent holds the id now: {agents:?}"
    );
}
