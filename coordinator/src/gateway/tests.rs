//! The gateway over a real loopback connection: what a malformed or out-of-order message gets.

use std::time::Duration;

use fondation_proto::{
    model::{FromAgent, Hello, ToAgent},
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
    FromAgent::Hello(Hello {
        agent_id: "agent-1".into(),
        version: "test".into(),
        slots: 1,
        labels: Default::default(),
        running: Vec::new(),
        unready: None,
    })
    .into()
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
