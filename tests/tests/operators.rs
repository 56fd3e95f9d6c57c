//! What operators watch (issue 13): both Prometheus endpoints follow a job as it advances, the
//! coordinator's readiness follows its job source (NOT_SERVING while the source is down for longer
//! than SOURCE_UNHEALTHY_AFTER, SERVING again when it answers), and `Admin/GetStats` counts jobs,
//! agents and the source's health, read through the real grpcurl.

use std::{net::SocketAddr, path::Path, time::Duration};

use fondation_proto::pb;
use fondation_runtime::serving::{probe_health, LIVENESS};
use fondation_testkit::{
    fake_convex::{self, FakeOptions},
    support::{
        cluster::{
            reported_address, wait_runs_started, AgentOptions, AgentProc, CoordinatorProc, Sandbox,
            ANY_PORT,
        },
        convex_world::ConvexWorld,
        grpcurl,
        metrics::{scrape, try_scrape, Metrics},
        wait,
    },
};
use tonic_health::pb::health_check_response::ServingStatus;

const TIMEOUT: Duration = Duration::from_secs(60);

/// `METRICS_ADDR` on any free port, reported in `file`.
fn metrics_env(file: &Path) -> [(&'static str, String); 2] {
    [
        ("METRICS_ADDR", "127.0.0.1:0".to_string()),
        ("METRICS_ADDRESS_FILE", file.display().to_string()),
    ]
}

fn as_env<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// Scrapes `addr` until `check` accepts the metrics (it says what it still misses otherwise).
async fn wait_metrics(
    what: &str,
    addr: SocketAddr,
    check: impl Fn(&Metrics) -> Result<(), String>,
) -> Metrics {
    wait::until(what, TIMEOUT, || async {
        let metrics = try_scrape(addr).await?;
        check(&metrics).map(|()| Some(metrics))
    })
    .await
}

/// `expected` as what `name` with `labels` must be, or what it is instead.
fn expect(
    metrics: &Metrics,
    name: &str,
    labels: &[(&str, &str)],
    expected: f64,
) -> Result<(), String> {
    let actual = metrics.count(name, labels);
    if actual == expected {
        Ok(())
    } else {
        Err(format!("{name}{labels:?} is {actual}, not {expected}"))
    }
}

fn expect_observations(
    metrics: &Metrics,
    name: &str,
    labels: &[(&str, &str)],
    expected: f64,
) -> Result<(), String> {
    let actual = metrics.observations(name, labels);
    if actual == expected {
        Ok(())
    } else {
        Err(format!(
            "{name}{labels:?} has {actual} observations, not {expected}"
        ))
    }
}

fn phase(name: &'static str) -> [(&'static str, &'static str); 1] {
    [("phase", name)]
}

const COMPLETED: [(&str, &str); 1] = [("outcome", "completed")];
const PHASES: &str = "fondation_agent_phase_duration_seconds";

#[tokio::test(flavor = "multi_thread")]
async fn metrics_follow_a_job_on_both_endpoints_and_get_stats_counts_it() {
    let sandbox = Sandbox::new();
    let coordinator_file = sandbox.path("coordinator-metrics.address");
    let coordinator_env = metrics_env(&coordinator_file);
    let mut coordinator =
        CoordinatorProc::start(&sandbox, ANY_PORT, &as_env(&coordinator_env)).await;
    let coordinator_metrics = reported_address(&mut coordinator.proc, &coordinator_file).await;
    let mut admin = coordinator.admin().await;

    // A job queued before any agent: the queue depth shows it, no agent is connected.
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    let queued = scrape(coordinator_metrics).await;
    expect(&queued, "fondation_coordinator_pending_jobs", &[], 1.0).unwrap();
    expect(&queued, "fondation_coordinator_agents_connected", &[], 0.0).unwrap();
    expect(&queued, "fondation_coordinator_jobs_total", &COMPLETED, 0.0).unwrap();

    // The agent's analyzer stops after its first step until the gate file exists.
    let gate = sandbox.path("let-the-run-finish");
    let agent_file = sandbox.path("agent-metrics.address");
    let mut agent_env = metrics_env(&agent_file).to_vec();
    agent_env.push(("FIXTURE_DIRECTIVES", format!("hold={}", gate.display())));
    let mut agent = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "agent-1",
            coordinator_url: coordinator.url(),
            slots: 1,
            extra: &as_env(&agent_env),
        },
    );
    agent.wait_connected().await;
    let agent_metrics = reported_address(&mut agent.proc, &agent_file).await;
    wait_runs_started(&sandbox, &job_id, 1, TIMEOUT).await;

    // Mid-run: the job is assigned and accepted, cloned, analyzing (held), nothing ended.
    let during = wait_metrics(
        "the coordinator's metrics to show the running job",
        coordinator_metrics,
        |m| {
            expect(m, "fondation_coordinator_agents_connected", &[], 1.0)?;
            expect(m, "fondation_coordinator_jobs_running", &[], 1.0)?;
            expect(m, "fondation_coordinator_pending_jobs", &[], 0.0)?;
            expect_observations(
                m,
                "fondation_coordinator_assignment_latency_seconds",
                &[],
                1.0,
            )
        },
    )
    .await;
    expect(&during, "fondation_coordinator_slots_total", &[], 1.0).unwrap();
    expect(&during, "fondation_coordinator_slots_free", &[], 0.0).unwrap();
    expect(&during, "fondation_coordinator_jobs_total", &COMPLETED, 0.0).unwrap();
    assert!(
        during.count(
            "fondation_coordinator_source_calls_total",
            &[("function", "claim"), ("result", "ok")]
        ) >= 1.0,
        "{}",
        during.text
    );
    let agent_during = wait_metrics(
        "the agent's metrics to show the clone done and the analysis under way",
        agent_metrics,
        |m| {
            expect(m, "fondation_agent_connected", &[], 1.0)?;
            expect(m, "fondation_agent_jobs_running", &[], 1.0)?;
            expect_observations(m, PHASES, &phase("clone"), 1.0)
        },
    )
    .await;
    for held in ["analyze", "collect", "upload"] {
        expect_observations(&agent_during, PHASES, &phase(held), 0.0).unwrap();
    }
    expect(
        &agent_during,
        "fondation_agent_runs_total",
        &[("outcome", "succeeded")],
        0.0,
    )
    .unwrap();

    // Let the analyzer finish: the job completes and every counter moves.
    std::fs::write(&gate, "go").expect("opening the gate");
    admin.wait_status(&job_id, &["completed"], TIMEOUT).await;
    let after = wait_metrics(
        "the coordinator's metrics to count the completed job",
        coordinator_metrics,
        |m| {
            expect(m, "fondation_coordinator_jobs_total", &COMPLETED, 1.0)?;
            expect(m, "fondation_coordinator_jobs_running", &[], 0.0)
        },
    )
    .await;
    expect(&after, "fondation_coordinator_slots_free", &[], 1.0).unwrap();
    expect(&after, "fondation_coordinator_source_healthy", &[], 1.0).unwrap();
    assert!(
        after.count("fondation_coordinator_leases_renewed_total", &[]) >= 1.0,
        "status changes extend the lease: {}",
        after.text
    );
    let agent_after = wait_metrics(
        "the agent's metrics to time every phase of the run",
        agent_metrics,
        |m| {
            for done in ["clone", "analyze", "collect", "upload"] {
                expect_observations(m, PHASES, &phase(done), 1.0)?;
            }
            Ok(())
        },
    )
    .await;
    expect(
        &agent_after,
        "fondation_agent_runs_total",
        &[("outcome", "succeeded")],
        1.0,
    )
    .unwrap();
    expect(&agent_after, "fondation_agent_jobs_running", &[], 0.0).unwrap();
    expect(
        &agent_after,
        "fondation_agent_analyzer_exits_total",
        &[("status", "exited"), ("code", "0")],
        1.0,
    )
    .unwrap();
    expect_observations(
        &agent_after,
        "fondation_agent_run_duration_seconds",
        &[("outcome", "succeeded")],
        1.0,
    )
    .unwrap();

    // GetStats through the real grpcurl: the job, the agent and the embedded store's health.
    let stats = grpcurl::call(&coordinator.addr(), "fondation.v1.Admin/GetStats", None).unwrap();
    assert_eq!(stats["jobsByStatus"]["completed"], "1", "{stats:#}");
    assert_eq!(stats["agentsConnected"], 1, "{stats:#}");
    assert_eq!(stats["agentsReady"], 1, "{stats:#}");
    assert_eq!(stats["slotsTotal"], 1, "{stats:#}");
    assert_eq!(stats["slotsFree"], 1, "{stats:#}");
    assert_eq!(stats["source"]["kind"], "embedded", "{stats:#}");
    assert_eq!(stats["source"]["healthy"], true, "{stats:#}");
    let last_success = stats["source"]["lastSuccess"].as_str().unwrap_or_default();
    assert!(
        last_success.ends_with('Z') && last_success.contains('T'),
        "last success as RFC 3339: {stats:#}"
    );
    assert!(stats["startedAt"].is_string(), "{stats:#}");
    assert!(
        stats["uptime"].as_str().is_some_and(|u| u.ends_with('s')),
        "{stats:#}"
    );

    // The agent leaves: the agents gauge goes back down.
    agent.proc.signal(nix::sys::signal::Signal::SIGTERM);
    agent.proc.wait_exit(TIMEOUT).await;
    wait_metrics(
        "the coordinator's metrics to see the agent gone",
        coordinator_metrics,
        |m| expect(m, "fondation_coordinator_agents_connected", &[], 0.0),
    )
    .await;
}

/// Polls the coordinator's health service `service` until it reports `wanted`.
async fn wait_health(addr: &str, service: &str, wanted: ServingStatus) {
    let what = format!("the coordinator's health {service:?} to be {wanted:?}");
    wait::until(&what, TIMEOUT, || async {
        match probe_health(addr, service, Duration::from_secs(2)).await {
            Ok(status) if status == wanted => Ok(Some(())),
            Ok(status) => Err(format!("{status:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

async fn source_health(coordinator: &CoordinatorProc) -> pb::SourceHealth {
    let mut admin = coordinator.admin().await;
    admin
        .client
        .get_stats(pb::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner()
        .source
        .expect("GetStats has the source's health")
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_follows_the_job_source_down_and_back() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    let coordinator = world
        .coordinator(
            None,
            &[
                ("SOURCE_UNHEALTHY_AFTER", "1500"),
                ("CONVEX_RETRY_BUDGET", "300"),
                ("CONVEX_REQUEST_TIMEOUT", "500"),
            ],
        )
        .await;
    // An agent with a free slot keeps the claim loop calling the source.
    let _agent = AgentProc::connected(&world.sandbox, "agent-1", coordinator.url(), &[]).await;
    let addr = coordinator.addr();
    wait::until("a successful call to the fake Convex", TIMEOUT, || async {
        let health = source_health(&coordinator).await;
        Ok(health.last_success.is_some().then_some(()))
    })
    .await;

    // The deployment goes away: connections are refused.
    let ConvexWorld {
        sandbox: _sandbox,
        fake,
        ..
    } = world;
    let fake_addr = fake.addr();
    fake.shutdown().await.expect("the fake Convex stops");
    wait_health(&addr, "", ServingStatus::NotServing).await;
    assert_eq!(
        probe_health(&addr, LIVENESS, Duration::from_secs(2))
            .await
            .unwrap(),
        ServingStatus::Serving,
        "a source outage is no reason to restart the coordinator"
    );
    let down = source_health(&coordinator).await;
    assert!(!down.healthy, "{down:?}");
    assert_eq!(down.kind, "convex");
    assert!(down.consecutive_errors >= 1, "{down:?}");
    assert!(down.last_error.contains("unavailable"), "{down:?}");

    // Back on the same address: the next call succeeds and readiness returns.
    let listener = tokio::net::TcpListener::bind(fake_addr)
        .await
        .expect("binding the fake Convex's address again");
    let _fake = fake_convex::spawn(listener, FakeOptions::fast()).await;
    wait_health(&addr, "", ServingStatus::Serving).await;
    let back = source_health(&coordinator).await;
    assert!(back.healthy, "{back:?}");
    assert_eq!(back.consecutive_errors, 0, "{back:?}");
}
