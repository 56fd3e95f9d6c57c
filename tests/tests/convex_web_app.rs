//! Issue 9, what the web app's users see: private repositories cloned with the owner's stored
//! GitHub token (items 5), and progress in the web app's language (item 7).
//!
//! The private repository is served by a git server of the test's own that requires HTTP
//! authentication (`support::git_http`); the owner's token is stored `enc_v1_`-encrypted by the
//! web app's own algorithm (`tests/fixtures/github-token/`, made with Node's `crypto`). A `git`
//! wrapper first on the agent's `PATH` records every git invocation, so the test can show where
//! the token went and where it did not.

use std::time::Duration;

use fondation_testkit::{
    fake_convex::{CallRecord, FakeOptions},
    support::{
        cluster::{read_tree, AgentProc, CoordinatorProc},
        convex_world::ConvexWorld,
        git::GitFixture,
        git_http::{basic_authorization, GitHttpServer},
        git_wrapper::GitWrapper,
    },
};

const TERMINAL: &[&str] = &["completed", "failed", "canceled", "dead"];
const TIMEOUT: Duration = Duration::from_secs(90);

const INVALID_TOKEN: &str = "Invalid GitHub token format. Please reconnect your GitHub account.";
const NO_TOKEN: &str = "GitHub access token not found. Please reconnect your GitHub account.";

/// The known-answer vector made by `tests/fixtures/github-token/make-vector.js`.
struct Vector {
    key: String,
    wrong_key: String,
    token: String,
    encrypted: String,
}

fn vector() -> Vector {
    let text = include_str!("../fixtures/github-token/vector.json");
    let json: serde_json::Value = serde_json::from_str(text).expect("vector.json parses");
    let field = |name: &str| json[name].as_str().expect("vector field").to_owned();
    Vector {
        key: field("encryption_key"),
        wrong_key: field("wrong_key"),
        token: field("token"),
        encrypted: field("encrypted"),
    }
}

/// A fake Convex, a private repository on an authenticating git server, a coordinator and one
/// agent whose git is the recording wrapper.
struct PrivateWorld {
    world: ConvexWorld,
    server: GitHttpServer,
    wrapper: GitWrapper,
    coordinator: CoordinatorProc,
    agent: AgentProc,
}

impl PrivateWorld {
    async fn start(coordinator_extra: &[(&str, &str)]) -> Self {
        let vector = vector();
        let world = ConvexWorld::new(FakeOptions::fast()).await;
        let server = GitHttpServer::start(world.sandbox.repo.root(), &vector.token).await;
        let base = server.base_url();
        let template = format!("{base}{{fullName}}.git");
        let mut env: Vec<(&str, &str)> = vec![
            ("CLONE_URL_TEMPLATE", template.as_str()),
            ("REPO_ALLOWLIST", base.as_str()),
            ("RUST_LOG", "debug"),
        ];
        env.extend_from_slice(coordinator_extra);
        let coordinator = world.coordinator(None, &env).await;
        let wrapper = GitWrapper::install(world.sandbox.root.path());
        let path = wrapper.path_env();
        let agent = AgentProc::connected(
            &world.sandbox,
            "agent-1",
            coordinator.url(),
            &[
                ("PATH", path.as_str()),
                ("REPO_ALLOWLIST", base.as_str()),
                ("RUST_LOG", "debug"),
            ],
        )
        .await;
        Self {
            world,
            server,
            wrapper,
            coordinator,
            agent,
        }
    }

    /// A job on a repository owned by a user whose stored token is `stored`.
    async fn job_of_owner(&self, stored: Option<&str>, prompt: &str) -> String {
        let client = &self.world.client;
        let user_id = client
            .create_user(&rand::random::<u32>().to_string(), stored)
            .await
            .expect("users:create");
        let repository_id = client
            .create_owned_repository(GitFixture::FULL_NAME, "main", &user_id)
            .await
            .expect("repositories:create");
        client
            .create_job_for(&user_id, &repository_id, prompt)
            .await
            .expect("jobs:create")
    }
}

/// The token and the header value that carries it: neither may show anywhere but where meant.
fn secrets(token: &str) -> [String; 2] {
    let header = basic_authorization(token);
    let encoded = header.trim_start_matches("Basic ").to_owned();
    [token.to_owned(), encoded]
}

fn assert_absent(secrets: &[String], text: &str, place: &str) {
    for secret in secrets {
        assert!(
            !text.contains(secret.as_str()),
            "the token (or its header) shows in {place}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_repository_is_cloned_with_the_owners_token_and_the_token_goes_nowhere_else() {
    let vector = vector();
    let secrets = secrets(&vector.token);
    let world = PrivateWorld::start(&[("ENCRYPTION_KEY", vector.key.as_str())]).await;
    // Slow steps keep the workspace on disk long enough to be searched while the analyzer runs;
    // `probe` makes the analyzer write its whole environment into a chapter.
    let job_id = world
        .job_of_owner(
            Some(&vector.encrypted),
            "explain this fixture:probe fixture:slow=1500",
        )
        .await;

    // While the analyzer runs, the clone is on disk: no file of the agent's workspaces holds the
    // token, `.git/config` included.
    world
        .world
        .wait_status(&job_id, &["analyzing"], TIMEOUT)
        .await;
    let workspaces = world.world.sandbox.path("agents-tmp");
    let files = read_tree(&workspaces);
    assert!(
        files
            .iter()
            .any(|(path, _)| path.ends_with("repo/.git/config")),
        "the clone was not found on disk while the analyzer ran: {:?}",
        files.iter().map(|(path, _)| path).collect::<Vec<_>>()
    );
    for (path, bytes) in &files {
        assert_absent(&secrets, &String::from_utf8_lossy(bytes), path);
    }

    let job = world.world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert!(
        world.server.authorized_requests() > 0,
        "the clone did not go through the authenticating server"
    );

    // git got the token once per clone, as the intended GIT_CONFIG_VALUE_0 only.
    let recorded = world.wrapper.recorded();
    let expected_value = format!(
        "env GIT_CONFIG_VALUE_0=Authorization: {}",
        basic_authorization(&vector.token)
    );
    let mut carried = 0;
    for line in recorded.lines() {
        if line == expected_value {
            carried += 1;
        } else {
            assert_absent(&secrets, line, "a git argument or variable");
        }
    }
    assert!(carried >= 1, "git never got the token:\n{recorded}");
    assert!(recorded.contains("env GIT_CONFIG_KEY_0=http.extraHeader"));
    assert!(recorded.contains("argv clone"), "{recorded}");

    // The analyzer's environment (the probe chapter), every document, every Convex call and
    // every log line of both processes.
    let docs = world.world.client.docs(&job_id).await.expect("docs");
    let probe = docs
        .iter()
        .find(|doc| doc.slug.ends_with("zz_probe.md"))
        .expect("the probe chapter");
    assert!(probe.content.contains("env PATH="), "{}", probe.content);
    for doc in &docs {
        assert_absent(&secrets, &doc.content, &doc.slug);
    }
    let calls: Vec<CallRecord> = world.world.client.calls().await.expect("calls");
    for call in &calls {
        assert_absent(&secrets, &call.args.to_string(), "a Convex call");
        // The user document and the token query return the stored (encrypted) token, as in
        // production; no other reply may carry it.
        if !matches!(
            call.path.as_deref(),
            Some("users:getGitHubToken" | "users:getUserById")
        ) {
            assert_absent(
                std::slice::from_ref(&vector.encrypted),
                &format!("{:?}", call.reply),
                "a Convex reply",
            );
        }
    }
    for line in world
        .coordinator
        .proc
        .lines()
        .iter()
        .chain(world.agent.proc.lines().iter())
    {
        assert_absent(&secrets, line, "a log line");
        assert_absent(
            std::slice::from_ref(&vector.key),
            line,
            "a log line (the key)",
        );
    }
    world.world.assert_no_rejected_calls().await;
}

/// The old worker's messages: a token that does not decrypt, and a clone refused without one.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_key_or_no_token_fails_the_job_with_the_old_workers_messages() {
    let vector = vector();
    let world = PrivateWorld::start(&[("ENCRYPTION_KEY", vector.wrong_key.as_str())]).await;

    let undecryptable = world
        .job_of_owner(Some(&vector.encrypted), "explain this")
        .await;
    let job = world
        .world
        .wait_status(&undecryptable, TERMINAL, TIMEOUT)
        .await;
    assert_ne!(job.status, "completed", "{job:?}");
    assert_eq!(job.last_error.as_deref(), Some(INVALID_TOKEN), "{job:?}");
    assert_eq!(
        world.server.authorized_requests() + world.server.refused_requests(),
        0,
        "a job whose token cannot be read is not cloned at all"
    );

    let tokenless = world.job_of_owner(None, "explain this").await;
    let job = world.world.wait_status(&tokenless, TERMINAL, TIMEOUT).await;
    assert_ne!(job.status, "completed", "{job:?}");
    assert_eq!(job.last_error.as_deref(), Some(NO_TOKEN), "{job:?}");
    assert!(world.server.refused_requests() > 0);
    assert_eq!(world.server.authorized_requests(), 0);
    // Without a token git runs without the header.
    assert!(!world.wrapper.recorded().contains("GIT_CONFIG_VALUE_0"));
    world.world.assert_no_rejected_calls().await;
}

/// Without a stored token, the coordinator's GITHUB_TOKEN clones the private repository.
#[tokio::test(flavor = "multi_thread")]
async fn github_token_on_the_coordinator_clones_when_the_owner_has_none() {
    let vector = vector();
    let world = PrivateWorld::start(&[("GITHUB_TOKEN", vector.token.as_str())]).await;
    let job_id = world.job_of_owner(None, "explain this").await;
    let job = world.world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    assert!(world.server.authorized_requests() > 0);
    for line in world
        .coordinator
        .proc
        .lines()
        .iter()
        .chain(world.agent.proc.lines().iter())
    {
        assert_absent(&secrets(&vector.token), line, "a log line");
    }
}

fn progress_texts(calls: &[CallRecord], job_id: &str) -> Vec<String> {
    let mut texts: Vec<String> = calls
        .iter()
        .filter(|c| c.path.as_deref() == Some("queue:heartbeat") && c.args["jobId"] == job_id)
        .filter_map(|c| c.args.get("progress").and_then(|p| p.as_str()))
        .map(str::to_owned)
        .collect();
    texts.dedup();
    texts
}

/// Item 7: every phase and every step shows the old worker's French text, in order.
#[tokio::test(flavor = "multi_thread")]
async fn the_old_workers_french_texts_reach_the_heartbeats_in_order() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    // Steps 300 ms apart, progress written at most every 50 ms: every step gets its heartbeat.
    let coordinator = world
        .coordinator(None, &[("PROGRESS_INTERVAL", "50")])
        .await;
    let _agent = AgentProc::connected(&world.sandbox, "agent-1", coordinator.url(), &[]).await;

    let job_id = world
        .create_job("explain this fixture:format=marker fixture:slow=300")
        .await;
    let job = world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");

    let calls = world.client.calls().await.expect("calls");
    assert_eq!(
        progress_texts(&calls, &job_id),
        [
            "Initializing...",
            "Clonage du dépôt...",
            "Analyse du code...",
            "Étape 1/6: Extraction des abstractions principales",
            "Étape 2/6: Analyse des relations entre composants",
            "Étape 3/6: Détermination de l'ordre optimal des chapitres",
            "Étape 4/6: Génération du contenu des chapitres",
            "Étape 5/6: Révision et amélioration des chapitres",
            "Étape 6/6: Génération de tutoriels interactifs",
            "Sauvegarde des résultats...",
        ]
    );
    world.assert_no_rejected_calls().await;
}

/// `PROGRESS_LANGUAGE=en` writes English texts of the same shape.
#[tokio::test(flavor = "multi_thread")]
async fn progress_language_en_writes_english() {
    let world = ConvexWorld::new(FakeOptions::fast()).await;
    let coordinator = world
        .coordinator(None, &[("PROGRESS_LANGUAGE", "en")])
        .await;
    let _agent = AgentProc::connected(&world.sandbox, "agent-1", coordinator.url(), &[]).await;
    let job_id = world.create_job("explain this").await;
    let job = world.wait_status(&job_id, TERMINAL, TIMEOUT).await;
    assert_eq!(job.status, "completed", "{job:?}");
    let texts = progress_texts(&world.client.calls().await.expect("calls"), &job_id);
    for phase in [
        "Cloning the repository...",
        "Analyzing the code...",
        "Saving the results...",
    ] {
        assert!(texts.iter().any(|t| t == phase), "{phase} in {texts:?}");
    }
    assert!(
        !texts
            .iter()
            .any(|t| t.starts_with("Étape") || t.contains("Clonage")),
        "{texts:?}"
    );
}
