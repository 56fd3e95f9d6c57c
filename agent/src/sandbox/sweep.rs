//! No process outlives its job: after each analyzer run, every process of the slot's user dies.
//!
//! Process groups are not enough (`setsid` leaves them, a double fork is reparented), and
//! per-job cgroups are not available here (cgroup v1, read-only inside containers). With one uid
//! per slot, the slot's processes are exactly the processes of that uid: a forked helper becomes
//! that user and calls `kill(-1, SIGKILL)`, which reaches every process the user may signal, i.e.
//! that uid's processes and nothing else (Linux never signals the caller with it). A fork racing
//! the kill could leave a child, so the agent then scans `/proc` and repeats until none is left
//! (zombies do not count: they are dead and only wait for a reaper). Each slot sweeps only its own
//! uid, so slots busy at once never touch each other.

use std::time::{Duration, Instant};

use nix::libc;
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};

use super::users::SlotUser;

/// How long one sweep may take before it is reported as failed.
const SWEEP_DEADLINE: Duration = Duration::from_secs(10);
/// Pause between two rounds, for processes already SIGKILLed to finish dying.
const ROUND_PAUSE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error("cannot fork the sweeping helper for uid {uid}: {source}")]
    Fork { uid: u32, source: nix::Error },
    #[error("processes of uid {uid} still alive after {SWEEP_DEADLINE:?} of sweeping: {pids:?}")]
    Survivors { uid: u32, pids: Vec<u32> },
}

/// Kills every process of `user`'s uid and returns how many were alive at the start. Blocking
/// (fork, wait, `/proc` scans): call it from a blocking thread.
pub fn sweep(user: SlotUser) -> Result<usize, SweepError> {
    let started = Instant::now();
    // One scan of `/proc` per round (reading every process's status is most of a sweep's cost,
    // and a sweep sits between a run's end and its result).
    let mut alive = live_processes(user.uid);
    let initial = alive.len();
    loop {
        if alive.is_empty() {
            return Ok(initial);
        }
        if started.elapsed() > SWEEP_DEADLINE {
            return Err(SweepError::Survivors {
                uid: user.uid,
                pids: alive,
            });
        }
        kill_all_as(user)?;
        std::thread::sleep(ROUND_PAUSE);
        alive = live_processes(user.uid);
    }
}

/// Forks a helper that becomes `user`, drops every capability, and SIGKILLs every process it
/// may signal.
fn kill_all_as(user: SlotUser) -> Result<(), SweepError> {
    // SAFETY: the child only makes async-signal-safe system calls (setgroups, setgid, setuid,
    // kill, _exit) and never returns into Rust code of the parent's state.
    match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let gid = user.gid as libc::gid_t;
            // SAFETY: plain system calls on values owned by this frame.
            unsafe {
                let ok = libc::setgroups(1, &gid) == 0
                    && libc::setgid(gid) == 0
                    && libc::setuid(user.uid as libc::uid_t) == 0
                    // Never kill as anyone else: if setuid silently failed, stop here.
                    && libc::getuid() == user.uid as libc::uid_t
                    && libc::geteuid() == user.uid as libc::uid_t
                    // With CAP_KILL left (an agent that is not root keeps its capabilities
                    // across setuid), kill(-1) would reach every process: none may remain.
                    && super::users::drop_all_caps().is_ok();
                if ok {
                    libc::kill(-1, libc::SIGKILL);
                    libc::_exit(0);
                }
                libc::_exit(1);
            }
        }
        Ok(ForkResult::Parent { child }) => {
            // The helper does three system calls; its status adds nothing the /proc scan misses.
            let _ = waitpid(child, None);
            Ok(())
        }
        Err(source) => Err(SweepError::Fork {
            uid: user.uid,
            source,
        }),
    }
}

/// Pids of the live (not zombie) processes whose real, effective or saved uid is `uid`.
pub fn live_processes(uid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may end between listing and reading: then it is not alive.
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        if status_matches(&status, uid) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether a `/proc/<pid>/status` text is of a live process of `uid`.
fn status_matches(status: &str, uid: u32) -> bool {
    let mut live = false;
    let mut ours = false;
    for line in status.lines() {
        if let Some(state) = line.strip_prefix("State:") {
            let state = state.trim_start();
            live = !(state.starts_with('Z') || state.starts_with('X'));
        } else if let Some(ids) = line.strip_prefix("Uid:") {
            ours = ids
                .split_whitespace()
                .take(3)
                .any(|id| id.parse::<u32>() == Ok(uid));
        }
    }
    live && ours
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read() {
        let running = "Name:\tnode\nState:\tS (sleeping)\nUid:\t64001\t64001\t64001\t64001\n";
        assert!(status_matches(running, 64001));
        assert!(!status_matches(running, 64000));
        let zombie = "Name:\tnode\nState:\tZ (zombie)\nUid:\t64001\t64001\t64001\t64001\n";
        assert!(!status_matches(zombie, 64001));
    }
}
