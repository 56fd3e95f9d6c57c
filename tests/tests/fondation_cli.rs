//! The `fondation` command against a real coordinator and agent: the progress bar in a real
//! pseudo-terminal (tmux), plain lines and JSON elsewhere, exit codes, tables that fit 80
//! columns, and errors that say what to do.

use std::{collections::BTreeSet, path::PathBuf, process::Output, time::Duration};

use fondation_testkit::support::{
    bin_path,
    cluster::{AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
};

const JOB_TIMEOUT: Duration = Duration::from_secs(90);

/// Runs `fondation` with `args` against the coordinator at `url`, its output captured.
async fn fondation(url: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(bin_path("fondation"))
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .env_remove("ADMIN_TOKEN")
        .env_remove("FONDATION_COORDINATOR")
        .output()
        .await
        .expect("fondation runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// One tmux server of its own (its socket in the sandbox): a pseudo-terminal of 80x24 running one
/// command given as argv, kept after the command exits so its screen and status can be read.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(sandbox: &Sandbox, argv: &[&str]) -> Self {
        let config = sandbox.path("tmux.conf");
        std::fs::write(&config, "set -g remain-on-exit on\n").unwrap();
        let tmux = Tmux {
            socket: sandbox.path("tmux.sock"),
        };
        let mut args = vec!["-f", config.to_str().unwrap()];
        args.extend([
            "new-session",
            "-d",
            "-s",
            "cli",
            "-x",
            "80",
            "-y",
            "24",
            "--",
        ]);
        args.extend(argv);
        let output = tmux.run(&args);
        assert!(output.status.success(), "tmux: {}", text(&output.stderr));
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        std::process::Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux runs (scripts/test installs it)")
    }

    fn screen(&self) -> String {
        text(&self.run(&["capture-pane", "-p", "-t", "cli"]).stdout)
    }

    /// The command's exit status once it has exited.
    fn exit_status(&self) -> Option<i32> {
        let shown = self.run(&[
            "display-message",
            "-p",
            "-t",
            "cli",
            "#{pane_dead} #{pane_dead_status} #{pane_pid}",
        ]);
        let shown = text(&shown.stdout);
        match shown.split_whitespace().collect::<Vec<_>>()[..] {
            ["1", status, _] => status.parse().ok(),
            // tmux may be slow to reap its child (seen here: a zombie for seconds): the kernel
            // has its exit status already.
            [_, pid] | [_, _, pid] => zombie_exit_status(pid),
            _ => None,
        }
    }
}

/// The exit status of process `pid` when it has exited and is not reaped yet: its state is `Z`
/// and field 52 of `/proc/<pid>/stat` holds the wait status.
fn zombie_exit_status(pid: &str) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command name: field 3 (state) is fields[0], field 52 (exit_code) is fields[49].
    if fields.first() != Some(&"Z") {
        return None;
    }
    let wait_status: i32 = fields.get(49)?.parse().ok()?;
    Some((wait_status >> 8) & 0xff)
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The progress bar's line on a tmux screen, from its spinner's elapsed time on.
fn bar_line(screen: &str) -> Option<String> {
    screen
        .lines()
        .find(|line| line.contains("] step "))
        .map(|line| line.trim().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_follow_on_a_terminal_shows_the_bar_advance_and_exits_zero() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let _agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let fondation = bin_path("fondation");
    let url = coordinator.url();
    let tmux = Tmux::start(
        &sandbox,
        &[
            fondation.to_str().unwrap(),
            "--coordinator",
            &url,
            "submit",
            &sandbox.repo.url,
            "--branch",
            "main",
            "--prompt",
            "explain fixture:slow=300",
            "--follow",
        ],
    );

    // The screen has no event to await: sample it until the command exits.
    let mut steps_seen = BTreeSet::new();
    let mut bars_seen = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + JOB_TIMEOUT;
    let status = loop {
        let screen = tmux.screen();
        if let Some(bar) = bar_line(&screen) {
            if let Some(step) = bar.split("] step ").nth(1).and_then(|s| s.get(..3)) {
                steps_seen.insert(step.to_string());
            }
            bars_seen.insert(bar);
        }
        if let Some(status) = tmux.exit_status() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "fondation did not exit; screen:\n{screen}"
        );
        tokio::time::sleep(Duration::from_millis(40)).await;
    };
    let screen = tmux.screen();
    assert_eq!(status, 0, "exit status; screen:\n{screen}");
    assert!(
        steps_seen.len() >= 2,
        "the bar advanced through at least two steps: saw {steps_seen:?} in {bars_seen:#?}"
    );
    assert!(
        screen.contains("completed") && screen.contains("documents"),
        "the summary line is left on the screen:\n{screen}"
    );
    for line in screen.lines() {
        assert!(
            line.chars().count() <= 80,
            "{line:?} is wider than the terminal"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_job_exits_non_zero_with_its_error_and_plain_lines_off_a_terminal() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[("MAX_ATTEMPTS", "1")]).await;
    let _agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let output = fondation(
        &coordinator.url(),
        &[
            "submit",
            &sandbox.repo.url,
            "--branch",
            "main",
            "--prompt",
            "fixture:fail",
            "--follow",
        ],
    )
    .await;
    let (stdout, stderr) = (text(&output.stdout), text(&output.stderr));
    assert!(
        !output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let job_id = stdout
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("job "))
        .and_then(|line| line.strip_suffix(" queued"))
        .unwrap_or_else(|| panic!("first line names the job: {stdout}"));
    assert!(
        stderr.contains(&format!("error: job {job_id} ended")) && stderr.contains("exit"),
        "the error says which job ended how, with the analyzer's failure: {stderr}"
    );
    assert!(
        stdout.lines().skip(1).all(|line| line.contains(" step ")),
        "off a terminal, one plain line per change and no bar: {stdout}"
    );
    assert!(
        !stdout.contains('\r') && !stdout.contains('\u{1b}'),
        "{stdout:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_prints_json_that_parses_and_tables_that_fit_80_columns() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let _agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let url = coordinator.url();

    let output = fondation(
        &url,
        &[
            "--output",
            "json",
            "submit",
            &sandbox.repo.url,
            "--branch",
            "main",
            "--prompt",
            "explain",
            "--follow",
        ],
    )
    .await;
    assert!(output.status.success(), "{}", text(&output.stderr));
    let lines: Vec<serde_json::Value> = text(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect();
    let job_id = lines[0]["jobId"]
        .as_str()
        .expect("the job id first")
        .to_string();
    let last = lines.last().unwrap();
    assert_eq!(last["status"], "completed", "{last}");
    // Times in the protobuf JSON mapping: RFC 3339 text.
    let created = last["createdAt"].as_str().expect("createdAt is text");
    created
        .parse::<jiff::Timestamp>()
        .unwrap_or_else(|e| panic!("createdAt {created:?} is not RFC 3339: {e}"));

    for args in [
        vec!["jobs"],
        vec!["jobs", "--status", "completed", "--order", "oldest"],
        vec!["job", &job_id],
        vec!["agents"],
    ] {
        let mut json_args = vec!["--output", "json"];
        json_args.extend(&args);
        let output = fondation(&url, &json_args).await;
        assert!(
            output.status.success(),
            "{args:?}: {}",
            text(&output.stderr)
        );
        let stdout = text(&output.stdout);
        let value: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{args:?} printed {stdout:?}: {e}"));
        assert!(value.is_object(), "{args:?}: {value}");
        if args[0] == "jobs" {
            assert_eq!(value["jobs"][0]["jobId"], job_id.as_str(), "{value}");
        }

        let output = fondation(&url, &args).await;
        assert!(
            output.status.success(),
            "{args:?}: {}",
            text(&output.stderr)
        );
        let table = text(&output.stdout);
        assert!(
            table.contains(&job_id) || args[0] == "agents" && table.contains("agent-1"),
            "{args:?}: {table}"
        );
        for line in table.lines() {
            assert!(
                line.chars().count() <= 80,
                "{args:?}: {line:?} is wider than 80"
            );
        }
    }
}

#[tokio::test]
async fn an_unreachable_coordinator_is_an_error_that_says_what_to_do() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let output = fondation(&url, &["jobs"]).await;
    assert!(!output.status.success());
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "coordinator not reachable at {url}: is it running?"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("FONDATION_COORDINATOR"), "{stderr}");
}
