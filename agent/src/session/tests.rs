//! The session in virtual time, over in-process channels standing in for the gRPC stream.

use std::time::Duration;

use clap::Parser;
use fondation_proto::{
    model::{
        Assignment, Document, DocumentKind, Drain, FollowOutput, FromAgent, OutputStream,
        ResultAck, RunEvent, RunOutcome, RunReport, ToAgent,
    },
    pb,
};
use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::{Agent, RunEntry, SessionEnd, Shutdown, OUTPUT_MESSAGES_QUEUED};
use crate::{
    analyzer::CommandTemplate,
    config::Cli,
    output_tail::OutputTail,
    redact::Redactor,
    runner::RunnerContext,
    sandbox::{EnvAllowlist, IsolationMode, Sandbox},
};

const PATIENCE: Duration = Duration::from_secs(24 * 3600);
const HEARTBEAT: Duration = Duration::from_secs(10);

async fn agent(workspace: &std::path::Path) -> Agent {
    let config = Cli::try_parse_from(["fondation-agent"])
        .expect("default flags parse")
        .config;
    let sandbox = Sandbox::new(
        IsolationMode::Off,
        config.analyzer_uid_base,
        config.max_concurrent_jobs,
        EnvAllowlist::parse(&config.analyzer_env).expect("default ANALYZER_ENV"),
        workspace,
    )
    .expect("a sandbox without isolation");
    let ctx = RunnerContext {
        sandbox,
        template: CommandTemplate::parse(&config.analyzer_command).expect("default template"),
        allowlist: Default::default(),
        workspace_root: workspace.to_path_buf(),
        metrics: crate::metrics::AgentMetrics::new(config.max_concurrent_jobs),
        config,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a health port");
    let (health, _task) = crate::health::serve(listener, CancellationToken::new())
        .await
        .expect("the health server starts");
    let readiness = crate::self_check::Readiness::default();
    readiness.set(None);
    Agent::new(
        std::sync::Arc::new(ctx),
        "agent-1".into(),
        None,
        health,
        readiness,
    )
}

/// One session over channels: what the coordinator sends in, what the agent sends out.
struct Session {
    down: mpsc::Sender<Result<pb::CoordinatorMessage, Status>>,
    up: mpsc::Receiver<pb::AgentMessage>,
    task: JoinHandle<(Agent, SessionEnd)>,
}

fn serve(mut agent: Agent, shutdown: Shutdown) -> Session {
    let (up_tx, up) = mpsc::channel(64);
    let (down, down_rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        let end = agent
            .serve(up_tx, ReceiverStream::new(down_rx), HEARTBEAT, &shutdown)
            .await;
        (agent, end)
    });
    Session { down, up, task }
}

impl Session {
    async fn send(&self, message: ToAgent) {
        self.down
            .send(Ok(message.into()))
            .await
            .expect("the session reads its stream");
    }

    /// The next message up, heartbeats included.
    async fn next(&mut self, waiting_for: &str) -> FromAgent {
        let message = tokio::time::timeout(PATIENCE, self.up.recv())
            .await
            .unwrap_or_else(|_| panic!("nothing from the agent while waiting for {waiting_for}"))
            .expect("the session is open");
        FromAgent::try_from(message).expect("the agent sends valid messages")
    }

    /// The next run report, skipping heartbeats.
    async fn next_report(&mut self, waiting_for: &str) -> RunReport {
        loop {
            match self.next(waiting_for).await {
                FromAgent::Report(report) => return report,
                FromAgent::Heartbeat { .. } => {}
                other => panic!("unexpected {other:?} while waiting for {waiting_for}"),
            }
        }
    }

    /// Closes the coordinator's side of the stream; returns the agent once the session ended.
    async fn lose(self) -> Agent {
        drop(self.down);
        let (agent, end) = tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("the session ends when its stream closes")
            .expect("the session does not panic");
        assert!(matches!(end, SessionEnd::Lost(_)));
        agent
    }
}

/// An assignment the runner refuses at once (its repository is not allow-listed): a run that
/// ends without cloning anything.
fn doomed_assignment(id: &str) -> ToAgent {
    ToAgent::Assignment(Box::new(Assignment {
        assignment_id: id.into(),
        job_id: "job-1".into(),
        repo_url: "https://evil.example/owner/repo.git".into(),
        branch: "main".into(),
        prompt: "explain".into(),
        attempt: 1,
        epoch: 42,
        clone_credential: None,
    }))
}

fn is_failed(report: &RunReport, retryable: bool) -> bool {
    matches!(&report.event, RunEvent::Finished(RunOutcome::Failed { retryable: r, .. }) if *r == retryable)
}

#[tokio::test(start_paused = true)]
async fn a_result_is_held_across_a_lost_session_until_acknowledged() {
    let workspace = tempfile::tempdir().unwrap();
    let mut session = serve(agent(workspace.path()).await, Shutdown::default());
    session.send(doomed_assignment("as-1")).await;
    let accepted = session.next_report("the acceptance").await;
    assert_eq!(accepted.event, RunEvent::Accepted);
    assert_eq!(
        (accepted.assignment_id.as_str(), accepted.epoch),
        ("as-1", 42)
    );
    let finished = session.next_report("the end of the run").await;
    assert!(is_failed(&finished, false), "{finished:?}");

    // The coordinator went away before acknowledging: the result is held and announced.
    let agent = session.lose().await;
    let hello = agent.hello();
    assert_eq!(hello.running.len(), 1);
    assert!(hello.running[0].result_pending);
    assert_eq!(hello.running[0].epoch, 42);

    // The next session re-sends it first, and forgets it once acknowledged.
    let mut session = serve(agent, Shutdown::default());
    let resent = session.next_report("the held result").await;
    assert_eq!(resent, finished);
    session
        .send(ToAgent::ResultAck(ResultAck {
            assignment_id: "as-1".into(),
            accepted: true,
            message: String::new(),
        }))
        .await;
    // A heartbeat after the acknowledgement shows the slot free again.
    loop {
        if let FromAgent::Heartbeat { free_slots, .. } = session.next("a heartbeat").await {
            if free_slots == 1 {
                break;
            }
        }
    }
    let agent = session.lose().await;
    assert!(agent.hello().running.is_empty());
    assert!(agent.held_results().is_empty());
}

#[tokio::test(start_paused = true)]
async fn documents_sent_before_a_lost_session_go_again_before_the_runs_end() {
    let workspace = tempfile::tempdir().unwrap();
    let mut agent = agent(workspace.path()).await;
    printing_run(&mut agent, "as-1");
    let reports = agent.reports_tx.clone();
    let report = |event| RunReport {
        assignment_id: "as-1".into(),
        epoch: 42,
        event,
    };
    let document = |n: u32| {
        report(RunEvent::Document {
            index: n,
            document: Document {
                slug: format!("chapters/chapter_{n}.md"),
                title: format!("Chapter {n}"),
                kind: DocumentKind::Chapter,
                chapter_index: Some(n),
                content: format!("# Chapter {n}"),
            },
        })
    };
    let mut session = serve(agent, Shutdown::default());
    for n in 0..2 {
        reports
            .send(document(n))
            .expect("the session takes reports");
        assert_eq!(session.next_report("a document").await, document(n));
    }

    // The session is lost before the run's end (the workspace is still being removed).
    let agent = session.lose().await;
    assert_eq!(agent.held_results(), [document(0), document(1)]);
    let mut session = serve(agent, Shutdown::default());
    for n in 0..2 {
        assert_eq!(session.next_report("a re-sent document").await, document(n));
    }
    let end = report(RunEvent::Finished(RunOutcome::Succeeded {
        document_count: 2,
        message: "done".into(),
    }));
    reports
        .send(end.clone())
        .expect("the session takes reports");
    assert_eq!(session.next_report("the end").await, end);
}

#[tokio::test(start_paused = true)]
async fn heartbeats_go_out_at_the_interval_the_coordinator_asked_for() {
    let workspace = tempfile::tempdir().unwrap();
    let mut session = serve(agent(workspace.path()).await, Shutdown::default());
    let start = Instant::now();
    for beat in 0..3u32 {
        let message = session.next("a heartbeat").await;
        assert_eq!(
            message,
            FromAgent::Heartbeat {
                free_slots: 1,
                unready: None
            }
        );
        assert_eq!(start.elapsed(), HEARTBEAT * beat);
    }
    session.lose().await;
}

#[tokio::test(start_paused = true)]
async fn a_draining_agent_refuses_new_assignments_for_retry() {
    let workspace = tempfile::tempdir().unwrap();
    let mut session = serve(agent(workspace.path()).await, Shutdown::default());
    session
        .send(ToAgent::Drain(Drain {
            reason: "test".into(),
        }))
        .await;
    session.send(doomed_assignment("as-2")).await;
    let refused = session.next_report("the refusal").await;
    assert_eq!(refused.assignment_id, "as-2");
    assert!(is_failed(&refused, true), "{refused:?}");
    let agent = session.lose().await;
    assert!(
        agent.hello().running.is_empty(),
        "a refused assignment is not held"
    );
}

#[tokio::test(start_paused = true)]
async fn a_drained_agent_with_nothing_running_ends_its_session_cleanly() {
    let workspace = tempfile::tempdir().unwrap();
    let shutdown = Shutdown::default();
    let session = serve(agent(workspace.path()).await, shutdown.clone());
    shutdown.drain.cancel();
    let (_agent, end) = tokio::time::timeout(PATIENCE, session.task)
        .await
        .expect("the session ends")
        .expect("no panic");
    assert!(matches!(end, SessionEnd::Done));
}

/// A run of the agent that prints what the test pushes into its tail; no runner behind it.
fn printing_run(agent: &mut Agent, assignment_id: &str) -> OutputTail {
    let output = OutputTail::new(Redactor::default(), agent.output_ready.clone());
    agent.runs.insert(
        assignment_id.into(),
        RunEntry {
            job_id: "job-1".into(),
            epoch: 42,
            cancel: CancellationToken::new(),
            result: None,
            partial: Vec::new(),
            timer: agent.ctx.metrics.run_started(),
            output: output.clone(),
        },
    );
    output
}

fn print(output: &OutputTail, lines: std::ops::Range<u64>) {
    for n in lines {
        output.push(OutputStream::Stdout, &format!("line {n}"));
    }
}

fn follow(assignment_id: &str, follow: bool) -> ToAgent {
    ToAgent::FollowOutput(FollowOutput {
        assignment_id: assignment_id.into(),
        epoch: 42,
        follow,
    })
}

/// The `seq`s of an `Output` report.
fn output_seqs(report: &RunReport) -> Vec<u64> {
    match &report.event {
        RunEvent::Output(lines) => lines.iter().map(|line| line.seq).collect(),
        other => panic!("expected output lines, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn output_goes_up_while_followed_and_the_rest_before_the_runs_end() {
    let workspace = tempfile::tempdir().unwrap();
    let mut agent = agent(workspace.path()).await;
    let output = printing_run(&mut agent, "as-1");
    let reports = agent.reports_tx.clone();
    print(&output, 0..3);
    let mut session = serve(agent, Shutdown::default());
    // Two heartbeats and nothing else: lines stay on the agent while nobody follows.
    for _ in 0..2 {
        let message = session.next("a heartbeat").await;
        assert!(
            matches!(message, FromAgent::Heartbeat { .. }),
            "{message:?}"
        );
    }

    // Followed: the kept tail first, then new lines, at most 200 to a message.
    session.send(follow("as-1", true)).await;
    let tail = session.next_report("the kept tail").await;
    assert_eq!(output_seqs(&tail), [0, 1, 2]);
    print(&output, 3..253);
    let mut seen = Vec::new();
    while seen.len() < 250 {
        let batch = output_seqs(&session.next_report("new lines").await);
        assert!(batch.len() <= 200, "{} lines in one message", batch.len());
        seen.extend(batch);
    }
    assert_eq!(seen, (3..253).collect::<Vec<_>>());

    // Not followed any more: the last lines go once, right before the run's end.
    session.send(follow("as-1", false)).await;
    print(&output, 253..255);
    reports
        .send(RunReport {
            assignment_id: "as-1".into(),
            epoch: 42,
            event: RunEvent::Finished(RunOutcome::Succeeded {
                document_count: 0,
                message: "done".into(),
            }),
        })
        .expect("the session takes reports");
    let last = session.next_report("the unsent tail").await;
    assert_eq!(output_seqs(&last), [253, 254]);
    let finished = session.next_report("the end").await;
    assert!(matches!(finished.event, RunEvent::Finished(_)));

    // Held with the result: a new session sends both again, in order.
    let agent = session.lose().await;
    let held = agent.held_results();
    assert_eq!(held.len(), 2);
    assert_eq!(held[0], last);
    assert_eq!(held[1], finished);
}

#[tokio::test(start_paused = true)]
async fn a_flood_the_stream_cannot_take_is_dropped_not_queued() {
    let workspace = tempfile::tempdir().unwrap();
    let mut agent = agent(workspace.path()).await;
    let output = printing_run(&mut agent, "as-1");
    let mut session = serve(agent, Shutdown::default());
    session.send(follow("as-1", true)).await;
    // Two floods while nobody reads the stream.
    const FLOOD: u64 = 5000;
    print(&output, 0..FLOOD);
    tokio::time::sleep(HEARTBEAT * 3).await;
    print(&output, FLOOD..2 * FLOOD);
    tokio::time::sleep(HEARTBEAT * 3).await;
    let mut queued = Vec::new();
    while let Ok(message) = session.up.try_recv() {
        queued.push(FromAgent::try_from(message).expect("valid"));
    }
    let outputs: Vec<Vec<u64>> = queued
        .iter()
        .filter_map(|message| match message {
            FromAgent::Report(report) => Some(output_seqs(report)),
            _ => None,
        })
        .collect();
    assert!(
        outputs.len() <= OUTPUT_MESSAGES_QUEUED + 1,
        "{} output messages queued while the stream was stuck",
        outputs.len()
    );
    // Reading again: the lines the tail still has come, in order; the rest is a gap.
    let mut seen: Vec<u64> = outputs.into_iter().flatten().collect();
    while seen.last() != Some(&(2 * FLOOD - 1)) {
        seen.extend(output_seqs(
            &session.next_report("the rest of the tail").await,
        ));
    }
    assert!(
        seen.windows(2).all(|pair| pair[0] < pair[1]),
        "in order, each once"
    );
    let tail = fondation_proto::limits::OUTPUT_TAIL_LINES;
    assert!(
        seen.len() <= 2 * tail,
        "{} lines arrived of {}: the tail bounds what is held",
        seen.len(),
        2 * FLOOD
    );
    assert_eq!(
        seen[seen.len() - tail..],
        (2 * FLOOD - tail as u64..2 * FLOOD).collect::<Vec<_>>(),
        "the last lines all arrive"
    );
    session.lose().await;
}
