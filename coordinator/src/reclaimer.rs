//! The reclaimer: on a job source whose expired leases nobody takes back (Convex, where
//! `queue:reclaimExpired` is internal and never scheduled), calls it every `RECLAIM_INTERVAL`, so
//! a job left claimed by a lost `queue:claimOne` reply or by a crash between a claim and its
//! journal entry runs again instead of blocking its repository forever.
//!
//! `queue:reclaimExpired` takes back the expired jobs of every worker, ours included. So before
//! each reclaim the leases of everything this coordinator still holds (running jobs, jobs waiting
//! for their agent to re-attach, results journaled but not yet delivered) are refreshed, and the
//! reclaim is skipped when any refresh failed: after an outage a reclaim never takes back work
//! that is really running. A reclaim that keeps failing (it may read much of the jobs table and
//! hit the per-mutation read limit) is logged loudly and backs off; claiming goes on regardless.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tracing::{error, info, warn};

use crate::{context::Context, job_source::JobSourceError};

/// Longest wait between two reclaims after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);

/// Runs until shutdown; returns at once when reclaims are off or the source cannot reclaim.
pub async fn run(ctx: Arc<Context>) {
    let interval = ctx.config.reclaim_interval;
    if interval.is_zero() || !ctx.source.can_reclaim() {
        return;
    }
    info!(
        interval_ms = interval.as_millis() as u64,
        "expired leases are reclaimed periodically"
    );
    let mut failures: u32 = 0;
    loop {
        let wait = backoff(interval, failures);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        match reclaim_once(&ctx).await {
            Ok(()) => failures = 0,
            Err(problem) => {
                failures = failures.saturating_add(1);
                let retry_in = backoff(interval, failures);
                if failures >= 3 {
                    error!(
                        failures,
                        retry_in_ms = retry_in.as_millis() as u64,
                        %problem,
                        "reclaiming expired leases keeps failing: jobs of lost claims stay stuck \
                         until it succeeds"
                    );
                } else {
                    warn!(failures, retry_in_ms = retry_in.as_millis() as u64, %problem, "reclaiming expired leases failed");
                }
            }
        }
    }
}

/// `interval` doubled per consecutive failure, at most [`MAX_BACKOFF`] (or `interval` if larger).
fn backoff(interval: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.min(16);
    interval
        .saturating_mul(factor)
        .min(MAX_BACKOFF.max(interval))
}

/// Refreshes every held lease, then reclaims; the reason when it did not reclaim.
async fn reclaim_once(ctx: &Context) -> Result<(), String> {
    let held = held_jobs(ctx).await?;
    let mut refresh_failed = 0usize;
    for job_id in &held {
        match ctx
            .source
            .heartbeat(
                job_id,
                &ctx.worker_id,
                &Default::default(),
                ctx.config.lease_time,
            )
            .await
        {
            // Not ours any more, or canceled: nothing of ours to protect.
            Ok(())
            | Err(
                JobSourceError::NotOwned { .. }
                | JobSourceError::Canceled(_)
                | JobSourceError::NotFound(_),
            ) => {}
            Err(error) => {
                warn!(job_id = %job_id, %error, "refreshing a lease before a reclaim failed");
                refresh_failed += 1;
            }
        }
    }
    if refresh_failed > 0 {
        return Err(format!(
            "reclaim skipped: {refresh_failed} of {} held leases could not be refreshed",
            held.len()
        ));
    }
    let counts = ctx
        .source
        .reclaim_expired()
        .await
        .map_err(|error| error.to_string())?;
    if counts.reclaimed > 0 {
        warn!(
            reclaimed = counts.reclaimed,
            checked = counts.checked,
            held = held.len(),
            "expired leases reclaimed: those jobs run again"
        );
    } else {
        info!(
            reclaimed = 0,
            checked = counts.checked,
            held = held.len(),
            "no expired lease to reclaim"
        );
    }
    Ok(())
}

/// Every job this coordinator still holds: in-flight assignments (running or waiting for their
/// agent to re-attach) and journaled entries (including results not yet delivered).
async fn held_jobs(ctx: &Context) -> Result<BTreeSet<String>, String> {
    let mut held: BTreeSet<String> = ctx
        .assignments
        .all()
        .into_iter()
        .map(|record| record.job_id)
        .collect();
    let journaled = ctx
        .journal
        .load()
        .await
        .map_err(|error| format!("reclaim skipped: cannot read the journal: {error}"))?;
    held.extend(journaled.into_iter().map(|entry| entry.record.job_id));
    Ok(held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let minute = Duration::from_secs(60);
        assert_eq!(backoff(minute, 0), minute);
        assert_eq!(backoff(minute, 2), minute * 4);
        assert_eq!(backoff(minute, 40), MAX_BACKOFF);
        assert_eq!(
            backoff(Duration::from_secs(3600), 3),
            Duration::from_secs(3600)
        );
    }
}
