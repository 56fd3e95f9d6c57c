//! The lease keeper in virtual time, against a scripted job source and a fake agent stream.

use std::time::Duration;

use fondation_proto::model::{Document, DocumentKind, RunEvent, RunOutcome, ToAgent};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use super::{spawn_keeper, JobEvent, KeeperStart};
use crate::{
    assignments::AssignmentRecord,
    job_source::{ActiveStatus, JobSourceError, JobStatus, ProgressUpdate},
    testing::{next_message, Call, Harness, PATIENCE},
};

const AGENT: &str = "agent-1";

struct Keeper {
    events: mpsc::UnboundedSender<JobEvent>,
    handle: JoinHandle<()>,
    agent: mpsc::Receiver<ToAgent>,
}

/// Starts a keeper for job `job-1` on an agent with one slot, as the dispatcher does.
async fn start_keeper(harness: &Harness) -> Keeper {
    let agent = harness.connect_agent(AGENT, 1);
    let record = AssignmentRecord {
        assignment_id: "as-1".into(),
        job_id: "job-1".into(),
        epoch: 1,
        attempt: 1,
        agent_id: AGENT.into(),
    };
    let ctx = &harness.ctx;
    ctx.agents
        .reserve_slot(&record.assignment_id, &record.job_id)
        .expect("a free slot");
    ctx.journal
        .record_assignment(&record)
        .await
        .expect("journaled");
    let (events, events_rx) = mpsc::unbounded_channel();
    ctx.assignments.insert(record.clone(), events.clone());
    let handle = spawn_keeper(ctx.clone(), record, events_rx, KeeperStart::Assigned);
    Keeper {
        events,
        handle,
        agent,
    }
}

/// Quiet cancel checks, so the calls a test looks at are the ones it caused.
fn no_cancel_checks(config: &mut crate::config::CoordinatorConfig) {
    config.cancel_check_interval = Duration::from_secs(1_000_000);
}

async fn ended(keeper: Keeper, waiting_for: &str) -> mpsc::Receiver<ToAgent> {
    tokio::time::timeout(PATIENCE, keeper.handle)
        .await
        .unwrap_or_else(|_| panic!("the keeper did not end while waiting for {waiting_for}"))
        .expect("the keeper does not panic");
    keeper.agent
}

fn run(event: RunEvent) -> JobEvent {
    JobEvent::Run(event)
}

fn succeeded(document_count: u32) -> JobEvent {
    run(RunEvent::Finished(RunOutcome::Succeeded {
        document_count,
        message: "done".into(),
    }))
}

#[tokio::test(start_paused = true)]
async fn heartbeats_keep_the_lease_and_progress_is_coalesced() {
    let mut harness = Harness::new(|config| {
        no_cancel_checks(config);
        config.heartbeat_interval = Duration::from_secs(60);
        config.progress_interval = Duration::from_secs(2);
    });
    let start = Instant::now();
    let keeper = start_keeper(&harness).await;

    keeper.events.send(run(RunEvent::Accepted)).unwrap();
    let (at, call) = harness.next_call("the accepted status").await;
    assert_eq!(at - start, Duration::ZERO);
    let Call::Heartbeat { update, .. } = call else {
        panic!("expected a heartbeat, got {call:?}")
    };
    assert_eq!(update.status, Some(ActiveStatus::Running));
    assert_eq!(update.progress.as_deref(), Some("Initializing..."));

    for (step, message) in [(1, "one"), (2, "two"), (2, "two, later")] {
        keeper
            .events
            .send(run(RunEvent::Progress {
                step,
                total_steps: 6,
                message: message.into(),
            }))
            .unwrap();
    }
    let (at, call) = harness.next_call("the coalesced progress").await;
    assert_eq!(
        at - start,
        Duration::from_secs(2),
        "one PROGRESS_INTERVAL after the last write"
    );
    assert_eq!(
        call,
        Call::Heartbeat {
            job_id: "job-1".into(),
            update: ProgressUpdate {
                status: None,
                // The web app's text for the step, not the CLI's words.
                progress: Some("Étape 2/6: Analyse des relations entre composants".into()),
                current_step: Some(2),
            },
        }
    );

    // Nothing more to say: the lease is still extended every HEARTBEAT_INTERVAL.
    for beat in 1..=3u64 {
        let (at, call) = harness.next_call("a plain heartbeat").await;
        assert_eq!(at - start, Duration::from_secs(60 * beat));
        assert!(
            matches!(&call, Call::Heartbeat { update, .. } if *update == ProgressUpdate::default()),
            "{call:?}"
        );
    }
    keeper.handle.abort();
}

#[tokio::test(start_paused = true)]
async fn an_agent_that_does_not_come_back_within_the_grace_loses_the_job() {
    let mut harness = Harness::new(|config| {
        no_cancel_checks(config);
        config.reattach_grace = Duration::from_secs(15);
    });
    let keeper = start_keeper(&harness).await;
    let gone_at = Instant::now();
    keeper.events.send(JobEvent::AgentGone).unwrap();

    let (at, call) = harness.next_final_call("the job handed back").await;
    assert_eq!(at - gone_at, Duration::from_secs(15));
    let Call::Fail {
        message, retryable, ..
    } = call
    else {
        panic!("expected a fail, got {call:?}")
    };
    assert!(retryable);
    assert!(message.contains("re-attach grace"), "{message}");

    ended(keeper, "the keeper to end").await;
    let ctx = &harness.ctx;
    assert!(ctx.assignments.is_empty());
    assert_eq!(ctx.agents.free_slots(), 1, "the slot is freed");
    assert!(ctx.journal.load().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_agent_back_within_the_grace_keeps_the_job() {
    let mut harness = Harness::new(|config| {
        no_cancel_checks(config);
        config.reattach_grace = Duration::from_secs(15);
        config.heartbeat_interval = Duration::from_secs(60);
    });
    let keeper = start_keeper(&harness).await;
    keeper.events.send(JobEvent::AgentGone).unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    keeper.events.send(JobEvent::AgentBack).unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;

    let calls = harness.pending_calls();
    assert!(
        calls
            .iter()
            .all(|call| matches!(call, Call::Heartbeat { .. })),
        "only heartbeats, got {calls:?}"
    );
    assert_eq!(calls.len(), 10, "one heartbeat a minute");
    assert!(!keeper.handle.is_finished());
    keeper.handle.abort();
}

#[tokio::test(start_paused = true)]
async fn a_superseded_run_is_stopped_and_its_result_refused() {
    let mut harness = Harness::new(no_cancel_checks);
    let mut keeper = start_keeper(&harness).await;
    keeper.events.send(JobEvent::Superseded).unwrap();

    let message = next_message(&mut keeper.agent, "the cancel").await;
    assert!(
        matches!(&message, ToAgent::Cancel(cancel) if cancel.assignment_id == "as-1"),
        "{message:?}"
    );
    keeper.events.send(succeeded(0)).unwrap();
    let message = next_message(&mut keeper.agent, "the refused result").await;
    assert!(
        matches!(&message, ToAgent::ResultAck(ack) if !ack.accepted),
        "{message:?}"
    );

    ended(keeper, "the stopped run").await;
    let calls = harness.pending_calls();
    assert!(
        !calls
            .iter()
            .any(|call| matches!(call, Call::Complete { .. } | Call::Fail { .. })),
        "a superseded run writes nothing: {calls:?}"
    );
    assert!(harness.ctx.journal.load().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_stopped_run_that_never_reports_frees_its_slot_after_the_stop_timeout() {
    let harness = Harness::new(no_cancel_checks);
    let keeper = start_keeper(&harness).await;
    let stopped_at = Instant::now();
    keeper.events.send(JobEvent::Superseded).unwrap();
    ended(keeper, "the stop timeout").await;
    assert_eq!(stopped_at.elapsed(), super::STOP_REPORT_TIMEOUT);
    assert_eq!(harness.ctx.agents.free_slots(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_canceled_job_stops_its_run_at_the_next_check() {
    let harness = Harness::new(|config| {
        config.cancel_check_interval = Duration::from_secs(5);
    });
    *harness.source.status.lock().unwrap() = Some(JobStatus::Canceled);
    let start = Instant::now();
    let mut keeper = start_keeper(&harness).await;
    let message = next_message(&mut keeper.agent, "the cancel").await;
    assert!(matches!(message, ToAgent::Cancel(_)), "{message:?}");
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    keeper.handle.abort();
}

fn document() -> Document {
    Document {
        slug: "chapters/chapter_1.md".into(),
        title: "One".into(),
        kind: DocumentKind::Chapter,
        chapter_index: Some(0),
        content: "# One".into(),
    }
}

/// Document `index` of the run's result.
fn document_at(index: u32) -> JobEvent {
    run(RunEvent::Document {
        index,
        document: document(),
    })
}

/// The next message to the agent is an acceptance of its result.
async fn expect_accepted_ack(agent: &mut mpsc::Receiver<ToAgent>) {
    let message = next_message(agent, "the acknowledgement").await;
    assert!(
        matches!(&message, ToAgent::ResultAck(ack) if ack.accepted),
        "{message:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_result_waits_out_a_job_source_outage() {
    let mut harness = Harness::new(no_cancel_checks);
    harness.source.complete_replies.lock().unwrap().extend([
        Err(JobSourceError::Unavailable("down".into())),
        Err(JobSourceError::Unavailable("still down".into())),
    ]);
    let mut keeper = start_keeper(&harness).await;
    keeper.events.send(document_at(0)).unwrap();
    keeper.events.send(succeeded(1)).unwrap();

    // Journaled, so the agent may let go at once, before the job source has it.
    expect_accepted_ack(&mut keeper.agent).await;
    let mut times = Vec::new();
    for _ in 0..3 {
        let (at, call) = harness.next_final_call("a complete attempt").await;
        assert_eq!(
            call,
            Call::Complete {
                job_id: "job-1".into(),
                documents: 1
            }
        );
        times.push(at);
    }
    assert_eq!(times[1] - times[0], Duration::from_secs(1));
    assert_eq!(
        times[2] - times[1],
        Duration::from_secs(2),
        "the waits double"
    );
    ended(keeper, "the delivered result").await;
    assert!(harness.ctx.journal.load().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_result_sent_again_from_its_first_document_replaces_the_partial_one() {
    let mut harness = Harness::new(no_cancel_checks);
    let mut keeper = start_keeper(&harness).await;
    // Two documents on a session this coordinator has not seen end, then the whole result again
    // on the agent's new session.
    for index in [0, 1, 0, 1] {
        keeper.events.send(document_at(index)).unwrap();
    }
    keeper.events.send(succeeded(2)).unwrap();
    let (_, call) = harness.next_final_call("the complete").await;
    assert_eq!(
        call,
        Call::Complete {
            job_id: "job-1".into(),
            documents: 2
        }
    );
    expect_accepted_ack(&mut keeper.agent).await;
    ended(keeper, "the delivered result").await;
}

#[tokio::test(start_paused = true)]
async fn a_source_that_records_ends_locally_holds_the_result_before_the_agent_lets_go() {
    let mut harness = Harness::new(no_cancel_checks);
    harness
        .source
        .ends_locally
        .store(true, std::sync::atomic::Ordering::SeqCst);
    harness.source.complete_replies.lock().unwrap().extend([
        Err(JobSourceError::Unavailable("down".into())),
        Err(JobSourceError::Unavailable("still down".into())),
    ]);
    let mut keeper = start_keeper(&harness).await;
    keeper.events.send(document_at(0)).unwrap();
    keeper.events.send(succeeded(1)).unwrap();

    // Not journaled: while the source does not have the end, the agent keeps its copy.
    harness.next_final_call("the first complete attempt").await;
    assert!(
        keeper.agent.try_recv().is_err(),
        "no acknowledgement before the source has the result"
    );
    let entries = harness.ctx.journal.load().await.unwrap();
    assert_eq!(entries.len(), 1);
    assert!(entries[0].end.is_none(), "the end is not written twice");

    for _ in 0..2 {
        harness.next_final_call("a complete attempt").await;
    }
    expect_accepted_ack(&mut keeper.agent).await;
    ended(keeper, "the delivered result").await;
    assert!(harness.ctx.journal.load().await.unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_an_outage_leaves_the_result_in_the_journal() {
    let mut harness = Harness::new(no_cancel_checks);
    harness
        .source
        .complete_replies
        .lock()
        .unwrap()
        .extend((0..100).map(|_| Err(JobSourceError::Unavailable("down".into()))));
    let keeper = start_keeper(&harness).await;
    keeper.events.send(succeeded(0)).unwrap();
    harness.next_final_call("the first complete attempt").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stop_at = Instant::now();
    harness.ctx.shutdown.cancel();
    ended(keeper, "the keeper to suspend").await;
    assert_eq!(
        stop_at.elapsed(),
        Duration::ZERO,
        "the backoff wait is cut short"
    );

    let entries = harness.ctx.journal.load().await.unwrap();
    assert_eq!(entries.len(), 1);
    assert!(
        entries[0].end.is_some(),
        "the run's end is kept for the next start"
    );
}

fn agent_fault(message: &str) -> JobEvent {
    run(RunEvent::Finished(RunOutcome::Failed {
        message: message.into(),
        retryable: true,
        agent_fault: true,
    }))
}

#[tokio::test(start_paused = true)]
async fn agent_faults_hand_the_job_back_for_free_within_the_budget_then_count() {
    use crate::agents::{AGENT_FAULTS_PER_JOB, QUARANTINE_AFTER};
    let mut harness = Harness::new(no_cancel_checks);
    for n in 1..=QUARANTINE_AFTER {
        let keeper = start_keeper(&harness).await;
        keeper
            .events
            .send(agent_fault("the analyzer exited with code 127"))
            .unwrap();
        let (_, call) = harness.next_final_call("the end of the run").await;
        if n <= AGENT_FAULTS_PER_JOB {
            assert_eq!(
                call,
                Call::Release {
                    job_id: "job-1".into()
                },
                "agent failure {n} loses no attempt"
            );
        } else {
            assert!(
                matches!(&call, Call::Fail { retryable: true, message, .. } if message.contains("127")),
                "agent failure {n} counts an attempt: {call:?}"
            );
        }
        let mut agent = ended(keeper, "the keeper to end").await;
        assert!(
            matches!(
                next_message(&mut agent, "the ack").await,
                ToAgent::ResultAck(ack) if ack.accepted
            ),
            "the agent may drop the failed run"
        );
    }
    let agents = harness.ctx.agents.snapshot();
    assert!(
        agents[0].quarantine.is_some(),
        "{QUARANTINE_AFTER} agent failures in a row quarantine the agent"
    );
    assert_eq!(harness.ctx.agents.free_slots(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_agent_fault_counts_an_attempt_where_the_source_cannot_release() {
    let mut harness = Harness::new(no_cancel_checks);
    harness
        .source
        .release_unsupported
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let keeper = start_keeper(&harness).await;
    keeper.events.send(agent_fault("git cannot run")).unwrap();
    let (_, call) = harness.next_final_call("the failure").await;
    assert!(
        matches!(
            &call,
            Call::Fail {
                retryable: true,
                ..
            }
        ),
        "{call:?}"
    );
    ended(keeper, "the keeper to end").await;
}
