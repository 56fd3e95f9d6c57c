//! The gateway over a real loopback connection: what a malformed or out-of-order message gets.

use std::time::Duration;

use fondation_proto::{
    model::{FromAgent, Hello, OutputLine, OutputStream, RunEvent, RunReport, ToAgent},
    pb::{
        self, agent_gateway_client::AgentGatewayClient, agent_gateway_server::AgentGatewayServer,
    },
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::Code;

use super::Gateway;
use crate::testing::Harness;

const DEADLINE: Duration = Duration::from_secs(10);

fn hello() -> pb::AgentMessage {
    hello_of("instance-1", 1)
}

fn hello_of(instance_id: &str, slots: u32) -> pb::AgentMessage {
    FromAgent::Hello(Hello {
        agent_id: "agent-1".into(),
        version: "test".into(),
        slots,
        labels: Default::default(),
        running: Vec::new(),
        unready: None,
        instance_id: instance_id.into(),
    })
    .into()
}

async fn welcomed(inbound: &mut tonic::Streaming<pb::CoordinatorMessage>) {
    let welcome = tokio::time::timeout(DEADLINE, inbound.message())
        .await
        .expect("a Welcome within 10 s")
        .expect("no error")
        .expect("a message");
    assert!(matches!(
        ToAgent::try_from(welcome),
        Ok(ToAgent::Welcome(_))
    ));
}

/// Serves the gateway on a loopback port and opens a session that first sends `first`.
async fn open(
    harness: &Harness,
    first: pb::AgentMessage,
) -> (
    mpsc::Sender<pb::AgentMessage>,
    Result<tonic::Streaming<pb::CoordinatorMessage>, tonic::Status>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("a port");
    let address = listener.local_addr().expect("its address");
    let service = AgentGatewayServer::new(Gateway::new(harness.ctx.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let mut client = AgentGatewayClient::connect(format!("http://{address}"))
        .await
        .expect("the gateway accepts connections");
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.expect("queued");
    let response = tokio::time::timeout(DEADLINE, client.session(ReceiverStream::new(rx)))
        .await
        .expect("the gateway answers the session within 10 s");
    (tx, response.map(tonic::Response::into_inner))
}

#[tokio::test]
async fn a_malformed_report_ends_the_session_with_invalid_argument() {
    let harness = Harness::new(|_| {});
    let (tx, inbound) = open(&harness, hello()).await;
    let mut inbound = inbound.expect("the session opens");
    let welcome = tokio::time::timeout(DEADLINE, inbound.message())
        .await
        .expect("a Welcome within 10 s")
        .expect("no error")
        .expect("a message");
    assert!(matches!(
        ToAgent::try_from(welcome),
        Ok(ToAgent::Welcome(_))
    ));
    assert_eq!(harness.ctx.agents.free_slots(), 1);

    let out_of_range = pb::AgentMessage {
        kind: Some(pb::agent_message::Kind::Progress(pb::StepProgress {
            assignment_id: "as-1".into(),
            epoch: 1,
            step: 9,
            total_steps: 6,
            message: String::new(),
        })),
    };
    tx.send(out_of_range).await.expect("queued");
    let status = tokio::time::timeout(DEADLINE, inbound.message())
        .await
        .expect("the session ends within 10 s")
        .expect_err("the session ends with an error status");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("step 9 of 6"), "{status:?}");
    assert_eq!(
        harness.ctx.agents.free_slots(),
        0,
        "the agent is disconnected"
    );
}

#[tokio::test]
async fn a_session_must_start_with_a_supported_hello() {
    let harness = Harness::new(|_| {});
    let mut old = hello();
    if let Some(pb::agent_message::Kind::Hello(hello)) = &mut old.kind {
        hello.protocol_version = 0;
    }
    let (_tx, response) = open(&harness, old).await;
    let status = response.expect_err("an old protocol is refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    let heartbeat: pb::AgentMessage = FromAgent::Heartbeat {
        free_slots: 1,
        unready: None,
    }
    .into();
    let (_tx, response) = open(&harness, heartbeat).await;
    let status = response.expect_err("a session must start with Hello");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("first message must be Hello"));
}

#[tokio::test]
async fn another_instance_is_refused_and_the_same_instance_replaces_its_session() {
    let harness = Harness::new(|_| {});
    let (_first_tx, first) = open(&harness, hello_of("instance-1", 1)).await;
    let mut first = first.expect("the first session opens");
    welcomed(&mut first).await;

    let (_tx, refused) = open(&harness, hello_of("instance-2", 3)).await;
    let status = refused.expect_err("another process with the same id is refused");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert!(
        status.message().contains("held by another live agent")
            && status
                .message()
                .contains("give each agent its own AGENT_ID"),
        "{status:?}"
    );
    let agents = harness.ctx.agents.snapshot();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].description.instance_id, "instance-1");
    assert_eq!(
        harness.ctx.agents.free_slots(),
        1,
        "the first keeps its slot"
    );

    // The same process reconnecting (its old stream half-open) replaces its session.
    let (_again_tx, again) = open(&harness, hello_of("instance-1", 2)).await;
    let mut again = again.expect("a reconnect of the same instance is welcome");
    welcomed(&mut again).await;
    assert_eq!(harness.ctx.agents.free_slots(), 2);

    let (_tx, slots) = open(&harness, hello_of("instance-1", 65)).await;
    let status = slots.expect_err("more slots than MAX_AGENT_SLOTS");
    assert!(status.message().contains("MAX_AGENT_SLOTS"), "{status:?}");
}

#[tokio::test]
async fn output_lines_go_to_the_job_logs_and_a_stale_runs_are_refused() {
    let harness = Harness::new(|_| {});
    let ctx = &harness.ctx;
    let (tx, inbound) = open(&harness, hello()).await;
    let mut inbound = inbound.expect("the session opens");
    welcomed(&mut inbound).await;
    let record = crate::assignments::AssignmentRecord {
        assignment_id: "as-1".into(),
        job_id: "job-1".into(),
        epoch: 5,
        attempt: 1,
        agent_id: "agent-1".into(),
    };
    let (events, _events_rx) = mpsc::unbounded_channel();
    ctx.assignments.insert(record.clone(), events);
    ctx.job_logs.run_started(&record);

    let output = |epoch: u64, text: &str| -> pb::AgentMessage {
        FromAgent::Report(RunReport {
            assignment_id: "as-1".into(),
            epoch,
            event: RunEvent::Output(vec![OutputLine {
                seq: 0,
                stream: OutputStream::Stdout,
                text: text.into(),
            }]),
        })
        .into()
    };
    tx.send(output(5, "kept")).await.expect("queued");
    // A stale epoch is refused like any other report: the agent is told to stop that run.
    tx.send(output(4, "stale")).await.expect("queued");
    let refusal = tokio::time::timeout(DEADLINE, inbound.message())
        .await
        .expect("an answer within 10 s")
        .expect("no error")
        .expect("a message");
    assert!(
        matches!(ToAgent::try_from(refusal), Ok(ToAgent::Cancel(cancel)) if cancel.assignment_id == "as-1"),
        "a stale run's lines are refused"
    );
    // Reports are handled in order: the first was kept before the refusal went out.
    let logs = crate::job_logs::JobLogs::read(ctx, "job-1", 10, false)
        .await
        .expect("read");
    let texts: Vec<&str> = logs.lines.iter().map(|line| line.text.as_str()).collect();
    assert_eq!(texts, ["kept"]);
}
