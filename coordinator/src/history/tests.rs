use std::time::Duration;

use fondation_proto::model::{Phase, RunEvent, RunOutcome};
use tokio::sync::mpsc;

use super::*;
use crate::{
    journal::Journal,
    lease::{spawn_keeper, JobEvent, KeeperStart},
    testing::{Call, Harness, PATIENCE},
};

fn record(assignment_id: &str, job_id: &str, epoch: u64, agent_id: &str) -> AssignmentRecord {
    AssignmentRecord {
        assignment_id: assignment_id.into(),
        job_id: job_id.into(),
        epoch,
        attempt: 1,
        agent_id: agent_id.into(),
    }
}

fn open(dir: &std::path::Path, cap: Option<usize>) -> (History, Journal, Database) {
    let db = Database::open(dir).expect("open database");
    (History::new(db.clone(), cap), Journal::new(db.clone()), db)
}

fn stages(attempt: &Attempt) -> Vec<Stage> {
    attempt.phases.iter().map(|(stage, _)| *stage).collect()
}

/// While an attempt runs, its start and phases are shown from memory; its end is written with the
/// removal of its journal entry, in the same commit.
#[tokio::test]
async fn an_attempt_is_shown_live_then_ended_with_its_journal_entry() {
    let dir = tempfile::tempdir().unwrap();
    let (history, journal, db) = open(dir.path(), None);
    let record = record("as-1", "job-1", 10, "agent-1");
    journal.record_assignment(&record).await.unwrap();

    let recorder = history.recorder(&record);
    recorder.started();
    recorder.stage(Stage::Cloning);
    recorder.stage(Stage::Analyzing);
    recorder.stage(Stage::Cloning);
    let commits = db.commits();
    let running = history.of_job("job-1").await.unwrap();
    assert_eq!(db.commits(), commits, "phases cost no commit");
    assert_eq!(running.len(), 1);
    let attempt = &running[0];
    assert_eq!(
        (attempt.number, attempt.agent_id.as_str(), attempt.outcome),
        (1, "agent-1", Outcome::Running)
    );
    assert!(attempt.claimed_at_ms.is_some(), "written with the claim");
    assert!(attempt.started_at_ms.is_some());
    assert_eq!(stages(attempt), [Stage::Cloning, Stage::Analyzing]);
    assert!(attempt.ended_at_ms.is_none());

    recorder.stage(Stage::Gathering);
    recorder.stage(Stage::Uploading);
    recorder.ended(Outcome::Completed, None);
    let decided = history.of_job("job-1").await.unwrap();
    assert_eq!(decided[0].outcome, Outcome::Completed, "shown once decided");
    let ended_at = decided[0].ended_at_ms;
    assert!(ended_at.is_some());
    recorder.finish().await.unwrap();
    assert_eq!(
        db.commits(),
        commits + 1,
        "end and journal removal share a commit"
    );
    assert!(journal.load().await.unwrap().is_empty());
    drop(recorder);

    // Read back from the file alone: nothing is live any more.
    let (reopened, _, _) = open(dir.path(), None);
    let attempts = reopened.of_job("job-1").await.unwrap();
    assert_eq!(attempts.len(), 1);
    let attempt = &attempts[0];
    assert_eq!(attempt.outcome, Outcome::Completed);
    assert_eq!(attempt.ended_at_ms, ended_at, "the time it was decided");
    assert_eq!(attempt.error, None);
    assert_eq!(
        stages(attempt),
        [
            Stage::Cloning,
            Stage::Analyzing,
            Stage::Gathering,
            Stage::Uploading
        ]
    );
    let times: Vec<f64> = [attempt.claimed_at_ms, attempt.started_at_ms]
        .into_iter()
        .flatten()
        .chain(attempt.phases.iter().map(|(_, at)| *at))
        .chain(attempt.ended_at_ms)
        .collect();
    assert_eq!(times.len(), 7);
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(reopened.of_job("job-2").await.unwrap().is_empty());
}

#[tokio::test]
async fn the_first_decided_outcome_stands_and_an_undecided_attempt_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (history, journal, _) = open(dir.path(), None);
    let first = record("as-1", "job-1", 1, "agent-1");
    let second = AssignmentRecord {
        attempt: 2,
        ..record("as-2", "job-1", 2, "agent-2")
    };
    for record in [&first, &second] {
        journal.record_assignment(record).await.unwrap();
    }
    let recorder = history.recorder(&first);
    recorder.ended(Outcome::Lost, Some("agent agent-1 lost"));
    recorder.ended(Outcome::Retried, Some("agent agent-1 lost"));
    recorder.finish().await.unwrap();
    history.recorder(&second).finish().await.unwrap();

    let attempts = history.of_job("job-1").await.unwrap();
    let summary: Vec<_> = attempts
        .iter()
        .map(|a| (a.number, a.agent_id.as_str(), a.outcome, a.error.as_deref()))
        .collect();
    assert_eq!(
        summary,
        [
            (1, "agent-1", Outcome::Lost, Some("agent agent-1 lost")),
            (2, "agent-2", Outcome::Lost, None),
        ]
    );
}

/// An assignment moved to another agent before it was sent keeps one row, with the new agent; a
/// refused one ends failed, with or without a row from its claim.
#[tokio::test]
async fn a_moved_assignment_keeps_its_row_and_a_refused_one_ends_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (history, journal, _) = open(dir.path(), None);
    journal
        .record_assignment(&record("as-1", "job-1", 1, "agent-1"))
        .await
        .unwrap();
    journal.remove("as-1").await.unwrap();
    let moved = record("as-2", "job-1", 1, "agent-2");
    journal.record_assignment(&moved).await.unwrap();
    let attempts = history.of_job("job-1").await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].agent_id, "agent-2");

    history
        .refused(&moved, "branch is not valid")
        .await
        .unwrap();
    assert!(journal.load().await.unwrap().is_empty());
    // Convex: nothing was journaled before the refusal.
    history
        .refused(&record("as-3", "job-2", 3, "agent-1"), "not allowed")
        .await
        .unwrap();
    for (job, error) in [("job-1", "branch is not valid"), ("job-2", "not allowed")] {
        let attempts = history.of_job(job).await.unwrap();
        assert_eq!(attempts.len(), 1, "{job}");
        assert_eq!(attempts[0].outcome, Outcome::Failed);
        assert_eq!(attempts[0].error.as_deref(), Some(error));
        assert!(attempts[0].ended_at_ms.is_some());
    }
}

#[tokio::test]
async fn a_capped_history_drops_the_oldest_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let (history, journal, _) = open(dir.path(), Some(3));
    for n in 1..=5u64 {
        let record = AssignmentRecord {
            attempt: n as u32,
            ..record(&format!("as-{n}"), "job-1", n, "agent-1")
        };
        journal.record_assignment(&record).await.unwrap();
        let recorder = history.recorder(&record);
        recorder.ended(Outcome::Retried, Some("boom"));
        recorder.finish().await.unwrap();
    }
    let numbers: Vec<u32> = history
        .of_job("job-1")
        .await
        .unwrap()
        .iter()
        .map(|a| a.number)
        .collect();
    assert_eq!(numbers, [3, 4, 5]);
}

/// Through a real lease keeper: a run's events become its attempt's history.
#[tokio::test(start_paused = true)]
async fn a_keeper_records_its_run_from_acceptance_to_upload() {
    let mut harness = Harness::new(|config| {
        config.cancel_check_interval = Duration::from_secs(1_000_000);
        config.heartbeat_interval = Duration::from_secs(1_000_000);
    });
    let _agent = harness.connect_agent("agent-1", 1);
    let ctx = harness.ctx.clone();
    let record = record("as-1", "job-1", 1, "agent-1");
    ctx.agents
        .reserve_slot(&record.assignment_id, &record.job_id)
        .expect("a free slot");
    ctx.journal.record_assignment(&record).await.unwrap();
    let (events, events_rx) = mpsc::unbounded_channel();
    ctx.assignments.insert(record.clone(), events.clone());
    let keeper = spawn_keeper(ctx.clone(), record, events_rx, KeeperStart::Assigned);

    events.send(JobEvent::Run(RunEvent::Accepted)).unwrap();
    for phase in [Phase::Cloning, Phase::Analyzing, Phase::Gathering] {
        events.send(JobEvent::Run(RunEvent::Phase(phase))).unwrap();
    }
    let mut heartbeats = 0;
    while heartbeats < 4 {
        if let (_, Call::Heartbeat { .. }) = harness.next_call("the phase heartbeats").await {
            heartbeats += 1;
        }
    }
    let running = ctx.history.of_job("job-1").await.unwrap();
    assert_eq!(running[0].outcome, Outcome::Running);
    assert!(running[0].started_at_ms.is_some());
    assert_eq!(
        stages(&running[0]),
        [Stage::Cloning, Stage::Analyzing, Stage::Gathering]
    );

    events
        .send(JobEvent::Run(RunEvent::Finished(RunOutcome::Failed {
            message: "analyzer exited with 1".into(),
            retryable: true,
            agent_fault: false,
        })))
        .unwrap();
    tokio::time::timeout(PATIENCE, keeper)
        .await
        .expect("the keeper ends")
        .expect("no panic");
    let attempts = ctx.history.of_job("job-1").await.unwrap();
    assert_eq!(attempts.len(), 1);
    let attempt = &attempts[0];
    assert_eq!(attempt.outcome, Outcome::Retried, "the fake source retries");
    assert_eq!(attempt.error.as_deref(), Some("analyzer exited with 1"));
    assert_eq!(
        stages(attempt),
        [Stage::Cloning, Stage::Analyzing, Stage::Gathering]
    );
    assert!(attempt.ended_at_ms.is_some());
    assert!(ctx.journal.load().await.unwrap().is_empty());
}
