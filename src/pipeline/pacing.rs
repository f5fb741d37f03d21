//! Per-token pacing: each token may start a limited number of deletes per minute (the API's
//! documented "Global (100/min)"). Over budget, a command waits for its slot; it never fails.
//!
//! With the Redis idempotency store the budget is shared by every worker: one script keeps each
//! token's theoretical arrival time (GCRA) on Redis's clock, so workers reserve slots from one
//! schedule. When Redis does not answer, a worker paces on its own bucket meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ::redis::Script;
use ::redis::aio::ConnectionManager;
use tokio::time::Instant;

use crate::config::{PacingLimit, TokenHash};
use crate::telemetry;

pub struct Pacer {
    /// Deletes per minute, or `None` for no limit.
    per_minute: Option<u32>,
    buckets: Mutex<HashMap<[u8; 32], Bucket>>,
    shared: Option<Shared>,
}

/// The schedule every worker shares, in Redis.
struct Shared {
    connection: ConnectionManager,
    prefix: String,
    script: Script,
}

/// KEYS[1]: the token's key; ARGV: ms between slots, the burst (ms of slots a quiet token may
/// use at once). Reserves the next slot and returns how many ms until it is due.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or now), now)
local due = tat + interval - burst
local wait = math.max(0, due - now)
redis.call('SET', KEYS[1], tostring(tat + interval), 'PX', math.ceil(tat + interval - now) + 1000)
return math.ceil(wait)
"#;

/// A token bucket of one token: `tokens` may go negative, meaning callers have reserved slots
/// in the future and are sleeping until then.
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl Pacer {
    /// A budget kept by this process.
    pub fn new(limit: PacingLimit) -> Self {
        Self {
            per_minute: match limit {
                PacingLimit::Unlimited => None,
                PacingLimit::PerMinute(n) => Some(n.max(1)),
            },
            buckets: Mutex::new(HashMap::new()),
            shared: None,
        }
    }

    /// A budget shared through Redis by every worker using the same keys.
    pub fn shared(limit: PacingLimit, connection: ConnectionManager, prefix: &str) -> Self {
        Self {
            shared: Some(Shared {
                connection,
                prefix: prefix.to_owned(),
                script: Script::new(RESERVE),
            }),
            ..Self::new(limit)
        }
    }

    /// Waits until `token` may start one more delete, and spends it.
    pub async fn wait(&self, token: &TokenHash) {
        let Some(per_minute) = self.per_minute else {
            return;
        };
        let delay = match self.reserve_shared(token, per_minute).await {
            Some(delay) => delay,
            None => self.reserve(token, per_minute),
        };
        metrics::histogram!(telemetry::PACING_WAIT).record(delay.as_secs_f64());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// The next slot of the shared schedule, or `None` without one (no Redis, or it failed).
    async fn reserve_shared(&self, token: &TokenHash, per_minute: u32) -> Option<Duration> {
        let shared = self.shared.as_ref()?;
        let interval_ms = 60_000.0 / f64::from(per_minute);
        let reserved: Result<u64, _> = shared
            .script
            .key(format!("{}{}", shared.prefix, hex::encode(token.0)))
            .arg(interval_ms)
            .arg(60_000)
            .invoke_async(&mut shared.connection.clone())
            .await;
        match reserved {
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(error) => {
                metrics::counter!(telemetry::PACING_LOCAL).increment(1);
                tracing::debug!(%error, "Shared pacing failed; pacing on this worker's bucket.");
                None
            }
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

    /// Three workers' pacers on one Redis reserve slots from one schedule: a minute's budget
    /// at once, then one slot per interval, whichever worker asks.
    #[tokio::test]
    async fn workers_sharing_redis_share_one_budget() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = ::redis::Client::open(url).unwrap();
        let prefix = format!("test:pacing:{}:", uuid::Uuid::new_v4().simple());
        let mut pacers = vec![];
        for _ in 0..3 {
            let connection = ConnectionManager::new(client.clone()).await.unwrap();
            pacers.push(Pacer::shared(
                PacingLimit::PerMinute(60),
                connection,
                &prefix,
            ));
        }
        let token = TokenHash::of(b"shared");
        let mut delays = vec![];
        for i in 0..66 {
            delays.push(pacers[i % 3].reserve_shared(&token, 60).await.unwrap());
        }
        assert!(delays[..60].iter().all(Duration::is_zero), "{delays:?}");
        for (k, delay) in delays[60..].iter().enumerate() {
            // Slot 60 + k is due about (k + 1) s from the start; the calls took a little time.
            let due = Duration::from_secs(k as u64 + 1);
            assert!(
                *delay <= due && *delay + Duration::from_millis(500) > due,
                "{delays:?}"
            );
        }
        let other = TokenHash::of(b"other");
        assert!(
            pacers[1]
                .reserve_shared(&other, 60)
                .await
                .unwrap()
                .is_zero()
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
