//! Issue 9 end to end against a fake Convex as harsh as production: function error messages
//! hidden from callers without the deploy key, lost replies of applied mutations, transaction
//! limits, the UI's cancel, and (with a deploy key) `queue:reclaimExpired` recovering jobs left
//! claimed by a lost `queue:claimOne` reply or a coordinator crash right after a claim.

use std::time::Duration;

use fondation_coordinator::failpoint::{FAILPOINT_ENV, FAILPOINT_EXIT_CODE};
use fondation_testkit::{
    fake_convex::{CallOutcome, CallRecord, FakeConvexClient, FakeOptions, FaultKind, FaultSpec},
    support::{
        cluster::{process_alive, wait_runs_started, AgentOptions, AgentProc},
        convex_world::ConvexWorld,
        free_port,
        git::GitFixture,
        wait,
    },
};

const TERMINAL: &[&str] = &["completed", "failed", "canceled", "dead"];
const TIMEOUT: Duration = Duration::from_secs(90);
const DEPLOY_KEY: &str = "prod:fake|deploy-key";

/// Short leases and frequent reclaims, with the deploy key: lost claims come back within seconds.
const RECLAIMING: &[(&str, &str)] = &[
    ("CONVEX_DEPLOY_KEY", DEPLOY_KEY),
    ("LEASE_TIME", "2000"),
    ("HEARTBEAT_INTERVAL", "500"),
    ("RECLAIM_INTERVAL", "500"),
];

fn agent(world: &ConvexWorld, id: &str, url: String) -> AgentProc {
    AgentProc::spawn(
        &world.sandbox,
        AgentOptions {
            id,
            coordinator_url: url,
            slots: 1,
            extra: &[],
        },
    )
}

fn calls_of<'a>(calls: &'a [CallRecord], path: &str, job_id: &str) -> Vec<&'a CallRecord> {
    calls
        .iter()
        .filter(|c| c.path.as_deref() == Some(path) && c.args["jobId"] == job_id)
        .collect()
}

fn admin_options() -> FakeOptions {
    FakeOptions {
        deploy_key: Some(DEPLOY_KEY.to_owned()),
        ..FakeOptions::fast()
    }
}

/// The job completed by exactly one accepted `queue:complete`, and no job is left claimed.
async fn assert_completed_once_and_nothing_claimed(world: &ConvexWorld, job_id: &str) {
    let calls = world.client.calls().await.expect("calls");
    let completes: Vec<_> = calls_of(&calls, "queue:complete", job_id)
        .into_iter()
        .filter(|call| call.outcome == CallOutcome::Success)
        .collect();
    assert_eq!(completes.len(), 1, "completed exactly once: {completes:#?}");
    let claimed: Vec<_> = world
        .client
        .jobs()
        .await
        .expect("jobs")
        .into_iter()
        .filter(|job| job.status == "claimed" || job.locked_by.is_some())
        .collect();
    assert!(claimed.is_empty(), "jobs left claimed: {claimed:#?}");
    assert!(world
        .client
        .violations()
        .await
        .expect("violations")
        .is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_the_deployment_refuses_ends_in_retry_or_fail_with_a_reason() {
    // The fixture's ~300 KB course passes the coordinator's own checks but not this deployment's
    // per-mutation write limit; its refusal comes with the message hidden.
    let options = FakeOptions {
        max_attempts: 1,
        transaction_bytes_limit: 64 * 1024,
        ..FakeOptions::fast()
    };
    let world = ConvexWorld::new(options).await;
    let coordinator = world.coordinator(None, &[]).await;
    let mut worker = agent(&world, "agent-1", coordinator.url());
    worker.wait_connected().await;
    let job_id = world.create_job("explain this project").await;
    let job = world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "dead", "{job:?}");
    assert_eq!(job.locked_by, None);

    let calls = world.client.calls().await.expect("calls");
    let upserts = calls_of(&calls, "docs:upsertFromJob", &job_id);
    assert!(!upserts.is_empty());
    for upsert in &upserts {
        assert_eq!(upsert.outcome, CallOutcome::FunctionError);
        let message = upsert.reply.as_ref().expect("a reply")["errorMessage"]
            .as_str()
            .expect("a message")
            .to_owned();
        assert!(
            message.ends_with("] Server Error"),
            "the message is hidden: {message}"
        );
    }
    let failures = calls_of(&calls, "queue:retryOrFail", &job_id);
    assert_eq!(failures.len(), 1);
    let error = failures[0].args["error"].as_str().expect("error text");
    assert!(
        error.contains("refused by the deployment (message hidden"),
        "{error}"
    );
    world.assert_no_rejected_calls().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ui_cancel_stops_the_run_uploads_nothing_and_keeps_the_previous_course() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    let coordinator = world.coordinator(None, &[]).await;
    let mut worker = agent(&world, "agent-1", coordinator.url());
    worker.wait_connected().await;
    let repository = world
        .client
        .create_repository(GitFixture::FULL_NAME, Some("main"))
        .await
        .expect("repository");

    // A first run leaves the repository's course.
    let first = world.create_job_in(&repository, "first").await;
    let done = world.wait_status(&first, TERMINAL, TIMEOUT).await;
    assert_eq!(done.status, "completed");
    let course = world.client.docs(&first).await.expect("docs");
    assert!(!course.is_empty());

    // The second run is canceled from the UI while the CLI runs.
    let second = world.create_job_in(&repository, "fixture:slow=3000").await;
    let runs = wait_runs_started(&world.sandbox, &second, 1, TIMEOUT).await;
    // Once `analyzing` is written (a cancel racing a status write is the documented window).
    world.wait_status(&second, &["analyzing"], TIMEOUT).await;
    world.client.cancel_from_ui(&second).await.expect("cancel");
    wait::until(
        "the canceled CLI to be gone",
        Duration::from_secs(20),
        || async { Ok((!process_alive(runs[0].pid)).then_some(())) },
    )
    .await;
    // The agent's only slot is free again once the canceled run is over: a next job completes.
    let next = world.create_job("next").await;
    let done = world.wait_status(&next, TERMINAL, TIMEOUT).await;
    assert_eq!(done.status, "completed");
    let calls = world.client.calls().await.expect("calls");
    for path in ["docs:upsertFromJob", "queue:complete", "queue:retryOrFail"] {
        assert!(
            calls_of(&calls, path, &second).is_empty(),
            "{path} called for a canceled job"
        );
    }
    let job = world.job(&second).await;
    assert_eq!(job.status, "canceled", "{job:?}");
    assert_eq!(job.cancel_requested, None, "the UI's cancel sets no flag");
    assert_eq!(
        world.client.docs(&first).await.expect("docs"),
        course,
        "the previous course is still there"
    );
    assert!(world
        .client
        .violations()
        .await
        .expect("violations")
        .is_empty());
    world.assert_no_rejected_calls().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_claim_applied_with_its_reply_dropped_is_reclaimed_and_completed_once() {
    let world = ConvexWorld::new(admin_options()).await;
    // The job is there before the first claim, so the dropped reply is that of a real claim.
    let job_id = world.create_job("explain this project").await;
    world
        .client
        .add_fault(FaultSpec::new(FaultKind::ApplyThenDrop).path("queue:claimOne"))
        .await
        .expect("fault");
    let coordinator = world.coordinator(None, RECLAIMING).await;
    let mut worker = agent(&world, "agent-1", coordinator.url());
    worker.wait_connected().await;

    let job = world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    // Once by the reclaim (the lost claim's attempt), never by a failure.
    assert_eq!(job.attempts, Some(1.0), "{job:?}");
    let calls = world.client.calls().await.expect("calls");
    let claims: Vec<CallOutcome> = calls
        .iter()
        .filter(|call| call.path.as_deref() == Some("queue:claimOne"))
        .map(|call| call.outcome)
        .collect();
    assert_eq!(claims.first(), Some(&CallOutcome::AppliedReplyDropped));
    assert!(calls.iter().any(|call| {
        call.path.as_deref() == Some("queue:reclaimExpired")
            && call
                .reply
                .as_ref()
                .is_some_and(|reply| reply["value"]["reclaimed"] == 1)
    }));
    assert_completed_once_and_nothing_claimed(&world, &job_id).await;
    world.assert_no_rejected_calls().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_coordinator_killed_right_after_a_claim_is_recovered_by_the_reclaim() {
    let world = ConvexWorld::new(admin_options()).await;
    let port = free_port();
    let mut crashing: Vec<(&str, &str)> = RECLAIMING.to_vec();
    crashing.push((FAILPOINT_ENV, "after-claim"));
    let mut coordinator = world.coordinator(Some(port), &crashing).await;
    let mut worker = agent(&world, "agent-1", coordinator.url());
    worker.wait_connected().await;
    let job_id = world.create_job("explain this project").await;
    let status = coordinator.proc.wait_exit(TIMEOUT).await;
    assert_eq!(
        status.code(),
        Some(FAILPOINT_EXIT_CODE),
        "stopped at the failpoint"
    );
    let orphan = world.job(&job_id).await;
    assert_eq!(orphan.status, "claimed", "{orphan:?}");

    // The same coordinator (same DATA_DIR, same WORKER_ID) starts again, without the failpoint.
    let coordinator = world.coordinator(Some(port), RECLAIMING).await;
    let job = world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, Some(1.0), "{job:?}");
    assert_completed_once_and_nothing_claimed(&world, &job_id).await;
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reclaim_that_keeps_failing_does_not_stop_claiming() {
    let world = ConvexWorld::new(admin_options()).await;
    world
        .client
        .add_fault(
            FaultSpec::new(FaultKind::Throw)
                .path("queue:reclaimExpired")
                .for_ms(600_000),
        )
        .await
        .expect("fault");
    let mut coordinator = world.coordinator(None, RECLAIMING).await;
    let mut worker = agent(&world, "agent-1", coordinator.url());
    worker.wait_connected().await;
    coordinator
        .proc
        .wait_for_log("reclaiming expired leases failed", TIMEOUT)
        .await;
    for n in 0..3 {
        let job_id = world.create_job(&format!("job {n}")).await;
        let job = world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
        assert_eq!(job.status, "completed", "{job:?}");
    }
    let reclaims: Vec<CallOutcome> = world
        .client
        .calls()
        .await
        .expect("calls")
        .iter()
        .filter(|call| call.path.as_deref() == Some("queue:reclaimExpired"))
        .map(|call| call.outcome)
        .collect();
    assert!(!reclaims.is_empty(), "reclaims were attempted");
    assert!(reclaims
        .iter()
        .all(|outcome| *outcome == CallOutcome::FunctionError));
    // As admin, the fake shows the reclaim's error to the coordinator, which logs it.
    let admin = FakeConvexClient::new(&world.fake.url()).with_deploy_key(DEPLOY_KEY);
    let error = admin.reclaim_expired().await.expect_err("still failing");
    assert!(
        error.to_string().contains("injected function error"),
        "{error:#}"
    );
}

#[tokio::test]
async fn reclaim_expired_is_internal_and_messages_show_only_to_admins() {
    let world = ConvexWorld::new(admin_options()).await;
    let public = world.client.clone();
    let error = public.reclaim_expired().await.expect_err("internal");
    assert!(
        error
            .to_string()
            .contains("Could not find public function for 'queue:reclaimExpired'"),
        "{error:#}"
    );
    let job_id = world.create_job("p").await;
    world
        .client
        .mutation("jobs:requestCancel", serde_json::json!({"jobId": job_id}))
        .await
        .expect("cancel");
    // A second cancel throws; its message is hidden from the public caller.
    let hidden = public
        .mutation("jobs:requestCancel", serde_json::json!({"jobId": job_id}))
        .await
        .expect_err("finished");
    assert!(hidden.to_string().ends_with("] Server Error"), "{hidden:#}");
    let admin = FakeConvexClient::new(&world.fake.url()).with_deploy_key(DEPLOY_KEY);
    let shown = admin
        .mutation("jobs:requestCancel", serde_json::json!({"jobId": job_id}))
        .await
        .expect_err("finished");
    assert!(
        shown.to_string().contains("cannot be cancelled"),
        "{shown:#}"
    );
    let counts = admin
        .reclaim_expired()
        .await
        .expect("admin runs internal functions");
    assert_eq!(counts["reclaimed"], 0);
}
