//! Issue 4's chaos test: 100 jobs on 4 agents while agents are killed and restarted, the
//! coordinator is restarted twice (once SIGKILL, once SIGTERM), agent links stall twice and the
//! job source (the fake Convex) fails every call for 20 s. Every job must end completed exactly
//! once, none stuck. The schedule is random from a printed seed (CHAOS_SEED reproduces a run).

use std::{collections::BTreeMap, time::Duration};

use fondation_testkit::{
    fake_convex::{CallOutcome, FakeOptions, FaultKind, FaultSpec},
    fixture_cli::{read_run_log, runs_per_job},
    support::{
        cluster::{AgentOptions, AgentProc},
        convex_world::ConvexWorld,
        fault_proxy::FaultProxy,
        wait,
    },
};
use nix::sys::signal::Signal;
use rand::{rngs::StdRng, Rng, SeedableRng};
use tokio::time::{sleep_until, Instant};

const JOBS: usize = 100;
const AGENTS: usize = 4;
const COORDINATOR: &[(&str, &str)] = &[
    ("AGENT_TIMEOUT", "2000"),
    ("REATTACH_GRACE", "3000"),
    ("CANCEL_CHECK_INTERVAL", "2000"),
];
const AGENT: &[(&str, &str)] = &[
    ("KEEPALIVE_INTERVAL", "500"),
    ("RECONNECT_MAX_BACKOFF", "500"),
    ("DETACH_TIMEOUT", "10000"),
    ("FIXTURE_STEP_DELAY_MS", "300"),
];

#[derive(Debug, Clone, Copy)]
enum Fault {
    KillAgent(usize),
    KillCoordinator,
    TermCoordinator,
    Stall(usize),
    Unstall(usize),
    SourceOutage,
}

fn spawn_agent(world: &ConvexWorld, index: usize, url: String) -> AgentProc {
    AgentProc::spawn(
        &world.sandbox,
        AgentOptions {
            id: &format!("chaos-{index}"),
            coordinator_url: url,
            slots: 1,
            extra: AGENT,
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_hundred_jobs_survive_kills_restarts_stalls_and_an_outage() {
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("chaos seed {seed} (set CHAOS_SEED to replay)");
    let mut rng = StdRng::seed_from_u64(seed);

    let options = FakeOptions {
        max_attempts: 50,
        ..FakeOptions::fast()
    };
    let world = ConvexWorld::new(options).await;
    let first = world.coordinator(None, COORDINATOR).await;
    let port = first.port;
    let mut coordinator = Some(first);
    let target = format!("127.0.0.1:{port}");
    let mut proxies = Vec::new();
    let mut agents = Vec::new();
    for index in 0..AGENTS {
        let proxy = FaultProxy::start(target.clone()).await;
        agents.push(Some(spawn_agent(&world, index, proxy.url())));
        proxies.push(proxy);
    }
    let mut jobs = Vec::new();
    for n in 0..JOBS {
        jobs.push(world.create_job(&format!("chaos job {n}")).await);
    }

    // About 45 s of work (100 jobs of ~1.8 s on 4 agents). The schedule: an agent kill every
    // 2.5 s from 2 s on (12 of them), coordinator restarts at 8 s and 20 s, stalls of 4 s at 5 s
    // and 15 s, a 20 s job-source outage from 12 s.
    let mut schedule: Vec<(u64, Fault)> = Vec::new();
    for k in 0..12 {
        schedule.push((
            2000 + k * 2500,
            Fault::KillAgent(rng.random_range(0..AGENTS)),
        ));
    }
    schedule.push((8000, Fault::KillCoordinator));
    schedule.push((20_000, Fault::TermCoordinator));
    for at in [5000, 15_000] {
        let index = rng.random_range(0..AGENTS);
        schedule.push((at, Fault::Stall(index)));
        schedule.push((at + 4000, Fault::Unstall(index)));
    }
    schedule.push((12_000, Fault::SourceOutage));
    schedule.sort_by_key(|(at, _)| *at);

    let start = Instant::now();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (at, fault) in schedule {
        // Sleeping here paces the chaos schedule; nothing waits on it for synchronisation.
        sleep_until(start + Duration::from_millis(at)).await;
        println!("{:>6} ms  {fault:?}", start.elapsed().as_millis());
        match fault {
            Fault::KillAgent(index) => {
                if let Some(mut agent) = agents[index].take() {
                    agent.proc.kill9().await;
                }
                agents[index] = Some(spawn_agent(&world, index, proxies[index].url()));
                *counts.entry("agent kills").or_default() += 1;
            }
            Fault::KillCoordinator | Fault::TermCoordinator => {
                let mut old = coordinator.take().expect("a running coordinator");
                if matches!(fault, Fault::KillCoordinator) {
                    old.proc.kill9().await;
                } else {
                    old.proc.signal(Signal::SIGTERM);
                    let status = old.proc.wait_exit(Duration::from_secs(30)).await;
                    assert!(status.success(), "coordinator exit on SIGTERM: {status:?}");
                }
                drop(old);
                coordinator = Some(world.coordinator(Some(port), COORDINATOR).await);
                *counts.entry("coordinator restarts").or_default() += 1;
            }
            Fault::Stall(index) => {
                proxies[index].stall();
                *counts.entry("stalls").or_default() += 1;
            }
            Fault::Unstall(index) => proxies[index].resume(),
            Fault::SourceOutage => {
                world
                    .client
                    .add_fault(FaultSpec::new(FaultKind::HttpError).for_ms(20_000))
                    .await
                    .unwrap();
                *counts.entry("job-source outage seconds").or_default() += 20;
            }
        }
    }

    let deadline = Duration::from_secs(300);
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for job_id in &jobs {
        let job = world
            .wait_status(
                job_id,
                &["completed", "dead", "failed", "canceled"],
                deadline,
            )
            .await;
        *statuses.entry(job.status.clone()).or_default() += 1;
        assert_eq!(job.status, "completed", "{job:?}");
        assert_eq!(job.docs_count, Some(36.0), "{job:?}");
    }
    let calls = world.client.calls().await.unwrap();
    let mut completions: BTreeMap<String, usize> = BTreeMap::new();
    for call in &calls {
        if call.path.as_deref() == Some("queue:complete")
            && matches!(
                call.outcome,
                CallOutcome::Success | CallOutcome::AppliedReplyDropped
            )
            && call
                .reply
                .as_ref()
                .is_some_and(|r| r["status"] == "success")
        {
            let job = call.args["jobId"].as_str().unwrap_or_default().to_string();
            *completions.entry(job).or_default() += 1;
        }
    }
    let runs = runs_per_job(&read_run_log(&world.sandbox.run_log).unwrap());
    let total_runs: usize = runs.values().sum();
    let retried = runs.values().filter(|n| **n > 1).count();
    println!("faults: {counts:?}");
    println!("job statuses: {statuses:?}");
    println!(
        "analyzer runs: {total_runs} for {JOBS} jobs ({retried} jobs ran more than once); \
         took {:.0} s",
        start.elapsed().as_secs_f64()
    );
    for job_id in &jobs {
        assert_eq!(
            completions.get(job_id),
            Some(&1),
            "job {job_id} completed once"
        );
    }
    let refused = calls
        .iter()
        .filter(|c| c.outcome == CallOutcome::InjectedHttpError)
        .count();
    println!("calls failed by the outage: {refused}");
    assert!(refused > 0, "the outage hit the coordinator's calls");
    assert!(counts["agent kills"] >= 10);
    assert_eq!(counts["coordinator restarts"], 2);
    assert_eq!(counts["stalls"], 2);
    assert!(world.client.violations().await.unwrap().is_empty());
    world.assert_no_rejected_calls().await;
    // Nothing stuck: no job holds a lease any more.
    wait::until(
        "every lease to be released",
        Duration::from_secs(10),
        || async {
            let locked: Vec<_> = world
                .client
                .jobs()
                .await
                .map_err(|e| e.to_string())?
                .into_iter()
                .filter(|j| j.locked_by.is_some())
                .map(|j| j.id)
                .collect();
            if locked.is_empty() {
                Ok(Some(()))
            } else {
                Err(format!("{locked:?}"))
            }
        },
    )
    .await;
}
