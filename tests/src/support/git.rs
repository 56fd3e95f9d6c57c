//! Git repositories the agents can clone over `file://` (allow-listed explicitly in tests).

use std::{path::Path, process::Command};

use tempfile::TempDir;

/// A bare repository with one commit on `main`, and its `file://` URL.
pub struct GitFixture {
    _dir: TempDir,
    pub url: String,
    /// Allow-list prefix covering this repository.
    pub allow_prefix: String,
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
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir for a git fixture");
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
        let bare = dir.path().join("demo.git");
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
        Self {
            _dir: dir,
            url,
            allow_prefix,
        }
    }
}

impl Default for GitFixture {
    fn default() -> Self {
        Self::new()
    }
}
