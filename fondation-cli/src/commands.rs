//! One function per subcommand: the Admin call, then its result as a table or JSON.

use fondation_proto::pb;

use crate::{
    args::{Command, JobOrderArg, OutputFormat},
    connection::{Admin, CliError},
    follow, output,
};

/// Runs `command` against the connected coordinator at `url`.
pub async fn run(
    admin: &mut Admin,
    url: &str,
    command: Command,
    format: OutputFormat,
) -> Result<(), CliError> {
    let status = |status| CliError::from_status(status, url);
    let json = format == OutputFormat::Json;
    match command {
        Command::Submit {
            repo,
            branch,
            prompt,
            follow,
        } => {
            let request = pb::SubmitJobRequest {
                repo_url: repo,
                branch,
                prompt,
            };
            let response = admin
                .submit_job(request)
                .await
                .map_err(status)?
                .into_inner();
            if json {
                output::print_line(&output::json_line(&response, "SubmitJobResponse"))?;
            } else {
                output::print_line(&format!("job {} queued", response.job_id))?;
            }
            if follow {
                follow::follow_job(admin, url, &response.job_id, format).await?;
            }
        }
        Command::Jobs {
            status: wanted,
            agent,
            order,
            limit,
        } => {
            let request = pb::ListJobsRequest {
                status: wanted.unwrap_or_default(),
                agent_id: agent.unwrap_or_default(),
                order: job_order(order) as i32,
                limit,
                page_token: String::new(),
            };
            let response = admin.list_jobs(request).await.map_err(status)?.into_inner();
            if json {
                output::print_line(&output::json_line(&response, "ListJobsResponse"))?;
            } else {
                print_jobs(&response.jobs)?;
            }
        }
        Command::Job {
            job_id,
            content,
            follow,
        } => {
            if follow {
                follow::follow_job(admin, url, &job_id, format).await?;
                return Ok(());
            }
            let request = pb::GetJobRequest {
                job_id,
                include_content: content && json,
            };
            let job = admin.get_job(request).await.map_err(status)?.into_inner();
            if json {
                output::print_line(&output::json_line(&job, "Job"))?;
            } else {
                print_job(&job)?;
            }
        }
        Command::Logs {
            job_id,
            tail,
            follow,
        } => {
            let request = pb::GetJobLogsRequest {
                job_id,
                tail,
                follow,
            };
            let mut lines = admin
                .get_job_logs(request)
                .await
                .map_err(status)?
                .into_inner();
            while let Some(line) = lines.message().await.map_err(status)? {
                if json {
                    output::print_line(&output::json_line(&line, "LogLine"))?;
                } else {
                    output::print_line(&line.text)?;
                }
            }
        }
        Command::Agents => {
            let response = admin
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if json {
                output::print_line(&output::json_line(&response, "ListAgentsResponse"))?;
            } else {
                print_agents(&response.agents)?;
            }
        }
        Command::Cancel { job_id } => {
            let request = pb::CancelJobRequest {
                job_id: job_id.clone(),
            };
            let response = admin
                .cancel_job(request)
                .await
                .map_err(status)?
                .into_inner();
            if json {
                output::print_line(&output::json_line(&response, "CancelJobResponse"))?;
            } else {
                output::print_line(&format!("job {job_id}: {}", response.status))?;
            }
        }
        Command::Drain { agent_id } => {
            let request = pb::DrainAgentRequest {
                agent_id: agent_id.clone(),
            };
            let response = admin
                .drain_agent(request)
                .await
                .map_err(status)?
                .into_inner();
            if json {
                output::print_line(&output::json_line(&response, "DrainAgentResponse"))?;
            } else {
                output::print_line(&format!(
                    "agent {agent_id} is draining: its running jobs finish, it takes no new ones"
                ))?;
            }
        }
        Command::Stats => {
            let stats = admin
                .get_stats(pb::GetStatsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if json {
                output::print_line(&output::json_line(&stats, "Stats"))?;
            } else {
                print_stats(&stats)?;
            }
        }
    }
    Ok(())
}

fn job_order(order: JobOrderArg) -> pb::JobOrder {
    match order {
        JobOrderArg::Newest => pb::JobOrder::NewestFirst,
        JobOrderArg::Oldest => pb::JobOrder::OldestFirst,
        JobOrderArg::Updated => pb::JobOrder::RecentlyUpdated,
        JobOrderArg::Status => pb::JobOrder::Status,
        JobOrderArg::Agent => pb::JobOrder::Agent,
    }
}

fn print_jobs(jobs: &[pb::Job]) -> Result<(), CliError> {
    let mut table = output::table(&["JOB", "STATUS", "STEP", "AGENT", "UPDATED", "REPOSITORY"]);
    for job in jobs {
        table.add_row([
            job.job_id.clone(),
            job.status.clone(),
            format!("{}/6", job.current_step),
            or_dash(&job.agent_id),
            output::short_time(job.updated_at.as_ref()),
            job.repo_url.clone(),
        ]);
    }
    output::keep_whole(&mut table, 0);
    output::print_line(&table.to_string())?;
    Ok(())
}

fn print_job(job: &pb::Job) -> Result<(), CliError> {
    let mut fields = output::table(&[]);
    let rows = [
        ("job", job.job_id.clone()),
        ("status", job.status.clone()),
        ("repository", job.repo_url.clone()),
        ("branch", or_default_branch(&job.branch)),
        ("step", format!("{}/6 {}", job.current_step, job.progress)),
        ("agent", or_dash(&job.agent_id)),
        ("attempts", job.attempts.to_string()),
        ("queued", output::time(job.created_at.as_ref())),
        ("claimed", output::time(job.claimed_at.as_ref())),
        ("started", output::time(job.started_at.as_ref())),
        ("ended", output::time(job.ended_at.as_ref())),
        ("error", or_dash(&job.error)),
    ];
    for (name, value) in rows {
        fields.add_row([name.to_string(), value]);
    }
    output::print_line(&fields.to_string())?;

    if !job.attempt_history.is_empty() {
        let mut attempts = output::table(&["#", "AGENT", "OUTCOME", "STARTED", "TOOK", "ERROR"]);
        for attempt in &job.attempt_history {
            attempts.add_row([
                attempt.number.to_string(),
                or_dash(&attempt.agent_id),
                attempt.outcome.clone(),
                output::short_time(attempt.started_at.as_ref().or(attempt.claimed_at.as_ref())),
                output::duration(attempt.duration.as_ref()),
                or_dash(&attempt.error),
            ]);
        }
        output::print_line(&format!("\n{attempts}"))?;
    }
    if !job.documents.is_empty() {
        let mut documents = output::table(&["KIND", "SIZE", "DOCUMENT", "TITLE"]);
        for document in &job.documents {
            documents.add_row([
                document.kind.clone(),
                format!("{} B", document.size_bytes),
                document.slug.clone(),
                document.title.clone(),
            ]);
        }
        output::print_line(&format!("\n{documents}"))?;
    }
    Ok(())
}

fn print_agents(agents: &[pb::AgentInfo]) -> Result<(), CliError> {
    let mut table = output::table(&["AGENT", "SLOTS", "RUNNING", "STATE", "VERSION", "LAST SEEN"]);
    for agent in agents {
        let state = if agent.quarantined {
            format!("quarantined: {}", agent.quarantine_reason)
        } else if agent.draining {
            "draining".into()
        } else if !agent.unready_reason.is_empty() {
            format!("unready: {}", agent.unready_reason)
        } else {
            "ready".into()
        };
        table.add_row([
            agent.agent_id.clone(),
            agent.slots.to_string(),
            agent.running_jobs.len().to_string(),
            state,
            agent.version.clone(),
            output::short_time(agent.last_seen_at.as_ref()),
        ]);
    }
    output::keep_whole(&mut table, 0);
    output::print_line(&table.to_string())?;
    Ok(())
}

fn print_stats(stats: &pb::Stats) -> Result<(), CliError> {
    let mut fields = output::table(&[]);
    let source = stats.source.clone().unwrap_or_default();
    let jobs = stats
        .jobs_by_status
        .iter()
        .map(|(status, count)| format!("{status} {count}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = [
        ("jobs", if jobs.is_empty() { "none".into() } else { jobs }),
        ("running", stats.jobs_running.to_string()),
        (
            "agents",
            format!(
                "{} connected, {} ready",
                stats.agents_connected, stats.agents_ready
            ),
        ),
        (
            "slots",
            format!("{} free of {}", stats.slots_free, stats.slots_total),
        ),
        ("up since", output::time(stats.started_at.as_ref())),
        ("uptime", output::duration(stats.uptime.as_ref())),
        (
            "job source",
            format!(
                "{} ({})",
                source.kind,
                if source.healthy {
                    "healthy"
                } else {
                    "UNHEALTHY"
                }
            ),
        ),
        ("last success", output::time(source.last_success.as_ref())),
        (
            "errors",
            if source.consecutive_errors == 0 {
                "none since the last success".into()
            } else {
                format!(
                    "{} in a row, last: {}",
                    source.consecutive_errors, source.last_error
                )
            },
        ),
    ];
    for (name, value) in rows {
        fields.add_row([name.to_string(), value]);
    }
    output::print_line(&fields.to_string())?;
    Ok(())
}

fn or_dash(value: &str) -> String {
    if value.is_empty() {
        "-".into()
    } else {
        value.to_string()
    }
}

fn or_default_branch(branch: &str) -> String {
    if branch.is_empty() {
        "(the repository's default)".into()
    } else {
        branch.to_string()
    }
}
