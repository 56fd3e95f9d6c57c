//! A `git` first on an agent's `PATH` that records how it is run: each invocation appends its
//! argv (one argument per line) and its whole environment to a log, then execs the real git with
//! the same argv. A tiny POSIX `sh` script, written per test with both paths fixed in it: the agent
//! gives git a filtered environment, so nothing can be passed to the wrapper through it.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

pub struct GitWrapper {
    /// Folder holding the wrapper, to put first on `PATH`.
    pub dir: PathBuf,
    /// What the wrapper recorded.
    pub log: PathBuf,
}

impl GitWrapper {
    /// Writes the wrapper into `<parent>/git-wrapper/`.
    pub fn install(parent: &Path) -> Self {
        let real = real_git();
        let dir = parent.join("git-wrapper");
        std::fs::create_dir_all(&dir).expect("creating the git wrapper folder");
        let log = parent.join("git-wrapper.log");
        std::fs::write(&log, "").expect("creating the git wrapper log");
        std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o666))
            .expect("opening the git wrapper log to the agent's user");
        let script = format!(
            "#!/bin/sh\n\
             # Test wrapper: records argv and environment, then runs the real git.\n\
             {{\n\
             \x20 echo '=== git invocation'\n\
             \x20 for argument in \"$@\"; do printf 'argv %s\\n' \"$argument\"; done\n\
             \x20 env | sed 's/^/env /'\n\
             }} >> '{log}'\n\
             exec '{real}' \"$@\"\n",
            log = log.display(),
            real = real.display(),
        );
        let path = dir.join("git");
        std::fs::write(&path, script).expect("writing the git wrapper");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("making the git wrapper executable");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
            .expect("opening the git wrapper folder");
        Self { dir, log }
    }

    /// `PATH` for the agent: the wrapper first, then the test's own `PATH`.
    pub fn path_env(&self) -> String {
        let rest = std::env::var("PATH").unwrap_or_default();
        format!("{}:{rest}", self.dir.display())
    }

    /// Everything recorded so far.
    pub fn recorded(&self) -> String {
        std::fs::read_to_string(&self.log).expect("reading the git wrapper log")
    }
}

/// The git the tests' `PATH` finds (looked up here: no shell).
fn real_git() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("git"))
        .find(|candidate| candidate.is_file())
        .expect("git on PATH (install it: apt-get install git)")
}
