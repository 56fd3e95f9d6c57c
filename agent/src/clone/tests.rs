use std::process::Command;

use tempfile::TempDir;

use super::*;

/// A local bare repository served through a `file://` URL, and an allow-list admitting it.
struct Fixture {
    dir: TempDir,
    url: String,
    allowlist: RepoAllowlist,
}

fn git(cwd: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(args)
        .current_dir(cwd)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("git should be installed for these tests");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `files` are (name, content) committed on branch `main`.
fn fixture(files: &[(&str, &[u8])]) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    git(
        dir.path(),
        &["-c", "init.defaultBranch=main", "init", "-q", "src"],
    );
    for (name, content) in files {
        std::fs::write(src.join(name), content).unwrap();
    }
    git(&src, &["add", "."]);
    git(
        &src,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-q",
            "-m",
            "init",
        ],
    );
    git(dir.path(), &["clone", "-q", "--bare", "src", "repo.git"]);
    let base = format!("file://{}", dir.path().display());
    let allowlist =
        RepoAllowlist::parse(&format!("https://github.com/,{base}/")).expect("allow-list");
    Fixture {
        url: format!("{base}/repo.git"),
        dir,
        allowlist,
    }
}

fn spec(fx: &Fixture, branch: &str) -> CloneSpec {
    CloneSpec {
        url: fx.url.clone(),
        branch: branch.into(),
        dest: fx.dir.path().join("checkout"),
        timeout: Duration::from_secs(60),
        max_bytes: 10 * 1024 * 1024,
        credential: None,
    }
}

/// Incompressible bytes, so git cannot shrink them.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn clones_a_local_repository() {
    let fx = fixture(&[("README.md", b"hello\n")]);
    let spec = spec(&fx, "main");
    clone_repo(&spec, &fx.allowlist, CancellationToken::new())
        .await
        .expect("clone should succeed");
    assert_eq!(
        std::fs::read(spec.dest.join("README.md")).unwrap(),
        b"hello\n"
    );
    assert!(spec.dest.join(".git").is_dir());
}

/// No branch means the remote's default (its HEAD), here `trunk`, even with a `main` beside it.
#[tokio::test]
async fn an_empty_branch_clones_the_default_branch() {
    let fx = fixture(&[("README.md", b"main\n")]);
    let src = fx.dir.path().join("src");
    let commit = ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q"];
    git(&src, &["checkout", "-q", "-b", "trunk"]);
    std::fs::write(src.join("README.md"), b"trunk\n").unwrap();
    git(&src, &[&commit[..], &["-am", "trunk"]].concat());
    std::fs::remove_dir_all(fx.dir.path().join("repo.git")).unwrap();
    git(fx.dir.path(), &["clone", "-q", "--bare", "src", "repo.git"]);

    let spec = spec(&fx, "");
    clone_repo(&spec, &fx.allowlist, CancellationToken::new())
        .await
        .expect("clone of the default branch");
    assert_eq!(
        std::fs::read(spec.dest.join("README.md")).unwrap(),
        b"trunk\n"
    );
    let main = CloneSpec {
        dest: fx.dir.path().join("main-checkout"),
        ..self::spec(&fx, "main")
    };
    clone_repo(&main, &fx.allowlist, CancellationToken::new())
        .await
        .expect("clone of main");
    assert_eq!(
        std::fs::read(main.dest.join("README.md")).unwrap(),
        b"main\n"
    );
}

#[tokio::test]
async fn missing_branch_fails_permanently_with_gits_message() {
    let fx = fixture(&[("README.md", b"hello\n")]);
    let spec = spec(&fx, "nope");
    let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
        .await
        .unwrap_err();
    match &err {
        CloneError::Failed {
            message, branch, ..
        } => {
            assert_eq!(branch, "nope");
            assert!(
                message.contains("Remote branch nope not found"),
                "{message}"
            );
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(!err.is_retryable());
    assert!(!spec.dest.exists(), "partial clone should be removed");
}

#[tokio::test]
async fn missing_repository_fails_permanently() {
    let fx = fixture(&[("README.md", b"hello\n")]);
    let mut spec = spec(&fx, "main");
    spec.url = format!("file://{}/missing.git", fx.dir.path().display());
    let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(matches!(err, CloneError::Failed { .. }), "{err:?}");
    assert!(!err.is_retryable(), "{err}");
}

#[tokio::test]
async fn url_outside_allowlist_is_rejected_before_anything_runs() {
    let fx = fixture(&[("README.md", b"hello\n")]);
    for url in [
        "https://evil.example/x.git".to_owned(),
        "ext::sh -c touch% /tmp/pwned".to_owned(),
        // A file:// URL outside the configured file:// prefix.
        "file:///etc".to_owned(),
    ] {
        let mut spec = spec(&fx, "main");
        spec.url = url.clone();
        let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(matches!(err, CloneError::Rejected(_)), "{url}: {err:?}");
        assert!(!err.is_retryable());
        assert!(!spec.dest.exists(), "{url}: dest must not be created");
    }
    // The default allow-list does not admit file:// at all.
    let err = clone_repo(
        &spec(&fx, "main"),
        &RepoAllowlist::default(),
        CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(matches!(
        err,
        CloneError::Rejected(ValidationError::UrlNotAllowed { .. })
    ));
}

#[tokio::test]
async fn option_like_branch_is_rejected() {
    let fx = fixture(&[("README.md", b"hello\n")]);
    for branch in ["--upload-pack=touch /tmp/pwned", "main;rm -rf /", "-x"] {
        let spec = spec(&fx, branch);
        let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                CloneError::Rejected(ValidationError::InvalidBranch { .. })
            ),
            "{branch}: {err:?}"
        );
        assert!(!spec.dest.exists());
    }
}

#[tokio::test]
async fn tiny_limit_is_too_large() {
    let fx = fixture(&[("README.md", b"hello, this is more than ten bytes\n")]);
    let mut spec = spec(&fx, "main");
    spec.max_bytes = 10;
    let err = clone_repo(&spec, &fx.allowlist, CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, CloneError::TooLarge { limit: 10, .. }),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(!spec.dest.exists(), "oversize clone should be removed");
}

#[tokio::test]
async fn watchdog_stops_a_growing_clone() {
    let fx = fixture(&[("big.bin", &noise(8 * 1024 * 1024))]);
    let mut spec = spec(&fx, "main");
    spec.max_bytes = 64 * 1024;
    let err = clone_with_poll(
        &spec,
        &fx.allowlist,
        CancellationToken::new(),
        Duration::from_millis(5),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, CloneError::TooLarge { .. }), "{err:?}");
    assert!(!spec.dest.exists());
}

#[tokio::test]
async fn canceled_clone_is_canceled() {
    let fx = fixture(&[("README.md", b"hello\n")]);
    let spec = spec(&fx, "main");
    let cancel = CancellationToken::new();
    cancel.cancel();
    let err = clone_repo(&spec, &fx.allowlist, cancel).await.unwrap_err();
    assert!(matches!(err, CloneError::Canceled), "{err:?}");
    assert!(!err.is_retryable());
    assert!(!spec.dest.exists());
}

#[tokio::test]
async fn unresponsive_remote_times_out() {
    // A git:// server that accepts and then says nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn);
        }
    });
    let base = format!("git://127.0.0.1:{port}/");
    let allowlist = RepoAllowlist::parse(&base).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = CloneSpec {
        url: format!("{base}repo.git"),
        branch: "main".into(),
        dest: dir.path().join("checkout"),
        timeout: Duration::from_millis(500),
        max_bytes: 1024 * 1024,
        credential: None,
    };
    let started = std::time::Instant::now();
    let err = clone_repo(&spec, &allowlist, CancellationToken::new())
        .await
        .unwrap_err();
    server.abort();
    assert!(matches!(err, CloneError::TimedOut { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(!spec.dest.exists());
}

#[test]
fn dir_size_counts_files_without_following_symlinks() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    std::fs::write(root.join("one"), [0u8; 100]).unwrap();
    std::fs::write(root.join("a/b/two"), [0u8; 50]).unwrap();
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("huge"), vec![0u8; 10_000]).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
    assert_eq!(dir_size(&root, u64::MAX), 150);
    assert!(dir_size(&root, 120) > 120);
    assert_eq!(dir_size(&dir.path().join("missing"), 10), 0);
}

#[test]
fn retryability() {
    let failed = |message: &str| CloneError::Failed {
        url: "u".into(),
        branch: "b".into(),
        message: message.into(),
    };
    assert!(failed(
        "fatal: unable to access 'https://github.com/o/r.git/': Could not resolve host: github.com"
    )
    .is_retryable());
    assert!(failed("fatal: early EOF").is_retryable());
    assert!(!failed("warning: Could not find remote branch x to clone.; fatal: Remote branch x not found in upstream origin").is_retryable());
    assert!(!failed("fatal: transport 'file' not allowed").is_retryable());
    assert!(CloneError::TimedOut {
        url: "u".into(),
        timeout: Duration::from_secs(1)
    }
    .is_retryable());
    assert!(!CloneError::TooLarge {
        url: "u".into(),
        limit: 1
    }
    .is_retryable());
    assert!(CloneError::Process(ProcessError::EmptyArgv).is_retryable());
}

#[test]
fn authentication_refusals_are_told_apart() {
    for message in [
        "remote: Repository not found.; fatal: repository 'https://github.com/o/r.git/' not found",
        "fatal: could not read Username for 'https://github.com': terminal prompts disabled",
        "remote: Invalid username or password.; fatal: Authentication failed for 'https://github.com/o/r.git/'",
        "fatal: unable to access 'http://127.0.0.1:1/o/r.git/': The requested URL returned error: 403",
    ] {
        assert!(is_auth_refusal(message), "{message}");
    }
    assert!(!is_auth_refusal("fatal: early EOF"));
    assert!(!is_auth_refusal(
        "fatal: Remote branch x not found in upstream origin"
    ));
    let refused = |had_credential| CloneError::AuthRefused {
        url: "https://github.com/o/r.git".into(),
        had_credential,
    };
    assert!(!refused(false).is_retryable());
    assert_eq!(
        refused(false).to_string(),
        "GitHub access token not found. Please reconnect your GitHub account."
    );
    assert!(refused(true)
        .to_string()
        .contains("Please reconnect your GitHub account."));
}

#[test]
fn the_token_reaches_git_only_as_an_extra_header_in_its_environment() {
    let env = credential_env(&CloneCredential::new("gho_secret".into()));
    let value = &env[2].1;
    assert_eq!(env[0], ("GIT_CONFIG_COUNT".into(), "1".into()));
    assert_eq!(
        env[1],
        ("GIT_CONFIG_KEY_0".into(), "http.extraHeader".into())
    );
    assert!(value.starts_with("Authorization: Basic "), "{value}");
    let encoded = value.trim_start_matches("Authorization: Basic ");
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .expect("base64");
    assert_eq!(decoded, b"x-access-token:gho_secret");
}

#[test]
fn failure_message_keeps_last_stderr_lines() {
    let line = |stream, text: &str| process::OutputLine {
        stream,
        text: text.into(),
    };
    let tail = vec![
        line(OutputStream::Stderr, "Cloning into '/x'..."),
        line(OutputStream::Stdout, "ignored"),
        line(OutputStream::Stderr, "warning: w"),
        line(OutputStream::Stderr, ""),
        line(OutputStream::Stderr, "fatal: f"),
    ];
    let status = process::ExitStatusKind::Exited(128);
    assert_eq!(failure_message(&tail, &status), "warning: w; fatal: f");
    assert_eq!(
        failure_message(&[], &status),
        "git ended with Exited(128) without an error message"
    );
}
