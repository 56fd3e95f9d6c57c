//! The dispatcher: the coordinator's single claim loop and the hand-out of claimed jobs.
//!
//! One poller per coordinator, however many agents: it claims only while some agent has a free
//! slot, claims again at once after a successful claim, and after an empty one waits
//! `POLL_INTERVAL` (or less when a submitted job or a due retry wakes it).

use std::{sync::Arc, time::Duration};

use fondation_proto::{
    model::{Assignment, ToAgent},
    validate,
};
use fondation_runtime::logging::escaped;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    assignments::AssignmentRecord,
    context::Context,
    job_source::{now_ms, ClaimedJob, RepoTarget},
    lease::{spawn_keeper, JobEvent, KeeperStart},
};

/// Runs until shutdown.
pub async fn run_claim_loop(ctx: Arc<Context>) {
    let shutdown = ctx.shutdown.clone();
    loop {
        // Claim only while an agent can take the job.
        while ctx.agents.free_slots() == 0 {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ctx.agents.capacity_changed() => {}
            }
        }
        if shutdown.is_cancelled() {
            return;
        }
        // Raced against shutdown: during a job-source outage a claim retries for up to its retry
        // budget, and a stopping coordinator must not wait that out. A claim cut short may
        // already have been applied by the source; like a claim whose reply was lost, that job
        // stays under our lock until its lease is reclaimed (DESIGN.md section 2).
        let claimed = tokio::select! {
            _ = shutdown.cancelled() => return,
            claimed = ctx.source.claim(&ctx.worker_id, ctx.config.lease_time) => claimed,
        };
        let wait = match claimed {
            Ok(Some(job)) => {
                dispatch(&ctx, job).await;
                continue;
            }
            Ok(None) => idle_wait(&ctx).await,
            Err(error) => {
                warn!(%error, source = ctx.source.kind(), "claiming a job failed; retrying after the poll interval");
                ctx.config.poll_interval
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ctx.wake_claimer.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How long to wait after an empty claim: the poll interval, or until the next retry is due.
async fn idle_wait(ctx: &Context) -> Duration {
    let poll = ctx.config.poll_interval;
    match ctx.source.next_due_at_ms().await {
        Ok(Some(due)) => {
            let until_due = Duration::from_millis((due - now_ms()).max(0.0) as u64);
            poll.min(until_due + Duration::from_millis(5))
        }
        _ => poll,
    }
}

/// Checks a claimed job and hands it to the agent with the most free slots.
async fn dispatch(ctx: &Arc<Context>, job: ClaimedJob) {
    let target = match check_job(ctx, &job) {
        Ok(target) => target,
        Err(message) => {
            warn!(job_id = %job.id, error = %escaped(&message), "job refused before assignment");
            if let Err(error) = ctx
                .source
                .fail(&job.id, &ctx.worker_id, &message, false)
                .await
            {
                warn!(job_id = %job.id, %error, "recording the refusal failed");
            }
            return;
        }
    };

    // The source handed us a job we still run (its lease expired under us): the old run is stale.
    if let Some(stale) = ctx.assignments.by_job(&job.id) {
        warn!(job_id = %job.id, stale_assignment = %stale.assignment_id, "job claimed again while still assigned; the old run is stale");
        ctx.assignments
            .notify(&stale.assignment_id, JobEvent::Superseded);
    }

    let assignment_id = uuid::Uuid::new_v4().to_string();
    let Some((agent_id, sender)) = ctx.agents.reserve_slot(&assignment_id) else {
        // The agent whose slot made us claim went away meanwhile.
        let message = "no agent with a free slot to run the job";
        warn!(job_id = %job.id, "{message}; handing the job back");
        if let Err(error) = ctx
            .source
            .fail(&job.id, &ctx.worker_id, message, true)
            .await
        {
            warn!(job_id = %job.id, %error, "handing the job back failed");
        }
        return;
    };
    let record = AssignmentRecord {
        assignment_id: assignment_id.clone(),
        job_id: job.id.clone(),
        epoch: ctx.assignments.next_epoch(),
        attempt: job.attempt,
        agent_id: agent_id.clone(),
    };
    // Journaled before it is sent, so a restart cannot forget a run that may have started.
    if let Err(error) = ctx.journal.record_assignment(&record).await {
        warn!(job_id = %job.id, %error, "could not journal the assignment; handing the job back");
        ctx.agents.release(&agent_id, &assignment_id);
        if let Err(error) = ctx
            .source
            .fail(&job.id, &ctx.worker_id, &error.to_string(), true)
            .await
        {
            warn!(job_id = %job.id, %error, "handing the job back failed");
        }
        return;
    }
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    ctx.assignments.insert(record.clone(), events_tx);
    spawn_keeper(
        ctx.clone(),
        record.clone(),
        events_rx,
        KeeperStart::Assigned,
    );

    // The owner's token, else the operator's GITHUB_TOKEN, else an anonymous clone. It goes
    // into this message only: the journal keeps the record above, which has no token.
    // (GITHUB_TOKEN was checked at start-up.)
    let clone_credential = target
        .credential
        .or_else(|| ctx.config.fallback_github_token().ok().flatten());
    let message = ToAgent::Assignment(Assignment {
        assignment_id,
        job_id: job.id.clone(),
        repo_url: target.url,
        branch: target.branch,
        prompt: job.prompt,
        attempt: job.attempt,
        epoch: record.epoch,
        clone_credential,
    });
    info!(job_id = %job.id, agent_id = %agent_id, attempt = job.attempt, "job assigned");
    if sender.send(message).await.is_err() {
        // The stream closed under us: the keeper hears about it from the gateway's clean-up or,
        // failing that, hands the job back after the re-attach grace.
        ctx.assignments
            .notify(&record.assignment_id, JobEvent::AgentGone);
    }
}

/// Everything from the job source is untrusted: the URL must be allow-listed, the branch a valid
/// git branch name, the prompt of sane size.
fn check_job(ctx: &Context, job: &ClaimedJob) -> Result<RepoTarget, String> {
    let target = job.target.clone()?;
    ctx.allowlist
        .check(&target.url)
        .map_err(|e| e.to_string())?;
    validate::check_branch(&target.branch).map_err(|e| e.to_string())?;
    validate::check_prompt(&job.prompt).map_err(|e| e.to_string())?;
    Ok(target)
}

#[cfg(test)]
mod tests;
