//! Test-only crash points. When `FONDATION_FAILPOINT` names a point, the process exits the moment
//! it reaches it, as a crash would: no clean-up, no journal entry, no commit. Unset in production,
//! where each check is one read of a value taken at the first check.
//!
//! Points: `after-claim` (Convex: a job claimed, nothing journaled yet), `mid-group-commit` (the
//! database thread ran a batch of two or more writes but has not committed it).

use std::sync::OnceLock;

/// The variable naming the point to stop at.
pub const FAILPOINT_ENV: &str = "FONDATION_FAILPOINT";

/// Exit status of a process stopped at a failpoint.
pub const FAILPOINT_EXIT_CODE: i32 = 86;

/// Exits the process when `FONDATION_FAILPOINT` is `name`.
pub fn hit(name: &str) {
    static CHOSEN: OnceLock<Option<String>> = OnceLock::new();
    let chosen = CHOSEN.get_or_init(|| std::env::var(FAILPOINT_ENV).ok());
    if chosen.as_deref() == Some(name) {
        eprintln!("failpoint {name}: exiting");
        std::process::exit(FAILPOINT_EXIT_CODE);
    }
}
