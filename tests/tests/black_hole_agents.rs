//! Issue 11: no black-hole agents. A real coordinator and real agents as processes: an agent that
//! cannot run jobs says so and takes none, and one whose analyzer fails at once is quarantined
//! without costing the queue its attempts.

use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

use fondation_proto::pb;
use fondation_runtime::serving::probe_health;
use fondation_testkit::{
    fixture_cli::read_run_log,
    support::{
        cluster::{Admin, AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
        wait,
    },
};
use tonic_health::pb::health_check_response::ServingStatus;

const JOB_TIMEOUT: Duration = Duration::from_secs(90);
const TERMINAL: &[&str] = &["completed", "failed", "dead", "canceled"];

/// An analyzer that cannot start: it exits 127 at once, printing nothing, as `sh` does for a
/// missing program. Its self-check passes: the program exists and is executable.
fn exit_127_analyzer(sandbox: &Sandbox) -> String {
    let path = sandbox.path("exit-127.sh");
    std::fs::write(&path, "#!/bin/sh\nexit 127\n").expect("writing the wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .expect("making the wrapper executable");
    format!("'{}' analyze {{repo}}", path.display())
}

async fn health(agent: &mut AgentProc, service: &str) -> Result<ServingStatus, String> {
    let addr = agent.health_addr().await;
    probe_health(&addr, service, Duration::from_secs(2))
        .await
        .map_err(|e| e.to_string())
}

async fn wait_health(agent: &mut AgentProc, expected: ServingStatus, within: Duration) {
    let what = format!("agent {} to report {expected:?}", agent.id);
    let addr = agent.health_addr().await;
    wait::until(&what, within, || {
        let addr = addr.clone();
        async move {
            match probe_health(&addr, "", Duration::from_secs(2)).await {
                Ok(status) if status == expected => Ok(Some(())),
                Ok(status) => Err(format!("{status:?}")),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await
}

/// Waits until `ListAgents` shows agent `id` matching `ok`; returns it.
async fn wait_agent(
    admin: &Admin,
    id: &str,
    what: &str,
    ok: impl Fn(&pb::AgentInfo) -> bool + Copy,
) -> pb::AgentInfo {
    let client = admin.client.clone();
    wait::until(
        &format!("agent {id} to be listed {what}"),
        Duration::from_secs(30),
        || {
            let mut client = client.clone();
            async move {
                let agents = client
                    .list_agents(pb::ListAgentsRequest {})
                    .await
                    .map_err(|e| e.to_string())?
                    .into_inner()
                    .agents;
                match agents.into_iter().find(|agent| agent.agent_id == id) {
                    Some(agent) if ok(&agent) => Ok(Some(agent)),
                    Some(agent) => Err(format!("{agent:?}")),
                    None => Err("not listed".into()),
                }
            }
        },
    )
    .await
}

/// The agents whose fixture CLI started a run of `job_id`.
fn runs_of(sandbox: &Sandbox, job_id: &str) -> Vec<String> {
    read_run_log(&sandbox.run_log)
        .expect("reading the run log")
        .into_iter()
        .filter(|record| {
            record.kind == fondation_testkit::fixture_cli::RunEventKind::Start
                && record.job_id == job_id
        })
        .map(|record| record.agent)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_a_missing_workdir_takes_no_job_until_fixed_without_a_restart() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let workdir: PathBuf = sandbox.path("workdir-made-later");
    let workdir_setting = workdir.to_string_lossy().into_owned();
    let mut agent = AgentProc::connected(
        &sandbox,
        "broken",
        coordinator.url(),
        &[("ANALYZER_WORKDIR", &workdir_setting)],
    )
    .await;
    let mut admin = coordinator.admin().await;

    // It says why, in its log and through the coordinator.
    let line = agent
        .proc
        .wait_for_log("self-check failed", Duration::from_secs(30))
        .await;
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("ANALYZER_WORKDIR"), "{line}");
    // Until its first self-check report, the agent is listed as not checked yet.
    let listed = wait_agent(&admin, "broken", "unready", |agent| {
        agent.unready_reason.contains("ANALYZER_WORKDIR")
    })
    .await;
    assert!(
        listed.unready_reason.contains("ANALYZER_WORKDIR")
            && listed.unready_reason.contains("workdir-made-later"),
        "{listed:?}"
    );
    assert_eq!(health(&mut agent, "").await, Ok(ServingStatus::NotServing));
    assert_eq!(
        health(&mut agent, "liveness").await,
        Ok(ServingStatus::Serving),
        "alive: nothing to restart"
    );

    let job_id = admin
        .submit(&sandbox.repo.url, "main", "explain this project")
        .await;
    let job = admin.job(&job_id, false).await;
    assert_eq!(job.status, "pending", "{job:?}");

    // Fixed in place: the agent finds out on its own and takes the job.
    std::fs::create_dir_all(&workdir).expect("creating the workdir");
    std::fs::set_permissions(&workdir, std::fs::Permissions::from_mode(0o755))
        .expect("opening the workdir to slot users");
    wait_health(&mut agent, ServingStatus::Serving, Duration::from_secs(90)).await;
    agent
        .proc
        .wait_for_log("self-check passed", Duration::from_secs(5))
        .await;
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(
        job.attempts, 1,
        "it was never run (nor failed) while the agent was broken"
    );
    assert_eq!(runs_of(&sandbox, &job_id), ["broken"]);
    let listed = wait_agent(&admin, "broken", "ready", |agent| {
        agent.unready_reason.is_empty()
    })
    .await;
    assert!(!listed.quarantined, "{listed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_with_a_full_disk_takes_no_job() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    // More than any test machine has free.
    let mut full = AgentProc::connected(
        &sandbox,
        "full",
        coordinator.url(),
        &[("MIN_FREE_DISK", "1 PiB")],
    )
    .await;
    let mut admin = coordinator.admin().await;
    let line = full
        .proc
        .wait_for_log("self-check failed", Duration::from_secs(30))
        .await;
    assert!(line.contains("MIN_FREE_DISK"), "{line}");
    let listed = wait_agent(&admin, "full", "unready", |agent| {
        agent.unready_reason.contains("MIN_FREE_DISK")
    })
    .await;
    assert_eq!(listed.running_jobs, Vec::<String>::new());
    assert_eq!(health(&mut full, "").await, Ok(ServingStatus::NotServing));

    let job_id = admin
        .submit(&sandbox.repo.url, "main", "explain this project")
        .await;
    // A healthy agent joins: the job is its, never the full one's.
    let _healthy = AgentProc::connected(&sandbox, "healthy", coordinator.url(), &[]).await;
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 1, "{job:?}");
    assert_eq!(runs_of(&sandbox, &job_id), ["healthy"]);
    assert_eq!(health(&mut full, "").await, Ok(ServingStatus::NotServing));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_whose_analyzer_cannot_start_is_quarantined_and_costs_no_job() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let broken_command = exit_127_analyzer(&sandbox);
    let mut admin = coordinator.admin().await;
    let mut broken = AgentProc::connected(
        &sandbox,
        "broken",
        coordinator.url(),
        &[("ANALYZER_COMMAND", &broken_command)],
    )
    .await;
    // Its self-check passes: it is a black hole until it fails runs.
    wait_health(&mut broken, ServingStatus::Serving, Duration::from_secs(30)).await;
    let _healthy_1 = AgentProc::connected(&sandbox, "healthy-1", coordinator.url(), &[]).await;
    let _healthy_2 = AgentProc::connected(&sandbox, "healthy-2", coordinator.url(), &[]).await;

    let mut jobs = Vec::new();
    for n in 0..20 {
        jobs.push(
            admin
                .submit(&sandbox.repo.url, "main", &format!("explain, take {n}"))
                .await,
        );
    }
    for job_id in &jobs {
        let job = admin.wait_status(job_id, TERMINAL, JOB_TIMEOUT).await;
        assert_eq!(job.status, "completed", "none is dead: {job:?}");
    }
    let listed = wait_agent(&admin, "broken", "quarantined", |agent| agent.quarantined).await;
    assert!(
        listed.quarantine_reason.contains("agent failures in a row")
            && listed.quarantine_reason.contains("127"),
        "{listed:?}"
    );
    coordinator_log_has(&coordinator, "agent quarantined");
    broken
        .proc
        .wait_for_log(
            "a run failed for a reason of the agent",
            Duration::from_secs(5),
        )
        .await;
}

fn coordinator_log_has(coordinator: &CoordinatorProc, needle: &str) {
    let lines = coordinator.proc.lines();
    let line = lines
        .iter()
        .find(|line| line.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in the coordinator's log"));
    assert!(line.contains("WARN"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_fails_at_once_on_every_agent_still_ends_dead_with_the_reason() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let command = exit_127_analyzer(&sandbox);
    let mut agents = Vec::new();
    for id in ["a", "b", "c"] {
        agents.push(
            AgentProc::connected(
                &sandbox,
                id,
                coordinator.url(),
                &[("ANALYZER_COMMAND", &command)],
            )
            .await,
        );
    }
    let mut admin = coordinator.admin().await;
    let job_id = admin
        .submit(&sandbox.repo.url, "main", "explain this project")
        .await;
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "dead", "{job:?}");
    assert_eq!(job.attempts, 3, "MAX_ATTEMPTS of the test cluster: {job:?}");
    let error = job.error;
    assert!(error.contains("exited with code 127"), "{error}");
}
