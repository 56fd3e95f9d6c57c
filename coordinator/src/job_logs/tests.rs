//! The job logs against a real database file: what is kept live and stored, the bounds, and the
//! followers with the `FollowOutput` messages they cause.

use std::sync::Arc;

use fondation_proto::model::{FollowOutput, OutputLine, OutputStream, ToAgent};
use tokio::sync::mpsc;

use super::{load, JobLogs, LogLimits, LogLine, LogStream};
use crate::{
    assignments::AssignmentRecord,
    database::Database,
    testing::{next_message, Harness},
};

const AGENT: &str = "agent-1";

fn record(job_id: &str, attempt: u32) -> AssignmentRecord {
    AssignmentRecord {
        assignment_id: format!("as-{job_id}-{attempt}"),
        job_id: job_id.into(),
        epoch: 7,
        attempt,
        agent_id: AGENT.into(),
    }
}

fn lines(seqs: impl IntoIterator<Item = u64>) -> Vec<OutputLine> {
    seqs.into_iter()
        .map(|seq| OutputLine {
            seq,
            stream: if seq % 2 == 0 {
                OutputStream::Stdout
            } else {
                OutputStream::Stderr
            },
            text: format!("line {seq}"),
        })
        .collect()
}

fn seqs(lines: &[LogLine]) -> Vec<(u32, u64)> {
    lines.iter().map(|line| (line.attempt, line.seq)).collect()
}

async fn stored(db: &Database, job_id: &str) -> Vec<LogLine> {
    let job_id = job_id.to_owned();
    db.run(move |conn| load(conn, &job_id))
        .await
        .expect("the stored lines load")
}

fn small(limits: LogLimits) -> (tempfile::TempDir, Database, JobLogs) {
    let dir = tempfile::tempdir().expect("a temporary folder");
    let db = Database::open(dir.path()).expect("the database opens");
    let logs = JobLogs::with_limits(db.clone(), limits);
    (dir, db, logs)
}

/// Limits that do not get in the way, adjusted by the test.
fn roomy() -> LogLimits {
    LogLimits {
        job_lines: 1000,
        job_bytes: 1 << 20,
        total_bytes: 1 << 30,
        max_jobs: 1000,
    }
}

#[tokio::test]
async fn a_runs_last_lines_are_stored_at_its_end_without_repeats_or_control_characters() {
    let (_dir, db, logs) = small(LogLimits {
        job_lines: 5,
        ..roomy()
    });
    let run = record("job-1", 1);
    logs.run_started(&run);
    logs.append(&run.assignment_id, lines(0..5));
    // A tail sent again after a reconnect: 3 and 4 are repeats.
    logs.append(&run.assignment_id, lines(3..8));
    logs.append(
        &run.assignment_id,
        vec![OutputLine {
            seq: 8,
            stream: OutputStream::Stdout,
            text: "\u{1b}[2Kforged\rclone https://user:token@example.com/r.git".into(),
        }],
    );
    // Nothing is kept for an assignment that is not running.
    logs.append("as-unknown", lines(0..3));
    assert!(logs.is_running("job-1"));
    assert!(
        stored(&db, "job-1").await.is_empty(),
        "stored at the end only"
    );

    logs.run_ended(&run.assignment_id).await;
    assert!(!logs.is_running("job-1"));
    let kept = stored(&db, "job-1").await;
    assert_eq!(
        seqs(&kept),
        [(1, 4), (1, 5), (1, 6), (1, 7), (1, 8)],
        "the last five, each once"
    );
    assert_eq!(kept[0].stream, LogStream::Stdout);
    assert_eq!(kept[1].stream, LogStream::Stderr);
    assert_eq!(kept[4].text, "[2Kforgedclone https://***@example.com/r.git");
    assert!(stored(&db, "as-unknown").await.is_empty());
}

#[tokio::test]
async fn long_lines_are_bounded_by_bytes() {
    let (_dir, db, logs) = small(LogLimits {
        job_bytes: 20,
        ..roomy()
    });
    let run = record("job-1", 1);
    logs.run_started(&run);
    // "line N" is 6 bytes: three fit in 20.
    logs.append(&run.assignment_id, lines(0..10));
    logs.run_ended(&run.assignment_id).await;
    assert_eq!(seqs(&stored(&db, "job-1").await), [(1, 7), (1, 8), (1, 9)]);
}

#[tokio::test]
async fn attempts_follow_each_other_and_the_oldest_jobs_go_first() {
    let (_dir, db, logs) = small(LogLimits {
        job_lines: 4,
        max_jobs: 2,
        ..roomy()
    });
    for attempt in 1..=2 {
        let run = record("job-a", attempt);
        logs.run_started(&run);
        logs.append(&run.assignment_id, lines(0..3));
        logs.run_ended(&run.assignment_id).await;
    }
    assert_eq!(
        seqs(&stored(&db, "job-a").await),
        [(1, 2), (2, 0), (2, 1), (2, 2)],
        "the job's last four lines, across its attempts"
    );

    for job in ["job-b", "job-c"] {
        let run = record(job, 1);
        logs.run_started(&run);
        logs.append(&run.assignment_id, lines(0..1));
        logs.run_ended(&run.assignment_id).await;
    }
    assert!(
        stored(&db, "job-a").await.is_empty(),
        "two jobs are kept: the first to end went"
    );
    assert_eq!(stored(&db, "job-b").await.len(), 1);
    assert_eq!(stored(&db, "job-c").await.len(), 1);

    // The byte bound (about 80 bytes of JSON per line): job-d fits, job-d and job-c do not.
    let (_dir, db, logs) = small(LogLimits {
        total_bytes: 400,
        ..roomy()
    });
    for (job, count) in [("job-b", 2), ("job-c", 2), ("job-d", 3)] {
        let run = record(job, 1);
        logs.run_started(&run);
        logs.append(&run.assignment_id, lines(0..count));
        logs.run_ended(&run.assignment_id).await;
    }
    assert!(stored(&db, "job-b").await.is_empty());
    assert!(stored(&db, "job-c").await.is_empty());
    assert_eq!(stored(&db, "job-d").await.len(), 3);
}

fn follow_output(run: &AssignmentRecord, follow: bool) -> ToAgent {
    ToAgent::FollowOutput(FollowOutput {
        assignment_id: run.assignment_id.clone(),
        epoch: run.epoch,
        follow,
    })
}

fn nothing_sent(agent: &mut mpsc::Receiver<ToAgent>) {
    assert!(
        agent.try_recv().is_err(),
        "no message to the agent expected"
    );
}

#[tokio::test]
async fn followers_start_and_stop_the_agents_forwarding_and_end_with_the_run() {
    let harness = Harness::new(|_| {});
    let ctx = &harness.ctx;
    let mut agent = harness.connect_agent(AGENT, 1);
    let run = record("job-1", 1);
    ctx.job_logs.run_started(&run);
    ctx.job_logs.append(&run.assignment_id, lines(0..3));

    // Without follow: the tail, and the agent is left alone.
    let logs = JobLogs::read(ctx, "job-1", 2, false).await.expect("read");
    assert_eq!(seqs(&logs.lines), [(1, 1), (1, 2)]);
    assert!(logs.follow.is_none());
    nothing_sent(&mut agent);

    let first = JobLogs::read(ctx, "job-1", 100, true).await.expect("read");
    assert_eq!(first.lines.len(), 3);
    let mut first = first.follow.expect("a running job can be followed");
    assert_eq!(
        next_message(&mut agent, "the first follower").await,
        follow_output(&run, true)
    );
    let mut second = JobLogs::read(ctx, "job-1", 0, true)
        .await
        .expect("read")
        .follow
        .expect("a second follower");
    nothing_sent(&mut agent);

    ctx.job_logs.append(&run.assignment_id, lines(3..5));
    for follower in [&mut first, &mut second] {
        assert_eq!(follower.next().await.expect("a line").seq, 3);
        assert_eq!(follower.next().await.expect("a line").seq, 4);
    }

    drop(second);
    nothing_sent(&mut agent);
    drop(first);
    assert_eq!(
        next_message(&mut agent, "the last follower leaving").await,
        follow_output(&run, false)
    );

    // A follower of a run whose agent re-attached: the new session is told again.
    let mut again = JobLogs::read(ctx, "job-1", 0, true)
        .await
        .expect("read")
        .follow
        .expect("a follower");
    assert_eq!(
        next_message(&mut agent, "a new follower").await,
        follow_output(&run, true)
    );
    JobLogs::agent_back(ctx, &run.assignment_id);
    assert_eq!(
        next_message(&mut agent, "the agent re-attached").await,
        follow_output(&run, true)
    );

    // The run's end ends the stream, after the lines sent before it.
    ctx.job_logs.append(&run.assignment_id, lines(5..6));
    ctx.job_logs.run_ended(&run.assignment_id).await;
    assert_eq!(again.next().await.expect("the last line").seq, 5);
    assert!(again.next().await.is_none(), "the stream ends with the run");
    drop(again);
    nothing_sent(&mut agent);

    // Ended: the stored lines, and nothing to follow.
    let logs = JobLogs::read(ctx, "job-1", 100, true).await.expect("read");
    assert_eq!(
        seqs(&logs.lines),
        (0..6).map(|seq| (1, seq)).collect::<Vec<_>>()
    );
    assert!(logs.follow.is_none());

    // The next attempt's live lines come after the stored ones.
    let retry = record("job-1", 2);
    ctx.job_logs.run_started(&retry);
    ctx.job_logs.append(&retry.assignment_id, lines(0..2));
    let logs = JobLogs::read(ctx, "job-1", 3, false).await.expect("read");
    assert_eq!(seqs(&logs.lines), [(1, 5), (2, 0), (2, 1)]);
}

#[tokio::test]
async fn a_slow_follower_skips_lines_rather_than_holding_a_flood() {
    let harness = Harness::new(|_| {});
    let ctx = Arc::clone(&harness.ctx);
    let _agent = harness.connect_agent(AGENT, 1);
    let run = record("job-1", 1);
    ctx.job_logs.run_started(&run);
    let mut follower = JobLogs::read(&ctx, "job-1", 0, true)
        .await
        .expect("read")
        .follow
        .expect("a follower");
    let flood = 3 * super::FOLLOW_BUFFER_LINES as u64;
    for start in (0..flood).step_by(100) {
        ctx.job_logs
            .append(&run.assignment_id, lines(start..start + 100));
    }
    let first = follower.next().await.expect("a line").seq;
    assert!(
        first >= flood - super::FOLLOW_BUFFER_LINES as u64,
        "the oldest lines were skipped, at most a buffer's worth is held: first {first}"
    );
    let mut expected = first + 1;
    while expected < flood {
        assert_eq!(follower.next().await.expect("a line").seq, expected);
        expected += 1;
    }
}
