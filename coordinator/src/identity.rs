//! The coordinator's identity towards the job source (`WORKER_ID`, Convex's `lockedBy`).
//!
//! It must survive restarts: a restarted coordinator with a new identity could no longer heartbeat
//! or complete the jobs it had claimed. When `WORKER_ID` is not set, one is generated once and kept
//! in `DATA_DIR/worker-id`.

use std::{fs, io, path::Path};

const FILE_NAME: &str = "worker-id";

#[derive(Debug, thiserror::Error)]
#[error(
    "could not read or write the worker id in {path}: {source}; check that DATA_DIR is writable"
)]
pub struct IdentityError {
    path: String,
    source: io::Error,
}

/// The configured id, else the persisted one, else a new persisted one.
pub fn resolve(configured: Option<&str>, data_dir: &Path) -> Result<String, IdentityError> {
    if let Some(id) = configured {
        return Ok(id.trim().to_string());
    }
    let path = data_dir.join(FILE_NAME);
    let error = |source| IdentityError {
        path: path.display().to_string(),
        source,
    };
    match fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    let id = format!("coordinator-{}", uuid::Uuid::new_v4().simple());
    // Write then rename, so a crash never leaves a half-written id behind.
    let tmp = data_dir.join(format!("{FILE_NAME}.tmp"));
    fs::write(&tmp, &id).map_err(error)?;
    fs::rename(&tmp, &path).map_err(error)?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = resolve(None, dir.path()).unwrap();
        assert!(first.starts_with("coordinator-"));
        assert_eq!(resolve(None, dir.path()).unwrap(), first);
        assert_eq!(resolve(Some("w1"), dir.path()).unwrap(), "w1");
    }
}
