//! `ConvexSource` against the fake Convex deployment, in process: the queue round trip, the wire
//! format Convex insists on, and the failure paths (retries, lost replies, lost leases, cancels,
//! limits).

use std::{path::Path, time::Duration};

use fondation_coordinator::job_source::{
    convex::{ConvexConfig, ConvexSource},
    ActiveStatus, Document, DocumentKind, FailOutcome, JobQuery, JobResult, JobSource,
    JobSourceError, JobStatus, NewJob, ProgressUpdate, RepoTarget,
};
use fondation_testkit::fake_convex::{
    self, AuthSeen, CallOutcome, CallRecord, FakeConvexClient, FakeConvexHandle, FakeOptions,
    FaultKind, FaultSpec,
};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const WORKER: &str = "coordinator-test";
const LEASE: Duration = Duration::from_secs(300);

struct Harness {
    fake: FakeConvexHandle,
    admin: FakeConvexClient,
    source: ConvexSource,
}

async fn start(options: FakeOptions) -> Harness {
    start_with(options, |_| {}).await
}

async fn start_with(options: FakeOptions, configure: impl FnOnce(&mut ConvexConfig)) -> Harness {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
    let fake = fake_convex::spawn(listener, options).await;
    let mut config = ConvexConfig::new(fake.url());
    config.request_timeout = Duration::from_secs(2);
    config.retry_budget = Duration::from_secs(10);
    configure(&mut config);
    let source = ConvexSource::new(config).expect("valid config");
    Harness {
        admin: fake.client(),
        fake,
        source,
    }
}

impl Harness {
    async fn enqueue(&self, full_name: &str, branch: Option<&str>) -> String {
        let repository = self
            .admin
            .create_repository(full_name, branch)
            .await
            .expect("create repository");
        self.admin
            .create_job(&repository, "analyze it")
            .await
            .expect("create job")
    }

    async fn claim(&self) -> fondation_coordinator::job_source::ClaimedJob {
        self.source
            .claim(WORKER, LEASE)
            .await
            .expect("claim succeeds")
            .expect("a job is pending")
    }

    async fn calls(&self) -> Vec<CallRecord> {
        self.admin.calls().await.expect("read calls")
    }

    async fn calls_of(&self, path: &str) -> Vec<CallRecord> {
        self.calls()
            .await
            .into_iter()
            .filter(|call| call.path.as_deref() == Some(path))
            .collect()
    }

    async fn assert_no_rejected_calls(&self) {
        let rejected: Vec<_> = self
            .calls()
            .await
            .into_iter()
            .filter(|call| call.rejected)
            .collect();
        assert!(rejected.is_empty(), "rejected calls: {rejected:#?}");
    }

    async fn assert_no_violations(&self) {
        let violations = self.admin.violations().await.expect("read violations");
        assert!(violations.is_empty(), "violations: {violations:?}");
    }
}

fn document(slug: &str, kind: DocumentKind, content: String) -> Document {
    Document {
        slug: slug.to_owned(),
        title: slug.to_owned(),
        kind,
        chapter_index: None,
        content,
    }
}

/// The fixture output tree as documents (YAML kept as text: converting it is not this test's job).
fn fixture_documents() -> Vec<Document> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/claude-tutorial-output");
    let mut documents = Vec::new();
    for (folder, kind, prefix) in [
        ("chapters", DocumentKind::Chapter, ""),
        ("reviewed-chapters", DocumentKind::Chapter, "Reviewed: "),
        ("tutorials", DocumentKind::Tutorial, "Tutorial: "),
    ] {
        let mut names: Vec<String> = std::fs::read_dir(root.join(folder))
            .expect("fixture folder")
            .map(|entry| {
                entry
                    .expect("entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        names.sort();
        for (index, name) in names.iter().enumerate() {
            let content = std::fs::read_to_string(root.join(folder).join(name)).expect("read");
            documents.push(Document {
                slug: format!("{folder}/{name}"),
                title: format!("{prefix}{name}"),
                kind,
                chapter_index: Some(u32::try_from(index).expect("small")),
                content,
            });
        }
    }
    for name in [
        "step1_abstractions.yaml",
        "step2_relationships.yaml",
        "step3_order.yaml",
    ] {
        let content = std::fs::read_to_string(root.join(name)).expect("read yaml");
        documents.push(document(name, DocumentKind::Yaml, content));
    }
    documents
}

fn result_with(documents: Vec<Document>) -> JobResult {
    JobResult {
        run_id: "run-1".to_owned(),
        message: "analysis complete".to_owned(),
        documents,
    }
}

fn contains_null(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Array(items) => items.iter().any(contains_null),
        Value::Object(object) => object.values().any(contains_null),
        _ => false,
    }
}

#[tokio::test]
async fn claim_heartbeat_complete_round_trip_with_documents() {
    let h = start(FakeOptions::fast()).await;
    let job_id = h.enqueue("octo-org/hello.world", Some("develop")).await;

    let claimed = h.claim().await;
    assert_eq!(claimed.id, job_id);
    assert_eq!(claimed.attempt, 1);
    assert_eq!(claimed.prompt, "analyze it");
    assert_eq!(
        claimed.target,
        Ok(RepoTarget {
            url: "https://github.com/octo-org/hello.world.git".to_owned(),
            branch: "develop".to_owned(),
            credential: None,
        })
    );
    assert!(h
        .source
        .claim(WORKER, LEASE)
        .await
        .expect("claim")
        .is_none());

    let update = ProgressUpdate {
        status: Some(ActiveStatus::Analyzing),
        progress: Some("Generating chapter content".to_owned()),
        current_step: Some(4),
    };
    h.source
        .heartbeat(&job_id, WORKER, &update, LEASE)
        .await
        .expect("heartbeat");
    let job = h.admin.job(&job_id).await.expect("job").expect("exists");
    assert_eq!(job.status, "analyzing");
    assert_eq!(job.progress.as_deref(), Some("Generating chapter content"));
    assert_eq!(job.current_step, Some(4.0));

    let documents = fixture_documents();
    assert_eq!(documents.len(), 36);
    h.source
        .complete(&job_id, WORKER, &result_with(documents.clone()))
        .await
        .expect("complete");

    let job = h.admin.job(&job_id).await.expect("job").expect("exists");
    assert_eq!(job.status, "completed");
    assert_eq!(job.locked_by, None);
    assert_eq!(job.docs_count, Some(36.0));
    assert_eq!(
        job.result,
        Some(json!({"success": true, "message": "analysis complete"}))
    );
    let stored = h.admin.docs(&job_id).await.expect("docs");
    assert_eq!(stored.len(), 36);
    for sent in &documents {
        let found = stored
            .iter()
            .find(|doc| doc.slug == sent.slug)
            .unwrap_or_else(|| panic!("{} stored", sent.slug));
        // Stored as the deployment normalizes Markdown (YAML as sent).
        let expected = match sent.kind {
            DocumentKind::Yaml => sent.content.clone(),
            _ => fake_convex::normalize_markdown(&sent.content),
        };
        assert_eq!(found.content, expected);
        assert_eq!(found.kind, sent.kind.as_str());
        assert_eq!(found.run_id.as_deref(), Some("run-1"));
    }
    let upserts = h.calls_of("docs:upsertFromJob").await;
    assert_eq!(upserts.len(), 1, "one upsert per job");
    assert_eq!(
        upserts[0].args["summary"]["chaptersCount"].as_f64(),
        Some(11.0),
        "reviewed chapters are not counted twice"
    );
    assert_eq!(
        upserts[0].args["summary"]["tutorialsCount"].as_f64(),
        Some(11.0)
    );

    let view = h
        .source
        .get_job(&job_id, false)
        .await
        .expect("get_job")
        .expect("exists");
    assert_eq!(view.status, JobStatus::Completed);
    assert_eq!(view.locked_by, None);

    h.assert_no_rejected_calls().await;
    h.assert_no_violations().await;
    for call in h.calls().await {
        let client = call.client.unwrap_or_default();
        assert!(
            client.starts_with("fondation-coordinator-")
                || client.starts_with("fondation-testkit-"),
            "Convex-Client {client:?}"
        );
    }
    h.fake.shutdown().await.expect("fake stops");
}

#[tokio::test]
async fn optional_fields_are_omitted_never_null() {
    let h = start(FakeOptions::fast()).await;
    let job_id = h.enqueue("octo/repo", None).await;
    let claimed = h.claim().await;
    assert_eq!(claimed.target.expect("target").branch, "main");
    h.source
        .heartbeat(&job_id, WORKER, &ProgressUpdate::default(), LEASE)
        .await
        .expect("heartbeat");

    let heartbeats = h.calls_of("queue:heartbeat").await;
    let keys: Vec<&String> = heartbeats[0]
        .args
        .as_object()
        .expect("object args")
        .keys()
        .collect();
    assert_eq!(keys, ["jobId", "leaseMs", "workerId"]);
    for call in h.calls().await {
        assert!(!contains_null(&call.args), "null sent in {call:?}");
    }
    h.assert_no_rejected_calls().await;
}

#[tokio::test]
async fn fake_rejects_null_optionals_and_extra_fields_like_convex() {
    let h = start(FakeOptions::default()).await;
    let body = json!({"path": "queue:claimOne", "format": "convex_encoded_json",
                      "args": {"workerId": "w", "leaseMs": null}});
    let (status, reply) = h.admin.raw("mutation", &body).await.expect("post");
    assert_eq!(status, 560);
    assert_eq!(reply["status"], "error");
    let message = reply["errorMessage"].as_str().expect("message");
    assert!(
        message.contains(
            "ArgumentValidationError: Value does not match validator.\nPath: .leaseMs\nValue: \
             null\nValidator: v.optional(v.float64())"
        ),
        "{message}"
    );

    let body = json!({"path": "queue:claimOne", "args": {"workerId": "w", "foo": 1}});
    let (_, reply) = h.admin.raw("mutation", &body).await.expect("post");
    let message = reply["errorMessage"].as_str().expect("message");
    assert!(
        message.contains(
            "ArgumentValidationError: Object contains extra field `foo` that is not in the \
             validator."
        ),
        "{message}"
    );

    let body = json!({"path": "jobs:getJob", "args": {"jobId": "not-an-id"}});
    let (_, reply) = h.admin.raw("query", &body).await.expect("post");
    assert!(reply["errorMessage"]
        .as_str()
        .is_some_and(|message| message.contains("Validator: v.id(\"jobs\")")));

    let body = json!({"path": "queue:nope", "args": {}});
    let (_, reply) = h.admin.raw("mutation", &body).await.expect("post");
    assert!(
        reply["errorMessage"].as_str().is_some_and(
            |message| message.contains("Could not find public function for 'queue:nope'")
        )
    );

    // The legacy one-element array form is accepted.
    let body = json!({"path": "queue:claimOne", "args": [{"workerId": "w"}]});
    let (status, reply) = h.admin.raw("mutation", &body).await.expect("post");
    assert_eq!((status, reply["status"].as_str()), (200, Some("success")));

    // A request without Convex-Client is a request error.
    let response = reqwest::Client::new()
        .post(format!("{}/api/mutation", h.fake.url()))
        .json(&json!({"path": "queue:claimOne", "args": {"workerId": "w"}}))
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 400);
    let reply: Value = response.json().await.expect("json");
    assert_eq!(reply["code"], "BadRequest");

    let calls = h.calls().await;
    let rejected: Vec<bool> = calls.iter().map(|call| call.rejected).collect();
    assert_eq!(rejected, [true, true, true, true, false, true]);
}

#[tokio::test]
async fn transient_errors_are_retried_within_the_budget() {
    let h = start(FakeOptions::fast()).await;
    let job_id = h.enqueue("octo/repo", None).await;
    h.admin
        .add_fault(
            FaultSpec::new(FaultKind::HttpError)
                .path("jobs:getJob")
                .count(3),
        )
        .await
        .expect("fault");
    h.admin
        .add_fault(FaultSpec::new(FaultKind::DropConnection).path("repositories:getByRepositoryId"))
        .await
        .expect("fault");
    let view = h.source.get_job(&job_id, false).await.expect("get_job");
    assert_eq!(view.expect("exists").status, JobStatus::Pending);
    let outcomes: Vec<CallOutcome> = h
        .calls_of("jobs:getJob")
        .await
        .into_iter()
        .map(|call| call.outcome)
        .collect();
    assert_eq!(
        outcomes,
        [
            CallOutcome::InjectedHttpError,
            CallOutcome::InjectedHttpError,
            CallOutcome::InjectedHttpError,
            CallOutcome::Success
        ]
    );
    let claimed = h.claim().await;
    assert_eq!(claimed.id, job_id);
    assert!(claimed.target.is_ok(), "{:?}", claimed.target);
    let lookups = h.calls_of("repositories:getByRepositoryId").await;
    assert_eq!(lookups.len(), 2);
    assert_eq!(lookups[0].outcome, CallOutcome::DroppedConnection);
}

/// A claim whose reply was lost may have claimed a job: repeating it would claim a second one.
#[tokio::test]
async fn a_claim_with_a_lost_reply_is_not_repeated() {
    let h = start(FakeOptions::fast()).await;
    let first = h.enqueue("octo/one", None).await;
    h.enqueue("octo/two", None).await;
    h.admin
        .add_fault(FaultSpec::new(FaultKind::ApplyThenDrop).path("queue:claimOne"))
        .await
        .expect("fault");
    let error = h
        .source
        .claim(WORKER, LEASE)
        .await
        .expect_err("the reply was lost");
    assert!(error.is_transient(), "{error}");
    assert_eq!(h.source.possible_orphans(), 1);
    let claims = h.calls_of("queue:claimOne").await;
    assert_eq!(claims.len(), 1, "claimOne is not repeated: {claims:#?}");
    // The lost claim did apply: the first job is ours with nobody running it, until reclaimed.
    let orphan = h.admin.job(&first).await.expect("job").expect("exists");
    assert_eq!(
        (orphan.status.as_str(), orphan.locked_by.as_deref()),
        ("claimed", Some(WORKER))
    );
    // An HTTP 503 is as ambiguous: not repeated either.
    h.admin
        .add_fault(FaultSpec::new(FaultKind::HttpError).path("queue:claimOne"))
        .await
        .expect("fault");
    h.source.claim(WORKER, LEASE).await.expect_err("503");
    assert_eq!(h.calls_of("queue:claimOne").await.len(), 2);
    assert_eq!(h.source.possible_orphans(), 2);
    // The next poll claims afresh.
    let claimed = h.claim().await;
    assert_ne!(claimed.id, first);
}

#[tokio::test]
async fn a_hung_call_times_out_and_is_retried() {
    let h = start_with(FakeOptions::fast(), |config| {
        config.request_timeout = Duration::from_millis(300);
    })
    .await;
    let job_id = h.enqueue("octo/repo", None).await;
    h.admin
        .add_fault(FaultSpec::new(FaultKind::Hang).path("jobs:getJob"))
        .await
        .expect("fault");
    let view = h.source.get_job(&job_id, false).await.expect("get_job");
    assert_eq!(view.expect("exists").status, JobStatus::Pending);
    let outcomes: Vec<CallOutcome> = h
        .calls_of("jobs:getJob")
        .await
        .into_iter()
        .map(|call| call.outcome)
        .collect();
    assert_eq!(outcomes, [CallOutcome::Hung, CallOutcome::Success]);
    h.admin.clear_faults().await.expect("release");
}

#[tokio::test]
async fn an_outage_longer_than_the_budget_is_unavailable() {
    let h = start_with(FakeOptions::fast(), |config| {
        config.retry_budget = Duration::from_millis(1500);
    })
    .await;
    h.admin
        .add_fault(FaultSpec::new(FaultKind::HttpError).for_ms(60_000))
        .await
        .expect("fault");
    let error = h
        .source
        .get_job("jd7fq0zq4f5m1e9w2x3y4z5a6b7c8d9e", false)
        .await
        .expect_err("unavailable");
    assert!(matches!(error, JobSourceError::Unavailable(_)), "{error}");
    assert!(error.is_transient());
    assert!(h.calls().await.len() >= 2, "retried before giving up");
}

#[tokio::test]
async fn a_lost_complete_reply_counts_as_done() {
    let h = start(FakeOptions::fast()).await;
    let job_id = h.enqueue("octo/repo", None).await;
    h.claim().await;
    h.admin
        .add_fault(FaultSpec::new(FaultKind::ApplyThenDrop).path("queue:complete"))
        .await
        .expect("fault");
    let result = result_with(vec![document(
        "chapters/a.md",
        DocumentKind::Chapter,
        "# A\n".to_owned(),
    )]);
    h.source
        .complete(&job_id, WORKER, &result)
        .await
        .expect("complete counts as done");
    let outcomes: Vec<CallOutcome> = h
        .calls_of("queue:complete")
        .await
        .into_iter()
        .map(|call| call.outcome)
        .collect();
    // Not repeated: the job read back says it is done.
    assert_eq!(outcomes, [CallOutcome::AppliedReplyDropped]);
    let job = h.admin.job(&job_id).await.expect("job").expect("exists");
    assert_eq!(job.status, "completed");

    // Calling complete again (e.g. replayed from the journal after a restart) is still fine.
    h.source
        .complete(&job_id, WORKER, &result)
        .await
        .expect("repeat complete");
    h.assert_no_rejected_calls().await;
}

#[tokio::test]
async fn a_lost_retry_or_fail_reply_is_recovered() {
    let h = start(FakeOptions::default()).await;
    let job_id = h.enqueue("octo/repo", None).await;
    h.claim().await;
    h.admin
        .add_fault(FaultSpec::new(FaultKind::ApplyThenDrop).path("queue:retryOrFail"))
        .await
        .expect("fault");
    let outcome = h
        .source
        .fail(&job_id, WORKER, "clone failed", true)
        .await
        .expect("fail");
    let job = h.admin.job(&job_id).await.expect("job").expect("exists");
    assert_eq!(
        outcome,
        FailOutcome::Retrying {
            attempts: 1,
            next_run_at_ms: job.run_at
        }
    );
}

#[tokio::test]
async fn a_heartbeat_from_another_worker_is_not_owned() {
    let h = start(FakeOptions {
        // A self-hosted backend replies to function errors with HTTP 200.
        function_error_status: 200,
        ..FakeOptions::fast()
    })
    .await;
    let job_id = h.enqueue("octo/repo", None).await;
    h.claim().await;
    let error = h
        .source
        .heartbeat(&job_id, "someone-else", &ProgressUpdate::default(), LEASE)
        .await
        .expect_err("not owned");
    assert!(matches!(error, JobSourceError::NotOwned { .. }), "{error}");
    let heartbeats = h.calls_of("queue:heartbeat").await;
    assert_eq!(heartbeats.len(), 1, "function errors are not retried");
    assert_eq!(heartbeats[0].http_status, Some(200));
}

#[tokio::test]
async fn a_missing_or_bad_repository_fails_the_target() {
    let h = start(FakeOptions::fast()).await;
    let bogus_repository = {
        // A well-formed id of a repository that does not exist.
        let real = h
            .admin
            .create_repository("octo/repo", None)
            .await
            .expect("repo");
        h.admin.reset().await.expect("reset");
        real
    };
    // `jobs:create` refuses a missing repository; `queue:createJob` checks nothing.
    let created = h
        .admin
        .mutation(
            "queue:createJob",
            json!({"userId": bogus_repository, "repositoryId": bogus_repository,
                   "prompt": "p", "callbackToken": "cb"}),
        )
        .await
        .expect("job");
    let job_id = created["jobId"].as_str().expect("job id").to_owned();
    let claimed = h.claim().await;
    assert_eq!(claimed.id, job_id);
    assert_eq!(
        claimed.target,
        Err(format!("repository {bogus_repository} not found"))
    );

    h.enqueue("octo/../etc", None).await;
    let claimed = h.claim().await;
    let error = claimed.target.expect_err("bad fullName");
    assert!(error.contains("fullName"), "{error}");

    h.enqueue("octo/repo", Some("--upload-pack=evil")).await;
    let claimed = h.claim().await;
    let error = claimed.target.expect_err("bad branch");
    assert!(error.contains("defaultBranch"), "{error}");
}

#[tokio::test]
async fn oversize_results_are_refused_before_sending() {
    let h = start(FakeOptions::fast()).await;
    let job_id = h.enqueue("octo/repo", None).await;
    h.claim().await;

    let big = document(
        "chapters/huge.md",
        DocumentKind::Chapter,
        "x".repeat(1024 * 1024 + 1),
    );
    let error = h
        .source
        .complete(&job_id, WORKER, &result_with(vec![big]))
        .await
        .expect_err("too large");
    assert!(matches!(error, JobSourceError::TooLarge(_)), "{error}");
    assert!(error.to_string().contains("chapters/huge.md"), "{error}");

    let many: Vec<Document> = (0..20)
        .map(|index| {
            document(
                &format!("chapters/{index}.md"),
                DocumentKind::Chapter,
                "y".repeat(900 * 1024),
            )
        })
        .collect();
    let error = h
        .source
        .complete(&job_id, WORKER, &result_with(many))
        .await
        .expect_err("too large");
    assert!(matches!(error, JobSourceError::TooLarge(_)), "{error}");
    assert!(error.to_string().contains("bytes"), "{error}");

    assert!(h.calls_of("docs:upsertFromJob").await.is_empty());
    let job = h.admin.job(&job_id).await.expect("job").expect("exists");
    assert_eq!(job.locked_by.as_deref(), Some(WORKER), "still ours to fail");
}

#[tokio::test]
async fn retry_or_fail_retries_then_marks_dead() {
    let h = start(FakeOptions::fast()).await;
    let job_id = h.enqueue("octo/repo", None).await;
    for attempt in 1..=5u32 {
        let claimed = h.claim().await;
        assert_eq!(claimed.id, job_id);
        assert_eq!(claimed.attempt, attempt);
        let outcome = h
            .source
            .fail(&job_id, WORKER, &format!("failure {attempt}"), attempt != 3)
            .await
            .expect("fail");
        if attempt < 5 {
            assert!(
                matches!(outcome, FailOutcome::Retrying { attempts, next_run_at_ms }
                    if attempts == attempt && next_run_at_ms > 0.0),
                "{outcome:?}"
            );
        } else {
            assert_eq!(outcome, FailOutcome::Dead { attempts: 5 });
        }
    }
    let job = h.admin.job(&job_id).await.expect("job").expect("exists");
    assert_eq!(job.status, "dead");
    assert_eq!(job.last_error.as_deref(), Some("failure 5"));
    assert!(h
        .source
        .claim(WORKER, LEASE)
        .await
        .expect("claim")
        .is_none());
    h.assert_no_rejected_calls().await;
}

#[tokio::test]
async fn a_canceled_job_is_never_written_over() {
    let h = start(FakeOptions::fast()).await;
    let job_id = h.enqueue("octo/repo", None).await;
    h.claim().await;
    let status = h.source.request_cancel(&job_id).await.expect("cancel");
    assert_eq!(status, JobStatus::Canceled);

    let view = h
        .source
        .get_job(&job_id, false)
        .await
        .expect("get")
        .expect("exists");
    assert!(view.cancel_requested);
    assert_eq!(view.locked_by.as_deref(), Some(WORKER));

    let with_status = ProgressUpdate {
        status: Some(ActiveStatus::Running),
        ..ProgressUpdate::default()
    };
    let error = h
        .source
        .heartbeat(&job_id, WORKER, &with_status, LEASE)
        .await
        .expect_err("canceled");
    assert!(matches!(error, JobSourceError::Canceled(_)), "{error}");
    h.source
        .heartbeat(&job_id, WORKER, &ProgressUpdate::default(), LEASE)
        .await
        .expect("a lease-only heartbeat is harmless");
    let error = h
        .source
        .complete(&job_id, WORKER, &result_with(Vec::new()))
        .await
        .expect_err("canceled");
    assert!(matches!(error, JobSourceError::Canceled(_)), "{error}");
    let error = h
        .source
        .fail(&job_id, WORKER, "stopped", true)
        .await
        .expect_err("canceled");
    assert!(matches!(error, JobSourceError::Canceled(_)), "{error}");

    let job = h.admin.job(&job_id).await.expect("job").expect("exists");
    assert_eq!(job.status, "canceled");
    h.assert_no_violations().await;
    h.assert_no_rejected_calls().await;
}

#[tokio::test]
async fn the_deploy_key_is_sent_and_a_wrong_one_is_not_retried() {
    let options = FakeOptions {
        deploy_key: Some("dev:fake|secret".to_owned()),
        ..FakeOptions::fast()
    };
    let h = start_with(options.clone(), |config| {
        config.deploy_key = Some("dev:fake|secret".to_owned());
    })
    .await;
    assert!(h
        .source
        .claim(WORKER, LEASE)
        .await
        .expect("claim")
        .is_none());
    let calls = h.calls().await;
    assert_eq!(calls[0].auth, AuthSeen::Valid);

    let wrong = start_with(options, |config| {
        config.deploy_key = Some("dev:fake|wrong".to_owned());
    })
    .await;
    let error = wrong.source.claim(WORKER, LEASE).await.expect_err("401");
    assert!(matches!(error, JobSourceError::Failed(_)), "{error}");
    assert!(error.to_string().contains("BadAdminKey"), "{error}");
    assert!(
        !error.to_string().contains("wrong"),
        "no key in errors: {error}"
    );
    assert_eq!(
        wrong.calls().await.len(),
        1,
        "request errors are not retried"
    );
}

#[tokio::test]
async fn submit_and_list_are_unsupported() {
    let h = start(FakeOptions::fast()).await;
    let error = h
        .source
        .submit(NewJob {
            repo_url: "https://github.com/octo/repo.git".to_owned(),
            branch: "main".to_owned(),
            prompt: "p".to_owned(),
        })
        .await
        .expect_err("unsupported");
    assert!(matches!(error, JobSourceError::Unsupported(_)), "{error}");
    let error = h
        .source
        .list_jobs(&JobQuery::default())
        .await
        .expect_err("unsupported");
    assert!(matches!(error, JobSourceError::Unsupported(_)), "{error}");
    assert!(h.calls().await.is_empty());
}

#[tokio::test]
async fn a_cancel_during_the_upload_is_not_overwritten() {
    let h = start(FakeOptions::fast()).await;
    let job_id = h.enqueue("octo/repo", None).await;
    h.claim().await;
    h.admin
        .set_latency(500, Some("docs:upsertFromJob"))
        .await
        .expect("latency");
    let source = std::sync::Arc::new(h.source);
    let completing = {
        let source = source.clone();
        let job_id = job_id.clone();
        tokio::spawn(async move {
            let result = result_with(vec![document(
                "chapters/a.md",
                DocumentKind::Chapter,
                "# A\n".to_owned(),
            )]);
            source.complete(&job_id, WORKER, &result).await
        })
    };
    // Cancel once the pre-upload check has passed, while the upload is delayed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let calls = h.admin.calls().await.expect("calls");
        if calls
            .iter()
            .any(|call| call.path.as_deref() == Some("jobs:getJob"))
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "complete() never checked the job"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.admin.request_cancel(&job_id).await.expect("cancel");

    let outcome = completing.await.expect("task");
    assert!(
        matches!(outcome, Err(JobSourceError::Canceled(_))),
        "{outcome:?}"
    );
    let job = h.admin.job(&job_id).await.expect("job").expect("exists");
    assert_eq!(job.status, "canceled");
    let violations = h.admin.violations().await.expect("violations");
    assert!(violations.is_empty(), "{violations:?}");
}

/// A claim that never reached the deployment (connection refused) cannot have claimed anything:
/// it is retried within the budget and counts no possible orphan.
#[tokio::test]
async fn a_claim_that_never_connected_is_no_lost_claim() {
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        listener.local_addr().expect("address")
    };
    let mut config = ConvexConfig::new(format!("http://{closed}"));
    config.request_timeout = Duration::from_secs(1);
    config.retry_budget = Duration::from_millis(1500);
    let source = ConvexSource::new(config).expect("valid config");
    let error = source
        .claim(WORKER, LEASE)
        .await
        .expect_err("nothing listens");
    assert!(matches!(error, JobSourceError::Unavailable(_)), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("gave up after") && !text.contains("after 1 attempt"),
        "retried: {text}"
    );
    assert_eq!(source.possible_orphans(), 0);
}
