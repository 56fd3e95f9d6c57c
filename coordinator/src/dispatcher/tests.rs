//! The claim loop in virtual time, against a scripted job source.

use std::{sync::atomic::Ordering, time::Duration};

use fondation_proto::model::ToAgent;
use tokio::task::JoinHandle;

use super::run_claim_loop;
use crate::testing::{claimed_job, next_message, Call, Harness};

fn start(harness: &Harness) -> JoinHandle<()> {
    tokio::spawn(run_claim_loop(harness.ctx.clone()))
}

fn claims(calls: &[Call]) -> usize {
    calls.iter().filter(|call| **call == Call::Claim).count()
}

async fn stopped(harness: &Harness, handle: JoinHandle<()>, waiting_for: &str) {
    harness.ctx.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(1), handle)
        .await
        .unwrap_or_else(|_| panic!("the claim loop did not stop within 1 s ({waiting_for})"))
        .expect("the claim loop does not panic");
}

#[tokio::test(start_paused = true)]
async fn claims_only_while_an_agent_has_a_free_slot() {
    let mut harness = Harness::new(|config| config.poll_interval = Duration::from_secs(5));
    let handle = start(&harness);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(claims(&harness.pending_calls()), 0, "no agent, no claim");

    harness.source.push_claim(claimed_job("job-1"));
    let mut agent = harness.connect_agent("agent-1", 1);
    let (_, call) = harness.next_call("a claim once a slot appeared").await;
    assert_eq!(call, Call::Claim);
    let message = next_message(&mut agent, "the assignment").await;
    let ToAgent::Assignment(assignment) = message else {
        panic!("expected an assignment, got {message:?}")
    };
    assert_eq!(assignment.job_id, "job-1");

    // The only slot is taken: no more claims, however long.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        claims(&harness.pending_calls()),
        0,
        "no free slot, no claim"
    );

    // The run ends and frees its slot: claiming resumes.
    harness
        .ctx
        .agents
        .release("agent-1", &assignment.assignment_id);
    loop {
        if harness.next_call("a claim once the slot was freed").await.1 == Call::Claim {
            break;
        }
    }
    stopped(&harness, handle, "after claims").await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_cuts_short_a_claim_stuck_in_an_outage() {
    let mut harness = Harness::new(|_| {});
    harness.source.claims_hang.store(true, Ordering::SeqCst);
    let _agent = harness.connect_agent("agent-1", 1);
    let handle = start(&harness);
    let (_, call) = harness.next_call("the claim").await;
    assert_eq!(call, Call::Claim);
    tokio::time::sleep(Duration::from_secs(30)).await;
    stopped(&harness, handle, "a hanging claim").await;
}

#[tokio::test(start_paused = true)]
async fn stops_on_shutdown_while_idle() {
    let mut harness = Harness::new(|config| config.poll_interval = Duration::from_secs(5));
    let _agent = harness.connect_agent("agent-1", 1);
    let handle = start(&harness);
    harness.next_call("an empty claim").await;
    let (_, call) = harness.next_call("the claim after one poll interval").await;
    assert_eq!(call, Call::Claim);
    stopped(&harness, handle, "idle").await;
}

#[tokio::test(start_paused = true)]
async fn a_job_failing_its_checks_is_refused_without_an_assignment() {
    let mut harness = Harness::new(|_| {});
    let mut job = claimed_job("job-1");
    job.target.as_mut().expect("a target").url = "https://evil.example/x.git".into();
    harness.source.push_claim(job);
    let mut agent = harness.connect_agent("agent-1", 1);
    let handle = start(&harness);
    harness.next_call("the claim").await;
    let (_, call) = harness.next_call("the refusal").await;
    let Call::Fail {
        job_id, retryable, ..
    } = call
    else {
        panic!("expected a fail, got {call:?}")
    };
    assert_eq!(job_id, "job-1");
    assert!(!retryable);
    assert!(agent.try_recv().is_err(), "nothing was assigned");
    assert_eq!(harness.ctx.agents.free_slots(), 1);
    stopped(&harness, handle, "after a refusal").await;
}

/// A source that batches claims (the embedded store: one commit for all) gets as many claims at
/// once as slots are free, up to what it takes; one that does not gets them one at a time.
#[tokio::test(start_paused = true)]
async fn free_slots_are_claimed_for_together_when_the_source_batches_claims() {
    for (parallel, expected) in [(1, 1), (3, 3), (8, 4)] {
        let mut harness = Harness::new(|_| {});
        harness.source.claims_hang.store(true, Ordering::SeqCst);
        harness
            .source
            .parallel_claims
            .store(parallel, Ordering::SeqCst);
        let _agent = harness.connect_agent("agent-1", 4);
        let handle = start(&harness);
        let (first, call) = harness.next_call("the first claim").await;
        assert_eq!(call, Call::Claim);
        // The claims hang: every claim of the round is in flight now, and no other comes.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let in_flight = 1 + claims(&harness.pending_calls());
        assert_eq!(
            in_flight, expected,
            "{parallel} parallel claims with 4 free slots (first at {first:?})"
        );
        stopped(&harness, handle, "hanging claims").await;
    }
}
