//! The analyzer is untrusted code: what it may see, which user it runs as, and the sweep that
//! leaves none of its processes behind.
//!
//! - [`env`]: the environment allow-list (`ANALYZER_ENV`), and git's;
//! - [`users`]: one user per slot (`ANALYZER_UID_BASE + slot`), and the workspace permissions
//!   that go with it;
//! - [`sweep`]: `kill(-1)` as the slot's user after each run and at start-up;
//! - [`privileges`]: the agent's own switch from root to `AGENT_USER`, keeping a few capabilities;
//! - [`SlotPool`]: which slot (hence which user) a run holds, until its sweep is done.
//!
//! Slot users need the rights to switch users (root, or `CAP_SETUID`, `CAP_SETGID`, `CAP_KILL`,
//! `CAP_DAC_OVERRIDE`). `ANALYZER_ISOLATION=auto` uses them when the agent has them and otherwise
//! runs the analyzer as the agent's own user, as before, with one warning naming what is off;
//! `required` refuses to start without them, `off` never uses them.
//!
//! Slot uids must be unique per host among agents that share a process namespace (bare metal,
//! `pid: host`): the sweep kills every process of a slot uid it can see. Give each such agent its
//! own `ANALYZER_UID_BASE` (ranges `[base, base + MAX_CONCURRENT_JOBS)` must not overlap). Agents
//! in their own containers each have their own process namespace and can share the default.

pub mod env;
pub mod privileges;
pub mod sweep;
pub mod users;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

pub use env::{EnvAllowlist, DEFAULT_ANALYZER_ENV};
pub use users::SlotUser;

/// `ANALYZER_ISOLATION`: whether analyzers run under per-slot users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IsolationMode {
    /// Per-slot users when the agent has the rights, else a warning.
    #[default]
    Auto,
    /// Per-slot users, or refuse to start.
    Required,
    /// Never: the analyzer runs as the agent's user.
    Off,
}

impl std::str::FromStr for IsolationMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "required" => Ok(Self::Required),
            "off" => Ok(Self::Off),
            other => Err(format!("unknown mode {other:?}: use auto, required or off")),
        }
    }
}

/// Lowest accepted `ANALYZER_UID_BASE`: below are the system's own users.
pub const MIN_UID_BASE: u32 = 1000;
/// uids a slot may never get: `nobody` and the 16-bit "no user".
const RESERVED_UIDS: [u32; 2] = [65534, 65535];

/// Why the analyzer sandbox cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "ANALYZER_ISOLATION=required, but the agent lacks {missing}: run it as root or grant \
         these capabilities (container: cap_add), or set ANALYZER_ISOLATION=auto"
    )]
    NoRights { missing: String },
    #[error("ANALYZER_UID_BASE {base} with {slots} slots: {message}")]
    UidRange {
        base: u32,
        slots: u32,
        message: String,
    },
    #[error(
        "TEMP_DIR: {} cannot be passed through by other users (no o+x), so the analyzer's slot \
         users cannot reach their workspaces: chmod o+x it or choose another TEMP_DIR",
        path.display()
    )]
    Unreachable { path: PathBuf },
    #[error("cannot prepare {} for the analyzer's slot user: {source}", path.display())]
    Folder {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot join the slot groups (CAP_SETGID): {0}")]
    Groups(std::io::Error),
}

/// How this agent runs its analyzers, decided once at start-up.
#[derive(Debug)]
pub struct Sandbox {
    env: EnvAllowlist,
    /// `Some(base)` when analyzers run as slot users `base + slot`.
    uid_base: Option<u32>,
    slots: Arc<SlotPool>,
}

impl Sandbox {
    /// Decides whether slot users are used, checks their uid range and the workspace root's
    /// reachability, and prepares the root. Warns once when isolation is off for lack of rights.
    pub fn new(
        mode: IsolationMode,
        uid_base: u32,
        slots: u32,
        env: EnvAllowlist,
        workspace_root: &Path,
    ) -> Result<Self, SandboxError> {
        let uid_base = match mode {
            IsolationMode::Off => {
                warn!("ANALYZER_ISOLATION=off: the analyzer runs as the agent's own user and can read its memory, environment and files, and processes it leaves behind are not swept");
                None
            }
            IsolationMode::Auto | IsolationMode::Required => {
                let missing = users::missing_caps();
                if missing.is_empty() {
                    Some(uid_base)
                } else {
                    let missing = missing
                        .iter()
                        .map(|cap| cap.to_string())
                        .collect::<Vec<_>>()
                        .join(", ");
                    if mode == IsolationMode::Required {
                        return Err(SandboxError::NoRights { missing });
                    }
                    warn!(%missing, "no per-slot analyzer users: the agent lacks these capabilities (it is not root); the analyzer runs as the agent's own user and can read its memory, environment and files, and processes it leaves behind are not swept");
                    None
                }
            }
        };
        if let Some(base) = uid_base {
            check_range(base, slots)?;
            users::join_slot_groups(base..base + slots).map_err(SandboxError::Groups)?;
            let root_mode = std::fs::Permissions::from_mode(0o711);
            std::fs::set_permissions(workspace_root, root_mode).map_err(|source| {
                SandboxError::Folder {
                    path: workspace_root.to_path_buf(),
                    source,
                }
            })?;
            if let Some(path) = users::unreachable_ancestor(workspace_root) {
                return Err(SandboxError::Unreachable { path });
            }
            info!(
                uid_first = base,
                uid_last = base + slots - 1,
                "analyzers run as per-slot users"
            );
        }
        Ok(Self {
            env,
            uid_base,
            slots: Arc::new(SlotPool::new(slots)),
        })
    }

    /// The user of a slot, when analyzers run as slot users.
    pub fn user(&self, slot: u32) -> Option<SlotUser> {
        self.uid_base.map(|base| SlotUser {
            uid: base + slot,
            gid: base + slot,
        })
    }

    /// Waits for a free slot; the run holds it until the returned lease is dropped.
    pub async fn acquire_slot(&self) -> SlotLease {
        self.slots.clone().acquire().await
    }

    /// Kills whatever runs under any slot user (a previous instance of this agent was killed
    /// with its analyzers still running). Call before taking work.
    pub async fn sweep_all(&self) {
        for slot in 0..self.slots.count {
            if let Some(user) = self.user(slot) {
                sweep_slot(user).await;
            }
        }
    }

    /// Opens a fresh workspace to its slot user: the workspace itself, and its `home` and `tmp`.
    pub fn prepare_workspace(&self, workspace: &Path, slot: u32) -> Result<(), SandboxError> {
        let Some(user) = self.user(slot) else {
            return Ok(());
        };
        let folder = |path: &Path, result: std::io::Result<()>| {
            result.map_err(|source| SandboxError::Folder {
                path: path.to_path_buf(),
                source,
            })
        };
        folder(workspace, users::share_with(workspace, user, 0o750))?;
        for name in ["home", "tmp"] {
            let path = workspace.join(name);
            folder(&path, users::writable_folder(&path, user))?;
        }
        Ok(())
    }

    /// Creates the analyzer's output folder, writable by the slot user.
    pub fn prepare_output(&self, output: &Path, slot: u32) -> Result<(), SandboxError> {
        let Some(user) = self.user(slot) else {
            return Ok(());
        };
        users::writable_folder(output, user).map_err(|source| SandboxError::Folder {
            path: output.to_path_buf(),
            source,
        })
    }

    /// The analyzer's whole environment: the allowed part of the agent's, with `HOME` and
    /// `TMPDIR` pointing into the workspace when it runs as a slot user.
    pub fn analyzer_env(&self, workspace: &Path, slot: u32) -> Vec<(String, String)> {
        let mut env = self.env.from_current();
        if self.user(slot).is_some() {
            env.retain(|(name, _)| name != "HOME" && name != "TMPDIR");
            for (name, folder) in [("HOME", "home"), ("TMPDIR", "tmp")] {
                env.push((
                    name.to_owned(),
                    workspace.join(folder).to_string_lossy().into_owned(),
                ));
            }
        }
        env
    }
}

/// Sweeps one slot user's processes, logging (not failing) when it cannot.
pub async fn sweep_slot(user: SlotUser) {
    match tokio::task::spawn_blocking(move || sweep::sweep(user)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(killed)) => info!(
            uid = user.uid,
            killed, "killed processes the analyzer left behind"
        ),
        Ok(Err(error)) => warn!(uid = user.uid, %error, "sweeping the analyzer's processes failed"),
        Err(error) => warn!(uid = user.uid, %error, "the sweep task failed"),
    }
}

fn check_range(base: u32, slots: u32) -> Result<(), SandboxError> {
    let err = |message: &str| SandboxError::UidRange {
        base,
        slots,
        message: message.to_owned(),
    };
    if base < MIN_UID_BASE {
        return Err(err("must be at least 1000, above the system's own users"));
    }
    let last = base
        .checked_add(slots)
        .filter(|end| *end < u32::MAX)
        .ok_or_else(|| err("the range runs past the largest uid"))?;
    if RESERVED_UIDS.iter().any(|uid| (base..last).contains(uid)) {
        return Err(err("the range includes 65534/65535 (nobody); move it"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if (base..last).contains(&me) {
        return Err(err("the range includes the agent's own uid"));
    }
    Ok(())
}

/// The agent's slots: a run takes a free one and holds it until its processes are swept.
#[derive(Debug)]
pub struct SlotPool {
    count: u32,
    free: Arc<Semaphore>,
    busy: Mutex<Vec<bool>>,
}

impl SlotPool {
    fn new(count: u32) -> Self {
        Self {
            count,
            free: Arc::new(Semaphore::new(count as usize)),
            busy: Mutex::new(vec![false; count as usize]),
        }
    }

    async fn acquire(self: Arc<Self>) -> SlotLease {
        // The semaphore is never closed, so acquiring only waits.
        let permit = self.free.clone().acquire_owned().await.ok();
        let index = {
            let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
            // A permit guarantees a free entry.
            let index = busy.iter().position(|b| !b).unwrap_or(0);
            busy[index] = true;
            index as u32
        };
        SlotLease {
            pool: self,
            index,
            _permit: permit,
        }
    }
}

/// A slot held by a run.
#[derive(Debug)]
pub struct SlotLease {
    pool: Arc<SlotPool>,
    index: u32,
    /// Released after `busy` is cleared (fields drop after `Drop::drop`).
    _permit: Option<OwnedSemaphorePermit>,
}

impl SlotLease {
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        let mut busy = self.pool.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = busy.get_mut(self.index as usize) {
            *entry = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_are_distinct_while_held_and_reused_after() {
        let pool = Arc::new(SlotPool::new(2));
        let a = pool.clone().acquire().await;
        let b = pool.clone().acquire().await;
        assert_ne!(a.index(), b.index());
        let third = tokio::spawn(pool.clone().acquire());
        tokio::task::yield_now().await;
        assert!(!third.is_finished(), "no third slot while two are held");
        let freed = a.index();
        drop(a);
        let c = tokio::time::timeout(std::time::Duration::from_secs(5), third)
            .await
            .expect("the freed slot is taken")
            .expect("task");
        assert_eq!(c.index(), freed);
    }

    #[test]
    fn uid_ranges_are_checked() {
        assert!(check_range(64000, 64).is_ok());
        assert!(check_range(999, 1).is_err());
        assert!(check_range(65500, 64).is_err(), "crosses nobody");
        assert!(check_range(u32::MAX - 2, 4).is_err());
    }
}
