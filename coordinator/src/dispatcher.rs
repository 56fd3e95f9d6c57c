//! The dispatcher: the coordinator's single claim loop and the hand-out of claimed jobs.
//!
//! One poller per coordinator, however many agents: it claims only while some agent has a free
//! slot, claims again at once after a successful claim, and after an empty one waits
//! `POLL_INTERVAL` (or less when a submitted job or a due retry wakes it).
//!
//! The agent's slot, the assignment id and its epoch are decided before the claim, so that a source
//! in the coordinator's own database journals the assignment in the claim's transaction
//! ([`JobSource::claim_journaled`]): one commit, and no window in which a crash leaves a claimed
//! job without its journal entry. With Convex the journal write follows the claim.
//!
//! A job submitted through the Admin API while an agent has a free slot skips the loop: its
//! submit claims in the same transaction ([`JobSource::submit_and_claim`], the embedded store),
//! so it reaches the agent after one commit instead of two.
//!
//! [`JobSource::claim_journaled`]: crate::job_source::JobSource::claim_journaled
//! [`JobSource::submit_and_claim`]: crate::job_source::JobSource::submit_and_claim

use std::{sync::Arc, time::Duration};

use fondation_proto::{
    model::{Assignment, ToAgent},
    validate,
};
use fondation_runtime::logging::escaped;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    agents::AgentSender,
    assignments::AssignmentRecord,
    context::Context,
    job_source::{now_ms, ClaimedJob, JobId, JobSourceError, NewJob, RepoTarget},
    journal::PlannedAssignment,
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
        let Some(round) = claim_round(&ctx).await else {
            return;
        };
        let wait = match round {
            Round::AllClaimed => continue,
            // The free slot went away since it was counted; look again after a while.
            Round::NoSlot => ctx.config.poll_interval,
            Round::Failed => ctx.config.poll_interval,
            Round::Drained => idle_wait(&ctx).await,
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ctx.wake_claimer.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// How a round of claims went.
enum Round {
    /// Every claim of the round brought a job: claim again at once.
    AllClaimed,
    /// No slot could be reserved after all.
    NoSlot,
    /// A claim failed (the source is unreachable or refused).
    Failed,
    /// A claim came back empty: the queue has nothing due.
    Drained,
}

/// Reserves as many free slots as the source takes parallel claims (at least one), claims a job
/// for each at once (on the embedded store they share one commit), and dispatches what came.
/// `None` when shutdown cut the claims short.
async fn claim_round(ctx: &Arc<Context>) -> Option<Round> {
    let wanted = ctx
        .source
        .parallel_claims()
        .clamp(1, ctx.agents.free_slots().max(1) as usize);
    let reserved: Vec<_> = std::iter::from_fn(|| reserve_slot(ctx))
        .take(wanted)
        .collect();
    if reserved.is_empty() {
        return Some(Round::NoSlot);
    }
    let claims = reserved.iter().map(|(planned, _)| {
        ctx.source
            .claim_journaled(&ctx.worker_id, ctx.config.lease_time, planned)
    });
    // Raced against shutdown: during a job-source outage a claim retries for up to its retry
    // budget, and a stopping coordinator must not wait that out. A claim cut short may already
    // have been applied by the source; like a claim whose reply was lost, that job stays under
    // our lock until its lease is reclaimed (DESIGN.md section 2). What was claimed is
    // dispatched whatever happens next.
    let results = tokio::select! {
        _ = ctx.shutdown.cancelled() => return None,
        results = futures::future::join_all(claims) => results,
    };
    let mut round = Round::AllClaimed;
    for ((planned, sender), claimed) in reserved.into_iter().zip(results) {
        match claimed {
            Ok(Some((job, journaled))) => dispatch(ctx, job, planned, sender, journaled).await,
            other => {
                ctx.agents
                    .release(&planned.agent_id, &planned.assignment_id);
                match other {
                    Err(error) => {
                        warn!(%error, source = ctx.source.kind(), "claiming a job failed; retrying after the poll interval");
                        round = Round::Failed;
                    }
                    _ if !matches!(round, Round::Failed) => round = Round::Drained,
                    _ => {}
                }
            }
        }
    }
    Some(round)
}

/// Reserves a free slot for an assignment not yet made: its id, epoch and agent are decided
/// before the claim, so that the claim can journal it.
fn reserve_slot(ctx: &Context) -> Option<(PlannedAssignment, AgentSender)> {
    let assignment_id = uuid::Uuid::new_v4().to_string();
    let (agent_id, sender) = ctx.agents.reserve_slot(&assignment_id, "")?;
    let planned = PlannedAssignment {
        assignment_id,
        epoch: ctx.assignments.next_epoch(),
        agent_id,
    };
    Some((planned, sender))
}

/// Queues a job submitted through the Admin API. With a free slot, the submit claims in its own
/// transaction and the claimed job is dispatched at once; the claim loop is woken only when
/// something may be left for it (no slot was free, or an older due job was claimed instead of
/// the new one).
pub async fn submit(ctx: &Arc<Context>, job: NewJob) -> Result<JobId, JobSourceError> {
    let reserved = if ctx.shutdown.is_cancelled() {
        None
    } else {
        reserve_slot(ctx)
    };
    let Some((planned, sender)) = reserved else {
        let job_id = ctx.source.submit(job).await?;
        ctx.wake_claimer.notify_one();
        return Ok(job_id);
    };
    let submitted = ctx
        .source
        .submit_and_claim(job, &ctx.worker_id, ctx.config.lease_time, &planned)
        .await;
    match submitted {
        Ok((job_id, Some(claimed))) => {
            if claimed.id != job_id {
                ctx.wake_claimer.notify_one();
            }
            // The caller gets its id without waiting for the agent's queue.
            let ctx = ctx.clone();
            tokio::spawn(async move { dispatch(&ctx, claimed, planned, sender, true).await });
            Ok(job_id)
        }
        Ok((job_id, None)) => {
            ctx.agents
                .release(&planned.agent_id, &planned.assignment_id);
            ctx.wake_claimer.notify_one();
            Ok(job_id)
        }
        Err(error) => {
            ctx.agents
                .release(&planned.agent_id, &planned.assignment_id);
            Err(error)
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

/// Checks a claimed job and hands it to the agent whose slot was reserved for it; `journaled`
/// when the claim already wrote the assignment's journal entry.
async fn dispatch(
    ctx: &Arc<Context>,
    job: ClaimedJob,
    planned: PlannedAssignment,
    sender: AgentSender,
    journaled: bool,
) {
    let record = planned.record(&job);
    let target = match check_job(ctx, &job) {
        Ok(target) => target,
        Err(message) => {
            warn!(job_id = %job.id, error = %escaped(&message), "job refused before assignment");
            // The journal entry first: a crash before the refusal leaves the job leased, and its
            // lease runs out, rather than a journaled run that never was. The attempt's history
            // ends in the same transaction.
            if let Err(error) = ctx.history.refused(&record, &message).await {
                warn!(job_id = %job.id, %error, "could not remove the refused job from the journal");
            }
            ctx.agents.release(&record.agent_id, &record.assignment_id);
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

    // The slot was reserved before the job was known: when its agent has failed this job before
    // and another agent can take it, the job goes to that one (journal entry rewritten first).
    let (record, sender) = match prefer_fresh_agent(ctx, record, sender, &job.id, journaled).await {
        Some(moved) => moved,
        None => return,
    };

    // Journaled before it is sent, so a restart cannot forget a run that may have started.
    if !journaled {
        if let Err(error) = ctx.journal.record_assignment(&record).await {
            warn!(job_id = %job.id, %error, "could not journal the assignment; handing the job back");
            ctx.agents.release(&record.agent_id, &record.assignment_id);
            if let Err(error) = ctx
                .source
                .fail(&job.id, &ctx.worker_id, &error.to_string(), true)
                .await
            {
                warn!(job_id = %job.id, %error, "handing the job back failed");
            }
            return;
        }
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
    let message = ToAgent::Assignment(Box::new(Assignment {
        assignment_id: record.assignment_id.clone(),
        job_id: job.id.clone(),
        repo_url: target.url,
        branch: target.branch,
        prompt: job.prompt,
        attempt: job.attempt,
        epoch: record.epoch,
        clone_credential,
    }));
    info!(job_id = %job.id, agent_id = %record.agent_id, attempt = job.attempt, "job assigned");
    if sender.send(message).await.is_err() {
        // The stream closed under us: the keeper hears about it from the gateway's clean-up or,
        // failing that, hands the job back after the re-attach grace.
        ctx.assignments
            .notify(&record.assignment_id, JobEvent::AgentGone);
    }
}

/// Moves a reservation away from an agent that failed this job before, when another agent has
/// a free slot; `None` when the move could not be journaled (the job was handed back).
async fn prefer_fresh_agent(
    ctx: &Arc<Context>,
    mut record: AssignmentRecord,
    sender: AgentSender,
    job_id: &str,
    journaled: bool,
) -> Option<(AssignmentRecord, AgentSender)> {
    if !ctx.agents.has_failed(&record.agent_id, job_id) {
        return Some((record, sender));
    }
    let moved_id = uuid::Uuid::new_v4().to_string();
    let Some((agent_id, fresh_sender)) = ctx.agents.reserve_fresh_slot(&moved_id, job_id) else {
        return Some((record, sender));
    };
    ctx.agents.release(&record.agent_id, &record.assignment_id);
    // The journal entry is keyed by assignment id: the old one goes, the new one is written.
    if journaled {
        if let Err(error) = ctx.journal.remove(&record.assignment_id).await {
            warn!(job_id, %error, "could not move the journal entry to another agent");
        }
    }
    info!(job_id, from = %record.agent_id, to = %agent_id, "job moved to an agent that has not failed it");
    record.assignment_id = moved_id;
    record.agent_id = agent_id;
    if journaled {
        if let Err(error) = ctx.journal.record_assignment(&record).await {
            warn!(job_id, %error, "could not journal the assignment; handing the job back");
            ctx.agents.release(&record.agent_id, &record.assignment_id);
            if let Err(error) = ctx
                .source
                .fail(job_id, &ctx.worker_id, &error.to_string(), true)
                .await
            {
                warn!(job_id, %error, "handing the job back failed");
            }
            return None;
        }
    }
    Some((record, fresh_sender))
}

/// Everything from the job source is untrusted: the URL must be allow-listed, the branch a valid
/// git branch name (or empty, for the repository's default branch), the prompt of sane size.
fn check_job(ctx: &Context, job: &ClaimedJob) -> Result<RepoTarget, String> {
    let target = job.target.clone()?;
    ctx.allowlist
        .check(&target.url)
        .map_err(|e| e.to_string())?;
    validate::check_job_branch(&target.branch).map_err(|e| e.to_string())?;
    validate::check_prompt(&job.prompt).map_err(|e| e.to_string())?;
    Ok(target)
}

#[cfg(test)]
mod tests;
