//! The README's first command: a coordinator and two agents on the embedded store, in one process,
//! run one job on a demo repository to completion, showing its progress (the `fondation`
//! command's progress bar on a terminal) and its documents. `RUST_LOG=info` adds the processes'
//! logs.
//!
//! The fixture CLI stands in for the real analyzer (which needs Node and Claude credentials):
//! this binary runs it itself when invoked as `fondation-demo analyze ...`.

use std::{process::ExitCode, time::Duration};

use anyhow::{bail, Context as _};
use clap::Parser;
use fondation_cli::{
    args::{ConnectionArgs, OutputFormat},
    connection, follow,
};
use fondation_proto::pb;
use fondation_testkit::{fixture_cli, support::git::GitFixture};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const AGENTS: usize = 2;

fn main() -> anyhow::Result<ExitCode> {
    if std::env::args().nth(1).as_deref() == Some("analyze") {
        return Ok(fixture_cli::main_from_env());
    }
    tokio::runtime::Runtime::new()
        .context("starting the async runtime")?
        .block_on(demo())
}

async fn demo() -> anyhow::Result<ExitCode> {
    // Errors only unless asked: the terminal is the progress bar's.
    fondation_runtime::logging::init_with_default(
        fondation_runtime::logging::LogFormat::Plain,
        "error",
    );
    let root = tempfile::tempdir().context("creating a temp folder for the demo")?;
    // Analyzers run as slot users when the demo runs as root: they pass through this folder.
    std::fs::set_permissions(
        root.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .context("opening the demo's temp folder to the analyzers' users")?;
    let repo = GitFixture::new();
    let allowlist = format!("https://github.com/,{}", repo.allow_prefix);
    let exe = std::env::current_exe().context("locating this binary")?;

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let coordinator_url = format!("http://{}", listener.local_addr()?);
    let data_dir = root.path().join("coordinator");
    let coordinator = fondation_coordinator::Cli::try_parse_from([
        "fondation-coordinator",
        "--data-dir",
        &data_dir.to_string_lossy(),
        "--repo-allowlist",
        &allowlist,
        "--poll-interval",
        "1000",
        "--progress-interval",
        "200",
    ])?
    .config;
    if coordinator.convex_url.is_some() {
        bail!("unset CONVEX_URL: the demo runs on the embedded store");
    }
    let stop = CancellationToken::new();
    let coordinator_task = tokio::spawn(fondation_coordinator::run(
        listener,
        coordinator,
        stop.clone(),
    ));

    let mut agents = Vec::new();
    let agent_shutdown = fondation_agent::Shutdown::default();
    for n in 1..=AGENTS {
        let health = TcpListener::bind("127.0.0.1:0").await?;
        let command = format!(
            "'{}' analyze {{repo}} --prompt {{prompt}} --job-id {{job_id}}",
            exe.display()
        );
        let config = fondation_agent::Cli::try_parse_from([
            "fondation-agent",
            "--coordinator-url",
            &coordinator_url,
            "--agent-id",
            &format!("demo-agent-{n}"),
            "--temp-dir",
            &root.path().join("agents").to_string_lossy(),
            "--analyzer-command",
            &command,
            "--analyzer-workdir",
            &root.path().to_string_lossy(),
            "--repo-allowlist",
            &allowlist,
            // Run as root, the agents start analyzers as slot users: one uid range each.
            "--analyzer-uid-base",
            &(64_000 + 64 * n as u32).to_string(),
        ])?
        .config;
        agents.push(tokio::spawn(fondation_agent::run(
            health,
            config,
            agent_shutdown.clone(),
        )));
    }

    let connection = ConnectionArgs::plain(&coordinator_url);
    let mut admin = connection::connect(&connection).await?;
    // Agents connect within a moment; wait for them so the job starts at once.
    for _ in 0..100 {
        let connected = admin
            .list_agents(pb::ListAgentsRequest {})
            .await?
            .into_inner()
            .agents;
        if connected.len() == AGENTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job_id = admin
        .submit_job(pb::SubmitJobRequest {
            repo_url: repo.url.clone(),
            branch: "main".into(),
            // Slow the fixture down so the progress is visible.
            prompt: "Explain this project. fixture:slow=400".into(),
        })
        .await?
        .into_inner()
        .job_id;
    println!("submitted job {job_id} for {}", repo.url);
    // The job's error, when it fails, is printed below with the rest.
    let _ = follow::follow_job(&mut admin, &coordinator_url, &job_id, OutputFormat::Text).await;
    let job = admin
        .get_job(pb::GetJobRequest {
            job_id: job_id.clone(),
            include_content: false,
        })
        .await?
        .into_inner();

    println!(
        "\njob {} is {} after {} attempt(s)",
        job.job_id, job.status, job.attempts
    );
    if !job.error.is_empty() {
        println!("error: {}", job.error);
    }
    println!("{} documents:", job.documents.len());
    for document in &job.documents {
        println!(
            "  {:<9} {:>7} B  {:<58} {}",
            document.kind, document.size_bytes, document.slug, document.title
        );
    }

    agent_shutdown.drain.cancel();
    for agent in agents {
        agent.await??;
    }
    stop.cancel();
    coordinator_task.await??;
    Ok(if job.status == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
