//! The idempotency stage as the pipeline sees it: every store call goes through here. An
//! unreachable store is waited out (the store's gauge and `/readyz` show it), and writes that
//! record an effect that already happened are retried until they are durable.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::idempotency::{IdempotencyStore, StoreError};
use crate::telemetry::{self, CommandLog};

pub struct Memory {
    store: Box<dyn IdempotencyStore>,
    /// The last store call went through.
    available: AtomicBool,
    /// How long a command waits for an unreachable store before it goes back to the broker.
    patience: Duration,
    /// Ids whose delete happened but is not recorded yet (the store was unreachable): a
    /// duplicate that reaches this worker waits for the record rather than claim the id after
    /// the claim's lease ran out.
    unrecorded: Mutex<HashSet<String>>,
    any_unrecorded: AtomicBool,
    /// Wakes the calls waiting out an outage as soon as one call goes through: commands
    /// whose effect waits to be recorded are answered at once, not after their backoff.
    back: tokio::sync::Notify,
}

/// An id in `unrecorded` for as long as this lives.
struct Unrecorded<'a> {
    memory: &'a Memory,
    id: &'a str,
}

impl<'a> Unrecorded<'a> {
    fn mark(memory: &'a Memory, id: &'a str) -> Self {
        memory.unrecorded().insert(id.to_owned());
        memory.any_unrecorded.store(true, Ordering::Relaxed);
        Self { memory, id }
    }
}

impl Drop for Unrecorded<'_> {
    fn drop(&mut self) {
        let mut unrecorded = self.memory.unrecorded();
        unrecorded.remove(self.id);
        self.memory
            .any_unrecorded
            .store(!unrecorded.is_empty(), Ordering::Relaxed);
    }
}

/// How long to keep trying a store call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Patience {
    /// Up to the configured outage wait, then give up (nothing happened yet).
    Bounded,
    /// Until it goes through: it records an effect that already happened.
    Unbounded,
}

impl Memory {
    pub fn new(store: Box<dyn IdempotencyStore>, patience: Duration) -> Self {
        metrics::gauge!(telemetry::STORE_AVAILABLE).set(1.0);
        Self {
            store,
            available: AtomicBool::new(true),
            patience,
            unrecorded: Mutex::new(HashSet::new()),
            any_unrecorded: AtomicBool::new(false),
            back: tokio::sync::Notify::new(),
        }
    }

    /// Whether `id` has a delete waiting to be recorded in this worker.
    pub fn is_unrecorded(&self, id: &str) -> bool {
        self.any_unrecorded.load(Ordering::Relaxed) && self.unrecorded().contains(id)
    }

    fn unrecorded(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.unrecorded.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what an effect of `id` did (the delete, the result): waits for the store as
    /// long as it takes, and meanwhile keeps duplicates of `id` in this worker away.
    pub async fn record<T, F, Fut>(
        &self,
        id: &str,
        log: &CommandLog<'_>,
        mut call: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        match call().await {
            Err(error) if error.is_outage() => {
                // Out again however the wait ends, dropped by a stop included: an id left
                // behind would send every later delivery of it round the retry queue for ever.
                let _waiting = Unrecorded::mark(self, id);
                self.call(Patience::Unbounded, log, call).await
            }
            done => done,
        }
    }

    pub fn store(&self) -> &dyn IdempotencyStore {
        self.store.as_ref()
    }

    /// Whether the store answers now (`/readyz`).
    pub async fn reachable(&self) -> bool {
        let up = self.store.ping().await;
        self.set_available(up);
        up
    }

    fn set_available(&self, up: bool) {
        if self.available.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!(telemetry::STORE_AVAILABLE).set(if up { 1.0 } else { 0.0 });
            if up {
                self.back.notify_waiters();
            }
        }
    }

    /// Runs `call`, retrying it with backoff while the store is unreachable; a store that
    /// answers (even with an error such as a corrupt record) ends the wait.
    pub async fn call<T, F, Fut>(
        &self,
        patience: Patience,
        log: &CommandLog<'_>,
        mut call: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let deadline = tokio::time::Instant::now() + self.patience;
        // Made on the first failure only: most calls go through at once.
        let mut backoff = None;
        let mut waited = false;
        loop {
            let error = match call().await {
                Ok(value) => {
                    self.set_available(true);
                    return Ok(value);
                }
                Err(error) if !error.is_outage() => return Err(error),
                Err(error) => error,
            };
            self.set_available(false);
            if !waited {
                waited = true;
                metrics::counter!(telemetry::STORE_WAITS).increment(1);
                log.in_span(|| tracing::warn!(%error, ?patience, "Idempotency store unreachable; waiting for it."));
            }
            let delay = backoff.get_or_insert_with(outage_delays).next();
            let delay = delay.unwrap_or(OUTAGE_LONGEST_WAIT);
            let now = tokio::time::Instant::now();
            if patience == Patience::Bounded && now + delay > deadline {
                return Err(error);
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.back.notified() => {}
            }
        }
    }
}
/// The longest wait between two looks at a store that does not answer.
pub(super) const OUTAGE_LONGEST_WAIT: Duration = Duration::from_secs(2);

/// The waits between looks at a store that does not answer (the idempotency store, the shared
/// pacing): 50 ms doubling to [`OUTAGE_LONGEST_WAIT`], jittered, for as long as it takes.
pub(super) fn outage_delays() -> backon::ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(OUTAGE_LONGEST_WAIT)
        .with_jitter()
        .without_max_times()
        .build()
}
