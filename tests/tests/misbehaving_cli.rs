//! The analyzer is untrusted: oversize output fails the job with a message naming the file,
//! symlinks are not followed, invalid UTF-8 breaks nothing, and a silent CLI still shows progress
//! through the files it writes.

use std::time::Duration;

use fondation_testkit::support::cluster::{
    AgentOptions, AgentProc, CoordinatorProc, Sandbox, ANY_PORT,
};

const TERMINAL: &[&str] = &["completed", "failed", "dead", "canceled"];

#[tokio::test(flavor = "multi_thread")]
async fn misbehaving_analyzers_get_clear_outcomes() {
    let sandbox = Sandbox::new();
    let mut coordinator = CoordinatorProc::start(&sandbox, ANY_PORT, &[]).await;
    let mut agent = AgentProc::spawn(
        &sandbox,
        AgentOptions {
            id: "agent-1",
            coordinator_url: coordinator.url(),
            slots: 2,
            extra: &[],
        },
    );
    agent.wait_connected().await;
    let mut admin = coordinator.admin().await;
    let url = sandbox.repo.url.clone();
    let timeout = Duration::from_secs(60);

    // 2 MiB chapter: over Convex's 1 MiB per document. Not retried: it would be as large again.
    let oversize = admin.submit(&url, "main", "fixture:oversize=2097152").await;
    let job = admin.wait_status(&oversize, TERMINAL, timeout).await;
    assert_eq!(job.status, "failed", "{job:?}");
    assert_eq!(job.attempts, 1);
    assert!(
        job.error.contains("chapters/chapter_99_oversize.md") && job.error.contains("2097152"),
        "the error names the file and its size: {}",
        job.error
    );
    assert!(
        job.documents.is_empty(),
        "nothing was stored, nothing truncated"
    );

    // A symlink to /etc/passwd in the output is skipped, never read.
    let symlink = admin.submit(&url, "main", "fixture:symlink").await;
    let job = admin.wait_status(&symlink, TERMINAL, timeout).await;
    assert_eq!(job.status, "completed", "{job:?}");
    let job = admin.job(&symlink, true).await;
    assert_eq!(job.documents.len(), 36);
    assert!(job
        .documents
        .iter()
        .all(|d| !d.content.contains("root:x:0:0")));
    assert!(job.documents.iter().all(|d| !d.slug.contains("zz_link")));

    // Invalid UTF-8 on stdout and stderr is read lossily.
    let garbled = admin.submit(&url, "main", "fixture:invalid-utf8").await;
    let job = admin.wait_status(&garbled, TERMINAL, timeout).await;
    assert_eq!(job.status, "completed", "{job:?}");

    // A CLI that prints nothing: progress comes from its output files.
    let silent = admin
        .submit(&url, "main", "fixture:format=silent fixture:slow=300")
        .await;
    let job = admin.wait_status(&silent, TERMINAL, timeout).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert_eq!(job.current_step, 6);
    coordinator
        .proc
        .wait_for_log("assignment accepted", Duration::from_secs(1))
        .await;
    assert!(
        agent.proc.lines().iter().all(|l| !l.contains("panicked")),
        "the agent survived everything"
    );

    // Every other progress format is understood.
    for format in ["marker", "bracket", "step", "progress"] {
        let job_id = admin
            .submit(
                &url,
                "main",
                &format!("fixture:format={format} fixture:slow=50"),
            )
            .await;
        let job = admin.wait_status(&job_id, TERMINAL, timeout).await;
        assert_eq!(job.status, "completed", "{format}: {job:?}");
        assert_eq!(
            job.current_step, 6,
            "{format}: the last step was recognised"
        );
    }
}
