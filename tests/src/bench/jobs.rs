//! The job measurements: the same jobs through the system and run directly, interleaved so that
//! a change of load on the machine weighs on both alike.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use tokio::runtime::Runtime;

use crate::support::git::GitFixture;

use super::{direct::fixture_peak_rss, median, Cluster, DirectRunner, MemoryLine};

/// Most rounds of the throughput measurement, alternating system and baseline.
const MAX_ROUNDS: usize = 4;
/// Fewest jobs per agent in a round, so a round measures a stream of jobs, not one job's latency.
const MIN_JOBS_PER_AGENT: usize = 5;

/// Rounds of the throughput measurement of `jobs` jobs on `agents` agents.
pub fn throughput_rounds(jobs: usize, agents: usize) -> usize {
    (jobs / (agents.max(1) * MIN_JOBS_PER_AGENT)).clamp(1, MAX_ROUNDS)
}

/// Median job latency through a coordinator and one agent, and of direct runs, interleaved.
/// Direct runs block this thread outside the runtime; the cluster is driven through it.
pub fn latency(
    runtime: &Runtime,
    fixture: &Path,
    runs: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let mut cluster = runtime.block_on(Cluster::start(1))?;
    let direct = DirectRunner::new(cluster.repo_url(), fixture.to_owned())?;
    // One untimed job each, so first-run costs (page cache, connections) are not measured.
    runtime.block_on(cluster.job_latency())?;
    direct.run()?;
    let mut system = Vec::with_capacity(runs);
    let mut baseline = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        direct.run()?;
        baseline.push(start.elapsed());
        system.push(runtime.block_on(cluster.job_latency())?);
    }
    runtime.block_on(cluster.stop());
    Ok((median(&system), median(&baseline)))
}

/// Wall time of `jobs` jobs on `agents` agents and of as many direct runs `agents` at a time,
/// and the peak memory of the cluster's processes after its run. Both run in alternating rounds
/// (a share of the jobs each), so a change of load on the machine affects both alike.
pub fn throughput(
    runtime: &Runtime,
    fixture: &Path,
    jobs: usize,
    agents: usize,
) -> anyhow::Result<(Duration, Duration, Vec<MemoryLine>)> {
    let mut cluster = runtime.block_on(Cluster::start(agents))?;
    let direct = DirectRunner::new(cluster.repo_url(), fixture.to_owned())?;
    let rounds = throughput_rounds(jobs, agents);
    let (mut system, mut baseline) = (Duration::ZERO, Duration::ZERO);
    for round in 0..rounds {
        let share = jobs / rounds + usize::from(round < jobs % rounds);
        baseline += direct.run_parallel(share, agents)?;
        system += runtime.block_on(cluster.run_batch(share))?;
    }
    let memory = cluster.peak_memory();
    runtime.block_on(cluster.stop());
    Ok((system, baseline, memory))
}

/// Peak RSS of one fixture CLI run, sampled.
pub fn fixture_rss(fixture: &Path) -> anyhow::Result<Option<u64>> {
    let repo = GitFixture::new();
    let direct = DirectRunner::new(&repo.url, fixture.to_owned())?;
    fixture_peak_rss(&direct)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_keep_several_jobs_per_agent() {
        assert_eq!(throughput_rounds(80, 4), 4);
        assert_eq!(throughput_rounds(400, 4), 4);
        assert_eq!(throughput_rounds(40, 4), 2);
        assert_eq!(throughput_rounds(16, 4), 1);
        assert_eq!(throughput_rounds(1, 0), 1);
    }
}
