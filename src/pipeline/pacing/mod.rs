//! Per-token pacing: each token may start a limited number of deletes per minute (the API's
//! documented "Global (100/min)"). Over budget, a command waits for its slot; it never fails.
//! No sliding minute holds more than the budget plus the configured burst (`pacing.burst`,
//! none by default): GCRA, a quiet token may start `1 + burst` at once, then one per interval.
//! A command handed back before its delete gives its slot back.
//!
//! With the Redis idempotency store the budget is shared by every worker: one script keeps each
//! token's theoretical arrival time (GCRA) on Redis's clock, so workers reserve slots from one
//! schedule. While Redis does not answer, commands wait for it: a budget per worker would
//! multiply the token's budget by the number of workers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ::redis::Script;
use ::redis::aio::ConnectionManager;
use tokio::time::Instant;

use super::memory::{OUTAGE_LONGEST_WAIT, outage_delays};
use crate::config::{PacingLimit, TokenHash};
use crate::telemetry;

pub struct Pacer {
    /// Deletes per minute, or `None` for no limit.
    per_minute: Option<u32>,
    /// Deletes a quiet token may start at once beyond the first.
    burst: u32,
    buckets: Mutex<HashMap<[u8; 32], Bucket>>,
    shared: Option<Shared>,
}

/// The schedule every worker shares, in Redis.
struct Shared {
    connection: ConnectionManager,
    prefix: String,
    reserve: Script,
    give_back: Script,
}

/// Reserves a token's next slot (see the file), on Redis's clock.
const RESERVE: &str = concat!(
    include_str!("../../lua/now.lua"),
    include_str!("reserve.lua")
);
/// Gives a reserved slot back (see the file).
const GIVE_BACK: &str = include_str!("give_back.lua");

/// A token bucket of one token: `tokens` may go negative, meaning callers have reserved slots
/// in the future and are sleeping until then.
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A reserved slot: given back when dropped before [`Slot::used`] (the command was handed
/// back, or fenced before anything was sent).
pub struct Slot<'a> {
    pacer: &'a Pacer,
    token: [u8; 32],
    reserved: Reserved,
}

enum Reserved {
    /// Unlimited, or already used.
    Nothing,
    Local,
    /// The shared schedule's arrival time after this slot.
    Shared(String),
}

impl Slot<'_> {
    /// The delete was tried: the slot is spent.
    pub fn used(mut self) {
        self.reserved = Reserved::Nothing;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.reserved, Reserved::Nothing) {
            Reserved::Nothing => {}
            Reserved::Local => self.pacer.give_back_local(&self.token),
            Reserved::Shared(slot) => {
                let Some(shared) = &self.pacer.shared else {
                    return;
                };
                let Some(per_minute) = self.pacer.per_minute else {
                    return;
                };
                let script = shared.give_back.clone();
                let key = shared.key(&self.token);
                let interval = interval_ms(per_minute);
                let mut connection = shared.connection.clone();
                // Best effort, off the dropping task: a slot not given back is only a slot
                // of the schedule left unused.
                tokio::spawn(async move {
                    let given: Result<i64, _> = script
                        .key(&key)
                        .key(format!("{key}:back"))
                        .arg(interval)
                        .arg(slot)
                        .invoke_async(&mut connection)
                        .await;
                    if let Err(error) = given {
                        tracing::debug!(%error, "Could not give a pacing slot back.");
                    }
                });
            }
        }
    }
}

impl Shared {
    fn key(&self, token: &[u8; 32]) -> String {
        format!("{}{}", self.prefix, hex::encode(token))
    }
}

fn interval_ms(per_minute: u32) -> f64 {
    60_000.0 / f64::from(per_minute)
}

impl Pacer {
    /// A budget kept by this process; `burst` deletes beyond the first may start at once.
    pub fn new(limit: PacingLimit, burst: u32) -> Self {
        Self {
            per_minute: match limit {
                PacingLimit::Unlimited => None,
                PacingLimit::PerMinute(n) => Some(n.max(1)),
            },
            burst,
            buckets: Mutex::new(HashMap::new()),
            shared: None,
        }
    }

    /// A budget shared through Redis by every worker using the same keys.
    pub fn shared(
        limit: PacingLimit,
        burst: u32,
        connection: ConnectionManager,
        prefix: &str,
    ) -> Self {
        Self {
            shared: Some(Shared {
                connection,
                prefix: prefix.to_owned(),
                reserve: Script::new(RESERVE),
                give_back: Script::new(GIVE_BACK),
            }),
            ..Self::new(limit, burst)
        }
    }

    /// Waits until `token` may start one more delete, and reserves it: the slot is given back
    /// unless [`Slot::used`] is called.
    pub async fn wait(&self, token: &TokenHash) -> Slot<'_> {
        let mut slot = Slot {
            pacer: self,
            token: token.0,
            reserved: Reserved::Nothing,
        };
        let Some(per_minute) = self.per_minute else {
            return slot;
        };
        let delay = match &self.shared {
            Some(shared) => {
                let (delay, after) = self.reserve_shared(shared, token, per_minute).await;
                slot.reserved = Reserved::Shared(after);
                delay
            }
            None => {
                slot.reserved = Reserved::Local;
                self.reserve(token, per_minute)
            }
        };
        metrics::histogram!(telemetry::PACING_WAIT).record(delay.as_secs_f64());
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        slot
    }

    /// The next slot of the shared schedule: how long until it is due, and its name. Waits
    /// for Redis while it does not answer.
    async fn reserve_shared(
        &self,
        shared: &Shared,
        token: &TokenHash,
        per_minute: u32,
    ) -> (Duration, String) {
        let interval = interval_ms(per_minute);
        let tolerance = interval * f64::from(self.burst + 1);
        let mut backoff = None;
        loop {
            let reserved: Result<(u64, String), _> = shared
                .reserve
                .key(shared.key(&token.0))
                .arg(interval)
                .arg(tolerance)
                .invoke_async(&mut shared.connection.clone())
                .await;
            match reserved {
                Ok((ms, after)) => return (Duration::from_millis(ms), after),
                Err(error) => {
                    metrics::counter!(telemetry::PACING_STORE_WAITS).increment(1);
                    tracing::debug!(%error, "Shared pacing does not answer; waiting for it.");
                }
            }
            let delay = backoff.get_or_insert_with(outage_delays).next();
            let delay = delay.unwrap_or(OUTAGE_LONGEST_WAIT);
            tokio::time::sleep(delay).await;
        }
    }

    /// Takes the next slot and returns how long until it is due. A full bucket holds
    /// `1 + burst` slots.
    fn reserve(&self, token: &TokenHash, per_minute: u32) -> Duration {
        let capacity = f64::from(self.burst + 1);
        let per_second = f64::from(per_minute) / 60.0;
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

    fn give_back_local(&self, token: &[u8; 32]) {
        let capacity = f64::from(self.burst + 1);
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bucket) = buckets.get_mut(token) {
            bucket.tokens = (bucket.tokens + 1.0).min(capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the deletes a token starts in (paused, virtual) time: `1 + burst` at once, then
    /// one per interval.
    #[tokio::test(start_paused = true)]
    async fn a_token_gets_its_budget_per_minute_and_the_rest_waits() {
        let pacer = Arc::new(Pacer::new(PacingLimit::PerMinute(6), 2));
        let token = TokenHash::of(b"a");
        let other = TokenHash::of(b"b");
        let started = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let mut tasks = vec![];
        for _ in 0..12 {
            let (pacer, started) = (pacer.clone(), started.clone());
            tasks.push(tokio::spawn(async move {
                pacer.wait(&token).await.used();
                started.fetch_add(1, Ordering::SeqCst);
            }));
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            started.load(Ordering::SeqCst),
            3,
            "one and the burst at once"
        );
        // Another token has its own budget.
        pacer.wait(&other).await.used();
        assert_eq!(Instant::now(), start, "another token does not wait");
        tokio::time::advance(Duration::from_secs(30)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(started.load(Ordering::SeqCst), 6, "then one every 10 s");
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(
            Instant::now().duration_since(start),
            Duration::from_secs(90)
        );
    }

    /// A slot dropped before it was used is given back: the next command takes it.
    #[tokio::test(start_paused = true)]
    async fn a_slot_not_used_is_given_back() {
        let pacer = Pacer::new(PacingLimit::PerMinute(6), 0);
        let token = TokenHash::of(b"a");
        let start = Instant::now();
        pacer.wait(&token).await.used();
        let handed_back = tokio::time::timeout(Duration::from_secs(1), pacer.wait(&token)).await;
        assert!(handed_back.is_err());
        pacer.wait(&token).await.used();
        assert_eq!(
            Instant::now().duration_since(start),
            Duration::from_secs(10)
        );
    }

    /// Three workers' pacers on one Redis reserve slots from one schedule: one and the burst
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
                5,
                connection,
                &prefix,
            ));
        }
        let token = TokenHash::of(b"shared");
        let mut delays = vec![];
        for i in 0..12 {
            let pacer = &pacers[i % 3];
            let shared = pacer.shared.as_ref().unwrap();
            delays.push(pacer.reserve_shared(shared, &token, 60).await.0);
        }
        assert!(delays[..6].iter().all(Duration::is_zero), "{delays:?}");
        for (k, delay) in delays[6..].iter().enumerate() {
            // Slot 6 + k is due about (k + 1) s from the start; the calls took a little time.
            let due = Duration::from_secs(k as u64 + 1);
            assert!(
                *delay <= due && *delay + Duration::from_millis(500) > due,
                "{delays:?}"
            );
        }
        let other = TokenHash::of(b"other");
        let shared = pacers[1].shared.as_ref().unwrap();
        let (delay, _) = pacers[1].reserve_shared(shared, &other, 60).await;
        assert!(delay.is_zero());
    }

    #[tokio::test(start_paused = true)]
    async fn unlimited_never_waits() {
        let pacer = Pacer::new(PacingLimit::Unlimited, 0);
        let start = Instant::now();
        for _ in 0..1000 {
            pacer.wait(&TokenHash::of(b"a")).await.used();
        }
        assert_eq!(Instant::now(), start);
    }
}
