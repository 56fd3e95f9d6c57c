//! TEMP STUB
use super::*;
use std::time::Duration;
#[derive(Debug, Clone)]
pub struct ConvexConfig {
    pub url: String,
    pub deploy_key: Option<String>,
    pub clone_url_template: String,
    pub request_timeout: Duration,
    pub retry_budget: Duration,
}
impl Default for ConvexConfig {
    fn default() -> Self {
        todo!()
    }
}
pub struct ConvexSource;
impl ConvexSource {
    pub fn new(_o: ConvexConfig) -> Result<Self> {
        todo!()
    }
}
#[async_trait]
impl JobSource for ConvexSource {
    fn kind(&self) -> &'static str {
        "convex"
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
