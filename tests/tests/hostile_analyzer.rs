//! A hostile analyzer (the fixture CLI's hostile modes) against a real agent running as root, so
//! each slot's analyzer runs under a user of its own: it finds no secret of the agent, none of
//! the processes it leaves behind survives its job (two slots busy at once), and the log lines it
//! tries to forge stay escaped on the line that quotes them.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use fondation_testkit::fixture_cli::{FORGED_LINE, PROBE_PATH, PROBE_READ_OK};
use fondation_testkit::support::{
    cluster::{AgentOptions, AgentProc, CoordinatorProc, Sandbox},
    free_port, wait,
};

const TERMINAL: &[&str] = &["completed", "failed", "dead", "canceled"];
const JOB_TIMEOUT: Duration = Duration::from_secs(60);

/// Live processes whose command line holds `marker`, with their real uid.
fn processes_with_marker(marker: &str) -> Vec<(u32, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("reading /proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).contains(marker) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        if status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains("Z (zombie)"))
        {
            continue;
        }
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            .and_then(|id| id.parse().ok())
            .unwrap_or(u32::MAX);
        found.push((pid, uid));
    }
    found
}

/// Gives a folder tree to `uid`, without following symlinks.
fn chown_tree(root: &std::path::Path, uid: u32) {
    let mut pending = vec![root.to_path_buf()];
    while let Some(path) = pending.pop() {
        std::os::unix::fs::lchown(&path, Some(uid), Some(uid)).expect("chown");
        if path.is_dir() && !path.is_symlink() {
            for entry in std::fs::read_dir(&path)
                .expect("reading a folder")
                .flatten()
            {
                pending.push(entry.path());
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_analyzer_under_an_agent_running_as_root() {
    hostile_analyzer_finds_no_secret_and_leaves_no_process(false).await;
}

/// The production shape: started as root, the agent becomes AGENT_USER at once and keeps only
/// the capabilities slot users need.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_analyzer_under_an_agent_running_as_its_own_user() {
    hostile_analyzer_finds_no_secret_and_leaves_no_process(true).await;
}

async fn hostile_analyzer_finds_no_secret_and_leaves_no_process(own_user: bool) {
    assert_eq!(
        nix::unistd::geteuid().as_raw(),
        0,
        "this test needs root: the agent runs analyzers under per-slot users only with that right"
    );
    let sandbox = Sandbox::new();
    let token = format!("agent-token-{}", uuid::Uuid::new_v4().simple());
    // A secret of the agent's on disk, readable by the agent's user only (like a token file).
    let secret = sandbox.path("agent-token");
    std::fs::write(&secret, &token).expect("writing the secret file");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))
        .expect("closing the secret file");
    let coordinator =
        CoordinatorProc::start(&sandbox, free_port(), &[("AGENT_TOKEN", &token)]).await;
    let options = AgentOptions {
        id: "agent-1",
        coordinator_url: coordinator.url(),
        slots: 2,
        extra: &[("AGENT_TOKEN", &token)],
    };
    let mut agent = if own_user {
        AgentProc::spawn_as_own_user(&sandbox, options)
    } else {
        AgentProc::spawn(&sandbox, options)
    };
    agent.wait_connected().await;
    let uid_base = agent.uid_base;
    if own_user {
        let pid = agent.proc.pid().expect("the agent runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("its status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let agent_uid = agent.agent_uid().to_string();
        assert_eq!(field("Uid:"), [agent_uid.as_str(); 4], "{status}");
        // CHOWN, DAC_OVERRIDE, KILL, SETGID, SETUID: bits 0, 1, 5, 6, 7.
        assert_eq!(field("CapEff:"), ["00000000000000e3"], "{status}");
        assert_eq!(field("CapPrm:"), ["00000000000000e3"], "{status}");
        assert_eq!(field("CapInh:"), ["0000000000000000"], "{status}");
        assert!(agent.proc.log_contains("running as AGENT_USER"));
        // git runs as the agent's user and serves a local repository only to its owner (git's
        // safe.directory); a real one is fetched over https, where ownership plays no part.
        let bare = sandbox
            .repo
            .url
            .strip_prefix("file://")
            .expect("a file:// URL");
        chown_tree(std::path::Path::new(bare), agent.agent_uid());
    }
    let mut admin = coordinator.admin().await;

    let markers = [
        format!("escapee-{}", uuid::Uuid::new_v4().simple()),
        format!("escapee-{}", uuid::Uuid::new_v4().simple()),
    ];
    let mut jobs = Vec::new();
    for marker in &markers {
        let prompt = format!(
            "fixture:probe={} fixture:escape={marker} fixture:slow=500",
            secret.display()
        );
        jobs.push(admin.submit(&sandbox.repo.url, "main", &prompt).await);
    }

    // Both runs at once, each with its escapees alive, under two different slot users.
    let uids = wait::until(
        "the escapees of both jobs to run at once",
        JOB_TIMEOUT,
        || async {
            let found: Vec<Vec<(u32, u32)>> =
                markers.iter().map(|m| processes_with_marker(m)).collect();
            // Per marker: the setsid child and the double-forked one (the run itself is the third
            // process holding the marker, in its prompt).
            if found.iter().all(|f| f.len() >= 3) {
                Ok(Some(found))
            } else {
                Err(format!("{found:?}"))
            }
        },
    )
    .await;
    let slot_uids: Vec<BTreeSet<u32>> = uids
        .iter()
        .map(|f| f.iter().map(|(_, uid)| *uid).collect())
        .collect();
    for set in &slot_uids {
        assert_eq!(set.len(), 1, "one uid per job's processes: {uids:?}");
    }
    let all: BTreeSet<u32> = slot_uids.iter().flatten().copied().collect();
    assert_eq!(
        all,
        BTreeSet::from([uid_base, uid_base + 1]),
        "the two slots run as the two slot users: {uids:?}"
    );

    for job_id in &jobs {
        let job = admin.wait_status(job_id, TERMINAL, JOB_TIMEOUT).await;
        assert_eq!(job.status, "completed", "{job:?}");
    }
    // The sweep runs before the result is collected: nothing is left when the job is done.
    for marker in &markers {
        let left = processes_with_marker(marker);
        assert!(left.is_empty(), "processes outlived their job: {left:?}");
    }
    for uid in [uid_base, uid_base + 1] {
        let left = fondation_agent::sandbox::sweep::live_processes(uid);
        assert!(left.is_empty(), "uid {uid} still runs {left:?}");
    }

    for job_id in &jobs {
        let job = admin.job(job_id, true).await;
        let probe = job
            .documents
            .iter()
            .find(|d| d.slug == PROBE_PATH)
            .unwrap_or_else(|| panic!("the probe report is among the documents: {job:?}"));
        let report = &probe.content;
        assert!(
            !report.contains(&token),
            "the analyzer found the token:\n{report}"
        );
        assert!(
            !report.contains(PROBE_READ_OK),
            "the analyzer read or reached what it must not:\n{report}"
        );
        for line in report.lines().filter(|l| l.starts_with("read ")) {
            assert!(line.contains("denied"), "{line}");
        }
        let env_names: Vec<&str> = report
            .lines()
            .filter_map(|l| l.strip_prefix("env "))
            .filter_map(|l| l.split_once('=').map(|(name, _)| name))
            .collect();
        for setting in [
            "AGENT_TOKEN",
            "COORDINATOR_URL",
            "AGENT_ID",
            "TEMP_DIR",
            "HEALTH_ADDR",
        ] {
            assert!(
                !env_names.contains(&setting),
                "{setting} reached the analyzer: {env_names:?}"
            );
        }
        assert!(
            env_names.contains(&"PATH") && env_names.contains(&"FIXTURE_RUN_LOG"),
            "allow-listed variables do reach it: {env_names:?}"
        );
        let home = report
            .lines()
            .find_map(|l| l.strip_prefix("env HOME="))
            .expect("HOME is set");
        assert!(
            home.ends_with("/home") && home.contains("fondation-job-"),
            "HOME is the run's own folder: {home}"
        );
        let uid_line = report
            .lines()
            .find(|l| l.starts_with("status Uid:"))
            .expect("the probe reports its uid");
        let uid: u32 = uid_line
            .split_whitespace()
            .nth(2)
            .and_then(|id| id.parse().ok())
            .expect("a uid");
        assert!(all.contains(&uid), "{uid_line}");
        for caps in ["CapPrm:", "CapEff:", "CapAmb:"] {
            let line = report
                .lines()
                .find(|l| l.contains(caps))
                .unwrap_or_else(|| panic!("{caps} reported"));
            assert!(
                line.ends_with("0000000000000000"),
                "the analyzer holds no capability: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_log_lines_stay_escaped_on_their_line() {
    let sandbox = Sandbox::new();
    let mut coordinator =
        CoordinatorProc::start(&sandbox, free_port(), &[("MAX_ATTEMPTS", "1")]).await;
    let mut agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let mut admin = coordinator.admin().await;
    let job_id = admin
        .submit(&sandbox.repo.url, "main", "fixture:forge-log")
        .await;
    let job = admin.wait_status(&job_id, TERMINAL, JOB_TIMEOUT).await;
    assert!(job.error.contains(FORGED_LINE), "{job:?}");

    let agent_line = agent
        .proc
        .wait_for_log("run failed", Duration::from_secs(10))
        .await;
    let coordinator_line = coordinator
        .proc
        .wait_for_log(FORGED_LINE, Duration::from_secs(10))
        .await;
    for (who, line) in [("agent", &agent_line), ("coordinator", &coordinator_line)] {
        assert!(
            line.contains(r"\r\u{1b}[2K") && line.contains(r"\nError: "),
            "the {who} logs the control characters escaped: {line:?}"
        );
        assert!(
            line.contains(&job_id) && line.contains("failed"),
            "on the line that reports the failure: {line:?}"
        );
    }
    for (who, lines) in [
        ("agent", agent.proc.lines()),
        ("coordinator", coordinator.proc.lines()),
    ] {
        for line in lines {
            assert!(
                !line.chars().any(|c| c == '\r' || c == '\x1b'),
                "the {who} wrote a raw control character: {line:?}"
            );
            assert!(
                !line.starts_with(FORGED_LINE) && !line.starts_with("Error: FORGED"),
                "the {who} log holds a forged line: {line:?}"
            );
        }
    }
}
