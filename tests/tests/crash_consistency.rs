//! Crashes of the coordinator while its database is busy: a burst of submissions while agents
//! claim and finish jobs, then the process dies (at a failpoint in the middle of a group commit,
//! or by kill -9 at an arbitrary moment), and a new coordinator starts on the same `DATA_DIR`.
//! Every submission that was acknowledged survives and completes; no job runs twice. The fixture
//! CLI logs every run, so run counts are facts.

use std::{collections::BTreeSet, time::Duration};

use fondation_coordinator::failpoint::{FAILPOINT_ENV, FAILPOINT_EXIT_CODE};
use fondation_proto::pb;
use fondation_testkit::{
    fixture_cli::{read_run_log, runs_per_job},
    support::cluster::{AgentOptions, AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
};
use tokio::sync::mpsc;

/// Quick to notice the coordinator is gone and to come back.
const COORDINATOR: &[(&str, &str)] = &[("AGENT_TIMEOUT", "2000"), ("REATTACH_GRACE", "5000")];
const AGENT: &[(&str, &str)] = &[
    ("KEEPALIVE_INTERVAL", "500"),
    ("RECONNECT_MAX_BACKOFF", "300"),
    ("FIXTURE_STEP_DELAY_MS", "20"),
];
const BURST: usize = 160;
const SUBMITTERS: usize = 8;
const TERMINAL: &[&str] = &["completed", "failed", "dead", "canceled"];
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// Two agents of two slots each, connected to `coordinator`.
async fn agents(sandbox: &Sandbox, coordinator: &CoordinatorProc) -> Vec<AgentProc> {
    let mut agents = Vec::new();
    for id in ["agent-1", "agent-2"] {
        let mut agent = AgentProc::spawn(
            sandbox,
            AgentOptions {
                id,
                coordinator_url: coordinator.url(),
                slots: 2,
                extra: AGENT,
            },
        );
        agent.wait_connected().await;
        agents.push(agent);
    }
    agents
}

/// Submits [`BURST`] jobs from [`SUBMITTERS`] concurrent clients, each one after the other;
/// `on_ack` sees the count of acknowledged submissions as they come (and may kill the
/// coordinator). Returns the acknowledged ids; a client stops at its first refusal (the
/// coordinator died).
async fn burst(
    sandbox: &Sandbox,
    coordinator: &mut CoordinatorProc,
    mut on_ack: impl AsyncFnMut(&mut CoordinatorProc, usize),
) -> BTreeSet<String> {
    let admin = coordinator.admin().await;
    let (acks, mut acked) = mpsc::unbounded_channel();
    for submitter in 0..SUBMITTERS {
        let mut client = admin.client.clone();
        let acks = acks.clone();
        let repo_url = sandbox.repo.url.clone();
        tokio::spawn(async move {
            for n in 0..BURST / SUBMITTERS {
                let request = pb::SubmitJobRequest {
                    repo_url: repo_url.clone(),
                    branch: "main".into(),
                    prompt: format!("explain ({submitter}-{n})"),
                };
                match client.submit_job(request).await {
                    Ok(response) => {
                        let _ = acks.send(response.into_inner().job_id);
                    }
                    Err(_) => break,
                }
            }
        });
    }
    drop(acks);
    let mut acknowledged = BTreeSet::new();
    while let Some(job_id) = acked.recv().await {
        acknowledged.insert(job_id);
        on_ack(coordinator, acknowledged.len()).await;
    }
    acknowledged
}

/// After the restart: every acknowledged job completes, every job the store holds ends, and no
/// job's analyzer ran twice.
async fn assert_nothing_lost_nothing_twice(
    sandbox: &Sandbox,
    coordinator: &CoordinatorProc,
    acknowledged: &BTreeSet<String>,
) {
    let mut admin = coordinator.admin().await;
    for job_id in acknowledged {
        let job = admin.wait_status(job_id, TERMINAL, JOB_TIMEOUT).await;
        assert_eq!(job.status, "completed", "acknowledged job {job:?}");
    }
    let stored = admin
        .client
        .list_jobs(pb::ListJobsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("ListJobs")
        .into_inner()
        .jobs;
    let stored_ids: BTreeSet<String> = stored.iter().map(|job| job.job_id.clone()).collect();
    assert!(
        acknowledged.is_subset(&stored_ids),
        "acknowledged jobs missing after the crash: {:?}",
        acknowledged.difference(&stored_ids).collect::<Vec<_>>()
    );
    // Submissions that were never acknowledged may or may not have been kept; the kept ones
    // run like the others.
    for job in &stored {
        let job = admin.wait_status(&job.job_id, TERMINAL, JOB_TIMEOUT).await;
        assert_eq!(job.status, "completed", "{job:?}");
    }
    let runs = runs_per_job(&read_run_log(&sandbox.run_log).unwrap());
    for job_id in &stored_ids {
        assert_eq!(
            runs.get(job_id).copied(),
            Some(1),
            "job {job_id} ran exactly once"
        );
    }
    assert!(
        runs.keys().all(|job_id| stored_ids.contains(job_id)),
        "every run belongs to a stored job"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_in_the_middle_of_a_group_commit_loses_no_acknowledged_job_and_runs_none_twice() {
    let sandbox = Sandbox::new();
    let mut crashing = COORDINATOR.to_vec();
    crashing.push((FAILPOINT_ENV, "mid-group-commit"));
    let mut coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &crashing).await;
    let port = coordinator.port;
    let _agents = agents(&sandbox, &coordinator).await;

    // Concurrent submissions share commits: the first batch of two or more writes stops the
    // process before its COMMIT.
    let acknowledged = burst(&sandbox, &mut coordinator, async |_, _| {}).await;
    let status = coordinator.proc.wait_exit(JOB_TIMEOUT).await;
    assert_eq!(
        status.code(),
        Some(FAILPOINT_EXIT_CODE),
        "stopped in a group commit"
    );
    assert!(
        acknowledged.len() < BURST,
        "the crash refused some submissions"
    );

    let coordinator = CoordinatorProc::start(&sandbox, port, COORDINATOR).await;
    assert_nothing_lost_nothing_twice(&sandbox, &coordinator, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_during_a_burst_of_submissions_and_claims_loses_no_acknowledged_job() {
    let sandbox = Sandbox::new();
    let mut coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, COORDINATOR).await;
    let port = coordinator.port;
    let _agents = agents(&sandbox, &coordinator).await;

    // Killed while submissions are still in flight and the agents claim and finish jobs.
    let acknowledged = burst(&sandbox, &mut coordinator, async |coordinator, acked| {
        if acked == BURST / 4 {
            coordinator.proc.kill9().await;
        }
    })
    .await;
    assert!(
        acknowledged.len() >= BURST / 4 && acknowledged.len() < BURST,
        "killed mid-burst: {} of {BURST} acknowledged",
        acknowledged.len()
    );

    let coordinator = CoordinatorProc::start(&sandbox, port, COORDINATOR).await;
    assert_nothing_lost_nothing_twice(&sandbox, &coordinator, &acknowledged).await;
}
