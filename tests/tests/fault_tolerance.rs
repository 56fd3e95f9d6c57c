//! Issue 4: agents die, the coordinator restarts, the network stalls, and no job is lost or run
//! twice. Real processes; the fixture CLI logs every run so run counts are facts, not guesses.

use std::time::{Duration, Instant};

use fondation_testkit::{
    fixture_cli::{read_run_log, runs_per_job, RunEventKind},
    support::{
        cluster::{
            process_alive, wait_runs_started, AgentOptions, AgentProc, CoordinatorProc, Sandbox,
            ANY_PORT,
        },
        fault_proxy::FaultProxy,
        wait,
    },
};
use nix::sys::signal::Signal;

const AGENT_TIMEOUT_MS: u64 = 2000;
const REATTACH_GRACE_MS: u64 = 3000;
const COORDINATOR: &[(&str, &str)] = &[("AGENT_TIMEOUT", "2000"), ("REATTACH_GRACE", "3000")];
const TERMINAL: &[&str] = &["completed", "failed", "dead", "canceled"];
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

fn agent<'a>(
    sandbox: &Sandbox,
    id: &'a str,
    coordinator_url: String,
    extra: &'a [(&'a str, &'a str)],
) -> AgentProc {
    AgentProc::spawn(
        sandbox,
        AgentOptions {
            id,
            coordinator_url,
            slots: 1,
            extra,
        },
    )
}

/// Agent settings for these tests: quick to notice a dead link, slow analyzer so runs are mid-way
/// when faults strike.
const SLOW_AGENT: &[(&str, &str)] = &[
    ("KEEPALIVE_INTERVAL", "500"),
    ("RECONNECT_MAX_BACKOFF", "500"),
    ("FIXTURE_STEP_DELAY_MS", "400"),
];

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_job_is_handed_back_and_completed_once_by_another() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, COORDINATOR).await;
    let mut first = agent(&sandbox, "agent-a", coordinator.url(), SLOW_AGENT);
    first.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    let runs = wait_runs_started(&sandbox, &job_id, 1, JOB_TIMEOUT).await;
    assert_eq!(runs[0].agent, "agent-a");

    let mut second = agent(&sandbox, "agent-b", coordinator.url(), SLOW_AGENT);
    second.wait_connected().await;
    let killed_at = Instant::now();
    first.proc.kill9().await;

    let runs = wait_runs_started(&sandbox, &job_id, 2, JOB_TIMEOUT).await;
    let handed_back_after = killed_at.elapsed();
    assert_eq!(runs[1].agent, "agent-b");
    assert!(
        handed_back_after < Duration::from_millis(AGENT_TIMEOUT_MS + REATTACH_GRACE_MS + 3000),
        "handed back after {handed_back_after:?}"
    );
    // The killed agent's analyzer died with it instead of running on as an orphan.
    wait::until(
        "the killed agent's analyzer to be gone",
        Duration::from_secs(10),
        || async { Ok((!process_alive(runs[0].pid)).then_some(())) },
    )
    .await;

    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 2);
    assert_eq!(admin.job(&job_id, false).await.documents.len(), 36);
    let records = read_run_log(&sandbox.run_log).unwrap();
    assert_eq!(
        runs_per_job(&records)[&job_id],
        2,
        "one lost run, one complete run"
    );
    assert!(
        coordinator.proc.log_contains("did not come back within"),
        "handed back as a lost agent"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_mid_job_adopts_the_running_cli_after_restart() {
    let sandbox = Sandbox::new();
    let mut coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, COORDINATOR).await;
    let port = coordinator.port;
    let mut survivor = agent(&sandbox, "survivor", coordinator.url(), SLOW_AGENT);
    let mut victim = agent(&sandbox, "victim", coordinator.url(), SLOW_AGENT);
    survivor.wait_connected().await;
    victim.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let first = admin.submit(&sandbox.repo.url, "main", "one").await;
    let second = admin.submit(&sandbox.repo.url, "main", "two").await;
    let first_run = wait_runs_started(&sandbox, &first, 1, JOB_TIMEOUT).await;
    let second_run = wait_runs_started(&sandbox, &second, 1, JOB_TIMEOUT).await;
    // Which agent runs which job is the dispatcher's choice: name them by what happens to them.
    let (kept_job, lost_job) = if first_run[0].agent == "survivor" {
        (first.clone(), second.clone())
    } else {
        (second.clone(), first.clone())
    };
    assert_ne!(first_run[0].agent, second_run[0].agent, "one job per agent");

    coordinator.proc.kill9().await;
    victim.proc.kill9().await;
    let coordinator = CoordinatorProc::start(&sandbox, port, COORDINATOR).await;
    let mut admin = coordinator.admin().await;

    let kept = admin.wait_status(&kept_job, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(kept.status, "completed", "{kept:?}");
    assert_eq!(kept.attempts, 1, "adopted, not retried");
    let lost = admin.wait_status(&lost_job, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(lost.status, "completed", "{lost:?}");
    assert_eq!(lost.attempts, 2, "its agent never came back: retried");

    let runs = runs_per_job(&read_run_log(&sandbox.run_log).unwrap());
    assert_eq!(runs[&kept_job], 1, "the running CLI was not restarted");
    assert_eq!(runs[&lost_job], 2);
    assert!(coordinator.proc.log_contains("recovering journaled jobs"));
    drop(survivor);
}

#[tokio::test(flavor = "multi_thread")]
async fn stall_shorter_than_the_grace_window_keeps_the_single_run() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(
        &sandbox,
        ANY_PORT,
        &[("AGENT_TIMEOUT", "1500"), ("REATTACH_GRACE", "8000")],
    )
    .await;
    let proxy = FaultProxy::start(coordinator.addr()).await;
    let mut behind_proxy = agent(&sandbox, "agent-a", proxy.url(), SLOW_AGENT);
    behind_proxy.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    wait_runs_started(&sandbox, &job_id, 1, JOB_TIMEOUT).await;

    proxy.stall();
    let mut coordinator = coordinator;
    coordinator
        .proc
        .wait_for_log(
            "agent gone; waiting for it to re-attach",
            Duration::from_secs(10),
        )
        .await;
    proxy.resume();
    coordinator
        .proc
        .wait_for_log("agent re-attached", Duration::from_secs(15))
        .await;

    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 1);
    let runs = runs_per_job(&read_run_log(&sandbox.run_log).unwrap());
    assert_eq!(runs[&job_id], 1, "the run went on through the stall");
}

#[tokio::test(flavor = "multi_thread")]
async fn stall_longer_than_the_grace_window_moves_the_job_and_refuses_the_late_result() {
    let sandbox = Sandbox::new();
    let mut coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, COORDINATOR).await;
    let proxy = FaultProxy::start(coordinator.addr()).await;
    // This agent would rather finish than detach, so its result comes late.
    let patient: Vec<(&str, &str)> = [SLOW_AGENT, &[("DETACH_TIMEOUT", "120000")]].concat();
    let mut stale = agent(&sandbox, "stale", proxy.url(), &patient);
    stale.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    wait_runs_started(&sandbox, &job_id, 1, JOB_TIMEOUT).await;
    proxy.stall();
    let mut fresh = agent(&sandbox, "fresh", coordinator.url(), SLOW_AGENT);
    fresh.wait_connected().await;

    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 2);
    let runs = wait_runs_started(&sandbox, &job_id, 2, JOB_TIMEOUT).await;
    assert_eq!(runs[1].agent, "fresh");

    proxy.resume();
    stale
        .proc
        .wait_for_log("result refused by the coordinator", Duration::from_secs(30))
        .await;
    coordinator
        .proc
        .wait_for_log(
            "a run this coordinator no longer owns",
            Duration::from_secs(5),
        )
        .await;
    let job = admin.job(&job_id, false).await;
    assert_eq!(job.status, "completed");
    assert_eq!(job.attempts, 2, "the late result changed nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_cut_off_past_detach_timeout_stops_its_cli() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, COORDINATOR).await;
    let proxy = FaultProxy::start(coordinator.addr()).await;
    let detaching: Vec<(&str, &str)> = [
        &[
            ("KEEPALIVE_INTERVAL", "500"),
            ("RECONNECT_MAX_BACKOFF", "500"),
        ][..],
        &[
            ("DETACH_TIMEOUT", "2000"),
            ("FIXTURE_STEP_DELAY_MS", "3000"),
        ],
    ]
    .concat();
    let mut cut_off = agent(&sandbox, "cut-off", proxy.url(), &detaching);
    cut_off.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    let runs = wait_runs_started(&sandbox, &job_id, 1, JOB_TIMEOUT).await;
    proxy.stall();
    cut_off
        .proc
        .wait_for_log("past DETACH_TIMEOUT", Duration::from_secs(20))
        .await;
    wait::until(
        "the detached agent's analyzer to stop",
        Duration::from_secs(10),
        || async { Ok((!process_alive(runs[0].pid)).then_some(())) },
    )
    .await;
    let ended = read_run_log(&sandbox.run_log)
        .unwrap()
        .into_iter()
        .find(|r| r.kind == RunEventKind::End && r.pid == runs[0].pid)
        .expect("the stopped run logged its end");
    assert_eq!(ended.exit_code, Some(143), "stopped by SIGTERM");
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_the_running_job_finish_and_the_agent_exit_zero() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, COORDINATOR).await;
    let mut draining = agent(&sandbox, "draining", coordinator.url(), SLOW_AGENT);
    draining.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    wait_runs_started(&sandbox, &job_id, 1, JOB_TIMEOUT).await;
    draining.proc.signal(Signal::SIGTERM);
    let status = draining.proc.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status:?}");
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 1, "finished by the draining agent");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_with_a_short_grace_hands_the_job_to_another_agent() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, COORDINATOR).await;
    let hasty: Vec<(&str, &str)> = [SLOW_AGENT, &[("SHUTDOWN_GRACE", "300")]].concat();
    let mut leaving = agent(&sandbox, "leaving", coordinator.url(), &hasty);
    leaving.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    wait_runs_started(&sandbox, &job_id, 1, JOB_TIMEOUT).await;
    let mut staying = agent(&sandbox, "staying", coordinator.url(), SLOW_AGENT);
    staying.wait_connected().await;
    leaving.proc.signal(Signal::SIGTERM);
    let status = leaving.proc.wait_exit(Duration::from_secs(30)).await;
    assert!(status.success(), "exit status {status:?}");
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 2);
    let runs = wait_runs_started(&sandbox, &job_id, 2, JOB_TIMEOUT).await;
    assert_eq!(runs[1].agent, "staying");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_coordinator_keeps_jobs_for_the_restarted_one() {
    let sandbox = Sandbox::new();
    let mut coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, COORDINATOR).await;
    let port = coordinator.port;
    let mut worker = agent(&sandbox, "worker", coordinator.url(), SLOW_AGENT);
    worker.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    wait_runs_started(&sandbox, &job_id, 1, JOB_TIMEOUT).await;
    coordinator.proc.signal(Signal::SIGTERM);
    let status = coordinator.proc.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status:?}");

    let coordinator = CoordinatorProc::start(&sandbox, port, COORDINATOR).await;
    let mut admin = coordinator.admin().await;
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 1);
    let runs = runs_per_job(&read_run_log(&sandbox.run_log).unwrap());
    assert_eq!(runs[&job_id], 1, "the CLI ran once across the restart");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_stops_at_once_and_still_hands_the_job_back() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, COORDINATOR).await;
    // The default SHUTDOWN_GRACE (10 minutes) would let the job finish: only the second signal
    // can make the agent leave early.
    let mut leaving = agent(&sandbox, "leaving", coordinator.url(), SLOW_AGENT);
    leaving.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let job_id = admin
        .submit(&sandbox.repo.url, "main", "fixture:slow=1000")
        .await;
    wait_runs_started(&sandbox, &job_id, 1, JOB_TIMEOUT).await;
    let _staying = AgentProc::connected(&sandbox, "staying", coordinator.url(), SLOW_AGENT).await;

    leaving.proc.signal(Signal::SIGTERM);
    leaving
        .proc
        .wait_for_log("shutting down: no new jobs", Duration::from_secs(10))
        .await;
    leaving.proc.signal(Signal::SIGTERM);
    let status = leaving.proc.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit status {status:?}");

    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 2, "handed back, then run by the other agent");
    let runs = wait_runs_started(&sandbox, &job_id, 2, JOB_TIMEOUT).await;
    assert_eq!(runs[1].agent, "staying");
}
