//! The idempotency store: what happened to each idempotency id, so a command's work is never
//! repeated once its answer is out. Two real implementations: an embedded file (redb, the
//! default, one worker) and Redis (several workers).
//!
//! A record holds the request's fingerprint, a lease (who is working on the id right now),
//! whether the chat delete already happened (a retry resumes at the purge), and the final
//! result once there is one to remember (200 and 4xx). A claim is renewed while its command
//! runs ([`claim`]).
//!
//! Writes after a claim was granted (the chat delete happened, the result) never depend on the
//! claim still being there: a record that vanished (expired, evicted, lost) is written again,
//! and a record that belongs to another request is never overwritten.

pub mod claim;
mod embedded;
mod redis;

pub use self::redis::{Durability, RESPONSE_TIMEOUT, RedisStore, connection_config};
pub use claim::Claim;
pub use embedded::EmbeddedStore;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::TokenHash;
use crate::contract::DeleteRequest;
use crate::contract::{Deletion, Outcome, Receipt};

/// instance + token hash + normalised body, hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint(pub String);

impl Fingerprint {
    /// The body part is the normalised request when the body is valid (so `+55 11 9...` and
    /// `55119...` are the same request), else the raw bytes.
    pub fn new(instance: &str, token: &TokenHash, body: Result<&DeleteRequest, &[u8]>) -> Self {
        let mut h = Self::hasher(instance, token);
        match body {
            Ok(request) => {
                h.update(b"chat\0");
                h.update(request.chat.as_str().as_bytes());
                h.update([u8::from(request.delete_media)]);
            }
            Err(raw) => {
                h.update(b"raw\0");
                h.update(raw);
            }
        }
        Self(hex::encode(h.finalize()))
    }

    /// A body over the size limit, told apart by its length and its first `prefix` bytes
    /// only: whatever it holds it is answered `400 Invalid request body`, so hashing megabytes
    /// of it would buy nothing.
    pub fn of_oversized(instance: &str, token: &TokenHash, body: &[u8], prefix: usize) -> Self {
        let mut h = Self::hasher(instance, token);
        h.update(b"oversized\0");
        h.update((body.len() as u64).to_le_bytes());
        h.update(&body[..prefix.min(body.len())]);
        Self(hex::encode(h.finalize()))
    }

    fn hasher(instance: &str, token: &TokenHash) -> Sha256 {
        let mut h = Sha256::new();
        h.update(instance.as_bytes());
        h.update([0]);
        h.update(token.0);
        h
    }
}

/// A result kept for replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub outcome: Outcome,
    pub attempts: u32,
    /// A 200's receipt (none in records of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<Receipt>,
}

/// The answer to "may I work on this id?".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Go ahead, holding the lease `claim`; `chat_deleted` means only the purge is left.
    /// `seen_ms` is when the id was first seen (Unix ms): chosen once and kept with the record,
    /// so every try of the id sends the same mutation.
    Claimed {
        claim: String,
        chat_deleted: bool,
        seen_ms: u64,
        /// What the delete did, when a try recorded it (not in records of earlier versions).
        deletion: Option<Deletion>,
    },
    /// Done before with the same request: answer with this, do nothing.
    Replay(Remembered),
    /// Used before with a different request.
    Conflict,
    /// Another delivery of the same id holds a live lease: try again later.
    Busy,
}

/// A granted claim: the id, the claim's name, the request it is for, and the generation of
/// the instance lease it was taken under (0 without ownership): a record written again by a
/// renewal or a mark keeps it, so the next owner can still take it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub id: String,
    pub claim: String,
    pub fingerprint: Fingerprint,
    pub generation: u64,
    /// When the id was first seen (see [`Begin::Claimed`]), written again with the record.
    pub seen_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The id's record belongs to another request now (it expired and was used again): a
    /// write for ours would overwrite it.
    #[error("the idempotency id belongs to another request now")]
    Superseded,
    /// A read or a commit failed; every operation of a failed commit gets the same error.
    #[error("embedded store: {0}")]
    Embedded(std::sync::Arc<redb::Error>),
    #[error("embedded store: {0}")]
    Io(#[from] std::io::Error),
    #[error("embedded store: the writer thread stopped")]
    WriterStopped,
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("corrupt record: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// A store that cannot be read or written now may work on the next try; a superseded
    /// record will stay another request's.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, StoreError::Superseded)
    }

    /// The store could not be reached or could not write: waiting may help, and no answer
    /// should come from it.
    pub fn is_outage(&self) -> bool {
        match self {
            StoreError::Embedded(_) | StoreError::Io(_) | StoreError::WriterStopped => true,
            StoreError::Redis(e) => {
                use ::redis::{ErrorKind, ServerErrorKind as S};
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || matches!(
                        e.kind(),
                        ErrorKind::Server(
                            S::BusyLoading | S::TryAgain | S::ClusterDown | S::MasterDown | S::ReadOnly
                        )
                    )
                    // A full Redis (maxmemory, noeviction) refuses writes until there is room.
                    || e.code() == Some("OOM")
                    || e.to_string().contains("OOM command not allowed")
            }
            StoreError::Superseded | StoreError::Corrupt(_) => false,
        }
    }
}

/// Whether a begin should first look for a settled answer (a remembered result, or a record
/// of another request) with a plain read, before asking for a claim. Re-running a batch
/// replays thousands of ids in a row, and fresh commands come in runs too: after a look that
/// found nothing, only every `PROBE_EVERY`th begin looks, so fresh work pays for few reads.
#[derive(Default)]
struct SettledHint {
    misses: std::sync::atomic::AtomicU32,
}

impl SettledHint {
    const PROBE_EVERY: u32 = 16;

    fn should_look(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        self.misses.load(Relaxed) == 0
            || self
                .misses
                .fetch_add(1, Relaxed)
                .is_multiple_of(Self::PROBE_EVERY)
    }

    fn looked(&self, found: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if found {
            self.misses.store(0, Relaxed);
        } else {
            let _ = self.misses.compare_exchange(0, 1, Relaxed, Relaxed);
        }
    }
}

/// Timing of leases and remembered results.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// How long a claim stays exclusive without being renewed or finished (a crashed
    /// worker's claims expire after this; `idempotency.lease_secs`).
    pub claim: Duration,
    /// How long a record (and a remembered result) is kept.
    pub keep: Duration,
}

#[async_trait::async_trait]
pub trait IdempotencyStore: Send + Sync {
    /// A claim name unique to this process: drawn once per delivery, so a begin asked again
    /// (its reply was lost) is recognised as the same asker.
    fn new_claim(&self) -> String;

    /// May this delivery, as `claim`, work on `id`? `generation` is that of this worker's
    /// lease on the command's instance (0 without ownership): a live claim taken under an
    /// older one was the previous owner's, which its fence keeps from every effect now, so it
    /// is taken over rather than waited out. A live claim named `claim` is this delivery's own
    /// (an earlier begin whose answer was lost) and is granted again.
    async fn begin_as(
        &self,
        id: &str,
        fingerprint: &Fingerprint,
        generation: u64,
        claim: &str,
    ) -> Result<Begin, StoreError>;

    /// [`Self::begin_as`] under a fresh claim name.
    async fn begin(
        &self,
        id: &str,
        fingerprint: &Fingerprint,
        generation: u64,
    ) -> Result<Begin, StoreError> {
        let claim = self.new_claim();
        self.begin_as(id, fingerprint, generation, &claim).await
    }
    /// Extends the claim by a lease from now; `false` when another delivery holds the id now.
    async fn renew(&self, held: &Held) -> Result<bool, StoreError>;
    /// Makes the claim's first-seen time durable before the effect it times: a try after a
    /// crash then sends the same mutation. (Redis keeps it with the claim at `begin`.)
    async fn keep_intent(&self, _held: &Held) -> Result<(), StoreError> {
        Ok(())
    }

    /// The chat delete of this id happened (as `deletion` says): a later try skips it.
    async fn mark_chat_deleted(&self, held: &Held, deletion: &Deletion) -> Result<(), StoreError>;
    /// Keeps the final result and ends the claim. Returns what is remembered now: `result`,
    /// or the result another delivery of the same request remembered first.
    async fn remember(&self, held: &Held, result: &Remembered) -> Result<Remembered, StoreError>;
    /// Ends the claim without a result (5xx and 503 are not remembered).
    async fn release(&self, held: &Held) -> Result<(), StoreError>;
    /// Whether the store answers (for `/readyz`).
    async fn ping(&self) -> bool;
}

/// The stored state of one id (the embedded store's value; Redis keeps the same fields in a
/// hash).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    fingerprint: Fingerprint,
    expires_ms: u64,
    lease_owner: Option<String>,
    lease_until_ms: u64,
    chat_deleted: bool,
    result: Option<Remembered>,
    /// When the id was first seen (Unix ms; 0 in records of earlier versions).
    #[serde(default)]
    seen_ms: u64,
    /// What the delete did, once recorded.
    #[serde(default)]
    deletion: Option<Deletion>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A claim name unique to this process and call (no random bytes needed on the hot path).
fn claim_name(process: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{process}/{n}")
}

/// Whether a stored lease still excludes others. `dead_process` tells whether the owner is
/// known to be gone (the embedded store is owned by one process at a time).
fn lease_is_live(record: &Record, now: u64, dead_owner: impl Fn(&str) -> bool) -> bool {
    match &record.lease_owner {
        Some(owner) => record.lease_until_ms > now && !dead_owner(owner),
        None => false,
    }
}

/// The begin decision on a record, and the record to write back (if any).
fn decide_begin(
    existing: Option<Record>,
    fingerprint: &Fingerprint,
    claim: &str,
    now: u64,
    lifetimes: Lifetimes,
    dead_owner: impl Fn(&str) -> bool,
) -> (Begin, Option<Record>) {
    let lease_until_ms = now + lifetimes.claim.as_millis() as u64;
    let expires_ms = now + lifetimes.keep.as_millis() as u64;
    let existing = existing.filter(|r| r.expires_ms > now);
    let Some(mut record) = existing else {
        let record = Record {
            fingerprint: fingerprint.clone(),
            expires_ms,
            lease_owner: Some(claim.to_owned()),
            lease_until_ms,
            chat_deleted: false,
            result: None,
            seen_ms: now,
            deletion: None,
        };
        let begin = Begin::Claimed {
            claim: claim.to_owned(),
            chat_deleted: false,
            seen_ms: now,
            deletion: None,
        };
        return (begin, Some(record));
    };
    if &record.fingerprint != fingerprint {
        return (Begin::Conflict, None);
    }
    if let Some(result) = &record.result {
        return (Begin::Replay(result.clone()), None);
    }
    let own = record.lease_owner.as_deref() == Some(claim);
    if !own && lease_is_live(&record, now, dead_owner) {
        return (Begin::Busy, None);
    }
    record.lease_owner = Some(claim.to_owned());
    record.lease_until_ms = lease_until_ms;
    record.expires_ms = record.expires_ms.max(lease_until_ms);
    if record.seen_ms == 0 {
        record.seen_ms = now;
    }
    let begin = Begin::Claimed {
        claim: claim.to_owned(),
        chat_deleted: record.chat_deleted,
        seen_ms: record.seen_ms,
        deletion: record.deletion.clone(),
    };
    (begin, Some(record))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::normalise_number;

    const L: Lifetimes = Lifetimes {
        claim: Duration::from_secs(10),
        keep: Duration::from_secs(100),
    };

    fn fp(s: &str) -> Fingerprint {
        Fingerprint(s.into())
    }

    #[test]
    fn begin_decisions() {
        let never = |_: &str| false;
        let (b, rec) = decide_begin(None, &fp("a"), "c1", 1_000, L, never);
        assert_eq!(
            b,
            Begin::Claimed {
                claim: "c1".into(),
                chat_deleted: false,
                seen_ms: 1_000,
                deletion: None,
            }
        );
        let mut rec = rec.unwrap();
        assert_eq!(
            decide_begin(Some(rec.clone()), &fp("b"), "c2", 2_000, L, never).0,
            Begin::Conflict
        );
        assert_eq!(
            decide_begin(Some(rec.clone()), &fp("a"), "c2", 2_000, L, never).0,
            Begin::Busy
        );
        // Asked again by the claim that holds it (its first answer was lost): granted.
        assert!(matches!(
            decide_begin(Some(rec.clone()), &fp("a"), "c1", 2_000, L, never).0,
            Begin::Claimed { seen_ms: 1_000, .. }
        ));
        // A lease past its time, or of a dead owner, can be taken over, keeping the progress.
        rec.chat_deleted = true;
        let (b, _) = decide_begin(Some(rec.clone()), &fp("a"), "c2", 20_000, L, never);
        assert_eq!(
            b,
            Begin::Claimed {
                claim: "c2".into(),
                chat_deleted: true,
                seen_ms: 1_000,
                deletion: None,
            }
        );
        let (b, _) = decide_begin(Some(rec.clone()), &fp("a"), "c2", 2_000, L, |_| true);
        assert!(matches!(b, Begin::Claimed { .. }));
        let done = Remembered {
            outcome: Outcome::InvalidNumber,
            attempts: 1,
            receipt: None,
        };
        rec.result = Some(done.clone());
        assert_eq!(
            decide_begin(Some(rec.clone()), &fp("a"), "c3", 2_000, L, never).0,
            Begin::Replay(done)
        );
        // Forgotten after the keep time.
        let (b, _) = decide_begin(Some(rec), &fp("b"), "c4", 200_000, L, never);
        assert!(matches!(
            b,
            Begin::Claimed {
                chat_deleted: false,
                ..
            }
        ));
    }

    /// Looks while looking finds settled answers; after a miss, one begin in `PROBE_EVERY`.
    #[test]
    fn settled_hint_looks_in_runs_of_replays_and_probes_otherwise() {
        let hint = SettledHint::default();
        assert!(hint.should_look());
        hint.looked(true);
        assert!(hint.should_look());
        hint.looked(false);
        let looks = (0..64).filter(|_| hint.should_look()).count();
        assert_eq!(looks, 64 / SettledHint::PROBE_EVERY as usize);
        hint.looked(true);
        assert!((0..8).all(|_| hint.should_look()));
    }

    #[test]
    fn fingerprints_use_the_normalised_body() {
        let token = TokenHash::of(b"t");
        let a = crate::contract::DeleteRequest {
            chat: normalise_number("+55 11 99999-9999").unwrap(),
            lookup: true,
            delete_media: false,
        };
        let b = crate::contract::DeleteRequest {
            chat: normalise_number("5511999999999").unwrap(),
            lookup: true,
            delete_media: false,
        };
        let c = crate::contract::DeleteRequest {
            delete_media: true,
            ..b.clone()
        };
        assert_eq!(
            Fingerprint::new("i", &token, Ok(&a)),
            Fingerprint::new("i", &token, Ok(&b))
        );
        assert_ne!(
            Fingerprint::new("i", &token, Ok(&b)),
            Fingerprint::new("i", &token, Ok(&c))
        );
        assert_ne!(
            Fingerprint::new("i", &token, Ok(&b)),
            Fingerprint::new("j", &token, Ok(&b))
        );
        assert_ne!(
            Fingerprint::new("i", &token, Ok(&b)),
            Fingerprint::new("i", &TokenHash::of(b"u"), Ok(&b))
        );
        assert_ne!(
            Fingerprint::new("i", &token, Err(b"x")),
            Fingerprint::new("i", &token, Err(b"y"))
        );
    }

    /// The remembered result's stored form, pinned for every outcome: both stores keep it for
    /// a day (by default), so renaming a variant or a field must not turn the records written
    /// by the previous version into corrupt ones.
    #[test]
    fn remembered_results_keep_their_stored_form() {
        let chat = normalise_number("5511999999999").unwrap();
        let golden = [
            (Outcome::MissingIdempotencyId, r#""MissingIdempotencyId""#),
            (Outcome::InstanceNotFound, r#""InstanceNotFound""#),
            (Outcome::InvalidToken, r#""InvalidToken""#),
            (Outcome::IdempotencyConflict, r#""IdempotencyConflict""#),
            (Outcome::InvalidBody, r#""InvalidBody""#),
            (Outcome::NumberRequired, r#""NumberRequired""#),
            (Outcome::InvalidNumber, r#""InvalidNumber""#),
            (Outcome::NotConnected, r#""NotConnected""#),
            (
                Outcome::DeleteChatFailed("timed out".into()),
                r#"{"DeleteChatFailed":"timed out"}"#,
            ),
            (
                Outcome::DeleteMediaFailed("disk".into()),
                r#"{"DeleteMediaFailed":"disk"}"#,
            ),
            (
                Outcome::Deleted {
                    chat,
                    delete_media: true,
                },
                r#"{"Deleted":{"chat":"5511999999999@s.whatsapp.net","delete_media":true}}"#,
            ),
        ];
        // A 200 with its receipt (records of earlier versions have none).
        let with_receipt = Remembered {
            outcome: Outcome::Deleted {
                chat: normalise_number("5511999999999").unwrap(),
                delete_media: true,
            },
            attempts: 1,
            receipt: Some(Receipt {
                chat_known: crate::contract::ChatKnown::Unknown,
                chat_kind: crate::contract::ChatKind::User,
                deleted_at_ms: 1_733_000_000_123,
                media: Some(crate::contract::MediaErased {
                    objects: 2,
                    bytes: 15,
                }),
            }),
        };
        let stored = r#"{"outcome":{"Deleted":{"chat":"5511999999999@s.whatsapp.net","delete_media":true}},"attempts":1,"receipt":{"chat_known":"unknown","chat_kind":"user","deleted_at_ms":1733000000123,"media":{"objects":2,"bytes":15}}}"#;
        assert_eq!(serde_json::to_string(&with_receipt).unwrap(), stored);
        assert_eq!(
            serde_json::from_str::<Remembered>(stored).unwrap(),
            with_receipt
        );
        for (outcome, json) in golden {
            let stored = format!(r#"{{"outcome":{json},"attempts":2}}"#);
            let remembered = Remembered {
                outcome,
                attempts: 2,
                receipt: None,
            };
            assert_eq!(serde_json::to_string(&remembered).unwrap(), stored);
            assert_eq!(
                serde_json::from_str::<Remembered>(&stored).unwrap(),
                remembered
            );
        }
    }
}
