//! A coordinator on the fake Convex deployment: the fake runs in the test process (a real HTTP
//! server on loopback), the coordinator and agents are real processes.

use std::time::Duration;

use crate::{
    fake_convex::{self, FakeConvexClient, FakeConvexHandle, FakeOptions, JobDoc},
    support::{
        cluster::{CoordinatorProc, Sandbox, ANY_PORT},
        git::GitFixture,
        wait,
    },
};

pub struct ConvexWorld {
    pub sandbox: Sandbox,
    pub fake: FakeConvexHandle,
    pub client: FakeConvexClient,
    pub repository_id: String,
}

impl ConvexWorld {
    pub async fn new(options: FakeOptions) -> Self {
        let sandbox = Sandbox::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fake Convex");
        let fake = fake_convex::spawn(listener, options).await;
        let client = fake.client();
        let repository_id = client
            .create_repository(GitFixture::FULL_NAME, Some("main"))
            .await
            .expect("repositories:create");
        Self {
            sandbox,
            fake,
            client,
            repository_id,
        }
    }

    /// Starts a coordinator on the fake on `port` (any free one when `None`), with `extra` settings.
    pub async fn coordinator(&self, port: Option<u16>, extra: &[(&str, &str)]) -> CoordinatorProc {
        let url = self.fake.url();
        let mut env: Vec<(&str, &str)> = vec![
            ("CONVEX_URL", &url),
            ("CLONE_URL_TEMPLATE", &self.sandbox.repo.clone_url_template),
            ("CONVEX_REQUEST_TIMEOUT", "2000"),
            ("CONVEX_RETRY_BUDGET", "5000"),
        ];
        env.extend_from_slice(extra);
        CoordinatorProc::start(&self.sandbox, port.unwrap_or(ANY_PORT), &env).await
    }

    /// Enqueues a job through `jobs:create` on a repository of its own (the web app allows one
    /// active job per repository).
    pub async fn create_job(&self, prompt: &str) -> String {
        let repository_id = self
            .client
            .create_repository(GitFixture::FULL_NAME, Some("main"))
            .await
            .expect("repositories:create");
        self.create_job_in(&repository_id, prompt).await
    }

    /// Enqueues a job through `jobs:create` on `repository_id`.
    pub async fn create_job_in(&self, repository_id: &str, prompt: &str) -> String {
        self.client
            .create_job(repository_id, prompt)
            .await
            .expect("jobs:create")
    }

    pub async fn job(&self, job_id: &str) -> JobDoc {
        self.client
            .job(job_id)
            .await
            .expect("reading the fake's job")
            .expect("the job exists")
    }

    /// Waits until the job's status is one of `statuses`.
    pub async fn wait_status(&self, job_id: &str, statuses: &[&str], timeout: Duration) -> JobDoc {
        let what = format!("Convex job {job_id} to reach {statuses:?}");
        wait::until(&what, timeout, || async {
            let job = self
                .client
                .job(job_id)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("job missing")?;
            if statuses.contains(&job.status.as_str()) {
                Ok(Some(job))
            } else {
                Err(format!(
                    "status {} attempts {:?} step {:?} error {:?}",
                    job.status, job.attempts, job.current_step, job.last_error
                ))
            }
        })
        .await
    }

    /// Fails the test if any call of the coordinator broke Convex's validation.
    pub async fn assert_no_rejected_calls(&self) {
        let rejected: Vec<_> = self
            .client
            .calls()
            .await
            .expect("reading the fake's calls")
            .into_iter()
            .filter(|call| call.rejected)
            .collect();
        assert!(
            rejected.is_empty(),
            "calls Convex would reject: {rejected:#?}"
        );
    }
}
