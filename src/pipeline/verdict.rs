//! What the pipeline decides for a delivery ([`Verdict`]), and the outcomes it carries: where
//! the delivery came from, what the work did, and why it stopped short.

use std::sync::Arc;

use crate::contract::{ChatJid, DeleteRequest, Deletion, MediaErased, Outcome, Receipt};
use crate::fence::Fenced;
use crate::idempotency::{Remembered, StoreError};
use crate::instances::Instance;
use crate::media::MediaError;
use crate::session::SessionError;
use crate::telemetry;

/// Where a delivery came from: what a queue feeds the pipeline.
#[derive(Clone)]
pub enum Source {
    /// One hosted instance's queue.
    Instance(Arc<Instance>),
    /// The unrouted queue: no worker hosts the routing key (answered 404).
    Unrouted,
    /// Dead-lettered after too many deliveries without an answer (a crash loop): answered
    /// without doing the work again, and parked for an operator. The instance, when this
    /// worker hosts it (a delivery's; the dead-letter queue's own source has none).
    DeadLettered(Option<Arc<Instance>>),
}

/// An outcome with what the result event needs to say about it.
#[derive(Debug)]
pub struct Handled {
    pub outcome: Outcome,
    pub chat: Option<ChatJid>,
    /// Tries of the work so far, this delivery's included.
    pub attempts: u32,
    /// A 200's receipt.
    pub receipt: Option<Receipt>,
}

/// What to do with a delivery.
#[derive(Debug)]
pub enum Verdict {
    /// Publish this result, then ack; `park` keeps a copy of the command in the parking queue
    /// (a final failure an operator may want to replay).
    Answer {
        handled: Handled,
        replayed: bool,
        park: bool,
    },
    /// No answer yet: send the command through the retry queue of `delay_ms`, carrying the
    /// tries and broker retries so far.
    RetryLater {
        delay_ms: u64,
        tries: u32,
        retries: u32,
    },
    /// No answer and nothing remembered: back to the queue at once. The command's claim went
    /// to another delivery of the same id, which answers it.
    HandBack,
}

impl Verdict {
    pub(super) fn answer(outcome: Outcome, chat: Option<ChatJid>, attempts: u32) -> Self {
        let park = outcome.status() >= 500;
        Verdict::Answer {
            handled: Handled {
                outcome,
                chat,
                attempts,
                receipt: None,
            },
            replayed: false,
            park,
        }
    }

    /// The 200 of a delete that happened, with its receipt.
    pub(super) fn deleted(done: Done, delete_media: bool, attempts: u32) -> Self {
        let receipt = Receipt::of(&done.deletion, done.media);
        let chat = done.deletion.chat;
        let outcome = Outcome::Deleted {
            chat: chat.clone(),
            delete_media,
        };
        let mut verdict = Verdict::answer(outcome, Some(chat), attempts);
        if let Verdict::Answer { handled, .. } = &mut verdict {
            handled.receipt = Some(receipt);
        }
        verdict
    }
}

/// What the work of a command did.
pub(super) struct Done {
    pub(super) deletion: Deletion,
    /// With `deleteMedia`: what the purge erased.
    pub(super) media: Option<MediaErased>,
}

/// Why the work of a command stopped short.
pub(super) enum Failure {
    Session(SessionError),
    Media(MediaError),
    /// The store answered, but not usably (an unreadable record).
    Store(StoreError),
    /// The claim is no longer held: no further effect.
    Fenced(Fenced),
    /// The command crash-looped: it is not tried again.
    DeadLettered,
}

impl Failure {
    pub(super) fn is_retryable(&self) -> bool {
        match self {
            Failure::Session(e) => e.is_retryable(),
            Failure::Media(e) => e.is_retryable(),
            Failure::Store(e) => e.is_retryable(),
            Failure::Fenced(_) => false,
            Failure::DeadLettered => true,
        }
    }

    pub(super) fn outcome(&self) -> Outcome {
        match self {
            Failure::Session(SessionError::NotConnected) => Outcome::NotConnected,
            Failure::Session(e) => Outcome::DeleteChatFailed(e.reason()),
            Failure::Media(e) => Outcome::DeleteMediaFailed(e.reason()),
            Failure::Store(_) => {
                Outcome::DeleteChatFailed("the idempotency record is unreadable".into())
            }
            Failure::Fenced(fenced) => Outcome::DeleteChatFailed(fenced.to_string()),
            Failure::DeadLettered => Outcome::DeleteChatFailed(
                "it was delivered too many times without an answer".into(),
            ),
        }
    }
}

impl From<SessionError> for Failure {
    fn from(error: SessionError) -> Self {
        match error {
            SessionError::Fenced(fenced) => Failure::Fenced(fenced),
            other => Failure::Session(other),
        }
    }
}

impl From<MediaError> for Failure {
    fn from(error: MediaError) -> Self {
        match error {
            MediaError::Fenced(fenced) => Failure::Fenced(fenced),
            other => Failure::Media(other),
        }
    }
}

/// A remembered result, answered again as a replay.
pub(super) fn replay(remembered: Remembered, request: Option<DeleteRequest>) -> Verdict {
    metrics::counter!(telemetry::REPLAYS).increment(1);
    let chat = match &remembered.outcome {
        Outcome::Deleted { chat, .. } => Some(chat.clone()),
        _ => request.map(|r| r.chat),
    };
    Verdict::Answer {
        handled: Handled {
            outcome: remembered.outcome,
            chat,
            attempts: remembered.attempts,
            receipt: remembered.receipt,
        },
        replayed: true,
        park: false,
    }
}
