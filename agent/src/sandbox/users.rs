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
//! and the ambient capability set is cleared, so the exec'd analyzer holds no capability at all.

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
