//! Job logs through the Admin API (`GetJobLogs`), with the real binaries: a running job's lines
//! followed in order and the tail kept after its end, bounded memory under a flood, and secrets
//! redacted.

use std::{os::unix::fs::PermissionsExt, path::PathBuf, time::Duration};

use fondation_proto::{limits, pb};
use fondation_testkit::{
    fixture_cli::{gate_note, numbered_line, COMPLETE_MESSAGE},
    support::{
        cluster::{with_token, Admin, AgentProc, CoordinatorProc, Sandbox, ANY_PORT},
        grpcurl,
        process::peak_rss_kib,
    },
};
use tonic::Streaming;

const DEADLINE: Duration = Duration::from_secs(60);

/// The file the fixture's `gate=` directive reads: the last step the run may start.
struct Gate {
    path: PathBuf,
}

impl Gate {
    fn new(sandbox: &Sandbox, allowed: usize) -> Self {
        let gate = Self {
            path: sandbox.path("gate"),
        };
        gate.open_to(allowed);
        gate
    }

    /// Lets the run go up to `step` (written whole: a rename).
    fn open_to(&self, step: usize) {
        let next = self.path.with_extension("next");
        std::fs::write(&next, step.to_string()).expect("writing the gate");
        // The analyzer may run as a slot user of its own.
        std::fs::set_permissions(&next, std::fs::Permissions::from_mode(0o644))
            .expect("opening the gate to the analyzer");
        std::fs::rename(&next, &self.path).expect("replacing the gate");
    }

    fn directive(&self) -> String {
        format!("fixture:gate={}", self.path.display())
    }
}

async fn get_logs(
    admin: &mut Admin,
    job_id: &str,
    tail: u32,
    follow: bool,
) -> Result<Streaming<pb::LogLine>, tonic::Status> {
    let request = with_token(
        admin.token.as_deref(),
        pb::GetJobLogsRequest {
            job_id: job_id.into(),
            tail,
            follow,
        },
    );
    Ok(admin.client.get_job_logs(request).await?.into_inner())
}

/// The next line, or `None` at the end of the stream.
async fn next_line(logs: &mut Streaming<pb::LogLine>, waiting_for: &str) -> Option<pb::LogLine> {
    tokio::time::timeout(DEADLINE, logs.message())
        .await
        .unwrap_or_else(|_| {
            panic!("no log line within {DEADLINE:?} while waiting for {waiting_for}")
        })
        .expect("the log stream carries no error")
}

/// Reads lines into `seen` until `done` holds.
async fn read_until(
    logs: &mut Streaming<pb::LogLine>,
    seen: &mut Vec<pb::LogLine>,
    waiting_for: &str,
    done: impl Fn(&[pb::LogLine]) -> bool,
) {
    while !done(seen) {
        match next_line(logs, waiting_for).await {
            Some(line) => seen.push(line),
            None => panic!("the log stream ended while waiting for {waiting_for}; got {seen:#?}"),
        }
    }
}

/// Every line up to the end of the stream.
async fn read_to_end(logs: &mut Streaming<pb::LogLine>, waiting_for: &str) -> Vec<pb::LogLine> {
    let mut lines = Vec::new();
    while let Some(line) = next_line(logs, waiting_for).await {
        lines.push(line);
    }
    lines
}

fn has(lines: &[pb::LogLine], text: &str) -> bool {
    lines.iter().any(|line| line.text.contains(text))
}

fn texts(lines: &[pb::LogLine]) -> Vec<(u64, &str)> {
    lines
        .iter()
        .map(|line| (line.seq, line.text.as_str()))
        .collect()
}

async fn status(admin: &mut Admin, job_id: &str) -> String {
    admin.job(job_id, false).await.status
}

#[tokio::test(flavor = "multi_thread")]
async fn a_followed_job_shows_its_lines_as_they_come_and_keeps_them_after_its_end() {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let _agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let mut admin = coordinator.admin().await;
    let gate = Gate::new(&sandbox, 1);
    let prompt = format!("explain fixture:numbered=3 {}", gate.directive());
    let job_id = admin.submit(&sandbox.repo.url, "main", &prompt).await;
    admin.wait_status(&job_id, &["analyzing"], DEADLINE).await;

    // Step 1 printed, the run held before step 2: its lines arrive while it runs.
    let mut logs = get_logs(&mut admin, &job_id, 0, true)
        .await
        .expect("GetJobLogs follows a running job");
    let mut seen = Vec::new();
    read_until(&mut logs, &mut seen, "step 1's lines", |seen| {
        (1..=3).all(|n| has(seen, &numbered_line(1, n))) && has(seen, &gate_note(2))
    })
    .await;
    assert_eq!(status(&mut admin, &job_id).await, "analyzing");

    // Lines printed after the follow began come too, still while the job runs.
    gate.open_to(2);
    read_until(&mut logs, &mut seen, "step 2's lines", |seen| {
        (1..=3).all(|n| has(seen, &numbered_line(2, n))) && has(seen, &gate_note(3))
    })
    .await;
    assert_eq!(status(&mut admin, &job_id).await, "analyzing");

    // The rest, and the stream ends with the run.
    gate.open_to(6);
    seen.extend(read_to_end(&mut logs, "the end of the run").await);
    admin.wait_status(&job_id, &["completed"], DEADLINE).await;

    let seqs: Vec<u64> = seen.iter().map(|line| line.seq).collect();
    assert_eq!(
        seqs,
        (0..seen.len() as u64).collect::<Vec<_>>(),
        "every line once, in order, no gap"
    );
    assert!(seen
        .iter()
        .all(|line| line.attempt == 1 && line.time.is_some()));
    let numbered: Vec<&str> = seen
        .iter()
        .filter(|line| line.text.contains("fixture line "))
        .map(|line| line.text.as_str())
        .collect();
    assert_eq!(numbered.len(), 18, "{numbered:#?}");
    for (index, text) in numbered.iter().enumerate() {
        let (step, n) = (index / 3 + 1, index as u64 % 3 + 1);
        assert!(
            text.contains(&numbered_line(step, n)),
            "line {index} is {text}"
        );
    }
    for line in &seen {
        let expected = if line.text.starts_with("fixture: step") {
            "stderr"
        } else {
            "stdout"
        };
        assert_eq!(line.stream, expected, "{line:?}");
    }
    assert!(
        seen.last()
            .is_some_and(|line| line.text.contains(COMPLETE_MESSAGE)),
        "{:#?}",
        texts(&seen)
    );

    // After the end: the kept tail, the same lines.
    let mut kept = get_logs(&mut admin, &job_id, 0, false)
        .await
        .expect("GetJobLogs of an ended job");
    let kept = read_to_end(&mut kept, "the kept lines").await;
    assert_eq!(texts(&kept), texts(&seen));
    let mut last = get_logs(&mut admin, &job_id, 3, true)
        .await
        .expect("following an ended job returns its tail");
    let last = read_to_end(&mut last, "the last three lines").await;
    assert_eq!(texts(&last), texts(&seen[seen.len() - 3..]));

    // The same through the real grpcurl, as the README shows it: times as RFC 3339 text.
    let shown = grpcurl::call_stream(
        &coordinator.addr(),
        "fondation.v1.Admin/GetJobLogs",
        &serde_json::json!({ "jobId": job_id, "tail": 2 }),
    )
    .expect("grpcurl reads the job's logs");
    assert_eq!(shown.len(), 2, "{shown:#?}");
    assert!(
        shown[1]["text"]
            .as_str()
            .is_some_and(|text| text.contains(COMPLETE_MESSAGE)),
        "{shown:#?}"
    );
    assert!(
        shown[1]["time"]
            .as_str()
            .is_some_and(|time| time.ends_with('Z') && time.contains('T')),
        "{shown:#?}"
    );

    let unknown = get_logs(&mut admin, "no-such-job", 0, false)
        .await
        .expect_err("an unknown job is refused");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
}

/// `VmHWM` of a live process, in KiB.
fn peak_rss(pid: u32) -> u64 {
    peak_rss_kib(pid).unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status"))
}

/// Peak memory of a fresh coordinator and agent after a followed job printed `lines` lines.
struct Flood {
    agent_kib: u64,
    coordinator_kib: u64,
    followed: usize,
}

async fn flood(lines: u64) -> Flood {
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let agent = AgentProc::connected(&sandbox, "agent-1", coordinator.url(), &[]).await;
    let mut admin = coordinator.admin().await;
    let gate = Gate::new(&sandbox, 0);
    let prompt = format!("explain fixture:flood={lines} {}", gate.directive());
    let job_id = admin.submit(&sandbox.repo.url, "main", &prompt).await;
    admin.wait_status(&job_id, &["analyzing"], DEADLINE).await;

    // Followed through the whole flood, as an operator would.
    let mut logs = get_logs(&mut admin, &job_id, 0, true)
        .await
        .expect("GetJobLogs follows the job");
    let mut seen = Vec::new();
    read_until(
        &mut logs,
        &mut seen,
        "the run to wait at its gate",
        |seen| has(seen, &gate_note(1)),
    )
    .await;
    gate.open_to(6);
    let mut followed = seen.len();
    while next_line(&mut logs, "the flood").await.is_some() {
        followed += 1;
    }
    admin.wait_status(&job_id, &["completed"], DEADLINE).await;

    let mut kept = get_logs(&mut admin, &job_id, limits::MAX_LOG_TAIL, false)
        .await
        .expect("GetJobLogs after the end");
    let kept = read_to_end(&mut kept, "the kept lines").await;
    assert!(kept.len() <= limits::JOB_LOG_LINES);
    assert!(
        has(&kept, &format!("processing file {lines}\"")),
        "the last flood line is kept"
    );
    assert!(kept
        .last()
        .is_some_and(|line| line.text.contains(COMPLETE_MESSAGE)));

    Flood {
        agent_kib: peak_rss(agent.proc.pid().expect("the agent runs")),
        coordinator_kib: peak_rss(coordinator.proc.pid().expect("the coordinator runs")),
        followed,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ten_times_larger_flood_leaves_peak_memory_about_the_same() {
    let small = flood(20_000).await;
    let large = flood(200_000).await;
    eprintln!(
        "peak RSS: agent {} -> {} KiB, coordinator {} -> {} KiB; lines followed {} and {}",
        small.agent_kib,
        large.agent_kib,
        small.coordinator_kib,
        large.coordinator_kib,
        small.followed,
        large.followed
    );
    assert!(large.followed > 0 && small.followed > 0);
    const SLACK_KIB: u64 = 8 * 1024;
    for (who, small, large) in [
        ("agent", small.agent_kib, large.agent_kib),
        ("coordinator", small.coordinator_kib, large.coordinator_kib),
    ] {
        assert!(
            large <= small * 3 / 2 + SLACK_KIB,
            "the {who}'s peak memory grew with the flood: {small} KiB -> {large} KiB"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_the_analyzer_prints_are_redacted_in_the_jobs_logs() {
    const AGENT_TOKEN: &str = "agent-token-5f1c9a7e3b";
    const CLONE_TOKEN: &str = "ghp_fixtureCloneCredential0042";
    const API_KEY: &str = "fixture-api-key-77aa19";
    let sandbox = Sandbox::new();
    let coordinator = CoordinatorProc::start(
        &sandbox,
        ANY_PORT,
        &[("AGENT_TOKEN", AGENT_TOKEN), ("GITHUB_TOKEN", CLONE_TOKEN)],
    )
    .await;
    let _agent = AgentProc::connected(
        &sandbox,
        "agent-1",
        coordinator.url(),
        // In the analyzer's environment (ANALYZER_ENV passes FIXTURE_*), with a secret's name.
        &[("AGENT_TOKEN", AGENT_TOKEN), ("FIXTURE_API_KEY", API_KEY)],
    )
    .await;
    let mut admin = coordinator.admin().await;
    let gate = Gate::new(&sandbox, 0);
    let prompt = format!(
        "explain fixture:say=agent:{AGENT_TOKEN} fixture:say=clone:{CLONE_TOKEN} \
         fixture:say=key:{API_KEY} fixture:say=url:https://user:{CLONE_TOKEN}@example.com/r.git \
         {}",
        gate.directive()
    );
    let job_id = admin.submit(&sandbox.repo.url, "main", &prompt).await;
    admin.wait_status(&job_id, &["analyzing"], DEADLINE).await;
    let expected = [
        "agent:<redacted>",
        "clone:<redacted>",
        "key:<redacted>",
        "url:https://***@example.com/r.git",
    ];
    let secrets = [AGENT_TOKEN, CLONE_TOKEN, API_KEY];

    // Followed while it runs.
    let mut logs = get_logs(&mut admin, &job_id, 0, true)
        .await
        .expect("GetJobLogs follows the job");
    let mut seen = Vec::new();
    read_until(&mut logs, &mut seen, "the printed secrets", |seen| {
        has(seen, &gate_note(1))
    })
    .await;
    // And kept after its end.
    gate.open_to(6);
    seen.extend(read_to_end(&mut logs, "the end of the run").await);
    admin.wait_status(&job_id, &["completed"], DEADLINE).await;
    let mut kept = get_logs(&mut admin, &job_id, 0, false)
        .await
        .expect("GetJobLogs after the end");
    let kept = read_to_end(&mut kept, "the kept lines").await;

    for (what, lines) in [("followed", &seen), ("kept", &kept)] {
        let shown: Vec<&str> = lines.iter().map(|line| line.text.as_str()).collect();
        let printed: Vec<&str> = lines
            .iter()
            .filter(|line| line.stream == "stdout")
            .take(expected.len())
            .map(|line| line.text.as_str())
            .collect();
        assert_eq!(printed, expected, "{what}: {shown:#?}");
        for secret in secrets {
            assert!(
                !shown.iter().any(|text| text.contains(secret)),
                "{what} lines show a secret: {shown:#?}"
            );
        }
    }
}
