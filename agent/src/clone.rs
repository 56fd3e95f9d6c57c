//! TEMP STUB
use std::{path::PathBuf, time::Duration};
#[derive(Debug, Clone)]
pub struct CloneSpec {
    pub url: String,
    pub branch: String,
    pub dest: PathBuf,
    pub timeout: Duration,
    pub max_bytes: u64,
}
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("x")]
    Canceled,
    #[error("y")]
    Other,
}
impl CloneError {
    pub fn is_retryable(&self) -> bool {
        true
    }
}
pub async fn clone_repo(
    _s: &CloneSpec,
    _a: &fondation_proto::validate::RepoAllowlist,
    _c: tokio_util::sync::CancellationToken,
) -> Result<(), CloneError> {
    Ok(())
}
