//! The bus contract in code: every outcome row and how it becomes a result event
//! ([`outcome`]), and every name on the wire ([`wire`]).

pub mod outcome;
pub mod wire;

pub use outcome::{EventContext, Outcome, ResultEvent, render};
pub use wire::Names;
