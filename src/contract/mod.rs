//! The bus contract in code: every outcome row and how it becomes a result event
//! ([`outcome`]), what a 200 says happened ([`receipt`]), and every name on the wire
//! ([`wire`]).

pub mod outcome;
pub mod receipt;
pub mod wire;

pub use outcome::{EventContext, Outcome, ResultEvent, render};
pub use receipt::{ChatKind, ChatKnown, Deletion, MediaErased, Receipt};
pub use wire::Names;
