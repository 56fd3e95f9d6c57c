//! Git repositories the agents can clone over `file://` (allow-listed explicitly in tests).

use std::{path::Path, process::Command};

use tempfile::TempDir;

/// A bare repository with a commit on `main` (and on its default branch when that is another),
/// and its `file://` URL. It lives at `<dir>/<FULL_NAME>.git`, so a Convex-style
/// `CLONE_URL_TEMPLATE` can point at it.
pub struct GitFixture {
    _dir: TempDir,
    pub url: String,
    /// Allow-list prefix covering this repository.
    pub allow_prefix: String,
    /// `CLONE_URL_TEMPLATE` that turns [`GitFixture::FULL_NAME`] into `url`.
    pub clone_url_template: String,
}

fn git(args: &[&str], cwd: &Path) {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=fondation-test",
            "-c",
            "user.email=test@fondation.invalid",
        ])
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("running git (install it: apt-get install git)");
    assert!(
        output.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

impl GitFixture {
    /// The repository's `owner/name`, as a Convex repository document has it.
    pub const FULL_NAME: &'static str = "fondation/demo";

    pub fn new() -> Self {
        Self::with_default_branch("main")
    }

    /// A repository whose default branch (the bare repository's `HEAD`) is `default`. Unless that
    /// is `main`, the default branch's README names it, and a `main` branch keeps the usual one:
    /// a clone of `main` where the default branch was meant shows in what the analyzer read.
    pub fn with_default_branch(default: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for a git fixture");
        // An agent started as root may switch to a user of its own (AGENT_USER) and run git as
        // that user: the repository must be readable by others.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("opening the git fixture to other users");
        let work = dir.path().join("work");
        std::fs::create_dir_all(work.join("src")).expect("creating the work tree");
        std::fs::write(
            work.join("README.md"),
            "# Demo project\n\nA tiny project to analyze.\n",
        )
        .expect("writing README");
        std::fs::write(
            work.join("src/main.rs"),
            "fn main() { println!(\"hello\"); }\n",
        )
        .expect("writing a source file");
        git(&["init", "--quiet", "--initial-branch=main"], &work);
        git(&["add", "."], &work);
        git(&["commit", "--quiet", "-m", "initial"], &work);
        if default != "main" {
            std::fs::write(
                work.join("README.md"),
                format!("# Demo project\n\nThe {default} branch, the default.\n"),
            )
            .expect("writing README");
            git(&["checkout", "--quiet", "-b", default], &work);
            git(&["commit", "--quiet", "-am", "the default branch"], &work);
        }
        let bare = dir.path().join(format!("{}.git", Self::FULL_NAME));
        git(
            &[
                "clone",
                "--quiet",
                "--bare",
                work.to_str().unwrap(),
                bare.to_str().unwrap(),
            ],
            dir.path(),
        );
        let url = format!("file://{}", bare.display());
        let allow_prefix = format!("file://{}/", dir.path().display());
        let clone_url_template = format!("file://{}/{{fullName}}.git", dir.path().display());
        Self {
            _dir: dir,
            url,
            allow_prefix,
            clone_url_template,
        }
    }
}

impl GitFixture {
    /// The folder the bare repository lives under (`<root>/<FULL_NAME>.git`), e.g. a git
    /// server's project root.
    pub fn root(&self) -> &Path {
        self._dir.path()
    }
}

impl Default for GitFixture {
    fn default() -> Self {
        Self::new()
    }
}
