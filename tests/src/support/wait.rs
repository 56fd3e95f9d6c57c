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

/// Formats any debuggable state for `until`'s error.
pub fn state<T: Debug>(value: &T) -> String {
    format!("{value:?}")
}
