use std::time::Duration;

use super::*;
use crate::pb;

fn document(kind: DocumentKind) -> Document {
    Document {
        slug: "chapters/chapter_1.md".into(),
        title: "One".into(),
        kind,
        chapter_index: Some(0),
        content: "# One".into(),
    }
}

fn report(event: RunEvent) -> RunReport {
    RunReport {
        assignment_id: "as-1".into(),
        epoch: 7,
        event,
    }
}

fn round_trip_up(message: FromAgent) -> Result<FromAgent, ModelError> {
    FromAgent::try_from(pb::AgentMessage::from(message))
}

#[test]
fn messages_to_the_agent_survive_the_wire() {
    let messages = [
        ToAgent::Welcome(Welcome {
            coordinator_id: "coord".into(),
            heartbeat_interval: Duration::from_millis(1500),
        }),
        ToAgent::Assignment(Box::new(Assignment {
            assignment_id: "as-1".into(),
            job_id: "job-1".into(),
            repo_url: "https://github.com/o/r.git".into(),
            branch: "main".into(),
            prompt: "explain".into(),
            attempt: 2,
            epoch: 9,
            clone_credential: None,
        })),
        ToAgent::Assignment(Box::new(Assignment {
            assignment_id: "as-2".into(),
            job_id: "job-2".into(),
            repo_url: "https://github.com/o/private.git".into(),
            branch: "main".into(),
            prompt: "explain".into(),
            attempt: 1,
            epoch: 10,
            clone_credential: Some(CloneCredential::new("gho_secret".into())),
        })),
        ToAgent::Cancel(CancelRun {
            assignment_id: "as-1".into(),
            reason: "canceled".into(),
        }),
        ToAgent::Drain(Drain {
            reason: "operator".into(),
        }),
        ToAgent::ResultAck(ResultAck {
            assignment_id: "as-1".into(),
            accepted: false,
            message: "stale".into(),
        }),
    ];
    for message in messages {
        let wire = pb::CoordinatorMessage::from(message.clone());
        assert_eq!(ToAgent::try_from(wire), Ok(message));
    }
    assert_eq!(
        ToAgent::try_from(pb::CoordinatorMessage { kind: None }),
        Err(ModelError::MissingKind("CoordinatorMessage"))
    );
}

#[test]
fn the_clone_credential_is_redacted_in_every_debug_output() {
    let assignment = Assignment {
        assignment_id: "as-1".into(),
        job_id: "job-1".into(),
        repo_url: "https://github.com/o/private.git".into(),
        branch: "main".into(),
        prompt: "explain".into(),
        attempt: 1,
        epoch: 1,
        clone_credential: Some(CloneCredential::new("gho_secret".into())),
    };
    let model = format!("{:?}", ToAgent::Assignment(Box::new(assignment.clone())));
    let wire = format!(
        "{:?}",
        pb::CoordinatorMessage::from(ToAgent::Assignment(Box::new(assignment)))
    );
    for printed in [model, wire] {
        assert!(!printed.contains("gho_secret"), "{printed}");
        assert!(printed.contains("<redacted>"), "{printed}");
    }
}

#[test]
fn reports_survive_the_wire() {
    let hello = FromAgent::Hello(Hello {
        agent_id: "agent-1".into(),
        version: "0.1.0".into(),
        slots: 2,
        labels: [("region".to_string(), "eu".to_string())].into(),
        running: vec![HeldRun {
            assignment_id: "as-1".into(),
            job_id: "job-1".into(),
            epoch: 3,
            result_pending: true,
        }],
        unready: Some("ANALYZER_WORKDIR /app/cli is missing".into()),
        instance_id: "b7c1e0f2".into(),
    });
    let mut messages = vec![
        hello,
        FromAgent::Heartbeat {
            free_slots: 1,
            unready: None,
        },
        FromAgent::Heartbeat {
            free_slots: 0,
            unready: Some("git cannot run".into()),
        },
        FromAgent::Report(report(RunEvent::Accepted)),
        FromAgent::Report(report(RunEvent::Progress {
            step: 2,
            total_steps: 6,
            message: "relations".into(),
        })),
        FromAgent::Report(report(RunEvent::Finished(RunOutcome::Succeeded {
            document_count: 1,
            message: "1 documents generated".into(),
        }))),
        FromAgent::Report(report(RunEvent::Finished(RunOutcome::Failed {
            message: "boom".into(),
            retryable: false,
            agent_fault: false,
        }))),
        FromAgent::Report(report(RunEvent::Finished(RunOutcome::Failed {
            message: "the analyzer could not start".into(),
            retryable: true,
            agent_fault: true,
        }))),
    ];
    for phase in [Phase::Cloning, Phase::Analyzing, Phase::Gathering] {
        messages.push(FromAgent::Report(report(RunEvent::Phase(phase))));
    }
    for kind in DocumentKind::ALL {
        messages.push(FromAgent::Report(report(RunEvent::Document {
            index: 0,
            document: document(kind),
        })));
    }
    for message in messages {
        assert_eq!(round_trip_up(message.clone()), Ok(message));
    }
}

#[test]
fn malformed_reports_are_errors_mapped_to_grpc_codes() {
    let up = |kind| pb::AgentMessage { kind: Some(kind) };
    use pb::agent_message::Kind;
    let cases = [
        (pb::AgentMessage { kind: None }, "carries none"),
        (
            up(Kind::Phase(pb::PhaseChanged {
                assignment_id: "a".into(),
                epoch: 1,
                phase: 0,
            })),
            "unknown phase 0",
        ),
        (
            up(Kind::Progress(pb::StepProgress {
                assignment_id: "a".into(),
                epoch: 1,
                step: 7,
                total_steps: 6,
                message: String::new(),
            })),
            "step 7 of 6",
        ),
        (
            up(Kind::Document(pb::ResultDocument {
                assignment_id: "a".into(),
                epoch: 1,
                index: 0,
                document: None,
            })),
            "without a document",
        ),
        (
            up(Kind::Document(pb::ResultDocument {
                assignment_id: "a".into(),
                epoch: 1,
                index: 0,
                document: Some(pb::Document {
                    slug: "x.md".into(),
                    kind: 0,
                    ..Default::default()
                }),
            })),
            "no valid kind",
        ),
        (
            up(Kind::Document(pb::ResultDocument {
                assignment_id: "a".into(),
                epoch: 1,
                index: 0,
                document: Some(pb::Document {
                    slug: String::new(),
                    kind: pb::DocumentKind::Chapter as i32,
                    ..Default::default()
                }),
            })),
            "slug must be 1 to",
        ),
        (
            up(Kind::Document(pb::ResultDocument {
                assignment_id: "a".into(),
                epoch: 1,
                index: 0,
                document: Some(pb::Document {
                    slug: "chapters/a\r\u{1b}[2Kb.md".into(),
                    kind: pb::DocumentKind::Chapter as i32,
                    ..Default::default()
                }),
            })),
            "contains a control character",
        ),
        (
            up(Kind::Hello(pb::Hello {
                agent_id: "a".into(),
                protocol_version: PROTOCOL_VERSION as i32,
                ..Default::default()
            })),
            "invalid agent instance id",
        ),
        (
            up(Kind::Finished(pb::AssignmentFinished {
                assignment_id: "a".into(),
                epoch: 1,
                outcome: None,
            })),
            "without an outcome",
        ),
        (
            up(Kind::Hello(pb::Hello {
                agent_id: "a b".into(),
                protocol_version: PROTOCOL_VERSION as i32,
                ..Default::default()
            })),
            "invalid agent id",
        ),
    ];
    for (message, expected) in cases {
        let error = FromAgent::try_from(message).expect_err(expected);
        assert!(error.to_string().contains(expected), "{error}");
        assert_eq!(
            tonic::Status::from(error).code(),
            tonic::Code::InvalidArgument
        );
    }
    let old = up(Kind::Hello(pb::Hello {
        agent_id: "a".into(),
        protocol_version: 0,
        ..Default::default()
    }));
    let error = FromAgent::try_from(old).expect_err("unsupported protocol");
    assert_eq!(error, ModelError::UnsupportedProtocol(0));
    assert_eq!(
        tonic::Status::from(error).code(),
        tonic::Code::FailedPrecondition
    );
}

#[test]
fn long_texts_are_cut_on_a_character_boundary() {
    let message = "é".repeat(limits::MAX_MESSAGE_BYTES);
    let wire = pb::AgentMessage::from(report(RunEvent::Finished(RunOutcome::Succeeded {
        document_count: 0,
        message,
    })));
    let Ok(FromAgent::Report(RunReport {
        event: RunEvent::Finished(RunOutcome::Succeeded { message, .. }),
        ..
    })) = FromAgent::try_from(wire)
    else {
        panic!("a succeeded outcome");
    };
    assert_eq!(message.len(), limits::MAX_MESSAGE_BYTES);
    assert!(message.chars().all(|c| c == 'é'));
}

#[test]
fn document_kinds_have_one_name_each() {
    for kind in DocumentKind::ALL {
        assert_eq!(kind.as_str().parse::<DocumentKind>(), Ok(kind));
        let json = serde_json::to_string(&kind).expect("serializes");
        assert_eq!(json, format!("\"{}\"", kind.as_str()));
    }
    assert!("toc ".parse::<DocumentKind>().is_err());
}
