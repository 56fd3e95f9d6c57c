//! Waiting for conditions with a deadline. Polls a state at a short interval; a timeout panics
//! with what was awaited and the last value seen.

use std::{fmt::Debug, future::Future, time::Duration};

/// Polls `probe` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(Some(value)) => return value,
            Ok(None) => "condition not met".to_string(),
            Err(state) => state,
        };
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}; last state: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `status` says every job of `job_ids` is `completed`; panics at once, with the
/// job's error, when one ends failed, dead or canceled. `status` answers (status, error).
pub async fn all_completed(
    job_ids: &[String],
    timeout: Duration,
    status: impl AsyncFn(&str) -> Result<(String, String), String>,
) {
    let what = format!("{} job(s) to complete", job_ids.len());
    let status = &status;
    until(&what, timeout, || async move {
        let mut pending = std::collections::BTreeMap::new();
        for job_id in job_ids {
            let (status, error) = status(job_id).await?;
            assert!(
                !["failed", "dead", "canceled"].contains(&status.as_str()),
                "job {job_id} ended {status}: {error}"
            );
            if status != "completed" {
                pending.insert(job_id.clone(), status);
            }
        }
        if pending.is_empty() {
            Ok(Some(()))
        } else {
            Err(format!("not completed: {pending:?}"))
        }
    })
    .await
}

/// Formats any debuggable state for `until`'s error.
pub fn state<T: Debug>(value: &T) -> String {
    format!("{value:?}")
}
