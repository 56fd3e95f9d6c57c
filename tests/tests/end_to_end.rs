//! Issue 2 end to end: a real coordinator and real agents as processes, the embedded job store,
//! real git clones over file://, and the fixture CLI as the analyzer.

use std::{collections::BTreeMap, time::Duration};

use fondation_proto::pb;
use nix::sys::signal::Signal;

use fondation_testkit::{
    fixture_cli::{self, max_concurrency_per_agent, read_run_log, runs_per_job},
    support::{
        cluster::{AgentOptions, AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
        free_port,
    },
};

const JOB_TIMEOUT: Duration = Duration::from_secs(90);
const TERMINAL: &[&str] = &["completed", "failed", "dead", "canceled"];

/// What the CLI wrote, as DESIGN.md section 3 says it must be stored: (slug, kind, title, index).
fn expected_documents() -> BTreeMap<String, (String, String, Option<u32>, serde_json::Value)> {
    let mut expected = BTreeMap::new();
    for file in fixture_cli::sample_files() {
        let path = file.path().to_string_lossy().into_owned();
        let text = file.contents_utf8().expect("sample files are UTF-8");
        let name = path.rsplit('/').next().unwrap().to_string();
        if let Some(folder) = path.strip_suffix(&format!("/{name}")) {
            // The first `# ` line outside fenced code blocks (the samples fence with ```).
            let mut in_fence = false;
            let heading = text
                .lines()
                .find_map(|line| {
                    if line.trim_start().starts_with("```") {
                        in_fence = !in_fence;
                        return None;
                    }
                    line.strip_prefix("# ").filter(|_| !in_fence)
                })
                .map(|title| title.trim().to_string())
                .unwrap_or_else(|| name.trim_end_matches(".md").replace('_', " "));
            let (kind, title) = match folder {
                "chapters" => ("chapter", heading),
                "reviewed-chapters" => ("chapter", format!("Reviewed: {heading}")),
                "tutorials" => ("tutorial", format!("Tutorial: {heading}")),
                other => panic!("unexpected sample folder {other}"),
            };
            // Sample names are `<kind>_<n>_...`: n is the natural-order position in the folder.
            let index: u32 = name.split('_').nth(1).unwrap().parse().unwrap();
            expected.insert(
                path.clone(),
                (
                    kind.into(),
                    title,
                    Some(index),
                    serde_json::Value::String(text.into()),
                ),
            );
        } else {
            let title = match name.as_str() {
                "step1_abstractions.yaml" => "Abstractions",
                "step2_relationships.yaml" => "Relationships",
                "step3_order.yaml" => "Chapter Order",
                other => panic!("unexpected sample file {other}"),
            };
            let parsed: serde_json::Value = serde_yaml::from_str(text).expect("sample YAML parses");
            expected.insert(path.clone(), ("yaml".into(), title.into(), None, parsed));
        }
    }
    expected
}

#[tokio::test(flavor = "multi_thread")]
async fn submitted_job_completes_with_exactly_the_documents_the_cli_wrote() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let _agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let mut admin = coordinator.admin().await;

    let job_id = admin
        .submit(&sandbox.repo.url, "main", "explain this project")
        .await;
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.attempts, 1);
    assert_eq!(job.current_step, 6, "the last step was reported");

    let job = admin.job(&job_id, true).await;
    let expected = expected_documents();
    assert_eq!(
        job.documents.len(),
        expected.len(),
        "one document per output file"
    );
    for document in &job.documents {
        let (kind, title, index, content) = expected
            .get(&document.slug)
            .unwrap_or_else(|| panic!("unexpected document {}", document.slug));
        assert_eq!(&document.kind, kind, "{}", document.slug);
        assert_eq!(&document.title, title, "{}", document.slug);
        assert_eq!(document.chapter_index, *index, "{}", document.slug);
        assert_eq!(document.size_bytes, document.content.len() as u64);
        match content {
            serde_json::Value::String(text) => {
                assert_eq!(&document.content, text, "{}", document.slug)
            }
            parsed => {
                let stored: serde_json::Value = serde_json::from_str(&document.content)
                    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", document.slug));
                assert_eq!(&stored, parsed, "{} holds the YAML as JSON", document.slug);
                assert!(document.content.contains("\n  "), "pretty-printed JSON");
            }
        }
    }
    let runs = read_run_log(&sandbox.run_log).unwrap();
    assert_eq!(runs_per_job(&runs).get(&job_id), Some(&1));
    // The workspace is gone once the job is done.
    // Only the live agent's lock on its workspace root stays.
    let workspaces: Vec<_> = std::fs::read_dir(sandbox.path("agents-tmp/agent-1"))
        .unwrap()
        .filter_map(|entry| entry.ok().map(|entry| entry.file_name()))
        .filter(|name| name != ".agent.lock")
        .collect();
    assert!(workspaces.is_empty(), "left behind: {workspaces:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn twelve_jobs_on_three_agents_run_once_each_within_slots_and_spread() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let mut agents = Vec::new();
    for id in ["agent-a", "agent-b", "agent-c"] {
        agents.push(AgentProc::spawn(
            &sandbox,
            AgentOptions {
                id,
                coordinator_url: coordinator.url(),
                slots: 2,
                // Slow enough that runs overlap, so slot limits are really exercised.
                extra: &[("FIXTURE_STEP_DELAY_MS", "120")],
            },
        ));
    }
    for agent in &mut agents {
        agent.wait_connected().await;
    }
    let mut admin = coordinator.admin().await;
    let mut job_ids = Vec::new();
    for n in 0..12 {
        job_ids.push(
            admin
                .submit(&sandbox.repo.url, "main", &format!("job {n}"))
                .await,
        );
    }
    for job_id in &job_ids {
        let job = admin.wait_status(job_id, TERMINAL, JOB_TIMEOUT).await;
        assert_eq!(job.status, "completed", "{job:?}");
        assert_eq!(job.attempts, 1, "{job:?}");
    }

    let runs = read_run_log(&sandbox.run_log).unwrap();
    let per_job = runs_per_job(&runs);
    for job_id in &job_ids {
        assert_eq!(
            per_job.get(job_id),
            Some(&1),
            "job {job_id} ran exactly once"
        );
    }
    let concurrency = max_concurrency_per_agent(&runs);
    println!("max concurrent runs per agent: {concurrency:?}");
    assert_eq!(
        concurrency.len(),
        3,
        "every agent ran jobs: {concurrency:?}"
    );
    for (agent, max) in &concurrency {
        assert!(
            *max <= 2,
            "agent {agent} ran {max} jobs at once with 2 slots"
        );
    }
    assert!(
        concurrency.values().any(|max| *max == 2),
        "slots were used in parallel"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_cli_is_retried_with_backoff_and_ends_dead_with_its_error() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(
        &sandbox,
        ANY_PORT,
        &[("MAX_ATTEMPTS", "3"), ("RETRY_BACKOFF", "300")],
    )
    .await;
    let _agent = AgentProc::connected(
        &sandbox,
        "agent-1",
        coordinator.url(),
        &[("FIXTURE_DIRECTIVES", "fail")],
    )
    .await;
    let mut admin = coordinator.admin().await;
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "dead", "{job:?}");
    assert_eq!(job.attempts, 3);
    assert!(
        job.error
            .contains("fixture failure: simulated analyzer crash"),
        "the CLI's error text is on the job: {:?}",
        job.error
    );
    assert!(job.error.contains("exited with code 1"), "{:?}", job.error);

    let starts: Vec<u128> = read_run_log(&sandbox.run_log)
        .unwrap()
        .into_iter()
        .filter(|r| r.kind == fixture_cli::RunEventKind::Start && r.job_id == job_id)
        .map(|r| r.at_nanos)
        .collect();
    assert_eq!(starts.len(), 3, "one run per attempt");
    // Backoff: at least 300 ms before the second run, at least 600 ms before the third.
    let gap = |a: u128, b: u128| Duration::from_nanos((b - a) as u64);
    assert!(
        gap(starts[0], starts[1]) >= Duration::from_millis(300),
        "{starts:?}"
    );
    assert!(
        gap(starts[1], starts[2]) >= Duration::from_millis(600),
        "{starts:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_started_before_the_coordinator_connects_once_it_is_up() {
    let sandbox = Sandbox::new();
    let port = free_port();
    let mut agent = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "early-agent",
            coordinator_url: format!("http://127.0.0.1:{port}"),
            slots: 1,
            extra: &[],
        },
    );
    agent
        .proc
        .wait_for_log(
            "connecting to the coordinator failed",
            Duration::from_secs(20),
        )
        .await;
    let coordinator = CoordinatorProc::start(&sandbox, port, &[]).await;
    agent.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let agents = admin.agents().await;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].agent_id, "early-agent");
    assert_eq!(agents[0].slots, 1);
    let job_id = admin.submit(&sandbox.repo.url, "main", "explain").await;
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn disallowed_urls_and_hostile_branches_are_refused_clearly_and_run_nothing() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let mut admin = coordinator.admin().await;
    let pwned = sandbox.path("pwned");
    let upload_pack = format!("--upload-pack=touch {}", pwned.display());
    let rm = "main;rm -rf /".to_string();
    let cases = [
        (
            "https://evil.example.com/x.git".to_string(),
            "main".to_string(),
            "REPO_ALLOWLIST",
        ),
        (
            "ext::sh -c touch% /tmp/pwned".to_string(),
            "main".to_string(),
            "repository URL",
        ),
        (sandbox.repo.url.clone(), upload_pack, "branch"),
        (
            sandbox.repo.url.clone(),
            "--upload-pack=x".to_string(),
            "branch",
        ),
        (sandbox.repo.url.clone(), rm, "branch"),
    ];
    // Admin refuses them at submit with the message dispatch would give (hostile input from
    // Convex is refused at dispatch: convex_source tests).
    for (url, branch, mentions) in cases {
        let refused = admin
            .try_submit(&url, &branch, "explain")
            .await
            .expect_err("a hostile URL or branch is refused at submit");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
        assert!(
            refused.message().contains(mentions),
            "the refusal of url {url:?} branch {branch:?} names the {mentions} rule: {:?}",
            refused.message()
        );
    }
    let listed = admin
        .client
        .list_jobs(pb::ListJobsRequest::default())
        .await
        .expect("ListJobs")
        .into_inner();
    assert!(listed.jobs.is_empty(), "no refused input became a job");
    assert!(!pwned.exists(), "no option was injected into git");
    assert!(
        read_run_log(&sandbox.run_log).unwrap().is_empty(),
        "the analyzer never ran"
    );
    assert!(
        !agent.proc.log_contains("run started"),
        "no assignment reached the agent"
    );
}

/// A `DATA_DIR` of an earlier version, whose database was `jobs.sqlite3`: the coordinator renames
/// it on start and runs the jobs queued in it.
#[tokio::test(flavor = "multi_thread")]
async fn a_legacy_database_file_is_renamed_and_its_queued_job_runs() {
    let sandbox = Sandbox::new();
    let port = free_port();
    let mut coordinator = CoordinatorProc::start(&sandbox, port, &[]).await;
    let job_id = coordinator
        .admin()
        .await
        .submit(&sandbox.repo.url, "main", "explain this project")
        .await;
    coordinator.proc.signal(Signal::SIGTERM);
    let status = coordinator.proc.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "exit status {status:?}");

    let data_dir = coordinator.data_dir.clone();
    for suffix in ["", "-wal", "-shm"] {
        let current = data_dir.join(format!("coordinator.sqlite3{suffix}"));
        if current.exists() {
            std::fs::rename(&current, data_dir.join(format!("jobs.sqlite3{suffix}")))
                .expect("giving the database its legacy name");
        }
    }
    assert!(data_dir.join("jobs.sqlite3").exists());

    let coordinator = CoordinatorProc::start(&sandbox, port, &[]).await;
    assert!(coordinator.proc.log_contains("database file renamed"));
    assert!(data_dir.join("coordinator.sqlite3").exists());
    assert!(!data_dir.join("jobs.sqlite3").exists());
    let _agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let job = coordinator
        .admin()
        .await
        .wait_status(&job_id, TERMINAL, JOB_TIMEOUT)
        .await;
    assert_eq!(job.status, "completed", "{job:?}");
}
