//! Shared helpers of the end-to-end tests: start the real binaries as processes, make git
//! repositories to clone, and wait for states and log lines with deadlines that say what they
//! were waiting for.

pub mod certs;
pub mod cluster;
pub mod compose;
pub mod convex_world;
pub mod fault_proxy;
pub mod git;
pub mod git_http;
pub mod git_wrapper;
pub mod grpcurl;
pub mod metrics;
pub mod process;
pub mod wait;

use std::path::PathBuf;

/// Path of a binary of this workspace, next to the running test executable
/// (`target/<profile>/deps/<test>` -> `target/<profile>/<name>`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let mut dir = exe
        .parent()
        .expect("the test executable has a folder")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`, \
         which `scripts/test` does)",
        path.display()
    );
    // `cargo nextest run -p fondation-testkit` rebuilds this test but not the other packages'
    // binaries: say so when a binary is older than the test, since it may be stale.
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(binary), Some(test)) = (modified(&path), modified(&exe)) {
        static NOTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let mut noted = NOTED.lock().unwrap_or_else(|e| e.into_inner());
        if binary < test && !noted.contains(&name.to_string()) {
            noted.push(name.to_string());
            eprintln!(
                "note: {} is older than this test; if you changed its code, run \
                 `cargo build --workspace --bins` (scripts/test does)",
                path.display()
            );
        }
    }
    path
}

/// A port that was free a moment ago on 127.0.0.1. Another process may take it before ours binds
/// it: only for a test that must know a port before the process that binds it exists (an agent
/// dialing a coordinator not started yet). Everything else binds port 0 and reads it back.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding an ephemeral port on 127.0.0.1")
}
