//! One user per slot: the analyzer of slot N runs as uid/gid `ANALYZER_UID_BASE + N`.
//!
//! Under another uid than the agent's, the analyzer cannot read `/proc/<agent>/environ` or the
//! agent's memory, cannot signal or trace it, and cannot open files only the agent may read
//! (token and key files, other slots' workspaces). What it may touch is set up here:
//! - the agent's workspace root (`TEMP_DIR/<agent id>`) is `0711`: slot users pass through it
//!   to their own workspace but cannot list it;
//! - a workspace is `0750`, group = the slot's group: its slot user reads the clone, nobody else
//!   gets in; inside it, `home` (the analyzer's `HOME`, for `~/.claude`), `tmp` (its `TMPDIR`)
//!   and the output folder are `2770`, the only places the slot user can write. The clone itself
//!   stays the agent's (git runs as the agent), so the analyzer cannot swap it for a symlink;
//! - setting a folder's group needs `CAP_CHOWN`, or membership of the group: an agent without
//!   `CAP_CHOWN` adds the slot groups to its supplementary groups at start-up (`CAP_SETGID`);
//! - removing a workspace needs `CAP_DAC_OVERRIDE`: the folders the analyzer made are its own,
//!   `0755` or even `0000`, and only that capability lets the agent delete inside them without
//!   first chmod-ing a tree a hostile process shaped (`CAP_FOWNER` would need exactly that).
//!
//! The switch happens in the child between fork and exec: supplementary groups, gid, then uid,
//! `no_new_privs` (no set-user-id program gives privileges back) and the ambient capability set
//! is cleared, so the exec'd analyzer holds no capability at all.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use caps::{CapSet, Capability};
use nix::libc;
use nix::unistd::{chown, Gid};

/// The user and group a slot's analyzer runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotUser {
    pub uid: u32,
    pub gid: u32,
}

/// Capabilities the agent needs to run analyzers under slot users, and what each is for.
pub const NEEDED_CAPS: [(Capability, &str); 4] = [
    (Capability::CAP_SETUID, "start analyzers as slot users"),
    (Capability::CAP_SETGID, "give analyzers their slot groups"),
    (
        Capability::CAP_KILL,
        "stop analyzers running under other uids",
    ),
    (
        Capability::CAP_DAC_OVERRIDE,
        "remove the files analyzers leave in their workspaces",
    ),
];

/// The needed capabilities this process lacks (empty: slot users are possible).
pub fn missing_caps() -> Vec<Capability> {
    NEEDED_CAPS
        .iter()
        .map(|(cap, _)| *cap)
        .filter(|cap| !caps::has_cap(None, CapSet::Effective, *cap).unwrap_or(false))
        .collect()
}

/// Makes the agent a member of the slot groups when it cannot chown (see the module header).
pub fn join_slot_groups(gids: impl Iterator<Item = u32>) -> io::Result<()> {
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_CHOWN).unwrap_or(false) {
        return Ok(());
    }
    let mut groups = nix::unistd::getgroups().map_err(io::Error::from)?;
    for gid in gids.map(Gid::from_raw) {
        if !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    nix::unistd::setgroups(&groups).map_err(io::Error::from)
}

/// Runs in the forked child before exec: become `user` for good.
///
/// Only async-signal-safe system calls: no allocation between fork and exec.
pub fn become_user(user: SlotUser) -> io::Result<()> {
    let gid = user.gid as libc::gid_t;
    // SAFETY: plain system calls on values owned by this frame.
    unsafe {
        if libc::setgroups(1, &gid) != 0
            || libc::setgid(gid) != 0
            || libc::setuid(user.uid as libc::uid_t) != 0
        {
            return Err(io::Error::last_os_error());
        }
        if libc::getuid() != user.uid as libc::uid_t || libc::geteuid() != user.uid as libc::uid_t {
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        drop_all_caps()?;
        // No set-user-id program or file capability can give the analyzer privileges back.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        // Ambient capabilities would survive exec; an older kernel without them says EINVAL.
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    Ok(())
}

/// Empties this thread's capability sets and checks they are empty. An agent that is not root
/// (`AGENT_USER`) keeps its capabilities across `setuid` to a slot user, and a slot-user process
/// with `CAP_KILL` would make `kill(-1)` reach every process, the agent's included.
///
/// Raw `capget`/`capset`: async-signal-safe, no allocation (it runs between fork and exec).
pub fn drop_all_caps() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    /// `_LINUX_CAPABILITY_VERSION_3`: two `Data` entries, 64 capability bits.
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: the kernel reads a header and two data entries, as declared for version 3.
    unsafe {
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if data
        .iter()
        .any(|d| d.effective != 0 || d.permitted != 0 || d.inheritable != 0)
    {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

/// Gives a folder to the slot's group with `mode`.
pub fn share_with(path: &Path, user: SlotUser, mode: u32) -> io::Result<()> {
    chown(path, None, Some(Gid::from_raw(user.gid))).map_err(io::Error::from)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Creates a folder only the slot user (and the agent) may write: `2770`, slot group.
pub fn writable_folder(path: &Path, user: SlotUser) -> io::Result<()> {
    match std::fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    share_with(path, user, 0o2770)
}

/// The first folder above (or at) `path` that other users cannot pass through, if any.
pub fn unreachable_ancestor(path: &Path) -> Option<std::path::PathBuf> {
    path.ancestors()
        .filter_map(|dir| std::fs::metadata(dir).ok().map(|m| (dir, m)))
        .find(|(_, meta)| meta.permissions().mode() & 0o001 == 0)
        .map(|(dir, _)| dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Capabilities are per thread: a thread of its own drops them, the test process keeps its.
    #[test]
    fn drop_all_caps_leaves_the_thread_with_none() {
        let status = std::thread::spawn(|| {
            drop_all_caps().expect("dropping capabilities");
            std::fs::read_to_string("/proc/thread-self/status").expect("reading the status")
        })
        .join()
        .expect("the thread");
        for set in ["CapPrm:", "CapEff:", "CapInh:"] {
            let line = status
                .lines()
                .find(|l| l.starts_with(set))
                .expect("a capability line");
            assert!(line.ends_with("0000000000000000"), "{line}");
        }
    }
}
