//! The project's own analyzer CLI, used by tests and the demo in place of the real Fondation CLI.
//!
//! It honours the contract of DESIGN.md section 3: `analyze <repo>` announces the six steps and
//! writes, step by step, a real output tree of the CLI (embedded at compile time from
//! `fixtures/claude-tutorial-output`) into `<repo>/.claude-tutorial-output/` or `--output-dir`.
//! On request it misbehaves: the `directives` module lists the `fixture:<directive>` vocabulary, read from
//! the prompt and from `FIXTURE_DIRECTIVES`. With `FIXTURE_RUN_LOG` set, every run appends its
//! start and end to a log that tests read back with [`read_run_log`].
//!
//! Layout: `directives` (what to do), `console` (how progress is printed), `run_log` (accounting),
//! `hostile` (what a malicious analyzer tries), and here the command line, the run itself and
//! SIGTERM handling.

mod console;
mod directives;
mod hostile;
mod run_log;

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use clap::{Parser, Subcommand};
use include_dir::{include_dir, Dir, DirEntry, File};
use nix::sys::signal::{raise, SigSet, Signal};

use console::Console;
use directives::{Directives, Format};
use run_log::RunLogWriter;

pub use hostile::{FORGED_LINE, PROBE_PATH, PROBE_READ_OK};
pub use run_log::{
    max_concurrency_per_agent, read_run_log, read_run_log_if_any, runs_per_job,
    starts_and_successes, RunEventKind, RunRecord,
};

/// The step start messages of the real CLI, steps 1 to 6.
pub const STEP_MESSAGES: [&str; 6] = [
    "Extracting core abstractions from codebase",
    "Analyzing relationships between components",
    "Determining optimal chapter order",
    "Generating chapter content",
    "Reviewing and enhancing chapters",
    "Generating interactive tutorials",
];

/// How the newest CLI marks a step start in its message: `[FONDATION_STEP_N/6] <message>`.
pub const STEP_MARKER: &str = "[FONDATION_STEP_";

/// What each step writes: a file or a folder of the sample tree.
const STEP_OUTPUTS: [&str; 6] = [
    "step1_abstractions.yaml",
    "step2_relationships.yaml",
    "step3_order.yaml",
    "chapters",
    "reviewed-chapters",
    "tutorials",
];

/// Output folder, relative to the analyzed repository, when `--output-dir` is absent.
pub const DEFAULT_OUTPUT_DIR: &str = ".claude-tutorial-output";
/// Final info line of a successful run.
pub const COMPLETE_MESSAGE: &str = "Analysis complete";
/// `msg` of the error line of a failed run.
pub const FAILED_MESSAGE: &str = "Analysis failed";
/// Error text of the `fail` and `fail-attempts` directives.
pub const FAILURE_MESSAGE: &str = "fixture failure: simulated analyzer crash";
/// Symlink written by the `symlink` directive, relative to the output folder.
pub const SYMLINK_PATH: &str = "chapters/zz_link.md";
/// Where the `symlink` directive points.
pub const SYMLINK_TARGET: &str = "/etc/passwd";
/// Chapter written by the `show-readme` directive (the checkout's `README.md`), relative to the
/// output folder.
pub const README_PATH: &str = "chapters/zz_readme.md";
/// File written by the `oversize=<bytes>` directive, relative to the output folder.
pub const OVERSIZE_PATH: &str = "chapters/chapter_99_oversize.md";

/// Directives applied to every run (comma or whitespace separated).
pub const ENV_DIRECTIVES: &str = "FIXTURE_DIRECTIVES";
/// How often a held run (`hold=<file>`) looks for its file.
const HOLD_POLL: Duration = Duration::from_millis(20);
/// Default delay before each step, in milliseconds (the `slow=` directive overrides it).
pub const ENV_STEP_DELAY_MS: &str = "FIXTURE_STEP_DELAY_MS";
/// Path of the run log; unset means no accounting.
pub const ENV_RUN_LOG: &str = "FIXTURE_RUN_LOG";
/// Agent name written to the run log; [`ENV_HOSTNAME`] when unset.
pub const ENV_AGENT_ID: &str = "FIXTURE_AGENT_ID";
/// Fallback agent name: Docker sets it to the container's host name, which is also the agent's
/// default AGENT_ID, and replicas of one compose service cannot be given distinct variables.
pub const ENV_HOSTNAME: &str = "HOSTNAME";

/// Exit code of a run the caller got wrong: bad flags, unknown directives.
const USAGE_EXIT: u8 = 2;
/// Exit code logged for a run ended by SIGTERM (128 + 15).
const SIGTERM_EXIT: i32 = 143;

static SAMPLE_TREE: Dir<'static> =
    include_dir!("$CARGO_MANIFEST_DIR/fixtures/claude-tutorial-output");

/// The embedded output tree a normal run writes.
pub fn sample_tree() -> &'static Dir<'static> {
    &SAMPLE_TREE
}

/// Every file of the sample tree, sorted by path (relative to the output folder).
pub fn sample_files() -> Vec<&'static File<'static>> {
    fn collect(dir: &'static Dir<'static>, files: &mut Vec<&'static File<'static>>) {
        files.extend(dir.files());
        for sub in dir.dirs() {
            collect(sub, files);
        }
    }
    let mut files = Vec::new();
    collect(&SAMPLE_TREE, &mut files);
    files.sort_by_key(|f| f.path());
    files
}

/// The files step `step` (1 to 6) writes, sorted by path; empty for any other number.
pub fn step_files(step: usize) -> Vec<&'static File<'static>> {
    let Some(name) = step.checked_sub(1).and_then(|i| STEP_OUTPUTS.get(i)) else {
        return Vec::new();
    };
    let mut files: Vec<_> = match SAMPLE_TREE.get_entry(name) {
        Some(DirEntry::File(file)) => vec![file],
        Some(DirEntry::Dir(dir)) => dir.files().collect(),
        None => Vec::new(),
    };
    files.sort_by_key(|f| f.path());
    files
}

#[derive(Debug, Parser)]
#[command(
    name = "fondation-fixture-cli",
    about = "Stand-in for the Fondation analyzer CLI: honours its contract, misbehaves on request"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Analyze a cloned repository and write the tutorial output tree.
    Analyze(AnalyzeArgs),
    /// Stay alive until killed (the processes of the `escape` directive).
    #[command(hide = true)]
    Linger {
        marker: String,
        /// Start a lingering child in a new session and exit at once (a double fork).
        #[arg(long)]
        detach: bool,
    },
}

#[derive(Debug, clap::Args)]
struct AnalyzeArgs {
    /// The cloned repository (must contain `.git`).
    repo: PathBuf,
    /// Accepted for compatibility with the real CLI; ignored.
    #[arg(long)]
    profile: Option<String>,
    /// Prompt text; `fixture:<directive>` tokens in it configure this run.
    #[arg(long)]
    prompt: Option<String>,
    /// Job id, written to the run log.
    #[arg(long)]
    job_id: Option<String>,
    /// Output folder; relative paths are resolved against the repository.
    #[arg(long)]
    output_dir: Option<PathBuf>,
}

/// State the SIGTERM watcher thread shares with the run (signal handling is process-wide).
struct Termination {
    /// Set by the `ignore-term` directive.
    ignore: AtomicBool,
    /// The run log, so a SIGTERM still records the end of the run.
    run_log: OnceLock<RunLogWriter>,
}

static TERMINATION: Termination = Termination {
    ignore: AtomicBool::new(false),
    run_log: OnceLock::new(),
};

/// Entry point of the `fondation-fixture-cli` binary: arguments and configuration from the
/// process's argv and environment.
pub fn main_from_env() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(u8::try_from(err.exit_code()).unwrap_or(USAGE_EXIT));
        }
    };
    let args = match cli.command {
        Command::Analyze(args) => args,
        Command::Linger { marker, detach } => {
            return match hostile::linger(&marker, detach) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("Error: linger: {err}");
                    ExitCode::FAILURE
                }
            }
        }
    };
    watch_sigterm();
    let env = |name| std::env::var(name).ok();
    let run_log = match env(ENV_RUN_LOG) {
        Some(path) => {
            let path = PathBuf::from(path);
            let agent = env(ENV_AGENT_ID)
                .or_else(|| env(ENV_HOSTNAME))
                .unwrap_or_default();
            let job_id = args.job_id.as_deref().unwrap_or_default();
            match RunLogWriter::start(&path, job_id, &agent) {
                Ok(writer) => Some((path, TERMINATION.run_log.get_or_init(|| writer))),
                Err(err) => {
                    eprintln!("Error: cannot open {ENV_RUN_LOG} {}: {err}", path.display());
                    return ExitCode::from(USAGE_EXIT);
                }
            }
        }
        None => None,
    };
    let config = RunConfig {
        directives: env(ENV_DIRECTIVES),
        step_delay_ms: env(ENV_STEP_DELAY_MS),
        run_log: run_log
            .as_ref()
            .map(|(path, writer)| (path.as_path(), *writer)),
    };
    let code = analyze(&args, &config);
    if let Some((_, writer)) = run_log {
        writer.end(i32::from(code));
    }
    ExitCode::from(code)
}

/// Configuration from the environment.
struct RunConfig<'a> {
    directives: Option<String>,
    step_delay_ms: Option<String>,
    run_log: Option<(&'a Path, &'a RunLogWriter)>,
}

/// One `analyze` run; returns the exit code.
fn analyze(args: &AnalyzeArgs, config: &RunConfig<'_>) -> u8 {
    let usage_error = |error: &str| {
        Console::new(Format::Json).error("Invalid fixture configuration", error);
        USAGE_EXIT
    };
    let directives = match Directives::collect(config.directives.as_deref(), args.prompt.as_deref())
    {
        Ok(directives) => directives,
        Err(err) => return usage_error(&err.to_string()),
    };
    TERMINATION
        .ignore
        .store(directives.ignore_term, Ordering::SeqCst);
    let delay = match (directives.slow_ms, config.step_delay_ms.as_deref()) {
        (Some(ms), _) => ms,
        (None, None) => 0,
        (None, Some(value)) => match value.trim().parse() {
            Ok(ms) => ms,
            Err(_) => {
                return usage_error(&format!(
                    "{ENV_STEP_DELAY_MS}={value:?} is not a number of milliseconds"
                ))
            }
        },
    };
    let fail = match (directives.fail, directives.fail_attempts, config.run_log) {
        (true, _, _) => true,
        (false, None, _) => false,
        (false, Some(_), None) => {
            return usage_error(&format!("fail-attempts needs {ENV_RUN_LOG} to count runs"))
        }
        (false, Some(attempts), Some((path, writer))) => match writer.run_number(path) {
            Ok(run) => run as u64 <= attempts,
            Err(err) => return usage_error(&format!("cannot read {ENV_RUN_LOG}: {err}")),
        },
    };

    let console = Console::new(directives.format);
    let failed = |error: &str| {
        console.error(FAILED_MESSAGE, error);
        1
    };
    if directives.need_prompts && !Path::new("prompts").is_dir() {
        let cwd = std::env::current_dir().unwrap_or_default();
        return failed(&format!(
            "ENOENT: no such file or directory, scandir '{}'",
            cwd.join("prompts").display()
        ));
    }
    if let Err(error) = check_repo(&args.repo) {
        return failed(&error);
    }
    let output_dir = args.repo.join(
        args.output_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_OUTPUT_DIR)),
    );
    if let Some(marker) = &directives.escape {
        if let Err(err) = hostile::escape(marker) {
            return failed(&format!("escape: {err}"));
        }
    }
    if directives.forge_log {
        hostile::forge_log();
        return 1;
    }

    for text in &directives.say {
        console.plain(text);
    }
    let mut flood_line = 0;
    for step in 1..=STEP_MESSAGES.len() {
        if let Some(gate) = &directives.gate {
            wait_at_gate(Path::new(gate), step, &console);
        }
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        console.step(step);
        if step == 1 && directives.invalid_utf8 {
            console.invalid_utf8();
        }
        for _ in 0..flood_share(directives.flood, step) {
            flood_line += 1;
            console.info(&format!("processing file {flood_line}"));
        }
        for line in 1..=directives.numbered {
            console.info(&numbered_line(step, line));
        }
        if directives.hang {
            loop {
                std::thread::park();
            }
        }
        if !directives.no_output {
            if let Err(err) = write_step(&output_dir, step, &directives) {
                return failed(&format!("step {step}: {err}"));
            }
        }
        if let (1, Some(gate)) = (step, &directives.hold) {
            while !Path::new(gate).exists() {
                std::thread::sleep(HOLD_POLL);
            }
        }
        if step == 2 && fail {
            return failed(FAILURE_MESSAGE);
        }
    }
    if let Some(secret) = &directives.probe {
        if let Err(err) = hostile::probe(&output_dir, &args.repo, secret.as_deref()) {
            return failed(&format!("probe: {err}"));
        }
    }
    if directives.show_readme {
        if let Err(err) = fs::copy(args.repo.join("README.md"), output_dir.join(README_PATH)) {
            return failed(&format!("show-readme: {err}"));
        }
    }
    console.info(COMPLETE_MESSAGE);
    directives.exit_code.unwrap_or(0)
}

/// The text of numbered line `line` of step `step` (the `numbered=` directive).
pub fn numbered_line(step: usize, line: u64) -> String {
    format!("fixture line {step}.{line}")
}

/// What the run says on stderr when step `step` waits at its gate.
pub fn gate_note(step: usize) -> String {
    format!("fixture: step {step} waits at the gate")
}

/// How often a closed gate is looked at.
const GATE_POLL: Duration = Duration::from_millis(20);

/// Waits until the gate file says at least `step` (the `gate=` directive); says so on stderr
/// when it has to wait.
fn wait_at_gate(gate: &Path, step: usize, console: &Console) {
    let open = || {
        fs::read_to_string(gate)
            .ok()
            .and_then(|text| text.trim().parse::<usize>().ok())
            .is_some_and(|allowed| allowed >= step)
    };
    if open() {
        return;
    }
    console.note(&gate_note(step));
    while !open() {
        std::thread::sleep(GATE_POLL);
    }
}

/// Proof that the clone happened: an existing directory holding `.git`.
fn check_repo(repo: &Path) -> Result<(), String> {
    let shown = repo.display();
    match fs::metadata(repo) {
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            Err(format!("repository path {shown} does not exist"))
        }
        Err(err) => Err(format!("repository path {shown} is not accessible: {err}")),
        Ok(meta) if !meta.is_dir() => Err(format!("repository path {shown} is not a directory")),
        Ok(_) if fs::symlink_metadata(repo.join(".git")).is_err() => Err(format!(
            "repository path {shown} is not a git checkout (no .git)"
        )),
        Ok(_) => Ok(()),
    }
}

/// How many of `total` flood lines step `step` prints: an even share, the remainder first.
fn flood_share(total: u64, step: usize) -> u64 {
    let steps = STEP_MESSAGES.len() as u64;
    let index = step as u64 - 1;
    total / steps + u64::from(index < total % steps)
}

fn write_step(output_dir: &Path, step: usize, directives: &Directives) -> io::Result<()> {
    for file in step_files(step) {
        let path = output_dir.join(file.path());
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&path, file.contents())?;
    }
    if step == 4 {
        if directives.symlink {
            let link = output_dir.join(SYMLINK_PATH);
            match fs::remove_file(&link) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
            std::os::unix::fs::symlink(SYMLINK_TARGET, link)?;
        }
        if let Some(size) = directives.oversize {
            write_oversize(&output_dir.join(OVERSIZE_PATH), size)?;
        }
    }
    Ok(())
}

/// A markdown chapter of exactly `size` bytes, starting with `# Oversize`.
fn write_oversize(path: &Path, size: u64) -> io::Result<()> {
    const HEADER: &[u8] = b"# Oversize\n\n";
    const FILLER: &[u8] = b"This paragraph pads the chapter past any sane document size limit.\n";
    let mut out = BufWriter::new(fs::File::create(path)?);
    let mut remaining = size;
    let mut chunks = std::iter::once(HEADER).chain(std::iter::repeat(FILLER));
    while remaining > 0 {
        let chunk = chunks.next().unwrap_or(FILLER);
        let take = chunk
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        out.write_all(&chunk[..take])?;
        remaining -= take as u64;
    }
    out.flush()
}

/// Handles SIGTERM on a dedicated thread: record the end of the run, then die of the signal as
/// before, or, under `ignore-term`, say so on stderr and carry on.
///
/// Must run before any other thread starts, so every thread inherits the blocked mask.
fn watch_sigterm() {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    if set.thread_block().is_err() {
        return; // default disposition stays: SIGTERM still ends the run
    }
    std::thread::spawn(move || loop {
        if set.wait().is_err() {
            continue;
        }
        if TERMINATION.ignore.load(Ordering::SeqCst) {
            let _ = writeln!(io::stderr(), "fixture: ignoring SIGTERM");
            continue;
        }
        if let Some(writer) = TERMINATION.run_log.get() {
            writer.end(SIGTERM_EXIT);
        }
        // Die of the signal itself, as an unhandled SIGTERM would.
        let _ = set.thread_unblock();
        let _ = raise(Signal::SIGTERM);
        std::process::exit(SIGTERM_EXIT);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_cover_the_sample_tree_exactly() {
        let mut from_steps: Vec<_> = (1..=6).flat_map(step_files).map(|f| f.path()).collect();
        from_steps.sort();
        let all: Vec<_> = sample_files().iter().map(|f| f.path()).collect();
        assert_eq!(from_steps, all);
        assert_eq!(all.len(), 36);
        assert!(step_files(0).is_empty() && step_files(7).is_empty());
    }

    #[test]
    fn flood_lines_are_spread_over_the_steps() {
        let shares: Vec<_> = (1..=6).map(|step| flood_share(20, step)).collect();
        assert_eq!(shares, [4, 4, 3, 3, 3, 3]);
    }

    #[test]
    fn oversize_file_has_the_exact_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        for size in [0, 5, 12, 1000, 200_001] {
            let path = dir.path().join("big.md");
            write_oversize(&path, size).expect("write");
            let bytes = fs::read(&path).expect("read");
            assert_eq!(bytes.len() as u64, size);
            assert!(b"# Oversize\n\n".starts_with(&bytes[..bytes.len().min(12)]));
        }
    }
}
