//! Issue 3 end to end: the coordinator drives the fake Convex deployment (strict validation, real
//! semantics, fault injection) while real agents run the fixture CLI.

use std::time::Duration;

use fondation_proto::pb;
use fondation_testkit::{
    fake_convex::{now_ms, CallOutcome, CallRecord, FakeOptions, FaultKind, FaultSpec},
    fixture_cli::{read_run_log, runs_per_job},
    support::{
        cluster::{process_alive, wait_runs_started, AgentOptions, AgentProc},
        convex_world::ConvexWorld,
        wait,
    },
};

const TERMINAL: &[&str] = &["completed", "failed", "canceled", "dead"];
const TIMEOUT: Duration = Duration::from_secs(90);

fn agent(world: &ConvexWorld, id: &str, url: String, extra: &[(&str, &str)]) -> AgentProc {
    AgentProc::spawn(
        &world.sandbox,
        AgentOptions {
            id,
            coordinator_url: url,
            slots: 1,
            extra,
        },
    )
}

fn calls_of<'a>(calls: &'a [CallRecord], path: &str, job_id: &str) -> Vec<&'a CallRecord> {
    calls
        .iter()
        .filter(|c| c.path.as_deref() == Some(path) && c.args["jobId"] == job_id)
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn convex_job_completes_with_its_documents_through_the_statuses_in_order() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    let coordinator = world.coordinator(None, &[]).await;
    let mut worker = agent(&world, "agent-1", coordinator.url(), &[]);
    worker.wait_connected().await;

    let job_id = world.create_job("explain this project").await;
    let job = world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.docs_count, Some(36.0));
    let docs = world.client.docs(&job_id).await.unwrap();
    assert_eq!(docs.len(), 36);

    let calls = world.client.calls().await.unwrap();
    let statuses: Vec<String> = calls_of(&calls, "queue:heartbeat", &job_id)
        .iter()
        .filter_map(|c| {
            c.args
                .get("status")
                .and_then(|s| s.as_str())
                .map(String::from)
        })
        .collect();
    assert_eq!(statuses, ["running", "cloning", "analyzing", "gathering"]);
    let upserts = calls_of(&calls, "docs:upsertFromJob", &job_id);
    assert_eq!(upserts.len(), 1, "one upload per job");
    assert_eq!(upserts[0].args["summary"]["chaptersCount"], 11.0);
    assert_eq!(upserts[0].args["summary"]["tutorialsCount"], 11.0);
    let completes = calls_of(&calls, "queue:complete", &job_id);
    assert_eq!(completes.len(), 1);
    assert_eq!(completes[0].args["docsCount"], 36.0);
    assert_eq!(completes[0].args["result"]["success"], true);
    // The callback token never leaves the coordinator.
    assert!(!worker.proc.lines().iter().any(|l| l.contains("cb-")));

    // The attempt's history, kept in the coordinator's DATA_DIR: Convex has no place for it.
    let admin = coordinator.admin().await;
    let attempts = wait::until("the attempt to end in the history", TIMEOUT, || {
        let mut client = admin.client.clone();
        let request = pb::GetJobRequest {
            job_id: job_id.clone(),
            include_content: false,
        };
        async move {
            let job = client
                .get_job(request)
                .await
                .map_err(|e| e.to_string())?
                .into_inner();
            match job.attempt_history.last() {
                Some(attempt) if attempt.ended_at.is_some() => Ok(Some(job.attempt_history)),
                _ => Err(format!("{job:?}")),
            }
        }
    })
    .await;
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    let attempt = &attempts[0];
    assert_eq!(
        (
            attempt.number,
            attempt.agent_id.as_str(),
            attempt.outcome.as_str()
        ),
        (1, "agent-1", "completed")
    );
    assert!(attempt.claimed_at.is_some() && attempt.started_at.is_some());
    let phases: Vec<&str> = attempt.phases.iter().map(|p| p.phase.as_str()).collect();
    assert_eq!(phases, ["cloning", "analyzing", "gathering", "uploading"]);
    world.assert_no_rejected_calls().await;
}

/// The newest CLI's progress (`[FONDATION_STEP_N/6] ...` in its JSON lines) reaches the
/// deployment's heartbeats as steps 1 to 6, in order.
#[tokio::test(flavor = "multi_thread")]
async fn newest_cli_step_markers_reach_the_heartbeats_as_steps_one_to_six() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    // Steps 300 ms apart, progress written at most every 50 ms: every step gets its heartbeat.
    // The CLI's own words are in the coordinator's debug log (the job shows the web app's texts).
    let coordinator = world
        .coordinator(None, &[("PROGRESS_INTERVAL", "50"), ("RUST_LOG", "debug")])
        .await;
    let mut worker = agent(&world, "agent-1", coordinator.url(), &[]);
    worker.wait_connected().await;

    let job_id = world
        .create_job("explain this fixture:format=marker fixture:slow=300")
        .await;
    let job = world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");

    let calls = world.client.calls().await.unwrap();
    let heartbeats = calls_of(&calls, "queue:heartbeat", &job_id);
    let mut steps: Vec<f64> = heartbeats
        .iter()
        .filter_map(|call| call.args.get("currentStep").and_then(|s| s.as_f64()))
        .collect();
    steps.dedup();
    assert_eq!(steps, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "{heartbeats:#?}");
    for call in &heartbeats {
        if let Some(progress) = call.args.get("progress").and_then(|p| p.as_str()) {
            assert!(
                !progress.contains("FONDATION_STEP"),
                "the marker is not shown to users: {progress:?}"
            );
            assert!(
                progress.starts_with("Étape ") || progress.ends_with("..."),
                "the job shows the web app's texts: {progress:?}"
            );
        }
    }
    // Steps read from the output files say so: these steps must come from the lines.
    let reported: Vec<String> = coordinator
        .proc
        .lines()
        .into_iter()
        .filter(|line| line.contains("step progress") && line.contains(&job_id))
        .collect();
    assert!(reported.len() >= 6, "{reported:#?}");
    assert!(
        !reported.iter().any(|line| line.contains("output written")),
        "a step was seen only in the output files: {reported:#?}"
    );
    world.assert_no_rejected_calls().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_poller_whatever_the_number_of_agents_and_none_while_all_slots_are_busy() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    let coordinator = world.coordinator(None, &[("POLL_INTERVAL", "500")]).await;
    let mut agents = Vec::new();
    for n in 0..10 {
        agents.push(agent(&world, &format!("agent-{n}"), coordinator.url(), &[]));
    }
    for agent in &mut agents {
        agent.wait_connected().await;
    }
    let claims = |calls: &[CallRecord], from: f64, to: f64| {
        calls
            .iter()
            .filter(|c| {
                c.path.as_deref() == Some("queue:claimOne") && c.at_ms >= from && c.at_ms < to
            })
            .count()
    };
    // Measure over a window of 5 s: the window is the measurement, not a synchronisation.
    let start = now_ms();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let end = now_ms();
    let idle = claims(&world.client.calls().await.unwrap(), start, end);
    println!("claims in 5 s with 10 idle agents: {idle}");
    assert!(
        (5..=12).contains(&idle),
        "one poller at 500 ms makes about 10 claims in 5 s, not {idle}"
    );

    // Fill every slot with a job that runs until canceled.
    let mut jobs = Vec::new();
    for n in 0..10 {
        jobs.push(world.create_job(&format!("job {n} fixture:hang")).await);
    }
    for job_id in &jobs {
        wait_runs_started(&world.sandbox, job_id, 1, TIMEOUT).await;
    }
    let busy_from = now_ms();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let busy = claims(&world.client.calls().await.unwrap(), busy_from, now_ms());
    assert_eq!(busy, 0, "no claim while every slot is busy");
    world.assert_no_rejected_calls().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chatty_cli_causes_only_a_handful_of_heartbeats() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    let coordinator = world
        .coordinator(
            None,
            &[
                ("PROGRESS_INTERVAL", "2000"),
                ("HEARTBEAT_INTERVAL", "60000"),
                ("LEASE_TIME", "300000"),
            ],
        )
        .await;
    let mut worker = agent(&world, "agent-1", coordinator.url(), &[]);
    worker.wait_connected().await;
    // 10,000 progress lines over about 5 s.
    let job_id = world
        .create_job("fixture:flood=10000 fixture:slow=830")
        .await;
    let job = world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    let calls = world.client.calls().await.unwrap();
    let heartbeats = calls_of(&calls, "queue:heartbeat", &job_id).len();
    println!("heartbeats for 10,000 progress lines: {heartbeats}");
    assert!(heartbeats <= 10, "{heartbeats} heartbeat calls");
    world.assert_no_rejected_calls().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_ninety_second_job_never_loses_its_ten_second_lease() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    let coordinator = world
        .coordinator(
            None,
            &[("LEASE_TIME", "10000"), ("HEARTBEAT_INTERVAL", "3000")],
        )
        .await;
    let mut worker = agent(&world, "agent-1", coordinator.url(), &[]);
    worker.wait_connected().await;
    let job_id = world
        .create_job("fixture:format=silent fixture:slow=15000")
        .await;
    let job = world
        .wait_status(&job_id, TERMINAL, Duration::from_secs(150))
        .await;
    assert_eq!(job.status, "completed", "{job:?}");
    // Convex counts failed attempts: none.
    assert_eq!(job.attempts.unwrap_or(0.0), 0.0, "never retried");

    let calls = world.client.calls().await.unwrap();
    let claim = calls
        .iter()
        .find(|c| {
            c.path.as_deref() == Some("queue:claimOne")
                && c.reply
                    .as_ref()
                    .and_then(|r| r.get("value"))
                    .and_then(|v| v.get("id"))
                    == Some(&serde_json::json!(job_id))
        })
        .expect("the claim of the job");
    let mut lease_renewed_at = vec![claim.at_ms];
    lease_renewed_at.extend(
        calls_of(&calls, "queue:heartbeat", &job_id)
            .iter()
            .filter(|c| c.outcome == CallOutcome::Success)
            .map(|c| c.at_ms),
    );
    let complete = calls_of(&calls, "queue:complete", &job_id)[0].at_ms;
    lease_renewed_at.push(complete);
    let longest_gap = lease_renewed_at
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .fold(0.0, f64::max);
    println!(
        "job took {:.0} s; longest gap between lease renewals {longest_gap:.0} ms",
        (complete - claim.at_ms) / 1000.0
    );
    assert!(
        complete - claim.at_ms >= 90_000.0,
        "the job really ran 90 s"
    );
    assert!(
        longest_gap < 10_000.0,
        "the lease lapsed: gap of {longest_gap} ms"
    );
    world.assert_no_rejected_calls().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_cancel_stops_the_cli_and_nothing_writes_over_it() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    let coordinator = world
        .coordinator(None, &[("CANCEL_CHECK_INTERVAL", "500")])
        .await;
    let mut worker = agent(
        &world,
        "agent-1",
        coordinator.url(),
        &[
            ("FIXTURE_DIRECTIVES", "ignore-term"),
            ("KILL_GRACE", "1000"),
        ],
    );
    worker.wait_connected().await;
    let job_id = world.create_job("fixture:slow=2000").await;
    let runs = wait_runs_started(&world.sandbox, &job_id, 1, TIMEOUT).await;
    // Cancel once the run's `analyzing` is written: a cancel between the coordinator's last read
    // and a status write would be overwritten (Convex has no conditional write; README).
    world.wait_status(&job_id, &["analyzing"], TIMEOUT).await;
    world.client.request_cancel(&job_id).await.unwrap();
    let canceled_at = now_ms();
    wait::until(
        "the canceled CLI to be gone",
        Duration::from_secs(10),
        || async { Ok((!process_alive(runs[0].pid)).then_some(())) },
    )
    .await;
    // The slot is free again: a next job runs on the same agent.
    let next = world.create_job("next").await;
    let done = world.wait_status(&next, TERMINAL, TIMEOUT).await;
    assert_eq!(done.status, "completed");

    let job = world.job(&job_id).await;
    assert_eq!(job.status, "canceled", "{job:?}");
    assert!(world.client.violations().await.unwrap().is_empty());
    let calls = world.client.calls().await.unwrap();
    for path in ["queue:complete", "queue:retryOrFail", "docs:upsertFromJob"] {
        assert!(
            calls_of(&calls, path, &job_id).is_empty(),
            "{path} called for a canceled job"
        );
    }
    let late_status = calls_of(&calls, "queue:heartbeat", &job_id)
        .into_iter()
        .filter(|c| c.at_ms > canceled_at && c.args.get("status").is_some())
        .count();
    assert_eq!(late_status, 0, "no status written after the cancel");
    world.assert_no_rejected_calls().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_seconds_of_outage_delay_the_result_but_it_lands_once() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    let coordinator = world.coordinator(None, &[]).await;
    let mut worker = agent(&world, "agent-1", coordinator.url(), &[]);
    worker.wait_connected().await;
    let job_id = world.create_job("fixture:slow=400").await;
    wait_runs_started(&world.sandbox, &job_id, 1, TIMEOUT).await;

    // 30 s in which every call fails with 503, and the first few hang until the client gives up.
    world
        .client
        .add_fault(FaultSpec::new(FaultKind::Hang).count(3))
        .await
        .unwrap();
    world
        .client
        .add_fault(FaultSpec::new(FaultKind::HttpError).for_ms(30_000))
        .await
        .unwrap();
    let job = world
        .wait_status(&job_id, TERMINAL, Duration::from_secs(120))
        .await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.docs_count, Some(36.0));

    let calls = world.client.calls().await.unwrap();
    let took_effect = |path: &str| {
        calls_of(&calls, path, &job_id)
            .iter()
            .filter(|c| {
                matches!(
                    c.outcome,
                    CallOutcome::Success | CallOutcome::AppliedReplyDropped
                )
            })
            .count()
    };
    let failed_attempts = calls_of(&calls, "docs:upsertFromJob", &job_id).len()
        + calls_of(&calls, "queue:heartbeat", &job_id).len();
    println!("calls for the job, failed ones included: {failed_attempts}");
    assert_eq!(took_effect("docs:upsertFromJob"), 1);
    assert_eq!(took_effect("queue:complete"), 1);
    assert!(
        calls
            .iter()
            .any(|c| c.outcome == CallOutcome::InjectedHttpError),
        "the outage happened"
    );
    let runs = runs_per_job(&read_run_log(&world.sandbox.run_log).unwrap());
    assert_eq!(runs[&job_id], 1, "the outage did not re-run the job");
    world.assert_no_rejected_calls().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_two_mib_chapter_fails_the_job_with_an_error_naming_it() {
    let options = FakeOptions {
        max_attempts: 1,
        ..FakeOptions::fast()
    };
    let world = ConvexWorld::new(options).await;
    let coordinator = world.coordinator(None, &[]).await;
    let mut worker = agent(&world, "agent-1", coordinator.url(), &[]);
    worker.wait_connected().await;
    let job_id = world.create_job("fixture:oversize=2097152").await;
    let job = world
        .wait_status(&job_id, &["dead", "failed", "completed"], TIMEOUT)
        .await;
    assert_eq!(job.status, "dead", "{job:?}");
    let calls = world.client.calls().await.unwrap();
    let failures = calls_of(&calls, "queue:retryOrFail", &job_id);
    assert_eq!(failures.len(), 1);
    let error = failures[0].args["error"].as_str().unwrap();
    assert!(
        error.contains("chapters/chapter_99_oversize.md") && error.contains("2097152"),
        "{error}"
    );
    assert!(
        calls_of(&calls, "docs:upsertFromJob", &job_id).is_empty(),
        "nothing truncated and stored"
    );
    world.assert_no_rejected_calls().await;
}
