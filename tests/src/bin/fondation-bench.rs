//! `fondation-bench`: dispatch overhead, throughput, progress parsing, collection and memory, each
//! against a baseline measured in the same run (see `fondation_testkit::bench`).

use std::{
    path::PathBuf,
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use clap::Parser;
use fondation_testkit::bench::{self, Comparison, MemoryLine, Settings, Value};

/// How the workspace binaries are built for a bench binary of this profile.
const BUILD: &str = if cfg!(debug_assertions) {
    "cargo build --workspace --bins"
} else {
    "cargo build --release --workspace --bins"
};

#[derive(Debug, Parser)]
#[command(
    name = "fondation-bench",
    about = "Measures Fondation dispatch against baselines measured in the same run",
    after_help = "Starts the coordinator, agents and fixture CLI found next to this binary: build \
                  them with the same profile first, e.g.\n  \
                  cargo build --release --workspace --bins\n  \
                  cargo run --release -p fondation-testkit --bin fondation-bench"
)]
struct Args {
    /// Smoke run: fewer jobs, runs, lines and collections (flags below still win).
    #[arg(long, env = "BENCH_QUICK")]
    quick: bool,
    /// Jobs timed one by one for the latency [default: 31, quick 7].
    #[arg(long, env = "BENCH_RUNS")]
    runs: Option<usize>,
    /// Jobs of the throughput run [default: 80, quick 16].
    #[arg(long, env = "BENCH_JOBS")]
    jobs: Option<usize>,
    /// Agents (one slot each) of the throughput run [default: 4].
    #[arg(long, env = "BENCH_AGENTS")]
    agents: Option<usize>,
    /// Log lines parsed [default: 1000000, quick 200000].
    #[arg(long, env = "BENCH_LINES")]
    lines: Option<usize>,
    /// Collections of the sample tree timed [default: 1000, quick 100].
    #[arg(long, env = "BENCH_COLLECTS")]
    collects: Option<usize>,
}

impl Args {
    fn settings(&self) -> Settings {
        let base = if self.quick {
            Settings::QUICK
        } else {
            Settings::FULL
        };
        Settings {
            runs: self.runs.unwrap_or(base.runs).max(1),
            jobs: self.jobs.unwrap_or(base.jobs).max(1),
            agents: self.agents.unwrap_or(base.agents).max(1),
            lines: self.lines.unwrap_or(base.lines).max(1),
            collects: self.collects.unwrap_or(base.collects).max(1),
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let scale = if args.quick {
        bench::scale::ScaleSettings::QUICK
    } else {
        bench::scale::ScaleSettings::FULL
    };
    match run(args.settings(), scale) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("fondation-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(settings: Settings, scale: bench::scale::ScaleSettings) -> anyhow::Result<()> {
    let bin_dir = check_prerequisites()?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let started = Instant::now();
    let load_before = bench::load_average();
    let profile = if cfg!(debug_assertions) {
        "debug build (not representative: use --release)"
    } else {
        "release build"
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let s = settings;
    let title = format!(
        "fondation-bench: {profile}, {cores} cores, {} latency runs, {} jobs on {} agents x 1 slot",
        s.runs, s.jobs, s.agents
    );
    eprintln!("{title}");
    let fixture = bin_dir.join("fondation-fixture-cli");

    eprintln!(
        "[1/4] job latency: {} jobs through 1 agent, {} direct runs",
        s.runs, s.runs
    );
    let (latency, latency_baseline) = bench::latency(&runtime, &fixture, s.runs)?;

    eprintln!(
        "[2/4] throughput: {} jobs on {} agents, {} direct runs {} at a time",
        s.jobs, s.agents, s.jobs, s.agents
    );
    let (batch, batch_baseline, mut memory) =
        bench::throughput(&runtime, &fixture, s.jobs, s.agents)?;

    eprintln!("[3/4] progress parsing: {} lines", s.lines);
    let log = bench::pino_text(s.lines);
    let (parse, scan) = bench::bench_parse(&log, 3)?;
    drop(log);

    eprintln!("[4/4] collection: {} times", s.collects);
    let (files, collect, read) = bench::bench_collect(s.collects)?;

    let jobs_per_s = |elapsed: Duration| s.jobs as f64 / elapsed.as_secs_f64();
    let lines_per_s = |elapsed: Duration| s.lines as f64 / elapsed.as_secs_f64();
    let comparisons = [
        Comparison {
            what: format!("job latency, median of {}", s.runs),
            system: Value::Time(latency),
            baseline: Value::Time(latency_baseline),
            baseline_is: "git clone --depth 1 + fixture CLI + reading its output, child processes"
                .into(),
        },
        Comparison {
            what: format!("throughput, {} jobs / {} agents", s.jobs, s.agents),
            system: Value::Rate(jobs_per_s(batch), "jobs/s"),
            baseline: Value::Rate(jobs_per_s(batch_baseline), "jobs/s"),
            baseline_is: format!(
                "the same direct runs, {} at a time, plain threads; {} rounds alternating with \
                 the system",
                s.agents,
                bench::throughput_rounds(s.jobs, s.agents)
            ),
        },
        Comparison {
            what: format!("progress parse_line, {} lines", s.lines),
            system: Value::Rate(lines_per_s(parse), "lines/s"),
            baseline: Value::Rate(lines_per_s(scan), "lines/s"),
            baseline_is: "splitting the same text into lines, contains(\"\\\"msg\\\"\")".into(),
        },
        Comparison {
            what: format!("collect sample tree ({files} files)"),
            system: Value::Time(collect),
            baseline: Value::Time(read),
            baseline_is: "reading every file of the same tree into memory".into(),
        },
    ];
    memory.push(MemoryLine {
        what: "fixture analyzer, one run (reference)".into(),
        peak_kib: bench::fixture_rss(&fixture)?,
    });
    let title = format!(
        "{title}\nload average (1 min) before / after: {} / {}",
        load_before,
        bench::load_average()
    );
    eprintln!(
        "[scale] up to {} simulated agents",
        scale.fleets.last().copied().unwrap_or(0)
    );
    let scale_rows = runtime.block_on(bench::scale::run(scale))?;
    println!("{}", bench::render(&title, &comparisons, &memory));
    println!("{}", bench::scale::render(&scale_rows));
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The coordinator, agent and fixture CLI next to this binary, and git; the folder holding them.
fn check_prerequisites() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe
        .parent()
        .context("locating the folder of this binary")?
        .to_path_buf();
    let missing = bench::missing_binaries(&dir);
    if !missing.is_empty() {
        let names: Vec<_> = missing.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "missing workspace binaries: {}\nbuild them with the same profile as this bench \
             first: `{BUILD}`",
            names.join(", ")
        );
    }
    let git = Command::new("git").arg("--version").output();
    if !git.is_ok_and(|out| out.status.success()) {
        bail!("git is needed to clone the benchmark repository: install it (apt-get install git)");
    }
    Ok(dir)
}
