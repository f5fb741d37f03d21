//! The bus contract in code, the bottom of the dependency order: the chat a command names
//! ([`chat`]) and the body that names it ([`request`]), every outcome row and how it becomes a
//! result event ([`outcome`]), what a 200 says happened ([`receipt`]), and every name on the
//! wire ([`wire`]).

pub mod chat;
pub mod outcome;
pub mod receipt;
pub mod request;
pub mod wire;

pub use chat::{ChatJid, JidServer, normalise_number};
pub use outcome::{EventContext, Outcome, ResultEvent, render};
pub use receipt::{ChatKind, ChatKnown, Deletion, MediaErased, Receipt};
pub use request::{DeleteRequest, parse_body};
pub use wire::Names;
