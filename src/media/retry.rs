//! The purge's one retry loop: exponential backoff with jitter over `[media.retry]`, shared by
//! the S3 listing, the S3 delete batches and the disk passes.

use std::fmt::Display;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

use super::MediaRetryConfig;

pub(super) struct Retry<'a> {
    config: &'a MediaRetryConfig,
    backoff: ExponentialBackoff,
    tries: u32,
}

impl<'a> Retry<'a> {
    pub(super) fn new(config: &'a MediaRetryConfig) -> Self {
        Self {
            config,
            backoff: backoff(config),
            tries: 1,
        }
    }

    /// Tries made so far, the first included.
    pub(super) fn tries(&self) -> u32 {
        self.tries
    }

    /// Something went through after a failure: the budget starts over.
    pub(super) fn progressed(&mut self) {
        if self.tries > 1 {
            *self = Self::new(self.config);
        }
    }

    /// After a failure: waits and returns true when another try is due, false when the error
    /// is final or the budget is spent. `what` says what happens next, for the debug log.
    pub(super) async fn again(
        &mut self,
        retryable: bool,
        error: &(dyn Display + Sync),
        what: &'static str,
    ) -> bool {
        let Some(delay) = self.backoff.next().filter(|_| retryable) else {
            return false;
        };
        tracing::debug!(%error, tries = self.tries, "{what}");
        self.tries += 1;
        tokio::time::sleep(delay).await;
        true
    }
}

fn backoff(config: &MediaRetryConfig) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(config.base_delay_ms))
        .with_max_delay(Duration::from_millis(config.max_delay_ms))
        .with_factor(2.0)
        .with_max_times(config.attempts.saturating_sub(1) as usize)
        .with_jitter()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn retries_retryable_errors_within_the_budget_and_starts_over_after_progress() {
        let config = MediaRetryConfig {
            attempts: 3,
            base_delay_ms: 100,
            max_delay_ms: 1_000,
        };
        let mut retry = Retry::new(&config);
        assert!(!retry.again(false, &"final", "never").await, "final errors");
        let mut retry = Retry::new(&config);
        let started = Instant::now();
        assert!(retry.again(true, &"e", "again").await);
        assert!(retry.again(true, &"e", "again").await);
        assert!(!retry.again(true, &"e", "spent").await, "3 tries in all");
        assert_eq!(retry.tries(), 3);
        // 100 ms then 200 ms, each with up to as much jitter again.
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300) && waited <= Duration::from_millis(600));
        retry.progressed();
        assert_eq!(retry.tries(), 1);
        assert!(retry.again(true, &"e", "again").await);
    }
}
