//! `Admin/GetStats`: counts for a dashboard. Jobs by status (the embedded store counts all it
//! holds; with Convex, which cannot count, the jobs this coordinator works on, each read back),
//! the fleet, uptime and the job source's health.

use std::{collections::HashMap, time::SystemTime};

use fondation_proto::{pb, validate::redact_credentials};
use futures::StreamExt as _;
use tonic::Status;

use crate::{context::Context, metrics::Fleet, source_health::HealthSnapshot};

/// Jobs read back at once when counting a Convex coordinator's jobs.
const READS_AT_ONCE: usize = 8;
/// The status shown for a job of ours that could not be read back (the source is down).
const UNKNOWN: &str = "unknown";

pub async fn collect(ctx: &Context) -> Result<pb::Stats, Status> {
    let jobs_by_status = jobs_by_status(ctx).await?;
    let fleet = Fleet::of(ctx);
    let uptime = ctx.started.elapsed();
    let started_at = SystemTime::now()
        .checked_sub(uptime)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    Ok(pb::Stats {
        jobs_by_status,
        agents_connected: fleet.agents_connected,
        agents_ready: fleet.agents_ready,
        slots_total: fleet.slots_total,
        slots_free: fleet.slots_free,
        jobs_running: fleet.jobs_running,
        started_at: Some(started_at.into()),
        uptime: prost_types::Duration::try_from(uptime).ok(),
        source: Some(source_health(ctx.source_health.snapshot())),
    })
}

async fn jobs_by_status(ctx: &Context) -> Result<HashMap<String, u64>, Status> {
    if let Some(counts) = ctx.source.count_by_status().await? {
        return Ok(counts
            .into_iter()
            .map(|(status, count)| (status.as_str().to_string(), count))
            .collect());
    }
    // Not a failure when the source is down: GetStats is how an operator sees that it is.
    let statuses: Vec<String> = futures::stream::iter(ctx.assignments.all())
        .map(|record| async move {
            match ctx.source.get_job(&record.job_id, false).await {
                Ok(Some(view)) => view.status.as_str().to_string(),
                Ok(None) | Err(_) => UNKNOWN.to_string(),
            }
        })
        .buffer_unordered(READS_AT_ONCE)
        .collect()
        .await;
    let mut counts = HashMap::new();
    for status in statuses {
        *counts.entry(status).or_insert(0) += 1;
    }
    Ok(counts)
}

fn source_health(health: HealthSnapshot) -> pb::SourceHealth {
    pb::SourceHealth {
        kind: health.kind.to_string(),
        healthy: health.healthy,
        last_success: health.last_success.map(Into::into),
        consecutive_errors: health.consecutive_errors,
        last_error: redact_credentials(&health.last_error.unwrap_or_default()).into_owned(),
    }
}
