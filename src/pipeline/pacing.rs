//! Per-token pacing: each token may start a limited number of deletes per minute (the API's
//! documented "Global (100/min)"). Over budget, a command waits for its slot; it never fails.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{PacingLimit, TokenHash};
use crate::telemetry;

pub struct Pacer {
    /// Deletes per minute, or `None` for no limit.
    per_minute: Option<u32>,
    buckets: Mutex<HashMap<[u8; 32], Bucket>>,
}

/// A token bucket of one token: `tokens` may go negative, meaning callers have reserved slots
/// in the future and are sleeping until then.
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Pacer {
    pub fn new(limit: PacingLimit) -> Self {
        Self {
            per_minute: match limit {
                PacingLimit::Unlimited => None,
                PacingLimit::PerMinute(n) => Some(n.max(1)),
            },
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until `token` may start one more delete, and spends it.
    pub async fn wait(&self, token: &TokenHash) {
        let Some(per_minute) = self.per_minute else {
            return;
        };
        let delay = self.reserve(token, per_minute);
        metrics::histogram!(telemetry::PACING_WAIT).record(delay.as_secs_f64());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// Takes the next slot and returns how long until it is due. A full bucket holds a
    /// minute's budget, so a quiet token may burst up to its per-minute limit.
    fn reserve(&self, token: &TokenHash, per_minute: u32) -> Duration {
        let capacity = f64::from(per_minute);
        let per_second = capacity / 60.0;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(token.0).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refill).min(capacity);
        bucket.updated = now;
        bucket.tokens -= 1.0;
        if bucket.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-bucket.tokens / per_second)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the deletes a token starts in (paused, virtual) time.
    #[tokio::test(start_paused = true)]
    async fn a_token_gets_its_budget_per_minute_and_the_rest_waits() {
        let pacer = Arc::new(Pacer::new(PacingLimit::PerMinute(6)));
        let token = TokenHash::of(b"a");
        let other = TokenHash::of(b"b");
        let started = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = vec![];
        for _ in 0..12 {
            let (pacer, started) = (pacer.clone(), started.clone());
            tasks.push(tokio::spawn(async move {
                pacer.wait(&token).await;
                started.fetch_add(1, Ordering::SeqCst);
            }));
        }
        tokio::task::yield_now().await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            started.load(Ordering::SeqCst),
            6,
            "the burst is one minute's budget"
        );
        // Another token has its own budget.
        pacer.wait(&other).await;
        assert_eq!(Instant::now(), start, "another token does not wait");
        tokio::time::advance(Duration::from_secs(30)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            started.load(Ordering::SeqCst),
            9,
            "one every 10 s after the burst"
        );
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            Instant::now().duration_since(start),
            Duration::from_secs(60)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let pacer = Pacer::new(PacingLimit::Unlimited);
        let start = Instant::now();
        for _ in 0..1000 {
            pacer.wait(&TokenHash::of(b"a")).await;
        }
        assert_eq!(Instant::now(), start);
    }
}
