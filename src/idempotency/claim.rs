//! A claim on an idempotency id while its command is handled: renewed every third of the lease
//! for as long as the work runs (a command answered well inside its lease renews nothing), and
//! the fence every effect checks. Its validity is counted on this process's monotonic clock
//! from the moment each claim or renewal was *asked for*, so it never outlives the store's.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::{Held, IdempotencyStore};
use crate::fence::{Fence, Fenced};
use crate::telemetry;

/// After a failed renewal, the next try comes this soon.
const RETRY_RENEWAL: Duration = Duration::from_millis(250);

pub struct Claim {
    held: Held,
    /// How long the claim lasts from each renewal.
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy)]
struct State {
    /// Held for sure until then.
    valid_until: Instant,
    /// When to renew next.
    renew_at: Instant,
    /// The store said someone else has it.
    taken: bool,
}

impl Claim {
    /// A claim the store granted to a `begin` sent at `asked_at`.
    pub fn new(held: Held, ttl: Duration, asked_at: Instant) -> Self {
        Self {
            held,
            ttl,
            state: Mutex::new(State {
                valid_until: asked_at + ttl,
                renew_at: asked_at + ttl / 3,
                taken: false,
            }),
        }
    }

    pub fn held(&self) -> &Held {
        &self.held
    }

    fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, change: impl FnOnce(&mut State)) {
        change(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Runs `work` while keeping the claim renewed.
    pub async fn hold_while<T>(
        &self,
        store: &dyn IdempotencyStore,
        work: impl Future<Output = T>,
    ) -> T {
        tokio::select! {
            biased;
            output = work => output,
            never = self.keep_renewed(store) => match never {},
        }
    }

    /// Renews at each `renew_at` until the claim is taken; never returns.
    async fn keep_renewed(&self, store: &dyn IdempotencyStore) -> std::convert::Infallible {
        loop {
            let state = self.state();
            if state.taken {
                return std::future::pending().await;
            }
            tokio::time::sleep_until(state.renew_at).await;
            let asked_at = Instant::now();
            let renewed = store.renew(&self.held).await;
            let outcome = match renewed {
                Ok(true) => "renewed",
                Ok(false) => "taken",
                Err(_) => "failed",
            };
            metrics::counter!(telemetry::CLAIM_RENEWALS, "outcome" => outcome).increment(1);
            let ttl = self.ttl;
            self.update(|s| match renewed {
                Ok(true) => {
                    s.valid_until = asked_at + ttl;
                    s.renew_at = asked_at + ttl / 3;
                }
                Ok(false) => s.taken = true,
                // Unknown: keep what we know, ask again soon.
                Err(_) => s.renew_at = asked_at + RETRY_RENEWAL,
            });
            if let Err(error) = renewed {
                tracing::warn!(%error, "Could not renew the idempotency claim; trying again.");
            }
        }
    }
}

impl Fence for Claim {
    fn check(&self) -> Result<(), Fenced> {
        let state = self.state();
        if state.taken {
            Err(Fenced("the idempotency claim was taken over"))
        } else if Instant::now() >= state.valid_until {
            Err(Fenced("the idempotency claim could not be renewed in time"))
        } else {
            Ok(())
        }
    }

    fn valid_until(&self) -> Option<Instant> {
        Some(self.state().valid_until)
    }
}
