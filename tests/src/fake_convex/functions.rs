//! The Fondation functions the fake deployment runs: the registry with each function's kind and
//! argument validator, and the `repositories`, `docs` and `jobs` handlers (the `queue` ones live
//! in `queue.rs`). Semantics follow the real functions, sharp edges included.
//!
//! `repositories:create` and `users:create` are fake-only: the real deployment creates them from
//! GitHub in actions. `docs:upsertFromJob` normalizes Markdown like the real one (content can
//! grow), skips empty chapters and tutorials, patches the job, deletes the documents of every
//! other completed job of the repository, and refuses to read or write more than
//! [`FakeOptions::transaction_bytes_limit`] in one mutation. `queue:reclaimExpired` is internal:
//! only admin calls (the deploy key) reach it, and nothing schedules it.

use std::{collections::HashSet, sync::LazyLock};

use serde::{de::DeserializeOwned, Deserialize};
use serde_json::{json, Value};

use super::{
    queue,
    store::{now_ms, JobDoc, RepositoryDoc, Store, StoredDoc},
    users,
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
    /// Internal functions run only for admin callers (the deploy key), as with `npx convex run`.
    pub internal: bool,
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

static FUNCTIONS: LazyLock<Vec<Function>> = LazyLock::new(|| {
    use Validator::{Array, Boolean, Float64, Id, Null, Object, String as Str, Union};
    let job_id = || required("jobId", Id("jobs"));
    let worker_id = || required("workerId", Str);
    vec![
        Function {
            path: "queue:claimOne",
            kind: Kind::Mutation,
            internal: false,
            args: Object(vec![worker_id(), optional("leaseMs", Float64)]),
            handler: queue::claim_one,
        },
        Function {
            path: "queue:heartbeat",
            kind: Kind::Mutation,
            internal: false,
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
            internal: false,
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
            internal: false,
            args: Object(vec![job_id(), worker_id(), required("error", Str)]),
            handler: queue::retry_or_fail,
        },
        Function {
            path: "queue:createJob",
            kind: Kind::Mutation,
            internal: false,
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
            internal: false,
            args: Object(vec![required("repositoryId", Id("repositories"))]),
            handler: get_repository,
        },
        Function {
            path: "repositories:create",
            kind: Kind::Mutation,
            internal: false,
            args: Object(vec![
                required("fullName", Str),
                required("defaultBranch", Str),
                optional("userId", Id("users")),
            ]),
            handler: create_repository,
        },
        Function {
            path: "users:create",
            kind: Kind::Mutation,
            internal: false,
            args: Object(vec![
                required("githubId", Str),
                optional("githubAccessToken", Str),
            ]),
            handler: users::create,
        },
        Function {
            path: "users:getUserById",
            kind: Kind::Query,
            internal: false,
            args: Object(vec![required("userId", Id("users"))]),
            handler: users::get_by_id,
        },
        Function {
            path: "users:getGitHubToken",
            kind: Kind::Query,
            internal: false,
            args: Object(vec![required("githubId", Str)]),
            handler: users::github_token,
        },
        Function {
            path: "queue:reclaimExpired",
            kind: Kind::Mutation,
            internal: true,
            args: Object(vec![]),
            handler: queue::reclaim_expired,
        },
        Function {
            path: "jobs:create",
            kind: Kind::Mutation,
            internal: false,
            args: Object(vec![
                required("userId", Id("users")),
                required("repositoryId", Id("repositories")),
                required("prompt", Str),
            ]),
            handler: queue::create_from_ui,
        },
        Function {
            path: "jobs:updateStatus",
            kind: Kind::Mutation,
            internal: false,
            args: Object(vec![
                job_id(),
                required(
                    "status",
                    literals(&[
                        "pending",
                        "claimed",
                        "cloning",
                        "analyzing",
                        "gathering",
                        "running",
                        "completed",
                        "failed",
                        "canceled",
                        "dead",
                    ]),
                ),
                required("callbackToken", Str),
                optional("progress", Str),
                optional("currentStep", Float64),
                optional("totalSteps", Float64),
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
                optional("error", Str),
            ]),
            handler: update_status,
        },
        Function {
            path: "docs:upsertFromJob",
            kind: Kind::Mutation,
            internal: false,
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
            internal: false,
            args: Object(vec![job_id()]),
            handler: list_docs,
        },
        Function {
            path: "jobs:getJob",
            kind: Kind::Query,
            internal: false,
            args: Object(vec![job_id()]),
            handler: get_job,
        },
        Function {
            path: "jobs:requestCancel",
            kind: Kind::Mutation,
            internal: false,
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
    default_branch: String,
    user_id: Option<String>,
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
        user_id: args.user_id,
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

/// The web app's `docs:upsertFromJob`: replaces the job's document set (matched by a source key:
/// repository, slug without its folder, title), skipping empty chapters and tutorials and
/// duplicates, storing Markdown normalized; patches the job (`docsCount`, `completedAt`, `runId`,
/// `regenerationStats`); then, when anything was inserted or updated, deletes the documents of
/// every other completed job of the repository. No ownership or cancel check. One transaction:
/// a document over 1 MiB, or more than the transaction limit read or written, fails all of it.
fn upsert_from_job(
    store: &mut Store,
    options: &FakeOptions,
    args: Value,
) -> Result<Value, FunctionError> {
    let args: UpsertArgs = parse(args)?;
    let Some(job) = store.jobs.get(&args.job_id) else {
        return Err(FunctionError::Thrown(format!(
            "Update on nonexistent document ID {}",
            args.job_id
        )));
    };
    let mut read = convex_size(&to_value(job)?);
    let mut written = 0usize;
    let now = now_ms();
    let existing = store.docs.get(&args.job_id).cloned().unwrap_or_default();
    for doc in &existing {
        read += convex_size(&to_value(doc)?);
    }
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
        let content = if file.kind == "yaml" {
            file.content.clone()
        } else {
            normalize_markdown(&file.content)
        };
        let chapter_index = file.chapter_index.unwrap_or(0.0);
        let doc = match existing.iter().find(|doc| doc.source_key == key) {
            Some(old) if old.content == content && old.chapter_index == chapter_index => {
                skipped += 1;
                old.clone()
            }
            Some(old) => {
                updated += 1;
                StoredDoc {
                    content,
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
                    content,
                    source_key: key,
                    run_id: args.run_id.clone(),
                    created_at: now,
                    updated_at: None,
                }
            }
        };
        let size = convex_size(&to_value(&doc)?);
        if size > MAX_DOCUMENT_BYTES {
            return Err(FunctionError::Limit(format!(
                "Value is too large ({size} bytes > maximum size {MAX_DOCUMENT_BYTES} bytes) for \
                 the document of slug {:?} in table \"docs\"",
                doc.slug
            )));
        }
        if !existing.iter().any(|old| old == &doc) {
            written += size;
        }
        kept.push(doc);
    }
    let orphans: Vec<&StoredDoc> = existing
        .iter()
        .filter(|old| !kept.iter().any(|doc| doc.id == old.id))
        .collect();
    for orphan in &orphans {
        written += convex_size(&to_value(orphan)?);
    }
    let deleted = orphans.len();
    let doc_ids: Vec<String> = kept.iter().map(|doc| doc.id.clone()).collect();
    let docs_count = doc_ids.len();
    let stats = json!({
        "inserted": inserted,
        "updated": updated,
        "skipped": skipped,
        "rejected": rejected,
        "deleted": deleted,
    });

    // The previous course: every other completed job of the repository (all of the repository's
    // jobs are read to find them) and their documents.
    let mut previous_jobs = Vec::new();
    if inserted > 0 || updated > 0 {
        for other in store
            .jobs
            .values()
            .filter(|other| other.repository_id == args.repository_id)
        {
            read += convex_size(&to_value(other)?);
            if other.status == "completed" && other.id != args.job_id {
                for doc in store.docs.get(&other.id).map_or(&[][..], Vec::as_slice) {
                    let size = convex_size(&to_value(doc)?);
                    read += size;
                    written += size;
                }
                previous_jobs.push(other.id.clone());
            }
        }
    }
    let limit = options.transaction_bytes_limit;
    if read > limit || written > limit {
        return Err(FunctionError::Limit(format!(
            "Transaction exceeded resource limits: {read} bytes read, {written} bytes written \
             (limit {limit} bytes each)"
        )));
    }

    store.docs.insert(args.job_id.clone(), kept);
    for previous in previous_jobs {
        store.docs.remove(&previous);
    }
    if let Some(job) = store.jobs.get_mut(&args.job_id) {
        job.docs_count = Some(docs_count as f64);
        job.completed_at = Some(args.summary.generated_at);
        job.run_id = args.run_id;
        job.regeneration_stats = Some(stats.clone());
    }
    Ok(json!({"docsCount": docs_count, "docIds": doc_ids, "stats": stats}))
}

/// The deployment's `normalizeMarkdown`: `\r\n` and `\r` become `\n`, an odd number of code
/// fences gets a closing one, a final newline, a blank line before each heading
/// (`\n(#{1,6}\s)`), and runs of three or more newlines become two.
pub fn normalize_markdown(content: &str) -> String {
    if content.is_empty() {
        return String::new();
    }
    let mut text = content.replace("\r\n", "\n").replace('\r', "\n");
    if text.matches("```").count() % 2 == 1 {
        text.push_str("\n```\n");
    }
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let lines: Vec<&str> = text.split('\n').collect();
    let last = lines.len() - 1;
    let mut spaced = String::with_capacity(text.len());
    for (index, line) in lines.into_iter().enumerate() {
        if index > 0 {
            spaced.push('\n');
            let hashes = line.bytes().take_while(|&byte| byte == b'#').count();
            // `\s` also matches the newline ending an empty heading line.
            let next = line[hashes..].chars().next();
            let heading = (1..=6).contains(&hashes)
                && (next.is_some_and(char::is_whitespace) || (next.is_none() && index < last));
            if heading {
                spaced.push('\n');
            }
        }
        spaced.push_str(line);
    }
    let mut out = String::with_capacity(spaced.len());
    let mut newlines = 0;
    for c in spaced.chars() {
        newlines = if c == '\n' { newlines + 1 } else { 0 };
        if newlines <= 2 {
            out.push(c);
        }
    }
    out
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

/// The web app's `jobs:requestCancel`: status `canceled`, `cancelRequested`, `error`,
/// `completedAt`, leaving `lockedBy` so the lease holder's calls still succeed. Throws on a
/// missing or finished job.
fn request_cancel(store: &mut Store, _: &FakeOptions, args: Value) -> Result<Value, FunctionError> {
    let args: JobIdArgs = parse(args)?;
    let job = store
        .jobs
        .get_mut(&args.job_id)
        .ok_or_else(|| thrown("Job not found"))?;
    if !ACTIVE_STATUSES.contains(&job.status.as_str()) {
        return Err(thrown("Job is not active and cannot be cancelled"));
    }
    let now = now_ms();
    job.status = "canceled".to_owned();
    job.cancel_requested = Some(true);
    job.error = Some("Job cancelled by user".to_owned());
    job.completed_at = Some(now);
    Ok(json!({"success": true}))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateStatusArgs {
    job_id: String,
    status: String,
    callback_token: String,
    progress: Option<String>,
    current_step: Option<f64>,
    total_steps: Option<f64>,
    result: Option<Value>,
    error: Option<String>,
}

/// The web app's `jobs:updateStatus`, which its UI uses to cancel (`status: canceled`, no
/// `cancelRequested`): checks the callback token only, writes any status, keeps `lockedBy`.
fn update_status(store: &mut Store, _: &FakeOptions, args: Value) -> Result<Value, FunctionError> {
    let args: UpdateStatusArgs = parse(args)?;
    let job = store
        .jobs
        .get_mut(&args.job_id)
        .ok_or_else(|| thrown("Job not found"))?;
    if job.callback_token != args.callback_token {
        return Err(thrown("Invalid callback token"));
    }
    let now = now_ms();
    if args.status == "completed" {
        job.completed_at = Some(now);
    }
    job.status = args.status;
    job.updated_at = now;
    if let Some(progress) = args.progress.filter(|progress| !progress.is_empty()) {
        job.progress = Some(progress);
    }
    if let Some(step) = args.current_step {
        job.current_step = Some(step);
    }
    if let Some(total) = args.total_steps {
        job.total_steps = Some(total);
    }
    if let Some(result) = args.result.filter(|result| !result.is_null()) {
        job.result = Some(result);
    }
    if let Some(error) = args.error.filter(|error| !error.is_empty()) {
        job.error = Some(error.clone());
        job.last_error = Some(error);
    }
    Ok(json!({"success": true}))
}
