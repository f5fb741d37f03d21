//! Fences: conditions that must still hold just before an effect (a WhatsApp delete, a media
//! purge batch). An idempotency claim is one: an effect happens only while the claim is
//! verifiably held, so a duplicate that took the id over never shares an effect with us.

use std::sync::Arc;

/// Something every effect checks just before it happens.
pub trait Fence: Send + Sync {
    /// `Err` when the effect must not happen (the work stops and is handed back).
    fn check(&self) -> Result<(), Fenced>;
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
}
