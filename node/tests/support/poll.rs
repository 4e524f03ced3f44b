//! Waiting, with a deadline, for something async to become true: shared by
//! the node crate's real-cluster tests and the root crate's tests.
#![allow(dead_code)]

use std::time::Duration;

/// Asks `f` until it gives `Some`, for at most `within` (every 100 ms):
/// the async form of waiting for a condition with a deadline.
pub async fn poll<T, F: std::future::Future<Output = Option<T>>>(
    within: Duration,
    mut f: impl FnMut() -> F,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + within;
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        every.tick().await;
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
    }
}
