//! The agent's own user (`AGENT_USER`): started as root, it becomes that user at once and keeps
//! only the capabilities slot users need ([`super::users::NEEDED_CAPS`], plus `CAP_CHOWN`).
//!
//! Why root first: under Docker a non-root user gets no capabilities (file capabilities are
//! ignored under `no-new-privileges`), so the container starts as root with `cap_drop: ALL` and
//! just the needed capabilities added, and the agent drops the rest of root here. It must happen
//! before any other thread exists: capability sets are per thread, and the tokio runtime would
//! otherwise keep root's on its workers. `PR_SET_KEEPCAPS` keeps the permitted set across
//! `setuid`; the effective set is then raised again to exactly the kept capabilities, the
//! inheritable and ambient sets are emptied so no program the agent runs (git) inherits any.

use std::io;

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Gid, Uid, User};

/// `AGENT_USER`: a user name, or `uid[:gid]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for AgentUser {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (user, group) = match s.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (s, None),
        };
        let gid = group
            .map(|g| {
                g.parse::<u32>()
                    .map_err(|_| format!("group {g:?} must be a number"))
            })
            .transpose()?;
        if let Ok(uid) = user.parse::<u32>() {
            return Ok(Self {
                uid,
                gid: gid.unwrap_or(uid),
            });
        }
        match User::from_name(user) {
            Ok(Some(found)) => Ok(Self {
                uid: found.uid.as_raw(),
                gid: gid.unwrap_or(found.gid.as_raw()),
            }),
            Ok(None) => Err(format!("no user named {user:?}; give a uid[:gid] instead")),
            Err(e) => Err(format!("cannot look up user {user:?}: {e}")),
        }
    }
}

/// What [`become_agent_user`] did, for a log line once logging is up.
#[derive(Debug)]
pub enum Switch {
    /// Not asked (no `AGENT_USER`), or already that user.
    Unchanged,
    /// Switched from root; these capabilities were kept.
    Switched { uid: u32, gid: u32, kept: String },
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "AGENT_USER={uid}:{gid} needs the agent to start as root (it runs as uid {current}); \
         unset it, or start the agent as root"
    )]
    NotRoot { uid: u32, gid: u32, current: u32 },
    #[error("AGENT_USER: uid 0 would keep the agent root; give a user of its own")]
    Root,
    #[error("switching to AGENT_USER {uid}:{gid} failed at {step}: {source}")]
    Step {
        uid: u32,
        gid: u32,
        step: &'static str,
        source: io::Error,
    },
}

/// Becomes `user`, keeping only the capabilities the analyzer sandbox needs. Call before any
/// thread is started.
pub fn become_agent_user(user: Option<&AgentUser>) -> Result<Switch, PrivilegeError> {
    let Some(user) = user else {
        return Ok(Switch::Unchanged);
    };
    let (uid, gid) = (user.uid, user.gid);
    if uid == 0 {
        return Err(PrivilegeError::Root);
    }
    let current = Uid::effective().as_raw();
    if current == uid {
        return Ok(Switch::Unchanged);
    }
    if current != 0 {
        return Err(PrivilegeError::NotRoot { uid, gid, current });
    }
    let step = |step: &'static str| {
        move |source: io::Error| PrivilegeError::Step {
            uid,
            gid,
            step,
            source,
        }
    };
    let caps_err = |e: caps::errors::CapsError| io::Error::other(e.to_string());
    let kept: CapsHashSet = super::users::NEEDED_CAPS
        .iter()
        .map(|(cap, _)| *cap)
        .chain([Capability::CAP_CHOWN])
        .filter(|cap| caps::has_cap(None, CapSet::Permitted, *cap).unwrap_or(false))
        .collect();
    nix::sys::prctl::set_keepcaps(true)
        .map_err(io::Error::from)
        .map_err(step("PR_SET_KEEPCAPS"))?;
    nix::unistd::setgroups(&[Gid::from_raw(gid)])
        .map_err(io::Error::from)
        .map_err(step("setgroups"))?;
    nix::unistd::setresgid(Gid::from_raw(gid), Gid::from_raw(gid), Gid::from_raw(gid))
        .map_err(io::Error::from)
        .map_err(step("setresgid"))?;
    nix::unistd::setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid))
        .map_err(io::Error::from)
        .map_err(step("setresuid"))?;
    caps::set(None, CapSet::Permitted, &kept)
        .map_err(caps_err)
        .map_err(step("capset permitted"))?;
    caps::set(None, CapSet::Effective, &kept)
        .map_err(caps_err)
        .map_err(step("capset effective"))?;
    caps::clear(None, CapSet::Inheritable)
        .map_err(caps_err)
        .map_err(step("capset inheritable"))?;
    caps::clear(None, CapSet::Ambient)
        .map_err(caps_err)
        .map_err(step("clearing ambient capabilities"))?;
    nix::sys::prctl::set_keepcaps(false)
        .map_err(io::Error::from)
        .map_err(step("PR_SET_KEEPCAPS"))?;
    let mut kept: Vec<String> = kept.iter().map(|cap| cap.to_string()).collect();
    kept.sort();
    Ok(Switch::Switched {
        uid,
        gid,
        kept: kept.join(","),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_user_parses_numbers_and_names() {
        assert_eq!(
            "10001".parse::<AgentUser>(),
            Ok(AgentUser {
                uid: 10001,
                gid: 10001
            })
        );
        assert_eq!(
            "10001:20".parse::<AgentUser>(),
            Ok(AgentUser {
                uid: 10001,
                gid: 20
            })
        );
        assert_eq!(
            "root".parse::<AgentUser>(),
            Ok(AgentUser { uid: 0, gid: 0 })
        );
        assert!("no-such-user-fondation".parse::<AgentUser>().is_err());
        assert!("1:x".parse::<AgentUser>().is_err());
    }
}
