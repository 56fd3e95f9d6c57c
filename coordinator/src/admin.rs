//! `fondation.v1.Admin`: what operators see and do with grpcurl.

use std::sync::Arc;

use fondation_proto::{
    model::{Drain, ToAgent},
    pb,
};
use fondation_runtime::settings::Secret;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::{
    auth::check_bearer,
    context::Context,
    job_source::{JobSourceError, JobStatus, JobView, NewJob},
    lease::JobEvent,
};

const DEFAULT_LIST_LIMIT: usize = 100;
use fondation_proto::limits::MAX_LIST_JOBS as MAX_LIST_LIMIT;

pub struct Admin {
    ctx: Arc<Context>,
}

impl Admin {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        check_bearer(
            request.metadata(),
            self.ctx.config.admin_token.as_ref().map(Secret::expose),
            "ADMIN_TOKEN",
        )
    }

    fn job_message(&self, view: JobView, include_content: bool) -> pb::Job {
        let agent_id = self
            .ctx
            .assignments
            .by_job(&view.id)
            .map(|record| record.agent_id)
            .unwrap_or_default();
        pb::Job {
            job_id: view.id,
            status: view.status.as_str().to_string(),
            attempts: view.attempts,
            error: view.error.unwrap_or_default(),
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
            repo_url: view.repo_url.unwrap_or_default(),
            branch: view.branch.unwrap_or_default(),
            created_at: view.created_at_ms,
            updated_at: view.updated_at_ms,
        }
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Admin {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.authorize(&request)?;
        let request = request.into_inner();
        if request.repo_url.trim().is_empty() {
            return Err(Status::invalid_argument("repo_url is required"));
        }
        let branch = if request.branch.is_empty() {
            "main".to_string()
        } else {
            request.branch
        };
        let job_id = self
            .ctx
            .source
            .submit(NewJob {
                repo_url: request.repo_url,
                branch,
                prompt: request.prompt,
            })
            .await?;
        info!(job_id = %job_id, "job submitted");
        self.ctx.wake_claimer.notify_one();
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let request = request.into_inner();
        let view = self
            .ctx
            .source
            .get_job(&request.job_id, request.include_content)
            .await?
            .ok_or_else(|| Status::not_found(format!("job {} not found", request.job_id)))?;
        Ok(Response::new(
            self.job_message(view, request.include_content),
        ))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
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
        let views = match self.ctx.source.list_jobs(status, limit).await {
            Ok(views) => views,
            // Convex offers no listing function: show the jobs this coordinator is running.
            Err(JobSourceError::Unsupported(_)) => {
                let mut views = Vec::new();
                for record in self.ctx.assignments.all() {
                    if let Some(view) = self.ctx.source.get_job(&record.job_id, false).await? {
                        if status.is_none_or(|s| s == view.status) {
                            views.push(view);
                        }
                    }
                }
                views.truncate(limit);
                views
            }
            Err(error) => return Err(error.into()),
        };
        let jobs = views
            .into_iter()
            .map(|view| self.job_message(view, false))
            .collect();
        Ok(Response::new(pb::ListJobsResponse { jobs }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::CancelJobResponse>, Status> {
        self.authorize(&request)?;
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
        _request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
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
                last_seen: agent.last_seen_ms,
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
        self.authorize(&request)?;
        let agent_id = request.into_inner().agent_id;
        let sender = self
            .ctx
            .agents
            .drain(&agent_id)
            .ok_or_else(|| Status::not_found(format!("agent {agent_id} is not connected")))?;
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
}
