//! TEMP STUB
use super::*;
use std::{path::Path, time::Duration};
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub backoff_jitter: Duration,
}
impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
            backoff_jitter: Duration::from_secs(5),
        }
    }
}
pub struct EmbeddedStore;
impl EmbeddedStore {
    pub fn open(_d: &Path, _o: EmbeddedOptions) -> Result<Self> {
        todo!()
    }
}
#[async_trait]
impl JobSource for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }
    async fn claim(&self, _w: &str, _l: Duration) -> Result<Option<ClaimedJob>> {
        todo!()
    }
    async fn heartbeat(&self, _j: &str, _w: &str, _u: &ProgressUpdate, _l: Duration) -> Result<()> {
        todo!()
    }
    async fn complete(&self, _j: &str, _w: &str, _r: &JobResult) -> Result<()> {
        todo!()
    }
    async fn fail(&self, _j: &str, _w: &str, _e: &str, _r: bool) -> Result<FailOutcome> {
        todo!()
    }
    async fn get_job(&self, _j: &str, _i: bool) -> Result<Option<JobView>> {
        todo!()
    }
    async fn submit(&self, _j: NewJob) -> Result<JobId> {
        todo!()
    }
    async fn list_jobs(&self, _s: Option<JobStatus>, _l: usize) -> Result<Vec<JobView>> {
        todo!()
    }
    async fn request_cancel(&self, _j: &str) -> Result<JobStatus> {
        todo!()
    }
}
