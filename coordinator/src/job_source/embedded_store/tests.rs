use std::collections::HashSet;

use fondation_proto::limits::{
    MAX_DOCUMENTS, MAX_DOCUMENT_BYTES, MAX_MESSAGE_BYTES, MAX_NAME_BYTES, MAX_PROMPT_BYTES,
    MAX_RESULT_BYTES,
};

use super::*;
use crate::job_source::ActiveStatus;

const LEASE: Duration = Duration::from_secs(300);

fn open(dir: &Path, options: EmbeddedOptions) -> EmbeddedStore {
    EmbeddedStore::new(Database::open(dir).expect("open database"), options)
}

/// Retries without waiting, so tests can run attempt after attempt.
fn no_backoff(max_attempts: u32) -> EmbeddedOptions {
    EmbeddedOptions {
        max_attempts,
        backoff_base: Duration::ZERO,
        backoff_max: Duration::ZERO,
        backoff_jitter: Duration::ZERO,
    }
}

fn new_job(n: usize) -> NewJob {
    NewJob {
        repo_url: format!("https://github.com/example/repo{n}.git"),
        branch: String::new(),
        prompt: format!("prompt {n}"),
    }
}

fn doc(slug: &str, content: &str) -> Document {
    Document {
        slug: slug.to_owned(),
        title: slug.to_uppercase(),
        kind: DocumentKind::Chapter,
        chapter_index: Some(0),
        content: content.to_owned(),
    }
}

fn result(documents: Vec<Document>) -> JobResult {
    JobResult {
        run_id: "run-1".to_owned(),
        message: "done".to_owned(),
        documents,
    }
}

async fn view(store: &EmbeddedStore, id: &str) -> JobView {
    store.get_job(id, true).await.unwrap().expect("job exists")
}

/// Makes a pending job due now, skipping its backoff.
async fn make_due(store: &EmbeddedStore, id: &str) {
    let id = id.to_owned();
    store
        .run("test: making a job due", move |conn| {
            conn.execute("UPDATE jobs SET run_at = 0 WHERE id = ?1", [id])?;
            Ok(())
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn submit_claim_complete_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), EmbeddedOptions::default());
    let id = store.submit(new_job(1)).await.unwrap();
    assert_eq!(id.len(), 32);
    assert!(id.bytes().all(|b| ID_ALPHABET.contains(&b)), "{id}");

    let job = view(&store, &id).await;
    assert_eq!(job.status, JobStatus::Pending);
    assert_eq!(
        job.branch.as_deref(),
        Some(""),
        "no branch: the repository's default"
    );
    assert_eq!(job.attempts, 0);

    let claimed = store.claim("w1", LEASE).await.unwrap().expect("a job");
    assert_eq!(claimed.id, id);
    assert_eq!(claimed.attempt, 1);
    assert_eq!(claimed.prompt, "prompt 1");
    let target = claimed.target.expect("target");
    assert_eq!(target.url, "https://github.com/example/repo1.git");
    assert_eq!(target.branch, "");
    assert!(store.claim("w1", LEASE).await.unwrap().is_none());
    assert_eq!(view(&store, &id).await.locked_by.as_deref(), Some("w1"));

    let update = ProgressUpdate {
        status: Some(ActiveStatus::Analyzing),
        progress: Some("step 2".to_owned()),
        current_step: Some(2),
    };
    store.heartbeat(&id, "w1", &update, LEASE).await.unwrap();
    let job = view(&store, &id).await;
    assert_eq!(job.status, JobStatus::Analyzing);
    assert_eq!(job.progress.as_deref(), Some("step 2"));
    assert_eq!(job.current_step, Some(2));

    let first = vec![
        doc("a.md", "alpha"),
        doc("b.md", "beta"),
        doc("c.md", "gamma"),
    ];
    store
        .complete(&id, "w1", &result(first.clone()))
        .await
        .unwrap();
    let job = view(&store, &id).await;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(job.locked_by, None);
    assert_eq!(contents(&job), first);

    // A repeated complete (lost reply) succeeds and replaces the whole set.
    let second = vec![doc("b.md", "beta v2"), doc("d.md", "delta")];
    store
        .complete(&id, "w1", &result(second.clone()))
        .await
        .unwrap();
    assert_eq!(contents(&view(&store, &id).await), second);

    let light = store.get_job(&id, false).await.unwrap().unwrap();
    assert!(light
        .documents
        .iter()
        .all(|d| d.document.content.is_empty()));
    assert_eq!(light.documents[1].document.slug, "d.md");
    let sizes: Vec<u64> = light.documents.iter().map(|d| d.size_bytes).collect();
    assert_eq!(sizes, vec![7, 5], "sizes without reading contents");

    // Another worker does not get that success.
    assert!(matches!(
        store.complete(&id, "w2", &result(vec![])).await,
        Err(JobSourceError::NotOwned { .. })
    ));
}

#[tokio::test]
async fn submit_validates_input() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), EmbeddedOptions::default());
    let mut job = new_job(1);
    job.repo_url.clear();
    assert!(matches!(
        store.submit(job).await,
        Err(JobSourceError::Invalid(_))
    ));
    let mut job = new_job(1);
    job.prompt = "x".repeat(MAX_PROMPT_BYTES + 1);
    assert!(matches!(
        store.submit(job).await,
        Err(JobSourceError::Invalid(_))
    ));
    let mut job = new_job(1);
    job.branch = "dev".to_owned();
    let id = store.submit(job).await.unwrap();
    assert_eq!(view(&store, &id).await.branch.as_deref(), Some("dev"));
}

#[tokio::test]
async fn concurrent_claimers_never_share_a_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), EmbeddedOptions::default());
    let mut submitted = HashSet::new();
    for n in 0..50 {
        submitted.insert(store.submit(new_job(n)).await.unwrap());
    }
    // Each claimer has its own connection, so BEGIN IMMEDIATE, not the mutex, is tested.
    let claimers = (0..8).map(|n| {
        let store = open(dir.path(), EmbeddedOptions::default());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            while let Some(job) = store.claim(&format!("w{n}"), LEASE).await.unwrap() {
                ids.push(job.id);
            }
            ids
        })
    });
    let mut claimed = Vec::new();
    for claimer in claimers.collect::<Vec<_>>() {
        claimed.extend(claimer.await.unwrap());
    }
    assert_eq!(claimed.len(), 50);
    assert_eq!(claimed.into_iter().collect::<HashSet<_>>(), submitted);
}

#[tokio::test]
async fn writes_of_a_non_owner_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), EmbeddedOptions::default());
    let id = store.submit(new_job(1)).await.unwrap();
    store.claim("w1", LEASE).await.unwrap().unwrap();
    let before = view(&store, &id).await;

    let update = ProgressUpdate {
        progress: Some("hijack".to_owned()),
        ..ProgressUpdate::default()
    };
    let not_owned = |res: Result<()>| matches!(res, Err(JobSourceError::NotOwned { .. }));
    assert!(not_owned(store.heartbeat(&id, "w2", &update, LEASE).await));
    assert!(not_owned(store.complete(&id, "w2", &result(vec![])).await));
    assert!(not_owned(
        store.fail(&id, "w2", "boom", true).await.map(drop)
    ));
    assert!(not_owned(
        store.heartbeat("unknown", "w1", &update, LEASE).await
    ));
    assert_eq!(view(&store, &id).await, before);

    // Once the job is finished its former holder does not own it either.
    store.fail(&id, "w1", "boom", false).await.unwrap();
    assert!(not_owned(store.heartbeat(&id, "w1", &update, LEASE).await));
}

#[tokio::test]
async fn backoff_doubles_with_each_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let options = EmbeddedOptions {
        max_attempts: 5,
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_secs(600),
        backoff_jitter: Duration::ZERO,
    };
    let store = open(dir.path(), options);
    let id = store.submit(new_job(1)).await.unwrap();
    for (attempt, delay) in [(1, 100.0), (2, 200.0), (3, 400.0)] {
        make_due(&store, &id).await;
        let claimed = store.claim("w1", LEASE).await.unwrap().expect("due job");
        assert_eq!(claimed.attempt, attempt);
        let before = now_ms();
        let outcome = store.fail(&id, "w1", "boom", true).await.unwrap();
        let after = now_ms();
        let FailOutcome::Retrying {
            attempts,
            next_run_at_ms,
        } = outcome
        else {
            panic!("expected a retry, got {outcome:?}");
        };
        assert_eq!(attempts, attempt);
        assert!(
            (before + delay..=after + delay).contains(&next_run_at_ms),
            "attempt {attempt}: {next_run_at_ms} not within {before}+{delay}..{after}+{delay}"
        );
        assert_eq!(store.next_due_at_ms().await.unwrap(), Some(next_run_at_ms));
        // Not due yet.
        assert!(store.claim("w1", LEASE).await.unwrap().is_none());
        let job = view(&store, &id).await;
        assert_eq!(job.status, JobStatus::Pending);
        assert_eq!(job.error.as_deref(), Some("boom"));
        assert_eq!(job.locked_by, None);
    }
}

#[test]
fn backoff_is_capped_and_jittered() {
    let options = EmbeddedOptions::default();
    assert!((5_000.0..10_000.0).contains(&backoff_ms(&options, 1)));
    assert!((600_000.0..605_000.0).contains(&backoff_ms(&options, 20)));
    assert!((600_000.0..605_000.0).contains(&backoff_ms(&options, u32::MAX)));
}

#[tokio::test]
async fn job_is_dead_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), no_backoff(2));
    let id = store.submit(new_job(1)).await.unwrap();
    store.claim("w1", LEASE).await.unwrap().unwrap();
    assert!(matches!(
        store.fail(&id, "w1", "first", true).await.unwrap(),
        FailOutcome::Retrying { attempts: 1, .. }
    ));
    store.claim("w1", LEASE).await.unwrap().unwrap();
    assert_eq!(
        store.fail(&id, "w1", "second", true).await.unwrap(),
        FailOutcome::Dead { attempts: 2 }
    );
    let job = view(&store, &id).await;
    assert_eq!(job.status, JobStatus::Dead);
    assert_eq!(job.error.as_deref(), Some("second"));
    assert!(store.claim("w1", LEASE).await.unwrap().is_none());
}

#[tokio::test]
async fn non_retryable_failure_fails_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), no_backoff(5));
    let id = store.submit(new_job(1)).await.unwrap();
    store.claim("w1", LEASE).await.unwrap().unwrap();
    let long_error = format!("START{}END", "é".repeat(MAX_MESSAGE_BYTES));
    assert_eq!(
        store.fail(&id, "w1", &long_error, false).await.unwrap(),
        FailOutcome::Failed
    );
    let job = view(&store, &id).await;
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.locked_by, None);
    let error = job.error.expect("error stored");
    // Cut as the Convex source cuts it: both ends kept, within the same cap.
    assert!(error.len() <= MAX_MESSAGE_BYTES);
    assert!(
        error.starts_with("START") && error.ends_with("END"),
        "{error}"
    );
    assert_eq!(error, limits::cap_error_text(&long_error));
    assert!(store.claim("w1", LEASE).await.unwrap().is_none());
}

#[tokio::test]
async fn expired_lease_is_reclaimed_by_the_next_claim() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), no_backoff(5));
    let id = store.submit(new_job(1)).await.unwrap();
    store
        .claim("vanished", Duration::from_millis(1))
        .await
        .unwrap()
        .unwrap();

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let claimed = loop {
        if let Some(job) = store.claim("w2", LEASE).await.unwrap() {
            break job;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired lease was never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    assert_eq!(claimed.id, id);
    assert_eq!(claimed.attempt, 2);
    let job = view(&store, &id).await;
    assert_eq!(job.locked_by.as_deref(), Some("w2"));
    assert_eq!(job.error.as_deref(), Some("lease expired"));
    let update = ProgressUpdate::default();
    assert!(matches!(
        store.heartbeat(&id, "vanished", &update, LEASE).await,
        Err(JobSourceError::NotOwned { .. })
    ));
}

#[tokio::test]
async fn expired_lease_on_last_attempt_makes_the_job_dead() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), no_backoff(1));
    let id = store.submit(new_job(1)).await.unwrap();
    store
        .claim("vanished", Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while view(&store, &id).await.status != JobStatus::Dead {
        assert!(store.claim("w2", LEASE).await.unwrap().is_none());
        assert!(tokio::time::Instant::now() < deadline, "job never died");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn cancel_pending_job() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), EmbeddedOptions::default());
    let id = store.submit(new_job(1)).await.unwrap();
    assert_eq!(
        store.request_cancel(&id).await.unwrap(),
        JobStatus::Canceled
    );
    let job = view(&store, &id).await;
    assert_eq!(job.status, JobStatus::Canceled);
    assert!(job.cancel_requested);
    assert!(store.claim("w1", LEASE).await.unwrap().is_none());
    assert!(matches!(
        store.request_cancel("unknown").await,
        Err(JobSourceError::NotFound(_))
    ));
}

#[tokio::test]
async fn cancel_running_job_keeps_the_holder_and_blocks_its_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), EmbeddedOptions::default());
    let id = store.submit(new_job(1)).await.unwrap();
    store.claim("w1", LEASE).await.unwrap().unwrap();
    let running = ProgressUpdate {
        status: Some(ActiveStatus::Running),
        ..ProgressUpdate::default()
    };
    store.heartbeat(&id, "w1", &running, LEASE).await.unwrap();

    assert_eq!(
        store.request_cancel(&id).await.unwrap(),
        JobStatus::Canceled
    );
    let canceled = view(&store, &id).await;
    assert_eq!(canceled.status, JobStatus::Canceled);
    assert!(canceled.cancel_requested);
    assert_eq!(canceled.locked_by.as_deref(), Some("w1"));

    // A heartbeat carrying a status must not un-cancel the job, nor write anything.
    let update = ProgressUpdate {
        status: Some(ActiveStatus::Gathering),
        progress: Some("still going".to_owned()),
        current_step: Some(5),
    };
    assert!(matches!(
        store.heartbeat(&id, "w1", &update, LEASE).await,
        Err(JobSourceError::Canceled(ref job)) if *job == id
    ));
    assert!(matches!(
        store
            .complete(&id, "w1", &result(vec![doc("a.md", "a")]))
            .await,
        Err(JobSourceError::Canceled(_))
    ));
    assert!(matches!(
        store.fail(&id, "w1", "stopped", true).await,
        Err(JobSourceError::Canceled(_))
    ));
    assert_eq!(view(&store, &id).await, canceled);

    // Terminal jobs stay as they are.
    assert_eq!(
        store.request_cancel(&id).await.unwrap(),
        JobStatus::Canceled
    );
    let done = store.submit(new_job(2)).await.unwrap();
    store.claim("w1", LEASE).await.unwrap().unwrap();
    store.complete(&done, "w1", &result(vec![])).await.unwrap();
    assert_eq!(
        store.request_cancel(&done).await.unwrap(),
        JobStatus::Completed
    );
}

#[tokio::test]
async fn data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let (done, pending) = {
        let store = open(dir.path(), EmbeddedOptions::default());
        let done = store.submit(new_job(1)).await.unwrap();
        store.claim("w1", LEASE).await.unwrap().unwrap();
        store
            .complete(&done, "w1", &result(vec![doc("a.md", "alpha")]))
            .await
            .unwrap();
        let pending = store.submit(new_job(2)).await.unwrap();
        (done, pending)
    };
    let store = open(dir.path(), EmbeddedOptions::default());
    let (mode, synchronous, version) = store
        .run("test: reading pragmas", |conn| {
            let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
            let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
            let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
            Ok((mode, sync, version))
        })
        .await
        .unwrap();
    assert_eq!(
        (mode.as_str(), synchronous, version),
        ("wal", 2, SCHEMA_VERSION)
    );
    let job = view(&store, &done).await;
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(contents(&job), vec![doc("a.md", "alpha")]);
    let claimed = store.claim("w1", LEASE).await.unwrap().unwrap();
    assert_eq!(claimed.id, pending);
}

#[tokio::test]
async fn list_jobs_newest_first_with_filter() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), EmbeddedOptions::default());
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(store.submit(new_job(n)).await.unwrap());
    }
    store.claim("w1", LEASE).await.unwrap().unwrap();

    let all: Vec<_> = store.list_jobs(&page(None, 0, 10)).await.unwrap();
    let listed: Vec<_> = all.iter().map(|job| job.id.clone()).collect();
    assert_eq!(listed, ids.iter().rev().cloned().collect::<Vec<_>>());
    assert_eq!(store.list_jobs(&page(None, 0, 2)).await.unwrap().len(), 2);
    let second_page: Vec<_> = store
        .list_jobs(&page(None, 2, 10))
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.id)
        .collect();
    assert_eq!(second_page, vec![ids[1].clone(), ids[0].clone()]);
    let claimed = store
        .list_jobs(&page(Some(JobStatus::Claimed), 0, 10))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, ids[0]);
    assert_eq!(
        store
            .list_jobs(&page(Some(JobStatus::Pending), 0, 10))
            .await
            .unwrap()
            .len(),
        3
    );
}

fn page(status: Option<JobStatus>, offset: usize, limit: usize) -> JobQuery {
    JobQuery {
        status,
        offset,
        limit,
        ..JobQuery::default()
    }
}

fn ids_of(views: Vec<JobView>) -> Vec<String> {
    views.into_iter().map(|view| view.id).collect()
}

/// Jobs listed by the agent of their last attempt (the attempt history beside the jobs), in each
/// order, with paging.
#[tokio::test]
async fn list_jobs_by_agent_and_in_each_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), no_backoff(5));
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(store.submit(new_job(n)).await.unwrap());
    }
    // Job 0 goes to agent b, job 1 to c, job 2 to a then (after a retry) to b; 3 never runs.
    let mut epoch = 0;
    let mut claim_on = |agent: &'static str| {
        epoch += 1;
        let planned = PlannedAssignment {
            assignment_id: format!("assignment-{epoch}"),
            epoch,
            agent_id: agent.into(),
        };
        let store = store.clone();
        async move {
            let (job, _) = store
                .claim_journaled("w1", LEASE, &planned)
                .await
                .unwrap()
                .expect("a due job");
            job.id
        }
    };
    assert_eq!(claim_on("b").await, ids[0]);
    assert_eq!(claim_on("c").await, ids[1]);
    assert_eq!(claim_on("a").await, ids[2]);
    store.fail(&ids[2], "w1", "boom", true).await.unwrap();
    make_due(&store, &ids[2]).await;
    assert_eq!(claim_on("b").await, ids[2]);
    store
        .complete(&ids[0], "w1", &result(vec![]))
        .await
        .unwrap();

    let query = |agent: &str, order: JobOrder| JobQuery {
        agent_id: Some(agent.to_owned()),
        order,
        limit: 10,
        ..JobQuery::default()
    };
    assert!(
        store
            .list_jobs(&query("a", JobOrder::NewestFirst))
            .await
            .unwrap()
            .is_empty(),
        "job 2's last attempt ran on b"
    );
    let on_b = ids_of(
        store
            .list_jobs(&query("b", JobOrder::OldestFirst))
            .await
            .unwrap(),
    );
    assert_eq!(on_b, vec![ids[0].clone(), ids[2].clone()]);
    let second = JobQuery {
        offset: 1,
        limit: 1,
        ..query("b", JobOrder::NewestFirst)
    };
    assert_eq!(
        ids_of(store.list_jobs(&second).await.unwrap()),
        vec![ids[0].clone()]
    );
    let claimed_on_b = JobQuery {
        status: Some(JobStatus::Claimed),
        ..query("b", JobOrder::Status)
    };
    assert_eq!(
        ids_of(store.list_jobs(&claimed_on_b).await.unwrap()),
        vec![ids[2].clone()]
    );

    let all = |order: JobOrder| JobQuery {
        order,
        limit: 10,
        ..JobQuery::default()
    };
    assert_eq!(
        ids_of(store.list_jobs(&all(JobOrder::Agent)).await.unwrap()),
        vec![
            ids[2].clone(),
            ids[0].clone(),
            ids[1].clone(),
            ids[3].clone()
        ],
        "b's newest first, then c's, the never assigned job last"
    );
    assert_eq!(
        ids_of(store.list_jobs(&all(JobOrder::Status)).await.unwrap()),
        vec![
            ids[2].clone(),
            ids[1].clone(),
            ids[0].clone(),
            ids[3].clone()
        ],
        "claimed, completed, pending"
    );
    let updated = store
        .list_jobs(&all(JobOrder::RecentlyUpdated))
        .await
        .unwrap();
    assert_eq!(updated.len(), 4);
    assert!(
        updated
            .windows(2)
            .all(|pair| pair[0].updated_at_ms >= pair[1].updated_at_ms),
        "{updated:?}"
    );
}

#[tokio::test]
async fn next_due_is_the_earliest_pending_run_at() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), EmbeddedOptions::default());
    assert_eq!(store.next_due_at_ms().await.unwrap(), None);
    let before = now_ms();
    let id = store.submit(new_job(1)).await.unwrap();
    let due = store
        .next_due_at_ms()
        .await
        .unwrap()
        .expect("a pending job");
    assert!((before..=now_ms()).contains(&due));
    store.claim("w1", LEASE).await.unwrap().unwrap();
    assert_eq!(store.next_due_at_ms().await.unwrap(), None);
    let FailOutcome::Retrying { next_run_at_ms, .. } =
        store.fail(&id, "w1", "boom", true).await.unwrap()
    else {
        panic!("expected a retry");
    };
    assert_eq!(store.next_due_at_ms().await.unwrap(), Some(next_run_at_ms));
}

/// The store refuses exactly what the shared check refuses (the one the Convex source applies
/// too): each cap admits its limit and refuses one more.
#[tokio::test]
async fn results_are_refused_at_the_shared_limits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), EmbeddedOptions::default());
    let id = store.submit(new_job(1)).await.unwrap();
    store.claim("w1", LEASE).await.unwrap().unwrap();
    let max = MAX_DOCUMENT_BYTES as usize;
    let long_name = "n".repeat(MAX_NAME_BYTES + 1);
    let mut long_title = doc("a.md", "x");
    long_title.title = long_name.clone();
    let refused = [
        (
            "a document over its cap",
            vec![doc("big.md", &"x".repeat(max + 1))],
        ),
        ("a slug over its cap", vec![doc(&long_name, "x")]),
        ("a title over its cap", vec![long_title]),
        (
            "too many documents",
            vec![doc("a.md", "x"); MAX_DOCUMENTS + 1],
        ),
        (
            "a result over its cap",
            (0..=MAX_RESULT_BYTES / MAX_DOCUMENT_BYTES)
                .map(|n| doc(&format!("{n}.md"), &"x".repeat(max)))
                .collect(),
        ),
    ];
    for (what, documents) in refused {
        let error = store.complete(&id, "w1", &result(documents)).await;
        assert!(
            matches!(&error, Err(JobSourceError::TooLarge(_))),
            "{what}: {error:?}"
        );
        assert_eq!(view(&store, &id).await.status, JobStatus::Claimed, "{what}");
    }

    // At every cap at once: accepted.
    let name = "n".repeat(MAX_NAME_BYTES);
    let mut documents = vec![doc(&name, &"x".repeat(max))];
    documents.extend((1..MAX_DOCUMENTS).map(|n| doc(&format!("{n}.md"), "x")));
    documents[0].title = name.clone();
    store.complete(&id, "w1", &result(documents)).await.unwrap();
    assert_eq!(view(&store, &id).await.status, JobStatus::Completed);
}

/// The documents of a view, as they were uploaded.
fn contents(view: &JobView) -> Vec<Document> {
    view.documents.iter().map(|d| d.document.clone()).collect()
}

/// A `DATA_DIR` of an earlier version, whose file was `jobs.sqlite3`: its jobs are still there.
#[tokio::test]
async fn a_legacy_database_file_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let store = open(dir.path(), EmbeddedOptions::default());
        assert_eq!(
            store.path(),
            dir.path().join(crate::database::DATABASE_FILE)
        );
        store.submit(new_job(1)).await.unwrap()
    };
    for suffix in ["", "-wal", "-shm"] {
        let from = dir.path().join(format!("coordinator.sqlite3{suffix}"));
        if from.exists() {
            std::fs::rename(&from, dir.path().join(format!("jobs.sqlite3{suffix}"))).unwrap();
        }
    }
    assert!(dir.path().join("jobs.sqlite3").exists());

    let store = open(dir.path(), EmbeddedOptions::default());
    assert_eq!(view(&store, &id).await.status, JobStatus::Pending);
    assert!(!dir.path().join("jobs.sqlite3").exists());
}

/// A submit is acknowledged only once the commit holding it is done: the commit counter moved
/// and a second connection (which sees only committed data) finds the job.
#[tokio::test]
async fn a_submit_is_acknowledged_after_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path()).expect("open database");
    let store = EmbeddedStore::new(db.clone(), EmbeddedOptions::default());
    let before = db.commits();
    let id = store.submit(new_job(1)).await.unwrap();
    assert_eq!(db.commits(), before + 1);
    let seen: String = Connection::open(db.path())
        .unwrap()
        .query_row("SELECT status FROM jobs WHERE id = ?1", [&id], |row| {
            row.get(0)
        })
        .expect("the job is committed");
    assert_eq!(seen, "pending");
}

/// The claim and the journal entry of its assignment are one commit: both are there, written
/// together, and an empty claim journals nothing.
#[tokio::test]
async fn a_claim_journals_its_assignment_in_the_same_commit() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path()).expect("open database");
    let store = EmbeddedStore::new(db.clone(), EmbeddedOptions::default());
    let journal = crate::journal::Journal::new(db.clone());
    let planned = PlannedAssignment {
        assignment_id: "assignment-1".into(),
        epoch: 7,
        agent_id: "agent-1".into(),
    };
    assert!(store
        .claim_journaled("w1", LEASE, &planned)
        .await
        .unwrap()
        .is_none());
    assert!(journal.load().await.unwrap().is_empty());

    let id = store.submit(new_job(1)).await.unwrap();
    let before = db.commits();
    let (job, journaled) = store
        .claim_journaled("w1", LEASE, &planned)
        .await
        .unwrap()
        .expect("a job");
    assert!(journaled);
    assert_eq!(job.id, id);
    assert_eq!(
        db.commits(),
        before + 1,
        "claim and journal share one commit"
    );
    let entries = journal.load().await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].record.job_id, id);
    assert_eq!(entries[0].record.assignment_id, "assignment-1");
    assert_eq!(entries[0].record.epoch, 7);
    assert_eq!(view(&store, &id).await.status, JobStatus::Claimed);
}

#[tokio::test]
async fn a_submit_with_a_free_slot_claims_and_journals_in_its_own_commit_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(dir.path()).expect("open database");
    let store = EmbeddedStore::new(db.clone(), EmbeddedOptions::default());
    let journal = crate::journal::Journal::new(db.clone());
    let planned = |n: u64| PlannedAssignment {
        assignment_id: format!("assignment-{n}"),
        epoch: n,
        agent_id: "agent-1".into(),
    };

    // Nothing older waits: the new job is the one claimed, in the submit's commit.
    let before = db.commits();
    let (id, claimed) = store
        .submit_and_claim(new_job(1), "w1", LEASE, &planned(1))
        .await
        .unwrap();
    assert_eq!(
        db.commits(),
        before + 1,
        "insert, claim and journal share one commit"
    );
    assert_eq!(claimed.expect("the new job is claimed").id, id);
    assert_eq!(view(&store, &id).await.status, JobStatus::Claimed);
    let entries = journal.load().await.unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].record.job_id, id);
    assert_eq!(entries[0].record.assignment_id, "assignment-1");

    // An older due job goes first; the new one waits for the claim loop.
    let older = store.submit(new_job(2)).await.unwrap();
    let (newer, claimed) = store
        .submit_and_claim(new_job(3), "w1", LEASE, &planned(2))
        .await
        .unwrap();
    assert_eq!(claimed.expect("the older job is claimed").id, older);
    assert_eq!(view(&store, &newer).await.status, JobStatus::Pending);
    let journaled: HashSet<String> = journal
        .load()
        .await
        .unwrap()
        .into_iter()
        .map(|entry| entry.record.job_id)
        .collect();
    assert_eq!(journaled, HashSet::from([id, older]));

    // A refused job is neither stored nor claimed.
    let mut empty = new_job(4);
    empty.repo_url.clear();
    assert!(matches!(
        store
            .submit_and_claim(empty, "w1", LEASE, &planned(3))
            .await,
        Err(JobSourceError::Invalid(_))
    ));
    assert_eq!(view(&store, &newer).await.status, JobStatus::Pending);
}

#[tokio::test]
async fn release_gives_the_attempt_back_and_makes_the_job_due_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // One attempt only: a released claim must not use it up.
    let store = open(dir.path(), no_backoff(1));
    let id = store.submit(new_job(1)).await.unwrap();
    for _ in 0..3 {
        let claimed = store
            .claim("w1", LEASE)
            .await
            .unwrap()
            .expect("due at once");
        assert_eq!(claimed.attempt, 1, "a released claim counts no attempt");
        store.release(&id, "w1").await.unwrap();
        let job = view(&store, &id).await;
        assert_eq!(job.status, JobStatus::Pending);
        assert_eq!(job.attempts, 0);
        assert_eq!(job.locked_by, None);
    }
    store.claim("w1", LEASE).await.unwrap().expect("claimable");
    assert!(
        matches!(
            store.release(&id, "w2").await,
            Err(JobSourceError::NotOwned { .. })
        ),
        "only the holder may release"
    );
    assert_eq!(
        store.fail(&id, "w1", "boom", true).await.unwrap(),
        FailOutcome::Dead { attempts: 1 }
    );
    assert!(matches!(
        store.release(&id, "w1").await,
        Err(JobSourceError::NotOwned { .. })
    ));
}
