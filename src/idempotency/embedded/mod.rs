//! The embedded store: one redb file, owned by one worker process at a time (redb locks it).
//! Writes from all commands go through one writer thread ([`writer`]) that groups them into
//! shared transactions; records are a compact binary layout ([`codec`]).
//!
//! Claims live in memory until there is something to keep (the chat delete happened, a
//! result, a released claim's fingerprint): a lease means nothing after the process is gone,
//! and only this process can have the file open, so a command that is answered at once costs
//! one record write, not two. Unless the writer is busy, the asking task decides its own begin,
//! from the claims in memory and the committed records ([`writer::Claims`]), instead of waiting
//! behind a commit.

mod codec;
mod writer;

use std::path::Path;
use std::sync::{Arc, RwLock, mpsc};

use tokio::sync::oneshot;

use super::{Begin, Fingerprint, Held, IdempotencyStore, Lifetimes, Remembered, StoreError};
use crate::contract::Deletion;
use writer::{Change, Claims, Op, Writer, Written};

pub struct EmbeddedStore {
    ops: mpsc::Sender<(String, Op)>,
    claims: Arc<Claims>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file. Fails if another process has it open.
    pub fn open(path: &Path, lifetimes: Lifetimes) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let db = writer::open(path).map_err(|e| StoreError::Embedded(Arc::new(e)))?;
        let db = Arc::new(RwLock::new(Some(db)));
        let (ops, rx) = mpsc::channel();
        let process = uuid::Uuid::new_v4().simple().to_string();
        let claims = Arc::new(Claims::new(db, process, lifetimes));
        let writer = Writer::new(claims.clone(), path.to_owned());
        std::thread::Builder::new()
            .name("idempotency-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self { ops, claims })
    }

    /// Sends an operation and waits for its answer.
    async fn ask<T>(
        &self,
        id: &str,
        op: impl FnOnce(oneshot::Sender<T>) -> Op,
    ) -> Result<T, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send((id.to_owned(), op(reply)))
            .map_err(|_| StoreError::WriterStopped)?;
        answer.await.map_err(|_| StoreError::WriterStopped)
    }

    async fn write(&self, id: &str, change: Change) -> Result<Written, StoreError> {
        self.ask(id, |reply| Op::Write { change, reply }).await?
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for EmbeddedStore {
    fn new_claim(&self) -> String {
        self.claims.new_claim()
    }

    /// One process at a time has the file open, so there is no other owner's claim to outlive:
    /// the generation is not kept.
    async fn begin_as(
        &self,
        id: &str,
        fingerprint: &Fingerprint,
        _generation: u64,
        claim: &str,
    ) -> Result<Begin, StoreError> {
        if !self.claims.writer_is_busy()
            && let Some(decided) = self.claims.begin(id, fingerprint, claim)
        {
            return decided;
        }
        let fingerprint = fingerprint.clone();
        let claim = claim.to_owned();
        self.ask(id, |reply| Op::Begin {
            fingerprint,
            claim,
            reply,
        })
        .await?
    }

    async fn renew(&self, held: &Held) -> Result<bool, StoreError> {
        let (claim, fingerprint) = (held.claim.clone(), held.fingerprint.clone());
        self.ask(&held.id, |reply| Op::Renew {
            claim,
            fingerprint,
            reply,
        })
        .await?
    }

    /// Claims live in memory: the claim's record is written (one group commit) before the
    /// effect, so the try after a crash finds its first-seen time.
    async fn keep_intent(&self, held: &Held) -> Result<(), StoreError> {
        let change = Change::Intent {
            claim: held.claim.clone(),
            fingerprint: held.fingerprint.clone(),
            seen_ms: held.seen_ms,
        };
        self.write(&held.id, change).await.map(drop)
    }

    async fn mark_chat_deleted(&self, held: &Held, deletion: &Deletion) -> Result<(), StoreError> {
        let change = Change::MarkChatDeleted {
            claim: held.claim.clone(),
            fingerprint: held.fingerprint.clone(),
            deletion: deletion.clone(),
        };
        self.write(&held.id, change).await.map(drop)
    }

    async fn remember(&self, held: &Held, result: &Remembered) -> Result<Remembered, StoreError> {
        let change = Change::Remember {
            claim: held.claim.clone(),
            fingerprint: held.fingerprint.clone(),
            result: result.clone(),
        };
        Ok(match self.write(&held.id, change).await? {
            Written::Done => result.clone(),
            Written::Kept(kept) => kept,
        })
    }

    async fn release(&self, held: &Held) -> Result<(), StoreError> {
        let claim = held.claim.clone();
        self.write(&held.id, Change::Release { claim })
            .await
            .map(drop)
    }

    async fn ping(&self) -> bool {
        self.ask("", |reply| Op::Ping { reply })
            .await
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::contract::Outcome;

    const L: Lifetimes = Lifetimes {
        claim: Duration::from_secs(60),
        keep: Duration::from_secs(600),
    };

    fn held(id: &str, begin: Begin, fingerprint: &Fingerprint) -> Held {
        let Begin::Claimed { claim, .. } = begin else {
            panic!("expected a claim, got {begin:?}")
        };
        Held {
            id: id.into(),
            claim,
            fingerprint: fingerprint.clone(),
            generation: 0,
            seen_ms: 0,
        }
    }

    #[tokio::test]
    async fn claims_renew_and_end_and_results_are_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"), L).unwrap();
        let (a, b) = (Fingerprint("a".into()), Fingerprint("b".into()));

        let x = held("x", store.begin("x", &a, 0).await.unwrap(), &a);
        assert_eq!(store.begin("x", &a, 0).await.unwrap(), Begin::Busy);
        assert_eq!(store.begin("x", &b, 0).await.unwrap(), Begin::Conflict);
        assert!(store.renew(&x).await.unwrap(), "still ours");
        let done = Remembered {
            outcome: Outcome::InvalidNumber,
            attempts: 1,
            receipt: None,
        };
        assert_eq!(store.remember(&x, &done).await.unwrap(), done);
        assert!(
            !store.renew(&x).await.unwrap(),
            "answered: nothing to renew"
        );
        assert_eq!(
            store.begin("x", &a, 0).await.unwrap(),
            Begin::Replay(done.clone())
        );

        // A released claim keeps its fingerprint (the id stays tied to its request), and a
        // marked chat delete survives it.
        let y = held("y", store.begin("y", &a, 0).await.unwrap(), &a);
        let deletion = Deletion {
            chat: crate::contract::normalise_number("5511999999999").unwrap(),
            known: crate::contract::ChatKnown::Unknown,
            at_ms: 1,
        };
        store.mark_chat_deleted(&y, &deletion).await.unwrap();
        store.release(&y).await.unwrap();
        assert!(!store.renew(&y).await.unwrap(), "released");
        assert_eq!(store.begin("y", &b, 0).await.unwrap(), Begin::Conflict);
        assert!(matches!(
            store.begin("y", &a, 0).await.unwrap(),
            Begin::Claimed {
                chat_deleted: true,
                ..
            }
        ));
        assert!(store.ping().await);
    }

    /// A command is claimed while the writer is busy committing others' results: it starts
    /// at once instead of waiting out another group's fsync.
    #[tokio::test]
    async fn a_claim_does_not_wait_behind_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"), L).unwrap();
        let a = Fingerprint("a".into());
        let x = held("x", store.begin("x", &a, 0).await.unwrap(), &a);
        let (release, stalled) = std::sync::mpsc::channel();
        store.ops.send((String::new(), Op::Stall(stalled))).unwrap();

        let begun = tokio::time::timeout(Duration::from_secs(10), store.begin("y", &a, 0)).await;
        assert!(
            matches!(begun, Ok(Ok(Begin::Claimed { .. }))),
            "claimed while the writer is busy: {begun:?}"
        );
        assert_eq!(store.begin("x", &a, 0).await.unwrap(), Begin::Busy);

        drop(release);
        let done = Remembered {
            outcome: Outcome::InvalidNumber,
            attempts: 1,
            receipt: None,
        };
        store.remember(&x, &done).await.unwrap();
        assert_eq!(store.begin("x", &a, 0).await.unwrap(), Begin::Replay(done));
    }

    #[tokio::test]
    async fn a_file_held_by_another_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = EmbeddedStore::open(&path, L).unwrap();
        assert!(EmbeddedStore::open(&path, L).is_err());
    }
}
