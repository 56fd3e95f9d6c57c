//! The coordinator's one SQLite file in `DATA_DIR`: its name, and the move from the name it had.
//!
//! The journal and the embedded store keep their tables in this one file, whichever job source
//! runs, so that one transaction can later cover a claim and its journal entry. It was called
//! `jobs.sqlite3` when only the embedded store used it; a coordinator started on such a
//! `DATA_DIR` renames it (with its `-wal` and `-shm` companions) before opening it.

use std::{
    io,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

/// File name of the database inside `DATA_DIR`.
pub const DATABASE_FILE: &str = "coordinator.sqlite3";

/// The name earlier versions used.
const LEGACY_DATABASE_FILE: &str = "jobs.sqlite3";

/// SQLite's companion files of a database in WAL mode: `<name>-wal` holds committed
/// transactions not yet copied into the main file, so it must move with it.
const COMPANION_SUFFIXES: [&str; 2] = ["-wal", "-shm"];

/// The database's path in `data_dir`, after renaming a legacy `jobs.sqlite3` (and its companions)
/// when no `coordinator.sqlite3` exists yet. Cheap and idempotent: every opener calls it.
pub fn path(data_dir: &Path) -> io::Result<PathBuf> {
    let path = data_dir.join(DATABASE_FILE);
    let legacy = data_dir.join(LEGACY_DATABASE_FILE);
    if exists(&path)? {
        if exists(&legacy)? {
            warn!(
                kept = %path.display(),
                ignored = %legacy.display(),
                "both database files exist; the legacy one is ignored, remove it once checked"
            );
        }
        return Ok(path);
    }
    if !exists(&legacy)? {
        return Ok(path);
    }
    // Companions first, the main file last: until the main file has its new name, a restart
    // after a crash here runs the migration again and moves what is left.
    for suffix in COMPANION_SUFFIXES {
        let from = with_suffix(&legacy, suffix);
        if exists(&from)? {
            std::fs::rename(&from, with_suffix(&path, suffix))?;
        }
    }
    std::fs::rename(&legacy, &path)?;
    // The renames are durable once the folder is synced.
    std::fs::File::open(data_dir)?.sync_all()?;
    info!(
        from = %legacy.display(),
        to = %path.display(),
        "database file renamed to its new name"
    );
    Ok(path)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Whether `path` exists, not following a symlink; other errors than "not found" are errors.
fn exists(path: &Path) -> io::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, content: &str) {
        std::fs::write(dir.join(name), content).expect("write");
    }

    fn read(dir: &Path, name: &str) -> Option<String> {
        std::fs::read_to_string(dir.join(name)).ok()
    }

    #[test]
    fn legacy_file_and_companions_are_renamed() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "jobs.sqlite3", "main");
        write(dir.path(), "jobs.sqlite3-wal", "wal");
        write(dir.path(), "jobs.sqlite3-shm", "shm");

        let path = super::path(dir.path()).expect("migrate");
        assert_eq!(path, dir.path().join("coordinator.sqlite3"));
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3").as_deref(),
            Some("main")
        );
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3-wal").as_deref(),
            Some("wal")
        );
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3-shm").as_deref(),
            Some("shm")
        );
        for old in ["jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"] {
            assert_eq!(read(dir.path(), old), None, "{old} is gone");
        }
        // A second start finds nothing to do.
        assert_eq!(super::path(dir.path()).expect("again"), path);
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3").as_deref(),
            Some("main")
        );
    }

    #[test]
    fn an_existing_new_file_is_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "coordinator.sqlite3", "new");
        write(dir.path(), "jobs.sqlite3", "old");
        write(dir.path(), "jobs.sqlite3-wal", "old wal");

        super::path(dir.path()).expect("path");
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3").as_deref(),
            Some("new")
        );
        assert_eq!(read(dir.path(), "coordinator.sqlite3-wal"), None);
        assert_eq!(read(dir.path(), "jobs.sqlite3").as_deref(), Some("old"));
        assert_eq!(
            read(dir.path(), "jobs.sqlite3-wal").as_deref(),
            Some("old wal")
        );
    }

    #[test]
    fn a_migration_cut_short_after_the_companions_completes_on_the_next_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        write(dir.path(), "jobs.sqlite3", "main");
        write(dir.path(), "coordinator.sqlite3-wal", "wal");

        super::path(dir.path()).expect("migrate");
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3").as_deref(),
            Some("main")
        );
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3-wal").as_deref(),
            Some("wal")
        );
        assert_eq!(read(dir.path(), "jobs.sqlite3"), None);
    }

    #[test]
    fn an_empty_data_dir_gets_the_new_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            super::path(dir.path()).expect("path"),
            dir.path().join("coordinator.sqlite3")
        );
        assert_eq!(
            read(dir.path(), "coordinator.sqlite3"),
            None,
            "nothing created"
        );
    }
}
