//! Fences: conditions that must still hold just before an effect (a WhatsApp delete, a media
//! purge batch). An idempotency claim is one: an effect happens only while the claim is
//! verifiably held, so a duplicate that took the id over never shares an effect with us. This
//! worker's lease on the instance ([`Lease`]) is the other.

mod lease;

pub use lease::Lease;
pub(crate) use lease::Term;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::time::Instant;

/// Something every effect checks just before it happens.
pub trait Fence: Send + Sync {
    /// `Err` when the effect must not happen (the work stops and is handed back).
    fn check(&self) -> Result<(), Fenced>;

    /// Until when the fence holds for sure (`None`: no end known); an effect that starts
    /// later than this, even after a check that passed, is not covered by it.
    fn valid_until(&self) -> Option<Instant> {
        None
    }
}

/// Why an effect was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Fenced(pub &'static str);

/// No fence: effects outside any command (tools, tests).
pub struct Unfenced;

impl Fence for Unfenced {
    fn check(&self) -> Result<(), Fenced> {
        Ok(())
    }
}

/// Both must hold: this worker's lease on the instance, then the command's claim.
pub struct Both(pub Arc<dyn Fence>, pub Arc<dyn Fence>);

impl Fence for Both {
    fn check(&self) -> Result<(), Fenced> {
        self.0.check()?;
        self.1.check()
    }

    fn valid_until(&self) -> Option<Instant> {
        match (self.0.valid_until(), self.1.valid_until()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Set once a command's effect was let through its fence: from then on the effect may be
/// happening outside the command's future (a session's actor sends it), so the command is
/// finished and its result recorded rather than dropped by a stop.
#[derive(Debug, Default)]
pub struct Committed(AtomicBool);

impl Committed {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A fence that marks `committed` when it lets an effect through.
pub struct Committing {
    pub fence: Arc<dyn Fence>,
    pub committed: Arc<Committed>,
}

impl Fence for Committing {
    fn check(&self) -> Result<(), Fenced> {
        self.fence.check()?;
        self.committed.0.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn valid_until(&self) -> Option<Instant> {
        self.fence.valid_until()
    }
}
