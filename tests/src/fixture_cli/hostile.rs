//! Hostile modes of the fixture CLI: what an analyzer steered by a malicious repository would try.
//!
//! - `probe`: report what this process can see of the agent (its environment, `/proc/<agent>/
//!   environ`, a secret file, the agent's workspace folder, signalling the agent) in a chapter
//!   document, [`PROBE_PATH`], that tests read back from the job's result;
//! - `escape=<marker>`: leave processes behind that outlive the run: one in a session of its own
//!   (`setsid`), one double-forked (its parent exits at once); both carry the marker in their
//!   command line, so tests find them in `/proc`;
//! - `forge-log`: print error lines with `\r`, an ANSI erase-line sequence and a fake log line, so
//!   an error text quoted raw in a log would forge a line of its own.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::signal::kill;
use nix::unistd::{getppid, setsid};

/// Chapter written by the `probe` directive, relative to the output folder.
pub const PROBE_PATH: &str = "chapters/zz_probe.md";
/// Marker of a probe result that read something it should not have.
pub const PROBE_READ_OK: &str = "READ-OK";
/// Text of the fake log line the `forge-log` directive tries to slip in.
pub const FORGED_LINE: &str = "FORGED-LINE INFO job completed job_id=forged";

/// Writes the probe report; `secret_file` is a file the analyzer must not be able to read.
pub fn probe(output_dir: &Path, repo: &Path, secret_file: Option<&str>) -> io::Result<()> {
    let mut report = String::from("# Probe\n\n");
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    for line in status.lines() {
        if [
            "Uid:", "Gid:", "Groups:", "CapInh:", "CapPrm:", "CapEff:", "CapAmb:",
        ]
        .iter()
        .any(|p| line.starts_with(p))
        {
            let _ = writeln!(report, "status {line}");
        }
    }
    for (name, value) in std::env::vars_os() {
        let _ = writeln!(
            report,
            "env {}={}",
            name.to_string_lossy(),
            value.to_string_lossy()
        );
    }
    let agent = getppid();
    let mut targets = vec![format!("/proc/{agent}/environ")];
    targets.extend(secret_file.map(str::to_owned));
    for target in targets {
        match fs::read(&target) {
            Ok(bytes) => {
                let _ = writeln!(
                    report,
                    "read {target}: {PROBE_READ_OK} {}",
                    String::from_utf8_lossy(&bytes).replace('\0', " ")
                );
            }
            Err(err) => {
                let _ = writeln!(report, "read {target}: denied ({err})");
            }
        }
    }
    // The agent's workspace root: the parent of this run's workspace (`<root>/<ws>/repo`).
    if let Some(root) = repo.parent().and_then(Path::parent) {
        match fs::read_dir(root) {
            Ok(entries) => {
                let names: Vec<String> = entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                let _ = writeln!(report, "list {}: {PROBE_READ_OK} {names:?}", root.display());
            }
            Err(err) => {
                let _ = writeln!(report, "list {}: denied ({err})", root.display());
            }
        }
    }
    match kill(agent, None) {
        Ok(()) => {
            let _ = writeln!(report, "signal {agent}: {PROBE_READ_OK}");
        }
        Err(err) => {
            let _ = writeln!(report, "signal {agent}: denied ({err})");
        }
    }
    let path = output_dir.join(PROBE_PATH);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::write(path, report)
}

/// Starts the two escapees carrying `marker`: one `setsid` child that keeps this run's stdout
/// and stderr open, one double-forked through `linger --detach`.
pub fn escape(marker: &str) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let mut in_own_session = Command::new(&exe);
    in_own_session.args(["linger", marker]).stdin(Stdio::null());
    // SAFETY: setsid is async-signal-safe and the closure allocates nothing.
    unsafe {
        in_own_session.pre_exec(|| setsid().map(drop).map_err(io::Error::from));
    }
    in_own_session.spawn()?;
    let mut middle = Command::new(&exe)
        .args(["linger", marker, "--detach"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    middle.wait()?;
    Ok(())
}

/// The `linger` subcommand: with `detach`, start a lingering child in a new session and exit
/// (the double fork); without, stay alive until killed.
pub fn linger(marker: &str, detach: bool) -> io::Result<()> {
    if detach {
        let mut child = Command::new(std::env::current_exe()?);
        child
            .args(["linger", marker])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid is async-signal-safe and the closure allocates nothing.
        unsafe {
            child.pre_exec(|| setsid().map(drop).map_err(io::Error::from));
        }
        child.spawn()?;
        return Ok(());
    }
    loop {
        std::thread::park();
    }
}

/// Prints the forging error lines on stderr.
pub fn forge_log() {
    let mut err = io::stderr().lock();
    let _ = err.write_all(b"Error: harmless looking\r\x1b[2K2026-11-30T10:00:00.000000Z  INFO ");
    let _ = err.write_all(FORGED_LINE.as_bytes());
    let _ = err.write_all(b"\nError: ");
    let _ = err.write_all(FORGED_LINE.as_bytes());
    let _ = err.write_all(b"\n");
    let _ = err.flush();
}
