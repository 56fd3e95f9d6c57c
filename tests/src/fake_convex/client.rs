//! [`FakeConvexClient`]: typed access to a running fake, both its Convex functions (as the web app
//! would call them) and its `/_fake/...` admin endpoints.

use std::fmt;

use anyhow::{bail, Context};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::{
    store::{CallRecord, FaultSpec, JobDoc, LatencySpec, StoredDoc, Violations},
    validate::ID_ALPHABET,
};

const CLIENT_NAME: &str = concat!("fondation-testkit-", env!("CARGO_PKG_VERSION"));

/// A function's own error reply (`{"status":"error"}`), kept as a type tests can downcast to.
#[derive(Debug, Clone)]
pub struct FunctionFailure {
    pub path: String,
    pub http_status: u16,
    pub message: String,
}

impl fmt::Display for FunctionFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} failed (HTTP {}): {}",
            self.path, self.http_status, self.message
        )
    }
}

impl std::error::Error for FunctionFailure {}

#[derive(Clone)]
pub struct FakeConvexClient {
    http: reqwest::Client,
    base_url: String,
    /// Sent as `Authorization: Convex <key>`: an admin caller (internal functions, readable
    /// errors).
    deploy_key: Option<String>,
}

impl fmt::Debug for FakeConvexClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeConvexClient")
            .field("base_url", &self.base_url)
            .field("admin", &self.deploy_key.is_some())
            .finish()
    }
}

impl FakeConvexClient {
    /// A caller without the deploy key, like the web app's browser clients.
    pub fn new(base_url: &str) -> Self {
        FakeConvexClient {
            http: reqwest::Client::new(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            deploy_key: None,
        }
    }

    /// The same deployment called with its deploy key.
    pub fn with_deploy_key(mut self, key: &str) -> Self {
        self.deploy_key = Some(key.to_owned());
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Posts `body` as is to `/api/{endpoint}` with the usual headers; the status and JSON reply
    /// (`Value::Null` if the body is not JSON).
    pub async fn raw(&self, endpoint: &str, body: &Value) -> anyhow::Result<(u16, Value)> {
        let mut request = self
            .http
            .post(format!("{}/api/{endpoint}", self.base_url))
            .header("Convex-Client", CLIENT_NAME);
        if let Some(key) = &self.deploy_key {
            request = request.header("Authorization", format!("Convex {key}"));
        }
        let response = request
            .json(body)
            .send()
            .await
            .with_context(|| format!("posting to /api/{endpoint}"))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.context("reading the reply")?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    pub async fn query(&self, path: &str, args: Value) -> anyhow::Result<Value> {
        self.call("query", path, args).await
    }

    pub async fn mutation(&self, path: &str, args: Value) -> anyhow::Result<Value> {
        self.call("mutation", path, args).await
    }

    async fn call(&self, endpoint: &str, path: &str, args: Value) -> anyhow::Result<Value> {
        let body = json!({"path": path, "format": "convex_encoded_json", "args": args});
        let (status, reply) = self.raw(endpoint, &body).await?;
        match reply.get("status").and_then(Value::as_str) {
            Some("success") => Ok(reply.get("value").cloned().unwrap_or(Value::Null)),
            Some("error") => Err(FunctionFailure {
                path: path.to_owned(),
                http_status: status,
                message: reply
                    .get("errorMessage")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
            }
            .into()),
            _ => bail!("{path}: HTTP {status}: {reply}"),
        }
    }

    /// Creates a repository through the fake-only `repositories:create`; its id. Without a
    /// branch it gets `main`, as the web app stores it when GitHub reports none.
    pub async fn create_repository(
        &self,
        full_name: &str,
        default_branch: Option<&str>,
    ) -> anyhow::Result<String> {
        let args =
            json!({"fullName": full_name, "defaultBranch": default_branch.unwrap_or("main")});
        let id = self.mutation("repositories:create", args).await?;
        id.as_str()
            .map(str::to_owned)
            .with_context(|| format!("repositories:create returned {id}"))
    }

    /// Creates a repository owned by `user_id` (whose token clones it when private); its id.
    pub async fn create_owned_repository(
        &self,
        full_name: &str,
        default_branch: &str,
        user_id: &str,
    ) -> anyhow::Result<String> {
        let args =
            json!({"fullName": full_name, "defaultBranch": default_branch, "userId": user_id});
        let id = self.mutation("repositories:create", args).await?;
        id.as_str()
            .map(str::to_owned)
            .with_context(|| format!("repositories:create returned {id}"))
    }

    /// Creates a user through the fake-only `users:create`, with a GitHub token stored as given
    /// (`enc_v1_...`, `obf_...` or plain); its id.
    pub async fn create_user(
        &self,
        github_id: &str,
        token: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut args = json!({"githubId": github_id});
        if let Some(token) = token {
            args["githubAccessToken"] = json!(token);
        }
        let id = self.mutation("users:create", args).await?;
        id.as_str()
            .map(str::to_owned)
            .with_context(|| format!("users:create returned {id}"))
    }

    /// Enqueues a job the way the web app's UI does (`jobs:create`, a new user): refused while
    /// the repository has an active job. Its id.
    pub async fn create_job(&self, repository_id: &str, prompt: &str) -> anyhow::Result<String> {
        let user_id = self
            .create_user(&format!("gh-{}", random_id()), None)
            .await?;
        self.create_job_for(&user_id, repository_id, prompt).await
    }

    /// `jobs:create` for `user_id`; the job's id.
    pub async fn create_job_for(
        &self,
        user_id: &str,
        repository_id: &str,
        prompt: &str,
    ) -> anyhow::Result<String> {
        let reply = self
            .mutation(
                "jobs:create",
                json!({"userId": user_id, "repositoryId": repository_id, "prompt": prompt}),
            )
            .await?;
        reply
            .get("jobId")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("jobs:create returned {reply}"))
    }

    /// The UI's cancel: `jobs:updateStatus` with `status: canceled` and the job's callback token
    /// (no `cancelRequested`, `lockedBy` kept).
    pub async fn cancel_from_ui(&self, job_id: &str) -> anyhow::Result<()> {
        let job = self
            .job(job_id)
            .await?
            .with_context(|| format!("no job {job_id}"))?;
        self.mutation(
            "jobs:updateStatus",
            json!({"jobId": job_id, "status": "canceled", "callbackToken": job.callback_token}),
        )
        .await
        .map(drop)
    }

    /// The internal `queue:reclaimExpired` (needs [`FakeConvexClient::with_deploy_key`]):
    /// `{reclaimed, checked}`.
    pub async fn reclaim_expired(&self) -> anyhow::Result<Value> {
        self.mutation("queue:reclaimExpired", json!({})).await
    }

    /// A user cancel (`jobs:requestCancel`).
    pub async fn request_cancel(&self, job_id: &str) -> anyhow::Result<()> {
        self.mutation("jobs:requestCancel", json!({"jobId": job_id}))
            .await
            .map(drop)
    }

    pub async fn calls(&self) -> anyhow::Result<Vec<CallRecord>> {
        self.get("/_fake/calls").await
    }

    pub async fn jobs(&self) -> anyhow::Result<Vec<JobDoc>> {
        self.get("/_fake/jobs").await
    }

    /// The raw job document, `None` if there is no such job.
    pub async fn job(&self, id: &str) -> anyhow::Result<Option<JobDoc>> {
        let response = self
            .http
            .get(format!("{}/_fake/jobs/{id}", self.base_url))
            .send()
            .await
            .context("GET /_fake/jobs/{id}")?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        parse(response).await.map(Some)
    }

    /// Merges `patch` into the job document (`null` removes a field).
    pub async fn patch_job(&self, id: &str, patch: Value) -> anyhow::Result<JobDoc> {
        let response = self
            .http
            .patch(format!("{}/_fake/jobs/{id}", self.base_url))
            .json(&patch)
            .send()
            .await
            .context("PATCH /_fake/jobs/{id}")?;
        parse(response).await
    }

    pub async fn docs(&self, job_id: &str) -> anyhow::Result<Vec<StoredDoc>> {
        self.get(&format!("/_fake/docs/{job_id}")).await
    }

    pub async fn add_fault(&self, fault: FaultSpec) -> anyhow::Result<()> {
        self.post("/_fake/faults", &fault).await
    }

    pub async fn faults(&self) -> anyhow::Result<Vec<FaultSpec>> {
        self.get("/_fake/faults").await
    }

    /// Clears all faults and releases hung calls.
    pub async fn clear_faults(&self) -> anyhow::Result<()> {
        let response = self
            .http
            .delete(format!("{}/_fake/faults", self.base_url))
            .send()
            .await
            .context("DELETE /_fake/faults")?;
        check(response).await.map(drop)
    }

    /// Delays calls of `path` (all calls when `None`) by `ms`; 0 removes the delay.
    pub async fn set_latency(&self, ms: u64, path: Option<&str>) -> anyhow::Result<()> {
        let spec = LatencySpec {
            ms,
            path: path.map(str::to_owned),
        };
        self.post("/_fake/latency", &spec).await
    }

    pub async fn violations(&self) -> anyhow::Result<Violations> {
        self.get("/_fake/violations").await
    }

    pub async fn reset(&self) -> anyhow::Result<()> {
        self.post("/_fake/reset", &json!({})).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> anyhow::Result<T> {
        let response = self
            .http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await
            .with_context(|| format!("GET {path}"))?;
        parse(response).await
    }

    async fn post<T: serde::Serialize>(&self, path: &str, body: &T) -> anyhow::Result<()> {
        let response = self
            .http
            .post(format!("{}{path}", self.base_url))
            .json(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))?;
        check(response).await.map(drop)
    }
}

async fn check(response: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let url = response.url().clone();
    let text = response.text().await.unwrap_or_default();
    bail!("{url}: HTTP {status}: {text}")
}

async fn parse<T: DeserializeOwned>(response: reqwest::Response) -> anyhow::Result<T> {
    let response = check(response).await?;
    let url = response.url().clone();
    let bytes = response.bytes().await.context("reading the reply")?;
    serde_json::from_slice(&bytes).with_context(|| format!("parsing the reply of {url}"))
}

/// A well-formed id no table of the fake knows (e.g. a user id).
pub(crate) fn random_id() -> String {
    let mut rng = rand::rng();
    (0..32)
        .map(|_| char::from(ID_ALPHABET[rng.random_range(0..ID_ALPHABET.len())]))
        .collect()
}
