//! The fixture analyzer CLI, driven as the agent drives it: the real binary, argv, a cloned repo.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fondation_testkit::fixture_cli::{
    self, max_concurrency_per_agent, read_run_log, runs_per_job, RunEventKind, COMPLETE_MESSAGE,
    FAILED_MESSAGE, FAILURE_MESSAGE, OVERSIZE_PATH, STEP_MESSAGES, SYMLINK_PATH, SYMLINK_TARGET,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tempfile::TempDir;

const BIN: &str = env!("CARGO_BIN_EXE_fondation-fixture-cli");
const DEADLINE: Duration = Duration::from_secs(20);

/// A temporary "clone": a directory with a `.git` folder.
fn repo() -> TempDir {
    let dir = tempfile::tempdir().expect("create temp repo");
    std::fs::create_dir(dir.path().join(".git")).expect("create .git");
    dir
}

/// `fondation-fixture-cli analyze <repo> <extra...>`, isolated from any FIXTURE_* of the caller.
fn analyze(repo: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("analyze").arg(repo).args(extra);
    for var in [
        fixture_cli::ENV_DIRECTIVES,
        fixture_cli::ENV_STEP_DELAY_MS,
        fixture_cli::ENV_RUN_LOG,
        fixture_cli::ENV_AGENT_ID,
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("run fondation-fixture-cli")
}

fn stdout_lines(output: &Output) -> Vec<String> {
    String::from_utf8(output.stdout.clone())
        .expect("stdout is UTF-8")
        .lines()
        .map(str::to_owned)
        .collect()
}

fn json_lines(output: &Output) -> Vec<Value> {
    stdout_lines(output)
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

fn output_dir(repo: &Path) -> PathBuf {
    repo.join(fixture_cli::DEFAULT_OUTPUT_DIR)
}

/// Every regular file under `root`, by relative path; symlinks are reported by their target.
fn read_tree(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).expect("read output dir") {
            let path = entry.expect("dir entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("metadata");
            let rel = path.strip_prefix(root).expect("under root").to_owned();
            if meta.is_dir() {
                walk(root, &path, files);
            } else if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).expect("read link");
                files.insert(rel, format!("symlink -> {}", target.display()).into_bytes());
            } else {
                files.insert(rel, std::fs::read(&path).expect("read output file"));
            }
        }
    }
    let mut files = BTreeMap::new();
    walk(root, root, &mut files);
    files
}

fn sample_tree_files() -> BTreeMap<PathBuf, Vec<u8>> {
    fixture_cli::sample_files()
        .into_iter()
        .map(|f| (f.path().to_owned(), f.contents().to_vec()))
        .collect()
}

/// Reads a child's pipe line by line on a thread, so a test can wait for a line with a deadline.
fn line_reader(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_for_line(lines: &mpsc::Receiver<String>, wanted: &str) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(wanted) => return,
            Ok(_) => {}
            Err(err) => panic!("no line containing {wanted:?} within {DEADLINE:?}: {err}"),
        }
    }
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "fixture CLI did not exit within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts a run that hangs after step 1 and returns once step 1 has been announced.
fn start_hanging(repo: &Path, job: &str, agent: &str, log: &Path, extra: &str) -> Child {
    let mut child = analyze(repo, &["--job-id", job])
        .arg("--prompt")
        .arg(format!("fixture:hang {extra}"))
        .env(fixture_cli::ENV_RUN_LOG, log)
        .env(fixture_cli::ENV_AGENT_ID, agent)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fixture CLI");
    let lines = line_reader(child.stdout.take().expect("stdout piped"));
    wait_for_line(&lines, STEP_MESSAGES[0]);
    child
}

fn terminate(child: &Child) {
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"));
    kill(pid, Signal::SIGTERM).expect("send SIGTERM");
}

#[test]
fn normal_run_writes_the_sample_tree_and_six_json_steps() {
    let repo = repo();
    let output = run(&mut analyze(repo.path(), &["--profile", "production"]));
    assert!(output.status.success(), "{output:?}");

    assert_eq!(read_tree(&output_dir(repo.path())), sample_tree_files());

    let lines = json_lines(&output);
    let msgs: Vec<&str> = lines.iter().filter_map(|l| l["msg"].as_str()).collect();
    let mut expected: Vec<&str> = STEP_MESSAGES.to_vec();
    expected.push(COMPLETE_MESSAGE);
    assert_eq!(msgs, expected);
    for line in &lines {
        assert_eq!(line["level"], "info");
        assert_eq!(line["hostname"], "fixture");
        assert!(line["time"].as_u64().is_some() && line["pid"].as_u64().is_some());
    }
    assert!(output.stderr.is_empty());
}

#[test]
fn marker_format_prints_the_newest_cli_json_lines() {
    let repo = repo();
    let prompt = "document this fixture:format=marker";
    let output = run(&mut analyze(repo.path(), &["--prompt", prompt]));
    assert!(output.status.success(), "{output:?}");
    assert_eq!(read_tree(&output_dir(repo.path())), sample_tree_files());

    let lines = json_lines(&output);
    assert_eq!(lines.len(), 7, "six steps and the end: {lines:?}");
    for (n, line) in lines[..6].iter().enumerate().map(|(i, l)| (i + 1, l)) {
        assert_eq!(
            line["msg"],
            format!("[FONDATION_STEP_{n}/6] {}", STEP_MESSAGES[n - 1])
        );
        assert_eq!(line["step"], format!("{n}/6"));
        assert!(line["phase"].as_str().is_some_and(|p| !p.is_empty()));
    }
    assert_eq!(lines[1]["phase"], "Analyze", "as DESIGN.md shows it");
    assert_eq!(lines[6]["msg"], COMPLETE_MESSAGE);
    for line in &lines {
        assert_eq!(line["level"], 30, "pino's numeric info level");
        assert!(line["time"].as_u64().is_some() && line["pid"].as_u64().is_some());
    }

    // A failure is a numeric error line.
    let repo = self::repo();
    let prompt = "fixture:format=marker fixture:fail";
    let output = run(&mut analyze(repo.path(), &["--prompt", prompt]));
    assert!(!output.status.success());
    let lines = json_lines(&output);
    let last = lines.last().expect("an error line");
    assert_eq!(
        (&last["level"], &last["msg"]),
        (&Value::from(50), &Value::from(FAILED_MESSAGE))
    );
}

#[test]
fn text_formats_print_their_step_lines() {
    type StepLine = fn(usize, &str) -> String;
    let cases: [(&str, StepLine); 3] = [
        ("bracket", |n, msg| format!("[{n}/6] Phase: {msg}")),
        ("step", |n, msg| format!("Step {n}/6: {msg}")),
        ("progress", |_, msg| format!("[PROGRESS] {msg}")),
    ];
    for (format, step_line) in cases {
        let repo = repo();
        let prompt = format!("document this fixture:format={format}");
        let output = run(&mut analyze(repo.path(), &["--prompt", &prompt]));
        assert!(output.status.success(), "{format}: {output:?}");
        let lines = stdout_lines(&output);
        let steps: Vec<String> = (1..=6)
            .map(|n| step_line(n, STEP_MESSAGES[n - 1]))
            .collect();
        assert_eq!(lines[..6], steps[..], "{format}");
        assert!(lines[6].ends_with(COMPLETE_MESSAGE), "{format}: {lines:?}");
        assert_eq!(lines.len(), 7, "{format}");
    }
}

#[test]
fn silent_prints_nothing_but_writes_the_files() {
    let repo = repo();
    let output = run(analyze(repo.path(), &[]).env(fixture_cli::ENV_DIRECTIVES, "format=silent"));
    assert!(output.status.success());
    assert!(output.stdout.is_empty() && output.stderr.is_empty());
    assert_eq!(read_tree(&output_dir(repo.path())), sample_tree_files());
}

#[test]
fn fail_stops_after_step_two_with_the_error_line() {
    let repo = repo();
    let output = run(&mut analyze(repo.path(), &["--prompt", "fixture:fail"]));
    assert_eq!(output.status.code(), Some(1));
    let lines = json_lines(&output);
    let last = lines.last().expect("an error line");
    assert_eq!(last["level"], "error");
    assert_eq!(last["msg"], FAILED_MESSAGE);
    assert_eq!(last["err"]["message"], FAILURE_MESSAGE);
    assert_eq!(lines.len(), 3, "two steps then the error: {lines:?}");
    let stderr = String::from_utf8(output.stderr).expect("UTF-8 stderr");
    assert_eq!(stderr.trim_end(), format!("Error: {FAILURE_MESSAGE}"));

    let out = output_dir(repo.path());
    assert!(out.join("step2_relationships.yaml").is_file());
    assert!(!out.join("step3_order.yaml").exists());
}

#[test]
fn fail_attempts_fails_then_succeeds_and_the_run_log_counts() {
    let repo = repo();
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir.path().join("runs.log");
    let mut codes = Vec::new();
    for _ in 0..3 {
        let output = run(analyze(repo.path(), &["--job-id", "job1"])
            .env(fixture_cli::ENV_DIRECTIVES, "fail-attempts=2,format=silent")
            .env(fixture_cli::ENV_RUN_LOG, &log)
            .env(fixture_cli::ENV_AGENT_ID, "agent-a"));
        codes.push(output.status.code());
    }
    assert_eq!(codes, [Some(1), Some(1), Some(0)]);

    let records = read_run_log(&log).expect("read run log");
    assert_eq!(records.len(), 6);
    let kinds: Vec<RunEventKind> = records.iter().map(|r| r.kind).collect();
    use RunEventKind::{End, Start};
    assert_eq!(kinds, [Start, End, Start, End, Start, End]);
    let exits: Vec<Option<i32>> = records.iter().map(|r| r.exit_code).collect();
    assert_eq!(exits, [None, Some(1), None, Some(1), None, Some(0)]);
    for pair in records.chunks(2) {
        assert_eq!(pair[0].pid, pair[1].pid);
        assert!(pair[0].at_nanos <= pair[1].at_nanos);
        assert!(pair
            .iter()
            .all(|r| r.job_id == "job1" && r.agent == "agent-a"));
    }
    assert_eq!(runs_per_job(&records), BTreeMap::from([("job1".into(), 3)]));
    assert_eq!(
        max_concurrency_per_agent(&records),
        BTreeMap::from([("agent-a".into(), 1)])
    );
}

#[test]
fn fail_attempts_without_a_run_log_is_a_usage_error() {
    let repo = repo();
    let output = run(&mut analyze(
        repo.path(),
        &["--prompt", "fixture:fail-attempts=1"],
    ));
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn overlapping_runs_show_in_the_concurrency_sweep() {
    let repo = repo();
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir.path().join("runs.log");
    let first = start_hanging(repo.path(), "j1", "agent-a", &log, "");
    let second = start_hanging(repo.path(), "j2", "agent-a", &log, "");
    for mut child in [first, second] {
        terminate(&child);
        assert_eq!(wait_exit(&mut child).signal(), Some(Signal::SIGTERM as i32));
    }
    let output = run(analyze(repo.path(), &["--job-id", "j3"])
        .env(fixture_cli::ENV_RUN_LOG, &log)
        .env(fixture_cli::ENV_AGENT_ID, "agent-b"));
    assert!(output.status.success());

    let records = read_run_log(&log).expect("read run log");
    let ends: Vec<Option<i32>> = records
        .iter()
        .filter(|r| r.kind == RunEventKind::End)
        .map(|r| r.exit_code)
        .collect();
    assert_eq!(ends, [Some(143), Some(143), Some(0)]);
    assert_eq!(
        max_concurrency_per_agent(&records),
        BTreeMap::from([("agent-a".into(), 2), ("agent-b".into(), 1)])
    );
}

#[test]
fn ignore_term_survives_sigterm_until_sigkill() {
    let repo = repo();
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir.path().join("runs.log");
    let mut child = analyze(
        repo.path(),
        &["--prompt", "fixture:hang fixture:ignore-term"],
    )
    .env(fixture_cli::ENV_RUN_LOG, &log)
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn fixture CLI");
    let stdout = line_reader(child.stdout.take().expect("stdout piped"));
    let stderr = line_reader(child.stderr.take().expect("stderr piped"));
    wait_for_line(&stdout, STEP_MESSAGES[0]);
    terminate(&child);
    wait_for_line(&stderr, "ignoring SIGTERM");
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "still running"
    );
    child.kill().expect("SIGKILL");
    assert_eq!(wait_exit(&mut child).signal(), Some(Signal::SIGKILL as i32));
    let records = read_run_log(&log).expect("read run log");
    assert_eq!(records.len(), 1, "a SIGKILLed run logs no end: {records:?}");
}

#[test]
fn symlink_points_outside_the_output() {
    let repo = repo();
    let output = run(&mut analyze(repo.path(), &["--prompt", "fixture:symlink"]));
    assert!(output.status.success());
    let link = output_dir(repo.path()).join(SYMLINK_PATH);
    assert!(std::fs::symlink_metadata(&link)
        .expect("link exists")
        .file_type()
        .is_symlink());
    assert_eq!(
        std::fs::read_link(&link).expect("read link"),
        Path::new(SYMLINK_TARGET)
    );
}

#[test]
fn oversize_writes_a_chapter_of_the_requested_size() {
    let repo = repo();
    let output = run(&mut analyze(
        repo.path(),
        &["--prompt", "fixture:oversize=2000000"],
    ));
    assert!(output.status.success());
    let bytes = std::fs::read(output_dir(repo.path()).join(OVERSIZE_PATH)).expect("oversize file");
    assert_eq!(bytes.len(), 2_000_000);
    assert!(bytes.starts_with(b"# Oversize"));
}

#[test]
fn repo_must_exist_and_hold_git() {
    let missing = tempfile::tempdir().expect("tempdir");
    let not_a_clone = tempfile::tempdir().expect("tempdir");
    for path in [missing.path().join("absent"), not_a_clone.path().to_owned()] {
        let output = run(&mut analyze(&path, &[]));
        assert_eq!(output.status.code(), Some(1), "{}", path.display());
        let lines = json_lines(&output);
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0]["level"], "error");
        assert_eq!(lines[0]["msg"], FAILED_MESSAGE);
        assert!(!output_dir(&path).exists());
    }
}

#[test]
fn unknown_directives_and_flags_exit_2() {
    let repo = repo();
    let typo = run(&mut analyze(repo.path(), &["--prompt", "fixture:fial"]));
    assert_eq!(typo.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&typo.stderr).contains("fial"));
    let env_typo = run(analyze(repo.path(), &[]).env(fixture_cli::ENV_DIRECTIVES, "slow=soon"));
    assert_eq!(env_typo.status.code(), Some(2));
    let flag = run(&mut analyze(repo.path(), &["--verbose"]));
    assert_eq!(flag.status.code(), Some(2));
    assert!(!output_dir(repo.path()).exists());
}

#[test]
fn output_dir_is_resolved_against_the_repo() {
    let repo = repo();
    let output = run(&mut analyze(repo.path(), &["--output-dir", "out/docs"]));
    assert!(output.status.success());
    assert_eq!(
        read_tree(&repo.path().join("out/docs")),
        sample_tree_files()
    );

    let elsewhere = tempfile::tempdir().expect("tempdir");
    let absolute = elsewhere.path().join("docs");
    let absolute = absolute.to_str().expect("UTF-8 temp path");
    let output = run(&mut analyze(repo.path(), &["--output-dir", absolute]));
    assert!(output.status.success());
    assert_eq!(read_tree(Path::new(absolute)), sample_tree_files());
}

#[test]
fn flood_adds_valid_progress_lines() {
    let repo = repo();
    let output = run(&mut analyze(
        repo.path(),
        &["--prompt", "fixture:flood=500"],
    ));
    assert!(output.status.success());
    let lines = json_lines(&output);
    assert_eq!(lines.len(), 6 + 500 + 1);
    let floods = lines
        .iter()
        .filter(|l| {
            l["msg"]
                .as_str()
                .is_some_and(|m| m.starts_with("processing file "))
        })
        .count();
    assert_eq!(floods, 500);
}

#[test]
fn invalid_utf8_output_still_succeeds() {
    let repo = repo();
    let output = run(&mut analyze(
        repo.path(),
        &["--prompt", "fixture:invalid-utf8"],
    ));
    assert!(output.status.success());
    assert!(std::str::from_utf8(&output.stdout).is_err());
    assert!(std::str::from_utf8(&output.stderr).is_err());
    assert_eq!(read_tree(&output_dir(repo.path())), sample_tree_files());
}

#[test]
fn no_output_and_exit_code_directives() {
    let repo = repo();
    let output = run(&mut analyze(
        repo.path(),
        &["--prompt", "fixture:no-output"],
    ));
    assert!(output.status.success());
    assert!(!output_dir(repo.path()).exists());

    let output = run(&mut analyze(
        repo.path(),
        &["--prompt", "fixture:exit=3 fixture:slow=1"],
    ));
    assert_eq!(output.status.code(), Some(3));
    assert!(!json_lines(&output).iter().any(|l| l["level"] == "error"));
    assert_eq!(read_tree(&output_dir(repo.path())), sample_tree_files());
}
