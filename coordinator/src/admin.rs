//! `fondation.v1.Admin`: what operators see and do with grpcurl.
//!
//! With `ADMIN_TOKEN` set every call needs it, or `ADMIN_READ_TOKEN` for the read-only ones
//! (GetJob, ListJobs, ListAgents, GetJobLogs). Jobs are submitted only with the inputs dispatch
//! would accept (same checks, same messages), so nothing unbounded or credentialed is stored;
//! repository URLs and errors are redacted again on the way out, since a job source may hold
//! older data.
//!
//! A job's attempts come from this coordinator's [`crate::history`], whichever the job source.
//! GetJob shows them whole; ListJobs shows them without their error texts (each job's last error
//! is its `error`), which keeps a page of many jobs within gRPC's message size.

use std::sync::Arc;

use fondation_proto::{
    model::{Drain, ToAgent},
    pb,
    validate::{self, redact_credentials},
};
use fondation_runtime::settings::Secret;
use futures::StreamExt;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    auth::{check_admin, Access},
    context::Context,
    history::Attempt,
    job_logs::{JobLogs, LogLine},
    job_source::{now_ms, JobOrder, JobQuery, JobSourceError, JobStatus, JobView, NewJob},
    lease::JobEvent,
};

const DEFAULT_LIST_LIMIT: usize = 100;
use fondation_proto::limits::{
    DEFAULT_LOG_TAIL, MAX_JOB_ID_BYTES, MAX_LIST_JOBS as MAX_LIST_LIMIT, MAX_LOG_TAIL,
};

/// `ListJobs` page tokens: this prefix and the offset of the page. Opaque to callers; the prefix
/// lets a token from elsewhere be refused clearly.
const PAGE_TOKEN_PREFIX: &str = "o";

/// The offset a `ListJobs` page token stands for (0 for none).
fn page_offset(token: &str) -> Result<usize, Status> {
    if token.is_empty() {
        return Ok(0);
    }
    token
        .strip_prefix(PAGE_TOKEN_PREFIX)
        .and_then(|offset| offset.parse().ok())
        .ok_or_else(|| {
            Status::invalid_argument(
                "page_token is not valid: pass the next_page_token of the previous ListJobs \
                 reply, or nothing for the first page",
            )
        })
}

/// An id from a request as repeated in an error: capped, since nothing bounds it on the wire.
fn shown_id(id: &str) -> &str {
    fondation_proto::limits::truncate_utf8(id, MAX_JOB_ID_BYTES)
}

pub struct Admin {
    ctx: Arc<Context>,
}

impl Admin {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    fn authorize<T>(&self, request: &Request<T>, access: Access) -> Result<(), Status> {
        let config = &self.ctx.config;
        check_admin(
            request.metadata(),
            config.admin_token.as_ref().map(Secret::expose),
            config.admin_read_token.as_ref().map(Secret::expose),
            access,
        )
    }

    /// A job as the API shows it, with its attempts (their errors only with `attempt_errors`).
    fn job_message(
        &self,
        view: JobView,
        include_content: bool,
        attempts: Vec<Attempt>,
        attempt_errors: bool,
    ) -> pb::Job {
        let agent_id = self
            .ctx
            .assignments
            .by_job(&view.id)
            .map(|record| record.agent_id)
            .unwrap_or_default();
        let last = attempts.last();
        let time = |ms: Option<f64>| ms.map(timestamp_from_ms);
        let (claimed_at, started_at, ended_at) = (
            time(last.and_then(|a| a.claimed_at_ms)),
            time(last.and_then(|a| a.started_at_ms)),
            time(last.and_then(|a| a.ended_at_ms)),
        );
        let now = now_ms();
        pb::Job {
            job_id: view.id,
            status: view.status.as_str().to_string(),
            attempts: view.attempts,
            error: redact_credentials(&view.error.unwrap_or_default()).into_owned(),
            progress: view.progress.unwrap_or_default(),
            current_step: view.current_step.unwrap_or_default(),
            agent_id,
            documents: view
                .documents
                .into_iter()
                .map(|stored| pb::DocumentInfo {
                    size_bytes: stored.size_bytes,
                    slug: stored.document.slug,
                    kind: stored.document.kind.as_str().to_string(),
                    title: stored.document.title,
                    content: if include_content {
                        stored.document.content
                    } else {
                        String::new()
                    },
                    chapter_index: stored.document.chapter_index,
                })
                .collect(),
            repo_url: redact_credentials(&view.repo_url.unwrap_or_default()).into_owned(),
            branch: view.branch.unwrap_or_default(),
            created_at: Some(timestamp_from_ms(view.created_at_ms)),
            updated_at: Some(timestamp_from_ms(view.updated_at_ms)),
            claimed_at,
            started_at,
            ended_at,
            attempt_history: attempts
                .into_iter()
                .map(|attempt| attempt_message(attempt, attempt_errors, now))
                .collect(),
        }
    }

    /// The jobs this coordinator works on, for a source that cannot list its jobs (Convex).
    async fn jobs_working_on(&self, query: &JobQuery) -> Result<Vec<JobView>, Status> {
        let mut jobs = Vec::new();
        for record in self.ctx.assignments.all() {
            if query
                .agent_id
                .as_ref()
                .is_some_and(|agent_id| *agent_id != record.agent_id)
            {
                continue;
            }
            if let Some(view) = self.ctx.source.get_job(&record.job_id, false).await? {
                if query.status.is_none_or(|s| s == view.status) {
                    jobs.push((view, record.agent_id));
                }
            }
        }
        jobs.sort_by(|(a, a_agent), (b, b_agent)| {
            query.order.compare((a, Some(a_agent)), (b, Some(b_agent)))
        });
        Ok(jobs
            .into_iter()
            .map(|(view, _)| view)
            .skip(query.offset)
            .take(query.limit)
            .collect())
    }
}

/// One attempt as the API shows it.
fn attempt_message(attempt: Attempt, with_error: bool, now_ms: f64) -> pb::Attempt {
    // From the agent's acceptance (else the claim) to the end, or to now while it runs.
    let duration = attempt
        .started_at_ms
        .or(attempt.claimed_at_ms)
        .map(|from| duration_from_ms(attempt.ended_at_ms.unwrap_or(now_ms) - from));
    pb::Attempt {
        number: attempt.number,
        agent_id: attempt.agent_id,
        claimed_at: attempt.claimed_at_ms.map(timestamp_from_ms),
        started_at: attempt.started_at_ms.map(timestamp_from_ms),
        phases: attempt
            .phases
            .into_iter()
            .map(|(stage, at)| pb::PhaseStart {
                phase: stage.as_str().to_owned(),
                started_at: Some(timestamp_from_ms(at)),
            })
            .collect(),
        ended_at: attempt.ended_at_ms.map(timestamp_from_ms),
        outcome: attempt.outcome.as_str().to_owned(),
        error: match attempt.error {
            Some(error) if with_error => redact_credentials(&error).into_owned(),
            _ => String::new(),
        },
        duration,
    }
}

/// The `order` of a ListJobs request.
fn job_order(order: i32) -> Result<JobOrder, Status> {
    Ok(match pb::JobOrder::try_from(order) {
        Ok(pb::JobOrder::NewestFirst) => JobOrder::NewestFirst,
        Ok(pb::JobOrder::OldestFirst) => JobOrder::OldestFirst,
        Ok(pb::JobOrder::RecentlyUpdated) => JobOrder::RecentlyUpdated,
        Ok(pb::JobOrder::Status) => JobOrder::Status,
        Ok(pb::JobOrder::Agent) => JobOrder::Agent,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "order {order} is not a JobOrder; leave it out for newest first"
            )))
        }
    })
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Admin {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let request = request.into_inner();
        if request.repo_url.trim().is_empty() {
            return Err(Status::invalid_argument("repo_url is required"));
        }
        // Empty stays empty: the job analyzes the repository's default branch.
        let branch = request.branch;
        // What dispatch checks, refused now rather than stored and failed later.
        let invalid =
            |error: validate::ValidationError| Status::invalid_argument(error.to_string());
        self.ctx
            .allowlist
            .check(&request.repo_url)
            .map_err(invalid)?;
        validate::check_job_branch(&branch).map_err(invalid)?;
        validate::check_prompt(&request.prompt).map_err(invalid)?;
        let job = NewJob {
            repo_url: request.repo_url,
            branch,
            prompt: request.prompt,
        };
        let job_id = crate::dispatcher::submit(&self.ctx, job).await?;
        info!(job_id = %job_id, "job submitted");
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(&request, Access::Read)?;
        let request = request.into_inner();
        let view = self
            .ctx
            .source
            .get_job(&request.job_id, request.include_content)
            .await?
            .ok_or_else(|| {
                Status::not_found(format!("job {:?} not found", shown_id(&request.job_id)))
            })?;
        let attempts = self
            .ctx
            .history
            .of_job(&view.id)
            .await
            .map_err(history_error)?;
        Ok(Response::new(self.job_message(
            view,
            request.include_content,
            attempts,
            true,
        )))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let request = request.into_inner();
        let status = if request.status.is_empty() {
            None
        } else {
            Some(request.status.parse::<JobStatus>()?)
        };
        let limit = match request.limit as usize {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        };
        let offset = page_offset(&request.page_token)?;
        let query = JobQuery {
            status,
            agent_id: (!request.agent_id.is_empty()).then_some(request.agent_id),
            order: job_order(request.order)?,
            offset,
            // One more than asked tells whether a next page exists.
            limit: limit + 1,
        };
        let mut views = match self.ctx.source.list_jobs(&query).await {
            Ok(views) => views,
            // Convex offers no listing function: show the jobs this coordinator is running.
            Err(JobSourceError::Unsupported(_)) => self.jobs_working_on(&query).await?,
            Err(error) => return Err(error.into()),
        };
        let next_page_token = if views.len() > limit {
            views.truncate(limit);
            PAGE_TOKEN_PREFIX.to_string() + &(offset + limit).to_string()
        } else {
            String::new()
        };
        let ids = views.iter().map(|view| view.id.clone()).collect();
        let mut attempts = self.ctx.history.of_jobs(ids).await.map_err(history_error)?;
        let jobs = views
            .into_iter()
            .map(|view| {
                let attempts = attempts.remove(&view.id).unwrap_or_default();
                self.job_message(view, false, attempts, false)
            })
            .collect();
        Ok(Response::new(pb::ListJobsResponse {
            jobs,
            next_page_token,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let job_id = request.into_inner().job_id;
        let status = self.ctx.source.request_cancel(&job_id).await?;
        info!(job_id = %job_id, %status, "cancel requested");
        if let Some(record) = self.ctx.assignments.by_job(&job_id) {
            self.ctx
                .assignments
                .notify(&record.assignment_id, JobEvent::CheckCancel);
        }
        Ok(Response::new(pb::CancelJobResponse {
            status: status.as_str().to_string(),
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.authorize(&request, Access::Read)?;
        let agents = self
            .ctx
            .agents
            .snapshot()
            .into_iter()
            .map(|agent| pb::AgentInfo {
                running_jobs: agent
                    .running
                    .iter()
                    .filter_map(|assignment_id| self.ctx.assignments.get(assignment_id))
                    .map(|record| record.job_id)
                    .collect(),
                agent_id: agent.description.agent_id,
                version: agent.description.version,
                slots: agent.description.slots,
                last_seen_at: Some(timestamp_from_ms(agent.last_seen_ms)),
                connected_at: Some(timestamp_from_ms(agent.connected_at_ms)),
                draining: agent.draining,
                labels: agent.description.labels.into_iter().collect(),
                peer: agent.description.peer,
                unready_reason: agent.unready.unwrap_or_default(),
                quarantined: agent.quarantine.is_some(),
                quarantine_reason: agent
                    .quarantine
                    .map(|q| {
                        let left = q
                            .until
                            .saturating_duration_since(tokio::time::Instant::now());
                        format!("{} ({} s left)", q.reason, left.as_secs())
                    })
                    .unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(pb::ListAgentsResponse { agents }))
    }

    async fn drain_agent(
        &self,
        request: Request<pb::DrainAgentRequest>,
    ) -> Result<Response<pb::DrainAgentResponse>, Status> {
        self.authorize(&request, Access::Write)?;
        let agent_id = request.into_inner().agent_id;
        let sender = self.ctx.agents.drain(&agent_id).ok_or_else(|| {
            Status::not_found(format!("agent {:?} is not connected", shown_id(&agent_id)))
        })?;
        let message = ToAgent::Drain(Drain {
            reason: "drained by an operator".into(),
        });
        sender
            .send(message)
            .await
            .map_err(|_| Status::unavailable(format!("agent {agent_id} disconnected")))?;
        info!(agent_id = %agent_id, "agent draining");
        Ok(Response::new(pb::DrainAgentResponse {}))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::Stats>, Status> {
        self.authorize(&request, Access::Read)?;
        Ok(Response::new(crate::stats::collect(&self.ctx).await?))
    }

    type GetJobLogsStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::LogLine, Status>> + Send>>;

    async fn get_job_logs(
        &self,
        request: Request<pb::GetJobLogsRequest>,
    ) -> Result<Response<Self::GetJobLogsStream>, Status> {
        self.authorize(&request, Access::Read)?;
        let request = request.into_inner();
        let job_id = request.job_id;
        validate::check_job_id(&job_id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let tail = match request.tail {
            0 => DEFAULT_LOG_TAIL,
            tail => tail.min(MAX_LOG_TAIL),
        } as usize;
        let logs = JobLogs::read(&self.ctx, &job_id, tail, request.follow)
            .await
            .map_err(|error| Status::internal(format!("reading the job's logs: {error}")))?;
        // No lines and no run: an unknown job is an error, a quiet one an empty answer.
        if logs.lines.is_empty()
            && !self.ctx.job_logs.is_running(&job_id)
            && self.ctx.source.get_job(&job_id, false).await?.is_none()
        {
            return Err(Status::not_found(format!(
                "job {:?} not found",
                shown_id(&job_id)
            )));
        }
        let kept = futures::stream::iter(logs.lines.into_iter().map(|line| Ok(log_line(&line))));
        let new = futures::stream::unfold(logs.follow, |follow| async move {
            let mut follow = follow?;
            let line = follow.next().await?;
            Some((Ok(log_line(&line)), Some(follow)))
        });
        Ok(Response::new(Box::pin(kept.chain(new))))
    }
}

/// A kept line as the Admin API shows it.
fn log_line(line: &LogLine) -> pb::LogLine {
    pb::LogLine {
        seq: line.seq,
        attempt: line.attempt,
        stream: line.stream.as_str().to_owned(),
        text: line.text.clone(),
        time: Some(timestamp_from_ms(line.received_ms)),
    }
}

/// Why the attempt history could not be read.
fn history_error(error: crate::database::DatabaseError) -> Status {
    Status::internal(format!("reading the attempt history: {error}"))
}

/// A span in milliseconds as the Admin API's `Duration` (never negative: the wall clock may step
/// back between two readings).
fn duration_from_ms(ms: f64) -> prost_types::Duration {
    let ms = ms.max(0.0) as i64;
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Epoch milliseconds (how the job sources keep times) as the Admin API's `Timestamp`.
fn timestamp_from_ms(ms: f64) -> prost_types::Timestamp {
    let ms = ms.max(0.0) as i64;
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}
