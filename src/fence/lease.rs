//! An instance's ownership lease as this worker knows it: the fence of every effect on the
//! instance. Held until a moment counted on this process's clock from when the renewal was
//! *sent*, so it never outlives Redis's (the ownership coordinator renews it).

use std::sync::Mutex;

use tokio::time::Instant;

use super::{Fence, Fenced};

/// An instance's ownership as this worker knows it; the fence of every effect on it.
pub struct Lease {
    term: Mutex<Option<Term>>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Term {
    pub(crate) generation: u64,
    /// `None`: held for good (a lone worker).
    pub(crate) until: Option<Instant>,
}

impl Lease {
    /// Held for as long as the process lives.
    pub fn permanent() -> Self {
        Self {
            term: Mutex::new(Some(Term {
                generation: 0,
                until: None,
            })),
        }
    }

    /// Not held until a coordinator takes it.
    pub fn vacant() -> Self {
        Self {
            term: Mutex::new(None),
        }
    }

    pub(crate) fn set(&self, term: Option<Term>) {
        *self.term.lock().unwrap_or_else(|e| e.into_inner()) = term;
    }

    fn term(&self) -> Option<Term> {
        *self.term.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One update under one lock: a hand-over clearing the term meanwhile stays cleared.
    pub(crate) fn extend(&self, until: Instant) {
        let mut term = self.term.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(term) = term.as_mut() {
            term.until = Some(until);
        }
    }

    /// The generation held, if the lease is held now.
    pub fn generation(&self) -> Option<u64> {
        let term = self.term()?;
        (!term.ended(Instant::now())).then_some(term.generation)
    }

    pub(crate) fn expired(&self, now: Instant) -> bool {
        self.term().is_some_and(|t| t.ended(now))
    }
}

impl Term {
    fn ended(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now >= until)
    }
}

impl Fence for Lease {
    fn check(&self) -> Result<(), Fenced> {
        match self.term() {
            None => Err(Fenced("this worker does not own the instance")),
            Some(term) if term.ended(Instant::now()) => Err(Fenced(
                "this worker's lease on the instance could not be renewed in time",
            )),
            Some(_) => Ok(()),
        }
    }

    fn valid_until(&self) -> Option<Instant> {
        match self.term() {
            Some(term) => term.until,
            // Not held: it ended already.
            None => Some(Instant::now()),
        }
    }
}
