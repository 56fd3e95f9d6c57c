//! The Fondation functions the fake deployment runs: the registry with each function's kind and
//! argument validator, and the `repositories`, `docs` and `jobs` handlers (the `queue` ones live
//! in `queue.rs`). Semantics follow the real functions, sharp edges included.
//!
//! `repositories:create` is fake-only: the real deployment creates repositories from GitHub in an
//! action. Markdown normalization done by the real `docs:upsertFromJob` is not reproduced: the fake
//! stores content verbatim, so tests can compare it with what was sent.

use std::{collections::HashSet, sync::LazyLock};

use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};

use super::{
    queue,
    store::{now_ms, JobDoc, RepositoryDoc, Store, StoredDoc},
    validate::{convex_size, literals, optional, required, Validator, MAX_DOCUMENT_BYTES},
    FakeOptions,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Query,
    Mutation,
    Action,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Query => "Query",
            Kind::Mutation => "Mutation",
            Kind::Action => "Action",
        }
    }
}

/// Why a function did not return.
#[derive(Debug)]
pub(crate) enum FunctionError {
    /// The handler threw.
    Thrown(String),
    /// A Convex limit was exceeded.
    Limit(String),
}

type Handler = fn(&mut Store, &FakeOptions, Value) -> Result<Value, FunctionError>;

pub(crate) struct Function {
    pub path: &'static str,
    pub kind: Kind,
    pub args: Validator,
    pub handler: Handler,
}

/// States in which `queue:createJob` considers a job a duplicate of a new one.
pub(super) const ACTIVE_STATUSES: [&str; 6] = [
    "pending",
    "claimed",
    "cloning",
    "analyzing",
    "gathering",
    "running",
];

/// Statuses `jobs:requestCancel` leaves alone.
const FINAL_STATUSES: [&str; 4] = ["completed", "failed", "canceled", "dead"];

static FUNCTIONS: LazyLock<Vec<Function>> = LazyLock::new(|| {
    use Validator::{Array, Boolean, Float64, Id, Null, Object, String as Str, Union};
    let job_id = || required("jobId", Id("jobs"));
    let worker_id = || required("workerId", Str);
    vec![
        Function {
            path: "queue:claimOne",
            kind: Kind::Mutation,
            args: Object(vec![worker_id(), optional("leaseMs", Float64)]),
            handler: queue::claim_one,
        },
        Function {
            path: "queue:heartbeat",
            kind: Kind::Mutation,
            args: Object(vec![
                job_id(),
                worker_id(),
                optional(
                    "status",
                    literals(&["cloning", "analyzing", "gathering", "running"]),
                ),
                optional("progress", Str),
                optional("currentStep", Float64),
                optional("totalSteps", Float64),
                optional("leaseMs", Float64),
            ]),
            handler: queue::heartbeat,
        },
        Function {
            path: "queue:complete",
            kind: Kind::Mutation,
            args: Object(vec![
                job_id(),
                worker_id(),
                optional(
                    "result",
                    Union(vec![
                        Object(vec![
                            required("success", Boolean),
                            optional("message", Str),
                            optional("data", Str),
                        ]),
                        Str,
                        Null,
                    ]),
                ),
                optional("docsCount", Float64),
            ]),
            handler: queue::complete,
        },
        Function {
            path: "queue:retryOrFail",
            kind: Kind::Mutation,
            args: Object(vec![job_id(), worker_id(), required("error", Str)]),
            handler: queue::retry_or_fail,
        },
        Function {
            path: "queue:createJob",
            kind: Kind::Mutation,
            args: Object(vec![
                required("userId", Id("users")),
                required("repositoryId", Id("repositories")),
                required("prompt", Str),
                required("callbackToken", Str),
                optional("dedupeKey", Str),
            ]),
            handler: queue::create_job,
        },
        Function {
            path: "repositories:getByRepositoryId",
            kind: Kind::Query,
            args: Object(vec![required("repositoryId", Id("repositories"))]),
            handler: get_repository,
        },
        Function {
            path: "repositories:create",
            kind: Kind::Mutation,
            args: Object(vec![
                required("fullName", Str),
                optional("defaultBranch", Str),
            ]),
            handler: create_repository,
        },
        Function {
            path: "docs:upsertFromJob",
            kind: Kind::Mutation,
            args: Object(vec![
                job_id(),
                required("repositoryId", Id("repositories")),
                optional("runId", Str),
                required(
                    "files",
                    Array(Box::new(Object(vec![
                        required("slug", Str),
                        required("title", Str),
                        optional("chapterIndex", Float64),
                        required("content", Str),
                        required("kind", literals(&["chapter", "tutorial", "toc", "yaml"])),
                    ]))),
                ),
                required(
                    "summary",
                    Object(vec![
                        required("chaptersCount", Float64),
                        required("tutorialsCount", Float64),
                        required("generatedAt", Float64),
                    ]),
                ),
            ]),
            handler: upsert_from_job,
        },
        Function {
            path: "docs:listByJobId",
            kind: Kind::Query,
            args: Object(vec![job_id()]),
            handler: list_docs,
        },
        Function {
            path: "jobs:getJob",
            kind: Kind::Query,
            args: Object(vec![job_id()]),
            handler: get_job,
        },
        Function {
            path: "jobs:requestCancel",
            kind: Kind::Mutation,
            args: Object(vec![job_id()]),
            handler: request_cancel,
        },
    ]
});

pub(crate) fn lookup(path: &str) -> Option<&'static Function> {
    FUNCTIONS.iter().find(|function| function.path == path)
}

pub(super) fn parse<T: DeserializeOwned>(args: Value) -> Result<T, FunctionError> {
    // Arguments were validated already; a failure here is a bug in the fake.
    serde_json::from_value(args)
        .map_err(|error| FunctionError::Thrown(format!("fake convex: bad arguments: {error}")))
}

pub(super) fn thrown(message: &str) -> FunctionError {
    FunctionError::Thrown(message.to_owned())
}

pub(super) fn to_value<T: serde::Serialize + ?Sized>(value: &T) -> Result<Value, FunctionError> {
    serde_json::to_value(value)
        .map_err(|error| FunctionError::Thrown(format!("fake convex: cannot encode: {error}")))
}

/// The job if `worker_id` holds its lease, else the deployment's error.
pub(super) fn owned_job<'a>(
    store: &'a mut Store,
    job_id: &str,
    worker_id: &str,
) -> Result<&'a mut JobDoc, FunctionError> {
    store
        .jobs
        .get_mut(job_id)
        .filter(|job| job.locked_by.as_deref() == Some(worker_id))
        .ok_or_else(|| thrown("Job not found or not owned by worker"))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RepositoryIdArgs {
    repository_id: String,
}

fn get_repository(store: &mut Store, _: &FakeOptions, args: Value) -> Result<Value, FunctionError> {
    let args: RepositoryIdArgs = parse(args)?;
    match store.repositories.get(&args.repository_id) {
        Some(repository) => to_value(repository),
        None => Ok(Value::Null),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateRepositoryArgs {
    full_name: String,
    default_branch: Option<String>,
}

fn create_repository(
    store: &mut Store,
    _: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: CreateRepositoryArgs = parse(args)?;
    let id = store.new_id("repositories");
    let repository = RepositoryDoc {
        id: id.clone(),
        creation_time: store.creation_time(),
        full_name: args.full_name,
        default_branch: args.default_branch,
    };
    store.repositories.insert(id.clone(), repository);
    Ok(Value::String(id))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpsertArgs {
    job_id: String,
    repository_id: String,
    run_id: Option<String>,
    files: Vec<FileArg>,
    summary: SummaryArg,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileArg {
    slug: String,
    title: String,
    chapter_index: Option<f64>,
    content: String,
    kind: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SummaryArg {
    generated_at: f64,
}

/// Replaces the job's document set: documents are matched by a source key (repository, slug
/// without its folder, title), updated or inserted, and the job's other documents deleted. Empty
/// chapters and tutorials are skipped, duplicates within the call too. All or nothing: a document
/// over the size limit fails the whole call.
fn upsert_from_job(
    store: &mut Store,
    _: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: UpsertArgs = parse(args)?;
    if !store.jobs.contains_key(&args.job_id) {
        return Err(FunctionError::Thrown(format!(
            "Update on nonexistent document ID {}",
            args.job_id
        )));
    }
    let now = now_ms();
    let existing = store.docs.remove(&args.job_id).unwrap_or_default();
    let source_key = |slug: &str, title: &str| {
        let slug = slug
            .strip_prefix("chapters/")
            .or_else(|| slug.strip_prefix("reviewed-chapters/"))
            .unwrap_or(slug);
        format!("{}:{slug}:{title}", args.repository_id)
    };
    let mut kept: Vec<StoredDoc> = Vec::new();
    let mut seen = HashSet::new();
    let (mut inserted, mut updated, mut skipped, mut rejected) = (0, 0, 0, 0);
    for file in &args.files {
        if matches!(file.kind.as_str(), "chapter" | "tutorial") && file.content.trim().is_empty() {
            rejected += 1;
            continue;
        }
        let key = source_key(&file.slug, &file.title);
        if !seen.insert(key.clone()) {
            skipped += 1;
            continue;
        }
        let chapter_index = file.chapter_index.unwrap_or(0.0);
        let doc = match existing.iter().find(|doc| doc.source_key == key) {
            Some(old) if old.content == file.content && old.chapter_index == chapter_index => {
                skipped += 1;
                old.clone()
            }
            Some(old) => {
                updated += 1;
                StoredDoc {
                    content: file.content.clone(),
                    chapter_index,
                    slug: file.slug.clone(),
                    updated_at: Some(now),
                    run_id: args.run_id.clone(),
                    ..old.clone()
                }
            }
            None => {
                inserted += 1;
                StoredDoc {
                    id: store.new_id("docs"),
                    creation_time: store.creation_time(),
                    job_id: args.job_id.clone(),
                    repository_id: args.repository_id.clone(),
                    slug: file.slug.clone(),
                    title: file.title.clone(),
                    chapter_index,
                    kind: file.kind.clone(),
                    content: file.content.clone(),
                    source_key: key,
                    run_id: args.run_id.clone(),
                    created_at: now,
                    updated_at: None,
                }
            }
        };
        let size = convex_size(&to_value(&doc)?);
        if size > MAX_DOCUMENT_BYTES {
            store.docs.insert(args.job_id.clone(), existing);
            return Err(FunctionError::Limit(format!(
                "Value is too large ({size} bytes > maximum size {MAX_DOCUMENT_BYTES} bytes) for \
                 the document of slug {:?} in table \"docs\"",
                doc.slug
            )));
        }
        kept.push(doc);
    }
    let deleted = existing
        .iter()
        .filter(|old| !kept.iter().any(|doc| doc.id == old.id))
        .count();
    let doc_ids: Vec<String> = kept.iter().map(|doc| doc.id.clone()).collect();
    let docs_count = doc_ids.len();
    store.docs.insert(args.job_id.clone(), kept);
    if let Some(job) = store.jobs.get_mut(&args.job_id) {
        job.docs_count = Some(docs_count as f64);
        job.completed_at = Some(args.summary.generated_at);
        job.run_id = args.run_id;
    }
    Ok(json!({
        "docsCount": docs_count,
        "docIds": doc_ids,
        "stats": {
            "inserted": inserted,
            "updated": updated,
            "skipped": skipped,
            "rejected": rejected,
            "deleted": deleted,
        }
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct JobIdArgs {
    job_id: String,
}

fn list_docs(store: &mut Store, _: &FakeOptions, args: Value) -> Result<Value, FunctionError> {
    let args: JobIdArgs = parse(args)?;
    to_value(store.docs.get(&args.job_id).map_or(&[][..], Vec::as_slice))
}

fn get_job(store: &mut Store, _: &FakeOptions, args: Value) -> Result<Value, FunctionError> {
    let args: JobIdArgs = parse(args)?;
    match store.jobs.get(&args.job_id) {
        Some(job) => to_value(job),
        None => Ok(Value::Null),
    }
}

/// What the web app does on a user cancel: status `canceled` and `cancelRequested`, leaving
/// `lockedBy` so the lease holder's calls still succeed.
fn request_cancel(store: &mut Store, _: &FakeOptions, args: Value) -> Result<Value, FunctionError> {
    let args: JobIdArgs = parse(args)?;
    let job = store
        .jobs
        .get_mut(&args.job_id)
        .ok_or_else(|| thrown("Job not found"))?;
    if !FINAL_STATUSES.contains(&job.status.as_str()) {
        job.status = "canceled".to_owned();
        job.cancel_requested = Some(true);
        job.updated_at = now_ms();
    }
    Ok(json!({"status": job.status}))
}
