//! Test support for the coordinator's in-process unit tests: a scripted [`FakeSource`] that
//! records every call it gets, and a [`Harness`] wiring it into a [`Context`] with a journal in a
//! temporary folder. Tests run with `tokio::time::pause()`: waits below are virtual time.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use clap::Parser;
use fondation_proto::{model::ToAgent, validate::RepoAllowlist};
use tokio::{
    sync::{mpsc, Notify},
    time::Instant,
};
use tokio_util::sync::CancellationToken;

use crate::{
    agents::{AgentDescription, AgentRegistry},
    assignments::AssignmentTable,
    config::{Cli, CoordinatorConfig},
    context::Context,
    history::History,
    job_source::{
        ClaimedJob, FailOutcome, JobId, JobQuery, JobResult, JobSource, JobSourceError, JobStatus,
        JobView, NewJob, ProgressUpdate, RepoTarget, Result,
    },
    journal::Journal,
};

pub const WORKER_ID: &str = "worker-test";
/// Longest a test waits for an expected event, in virtual time.
pub const PATIENCE: Duration = Duration::from_secs(24 * 3600);

/// A call the fake job source received.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Claim,
    Heartbeat {
        job_id: String,
        update: ProgressUpdate,
    },
    Complete {
        job_id: String,
        documents: usize,
    },
    Fail {
        job_id: String,
        message: String,
        retryable: bool,
    },
    GetJob {
        job_id: String,
    },
    Release {
        job_id: String,
    },
}

/// A scripted job source. Replies are taken from queues; an empty queue means success (no job
/// for `claim`).
#[derive(Default)]
pub struct FakeSource {
    calls: Mutex<Option<mpsc::UnboundedSender<(Instant, Call)>>>,
    pub claims: Mutex<VecDeque<ClaimedJob>>,
    /// `claim` never answers (a job source in an outage, retrying within its budget).
    pub claims_hang: std::sync::atomic::AtomicBool,
    /// What `parallel_claims` answers (1 when 0, the trait's default).
    pub parallel_claims: std::sync::atomic::AtomicUsize,
    /// What `records_ends_locally` answers (false, the trait's default, unless set).
    pub ends_locally: std::sync::atomic::AtomicBool,
    pub heartbeat_replies: Mutex<VecDeque<Result<()>>>,
    pub complete_replies: Mutex<VecDeque<Result<()>>>,
    pub fail_replies: Mutex<VecDeque<Result<FailOutcome>>>,
    /// `release` answers Unsupported, like Convex.
    pub release_unsupported: std::sync::atomic::AtomicBool,
    /// What `get_job` reports as the job's status (claimed by us when None).
    pub status: Mutex<Option<JobStatus>>,
}

impl FakeSource {
    fn record(&self, call: Call) {
        if let Some(calls) = &*self.calls.lock().unwrap() {
            let _ = calls.send((Instant::now(), call));
        }
    }

    pub fn push_claim(&self, job: ClaimedJob) {
        self.claims.lock().unwrap().push_back(job);
    }
}

#[async_trait]
impl JobSource for FakeSource {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn parallel_claims(&self) -> usize {
        self.parallel_claims
            .load(std::sync::atomic::Ordering::SeqCst)
            .max(1)
    }

    fn records_ends_locally(&self) -> bool {
        self.ends_locally.load(std::sync::atomic::Ordering::SeqCst)
    }

    async fn claim(&self, _worker_id: &str, _lease: Duration) -> Result<Option<ClaimedJob>> {
        self.record(Call::Claim);
        if self.claims_hang.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        Ok(self.claims.lock().unwrap().pop_front())
    }

    async fn heartbeat(
        &self,
        job_id: &str,
        _worker_id: &str,
        update: &ProgressUpdate,
        _lease: Duration,
    ) -> Result<()> {
        self.record(Call::Heartbeat {
            job_id: job_id.into(),
            update: update.clone(),
        });
        self.heartbeat_replies
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(()))
    }

    async fn complete(&self, job_id: &str, _worker_id: &str, result: &JobResult) -> Result<()> {
        self.record(Call::Complete {
            job_id: job_id.into(),
            documents: result.documents.len(),
        });
        self.complete_replies
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(()))
    }

    async fn fail(
        &self,
        job_id: &str,
        _worker_id: &str,
        error: &str,
        retryable: bool,
    ) -> Result<FailOutcome> {
        self.record(Call::Fail {
            job_id: job_id.into(),
            message: error.into(),
            retryable,
        });
        self.fail_replies
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or(Ok(FailOutcome::Retrying {
                attempts: 1,
                next_run_at_ms: 0.0,
            }))
    }

    async fn release(&self, job_id: &str, _worker_id: &str) -> Result<()> {
        if self
            .release_unsupported
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Err(JobSourceError::Unsupported("no release here".into()));
        }
        self.record(Call::Release {
            job_id: job_id.into(),
        });
        Ok(())
    }

    async fn get_job(&self, job_id: &str, _include_content: bool) -> Result<Option<JobView>> {
        self.record(Call::GetJob {
            job_id: job_id.into(),
        });
        let status = self.status.lock().unwrap().unwrap_or(JobStatus::Running);
        Ok(Some(JobView {
            id: job_id.into(),
            status,
            attempts: 0,
            error: None,
            progress: None,
            current_step: None,
            repo_url: None,
            branch: None,
            cancel_requested: false,
            locked_by: Some(WORKER_ID.into()),
            created_at_ms: 0.0,
            updated_at_ms: 0.0,
            documents: Vec::new(),
        }))
    }

    async fn submit(&self, _job: NewJob) -> Result<JobId> {
        Err(JobSourceError::Unsupported("fake".into()))
    }

    async fn list_jobs(&self, _query: &JobQuery) -> Result<Vec<JobView>> {
        Err(JobSourceError::Unsupported("fake".into()))
    }

    async fn request_cancel(&self, _job_id: &str) -> Result<JobStatus> {
        Err(JobSourceError::Unsupported("fake".into()))
    }
}

/// A coordinator context around a [`FakeSource`].
pub struct Harness {
    pub ctx: Arc<Context>,
    pub source: Arc<FakeSource>,
    calls: mpsc::UnboundedReceiver<(Instant, Call)>,
    _data_dir: tempfile::TempDir,
}

impl Harness {
    /// Default configuration, adjusted by `configure`.
    pub fn new(configure: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let mut config = Cli::try_parse_from(["fondation-coordinator"])
            .expect("default flags parse")
            .config;
        configure(&mut config);
        let data_dir = tempfile::tempdir().expect("a temporary folder");
        let db = crate::database::Database::open(data_dir.path()).expect("the database opens");
        let history = History::new(db.clone(), None);
        let job_logs = crate::job_logs::JobLogs::new(db.clone());
        let journal = Journal::new(db);
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let source = Arc::new(FakeSource::default());
        *source.calls.lock().unwrap() = Some(calls_tx);
        let ctx = Arc::new(Context {
            config,
            allowlist: RepoAllowlist::default(),
            worker_id: WORKER_ID.into(),
            source: source.clone(),
            source_health: Arc::new(crate::source_health::SourceHealth::new(
                "fake",
                std::time::Duration::from_secs(60),
            )),
            metrics: crate::metrics::CoordinatorMetrics::new(false),
            started: std::time::Instant::now(),
            agents: AgentRegistry::default(),
            journal,
            history,
            assignments: AssignmentTable::default(),
            job_logs,
            wake_claimer: Notify::new(),
            shutdown: CancellationToken::new(),
            sessions_closed: CancellationToken::new(),
        });
        Self {
            ctx,
            source,
            calls,
            _data_dir: data_dir,
        }
    }

    /// The next call the job source gets, and when it got it.
    pub async fn next_call(&mut self, waiting_for: &str) -> (Instant, Call) {
        tokio::time::timeout(PATIENCE, self.calls.recv())
            .await
            .unwrap_or_else(|_| panic!("no job-source call while waiting for {waiting_for}"))
            .expect("the fake source lives as long as the harness")
    }

    /// The next call that is not a heartbeat or a cancel check (those come at their own pace).
    pub async fn next_final_call(&mut self, waiting_for: &str) -> (Instant, Call) {
        loop {
            let call = self.next_call(waiting_for).await;
            if !matches!(call.1, Call::Heartbeat { .. } | Call::GetJob { .. }) {
                return call;
            }
        }
    }

    /// Calls received so far and not yet looked at.
    pub fn pending_calls(&mut self) -> Vec<Call> {
        let mut calls = Vec::new();
        while let Ok((_, call)) = self.calls.try_recv() {
            calls.push(call);
        }
        calls
    }

    /// Connects an agent; returns what the coordinator sends it.
    pub fn connect_agent(&self, agent_id: &str, slots: u32) -> mpsc::Receiver<ToAgent> {
        let (tx, rx) = mpsc::channel(64);
        self.ctx
            .agents
            .connect(
                AgentDescription {
                    agent_id: agent_id.into(),
                    instance_id: "test-instance".into(),
                    version: "test".into(),
                    slots,
                    labels: Default::default(),
                    peer: "test".into(),
                    unready: None,
                },
                tx,
                Default::default(),
            )
            .expect("one instance per agent id in tests");
        rx
    }
}

/// A claimed job that passes the dispatcher's checks.
pub fn claimed_job(id: &str) -> ClaimedJob {
    ClaimedJob {
        id: id.into(),
        attempt: 1,
        prompt: "explain".into(),
        target: Ok(RepoTarget {
            url: "https://github.com/owner/repo.git".into(),
            branch: "main".into(),
            credential: None,
        }),
    }
}

/// The next message to an agent, within [`PATIENCE`].
pub async fn next_message(rx: &mut mpsc::Receiver<ToAgent>, waiting_for: &str) -> ToAgent {
    tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no message to the agent while waiting for {waiting_for}"))
        .expect("the agent's stream is open")
}
