//! What GetJob and ListJobs tell about a job, through the real `grpcurl`: its times as RFC 3339
//! text, every attempt with its agent, phases and outcome (a retried job shows both), jobs listed
//! by agent and in each order; and a job without a branch analyzes the repository's default
//! branch, whatever its name.

use std::time::Duration;

use fondation_proto::pb;
use fondation_testkit::{
    fixture_cli::{FAILURE_MESSAGE, README_PATH},
    support::{
        cluster::{wait_runs_started, AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
        git::GitFixture,
        grpcurl, wait,
    },
};
use jiff::Timestamp;
use serde_json::{json, Value};

const TERMINAL: &[&str] = &["completed", "failed", "dead", "canceled"];
const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// A time as grpcurl prints a `Timestamp`: RFC 3339 in UTC (`2026-11-30T09:25:03.610Z`).
fn time(value: &Value, what: &str) -> Timestamp {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"));
    assert!(text.ends_with('Z'), "{what} is not UTC RFC 3339: {text}");
    text.parse()
        .unwrap_or_else(|e| panic!("{what} {text:?} is not RFC 3339: {e}"))
}

/// A span as grpcurl prints a `Duration` (`"1.250s"`), in milliseconds.
fn duration_ms(value: &Value, what: &str) -> f64 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value}"));
    let seconds: f64 = text
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{what} {text:?} is not a Duration"));
    seconds * 1000.0
}

fn get_job(addr: &str, job_id: &str, include_content: bool) -> Value {
    grpcurl::call(
        addr,
        "fondation.v1.Admin/GetJob",
        Some(&json!({ "job_id": job_id, "include_content": include_content })),
    )
    .expect("GetJob through grpcurl")
}

/// GetJob once the job is over and its last attempt has ended: the history ends an attempt just
/// after the job source has the job's end.
async fn ended_job(addr: &str, job_id: &str, include_content: bool) -> Value {
    wait::until("the job and its last attempt to end", JOB_TIMEOUT, || {
        let job = get_job(addr, job_id, include_content);
        async move {
            let over = job["status"]
                .as_str()
                .is_some_and(|status| TERMINAL.contains(&status));
            let last_ended = job["attemptHistory"]
                .as_array()
                .and_then(|attempts| attempts.last())
                .is_some_and(|attempt| attempt.get("endedAt").is_some());
            if over && last_ended {
                Ok(Some(job))
            } else {
                Err(job.to_string())
            }
        }
    })
    .await
}

/// The ids ListJobs returns for `request`, and its next page token.
fn list(addr: &str, request: Value) -> (Vec<String>, String) {
    let reply = grpcurl::call(addr, "fondation.v1.Admin/ListJobs", Some(&request))
        .expect("ListJobs through grpcurl");
    let ids = reply["jobs"]
        .as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|job| job["jobId"].as_str().expect("jobId").to_owned())
                .collect()
        })
        .unwrap_or_default();
    let token = reply["nextPageToken"].as_str().unwrap_or("").to_owned();
    (ids, token)
}

/// Every time of an attempt in the order they happened: claimed, started, each phase, ended.
fn attempt_times(attempt: &Value) -> Vec<Timestamp> {
    let mut times = vec![
        time(&attempt["claimedAt"], "claimedAt"),
        time(&attempt["startedAt"], "startedAt"),
    ];
    for phase in attempt["phases"].as_array().expect("phases") {
        times.push(time(&phase["startedAt"], "a phase's startedAt"));
    }
    times.push(time(&attempt["endedAt"], "endedAt"));
    times
}

fn phase_names(attempt: &Value) -> Vec<&str> {
    attempt["phases"]
        .as_array()
        .expect("phases")
        .iter()
        .map(|phase| phase["phase"].as_str().expect("a phase name"))
        .collect()
}

fn assert_in_order(times: &[Timestamp], what: &str) {
    assert!(
        times.windows(2).all(|pair| pair[0] <= pair[1]),
        "{what} out of order: {times:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_without_a_branch_analyzes_the_default_branch_and_shows_its_times() {
    let mut sandbox = Sandbox::new();
    // `master` is the default, and a `main` branch exists beside it with other content.
    sandbox.repo = GitFixture::with_default_branch("master");
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let _agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let addr = coordinator.addr();

    let submitted = grpcurl::call(
        &addr,
        "fondation.v1.Admin/SubmitJob",
        Some(&json!({ "repo_url": sandbox.repo.url, "prompt": "explain fixture:show-readme" })),
    )
    .expect("SubmitJob without a branch");
    let job_id = submitted["jobId"].as_str().expect("jobId").to_owned();
    let job = ended_job(&addr, &job_id, true).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert!(
        job["branch"].as_str().unwrap_or_default().is_empty(),
        "the branch asked for stays empty: {job}"
    );
    let readme = job["documents"]
        .as_array()
        .expect("documents")
        .iter()
        .find(|doc| doc["slug"] == README_PATH)
        .unwrap_or_else(|| panic!("no {README_PATH} in {job}"));
    assert!(
        readme["content"]
            .as_str()
            .is_some_and(|content| content.contains("The master branch, the default.")),
        "the analyzer read master's README: {readme}"
    );

    let created = time(&job["createdAt"], "createdAt");
    let (claimed, started, ended) = (
        time(&job["claimedAt"], "claimedAt"),
        time(&job["startedAt"], "startedAt"),
        time(&job["endedAt"], "endedAt"),
    );
    let updated = time(&job["updatedAt"], "updatedAt");
    assert_in_order(&[created, claimed, started, ended], "the job's times");
    assert_in_order(&[started, updated], "a change after the start");
    let attempts = job["attemptHistory"].as_array().expect("attemptHistory");
    assert_eq!(attempts.len(), 1, "{job}");
    let attempt = &attempts[0];
    assert_eq!(attempt["number"], 1);
    assert_eq!(attempt["agentId"], "agent-1");
    assert_eq!(attempt["outcome"], "completed");
    assert_eq!(
        phase_names(attempt),
        ["cloning", "analyzing", "gathering", "uploading"]
    );
    let times = attempt_times(attempt);
    assert_in_order(&times, "the attempt's times");
    assert_eq!(
        (times[0], times[1], times[times.len() - 1]),
        (claimed, started, ended),
        "the job's times are its last attempt's"
    );
    let took = duration_ms(&attempt["duration"], "duration");
    let span = ended.duration_since(started).as_secs_f64() * 1000.0;
    assert!(
        (took - span).abs() <= 1.0,
        "duration {took} ms, span {span} ms"
    );

    let agents = grpcurl::call(&addr, "fondation.v1.Admin/ListAgents", None).expect("ListAgents");
    let agent = &agents["agents"][0];
    let connected = time(&agent["connectedAt"], "connectedAt");
    let last_seen = time(&agent["lastSeenAt"], "lastSeenAt");
    assert_in_order(&[connected, claimed, last_seen], "the agent's times");
}

/// A job whose first attempt fails on one agent and whose second completes on another shows both
/// attempts; ListJobs finds jobs by the agent of their last attempt and orders them.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_job_shows_each_attempt_and_jobs_are_listed_by_agent() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let addr = coordinator.addr();
    let mut admin = coordinator.admin().await;
    let url = sandbox.repo.url.as_str();

    // Never assigned: canceled while no agent is there.
    let never = admin.submit(url, "", "explain").await;
    admin
        .client
        .cancel_job(pb::CancelJobRequest {
            job_id: never.clone(),
        })
        .await
        .expect("CancelJob");
    let _agent_a = AgentProc::connected(&sandbox, "agent-a", coordinator.url(), &[]).await;
    let on_a = admin.submit(url, "", "explain").await;
    let job = admin.wait_status(&on_a, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");

    // The first run fails on agent-a, which is drained meanwhile: the retry runs on agent-b.
    let retried = admin
        .submit(url, "", "explain fixture:fail-attempts=1 fixture:slow=700")
        .await;
    wait_runs_started(&sandbox, &retried, 1, JOB_TIMEOUT).await;
    admin
        .client
        .drain_agent(pb::DrainAgentRequest {
            agent_id: "agent-a".into(),
        })
        .await
        .expect("DrainAgent");
    let _agent_b = AgentProc::connected(&sandbox, "agent-b", coordinator.url(), &[]).await;
    let job = ended_job(&addr, &retried, false).await;
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["attempts"], 2, "{job}");
    let attempts = job["attemptHistory"].as_array().expect("attemptHistory");
    let summary: Vec<_> = attempts
        .iter()
        .map(|a| {
            (
                a["number"].clone(),
                a["agentId"].clone(),
                a["outcome"].clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (json!(1), json!("agent-a"), json!("retried")),
            (json!(2), json!("agent-b"), json!("completed")),
        ],
        "{job}"
    );
    assert!(
        attempts[0]["error"]
            .as_str()
            .is_some_and(|error| error.contains(FAILURE_MESSAGE)),
        "the failed attempt says why: {job}"
    );
    assert!(attempts[1].get("error").is_none(), "{job}");
    assert_eq!(phase_names(&attempts[0])[..2], ["cloning", "analyzing"]);
    assert!(!phase_names(&attempts[0]).contains(&"uploading"));
    assert_eq!(
        phase_names(&attempts[1]),
        ["cloning", "analyzing", "gathering", "uploading"]
    );
    let (first, second) = (attempt_times(&attempts[0]), attempt_times(&attempts[1]));
    assert_in_order(
        &[first.clone(), second.clone()].concat(),
        "the attempts' times",
    );
    assert!(
        first[first.len() - 1] < second[0],
        "the retry was claimed after the first attempt ended (backoff)"
    );
    assert_eq!(time(&job["claimedAt"], "claimedAt"), second[0]);

    // The agent of the current or last attempt: the retried job is agent-b's only.
    let ids = |jobs: &[&String]| jobs.iter().map(|id| id.to_string()).collect::<Vec<_>>();
    let by_agent = |agent: &str| json!({ "agent_id": agent });
    assert_eq!(list(&addr, by_agent("agent-a")).0, ids(&[&on_a]));
    assert_eq!(list(&addr, by_agent("agent-b")).0, ids(&[&retried]));
    assert!(list(&addr, by_agent("nobody")).0.is_empty());
    let ordered = |order: &str| list(&addr, json!({ "order": order })).0;
    assert_eq!(
        ordered("JOB_ORDER_NEWEST_FIRST"),
        ids(&[&retried, &on_a, &never])
    );
    assert_eq!(
        ordered("JOB_ORDER_OLDEST_FIRST"),
        ids(&[&never, &on_a, &retried])
    );
    assert_eq!(
        ordered("JOB_ORDER_AGENT"),
        ids(&[&on_a, &retried, &never]),
        "agent-a's, agent-b's, then the never assigned"
    );
    assert_eq!(
        ordered("JOB_ORDER_STATUS"),
        ids(&[&never, &retried, &on_a]),
        "canceled, then completed newest first"
    );
    // Paging keeps the order.
    let (first_page, token) = list(&addr, json!({ "order": "JOB_ORDER_AGENT", "limit": 2 }));
    assert_eq!(first_page, ids(&[&on_a, &retried]));
    let (second_page, last) = list(
        &addr,
        json!({ "order": "JOB_ORDER_AGENT", "limit": 2, "page_token": token }),
    );
    assert_eq!((second_page, last.as_str()), (vec![never.clone()], ""));

    // A listing shows the attempts without their error texts (GetJob has them).
    let listed = grpcurl::call(
        &addr,
        "fondation.v1.Admin/ListJobs",
        Some(&by_agent("agent-b")),
    )
    .expect("ListJobs");
    let listed_attempts = listed["jobs"][0]["attemptHistory"]
        .as_array()
        .expect("attemptHistory in ListJobs");
    assert_eq!(listed_attempts.len(), 2, "{listed}");
    assert_eq!(listed_attempts[0]["agentId"], "agent-a");
    assert!(listed_attempts[0].get("error").is_none(), "{listed}");
}
