//! The embedded store: one redb file, owned by one worker process at a time (redb locks it).
//! Writes from all commands go through one writer thread ([`writer`]) that groups them into
//! shared transactions; records are a compact binary layout ([`codec`]).
//!
//! Claims live in the writer's memory until there is something to keep (the chat delete
//! happened, a result, a released claim's fingerprint): a lease means nothing after the process
//! is gone, and only this process can have the file open, so a command that is answered at once
//! costs one record write, not two.

mod codec;
mod writer;

use std::path::Path;
use std::sync::{Arc, mpsc};

use redb::{Database, ReadableDatabase, TableDefinition};
use tokio::sync::oneshot;

use super::{Begin, Fingerprint, IdempotencyStore, Lifetimes, Remembered, StoreError};
use writer::{Change, Op, RECORDS, Writer};

/// An expiry index of earlier versions; dropped on open (the sweep walks the records now,
/// which costs less than one more B-tree insert per command).
const OLD_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
const CACHE_BYTES: usize = 8 * 1024 * 1024;

pub struct EmbeddedStore {
    ops: mpsc::Sender<(String, Op)>,
    db: Arc<Database>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store file. Fails if another process has it open.
    pub fn open(path: &Path, lifetimes: Lifetimes) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // redb's default cache (1 GiB) would grow with the number of ids; records are small.
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(embedded)?;
        let db = Arc::new(db);
        let txn = db.begin_write().map_err(embedded)?;
        txn.open_table(RECORDS).map_err(embedded)?;
        txn.delete_table(OLD_EXPIRY).map_err(embedded)?;
        txn.commit().map_err(embedded)?;
        let (ops, rx) = mpsc::channel();
        let process = uuid::Uuid::new_v4().simple().to_string();
        let writer = Writer::new(db.clone(), process, lifetimes);
        std::thread::Builder::new()
            .name("idempotency-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(Self { ops, db })
    }

    async fn write(&self, id: &str, change: Change) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(id, Op::Write { change, reply })?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    fn send(&self, id: &str, op: Op) -> Result<(), StoreError> {
        self.ops
            .send((id.to_owned(), op))
            .map_err(|_| StoreError::WriterStopped)
    }
}

fn embedded(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Embedded(Arc::new(e.into()))
}

#[async_trait::async_trait]
impl IdempotencyStore for EmbeddedStore {
    async fn begin(&self, id: &str, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        let (reply, answer) = oneshot::channel();
        let fingerprint = fingerprint.clone();
        self.send(id, Op::Begin { fingerprint, reply })?;
        answer.await.map_err(|_| StoreError::WriterStopped)?
    }

    async fn mark_chat_deleted(&self, id: &str, _claim: &str) -> Result<(), StoreError> {
        self.write(id, Change::MarkChatDeleted).await
    }

    async fn remember(&self, id: &str, claim: &str, result: &Remembered) -> Result<(), StoreError> {
        let change = Change::Remember {
            claim: claim.to_owned(),
            result: result.clone(),
        };
        self.write(id, change).await
    }

    async fn release(&self, id: &str, claim: &str) -> Result<(), StoreError> {
        let claim = claim.to_owned();
        self.write(id, Change::Release { claim }).await
    }

    async fn ping(&self) -> bool {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.begin_read().is_ok())
            .await
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::contract::Outcome;
    use crate::idempotency::Record;

    const L: Lifetimes = Lifetimes {
        lease: Duration::from_secs(60),
        keep: Duration::from_secs(600),
    };

    fn on_disk(store: &EmbeddedStore, id: &str) -> Option<Record> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(RECORDS).unwrap();
        let bytes = table.get(id).unwrap();
        bytes.map(|b| codec::decode(b.value()).unwrap())
    }

    #[tokio::test]
    async fn claims_stay_in_memory_until_there_is_something_to_keep() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(&dir.path().join("s.redb"), L).unwrap();
        let (a, b) = (Fingerprint("a".into()), Fingerprint("b".into()));

        let Begin::Claimed { claim, .. } = store.begin("x", &a).await.unwrap() else {
            panic!("first begin claims")
        };
        assert!(
            on_disk(&store, "x").is_none(),
            "a claim alone is not written"
        );
        assert_eq!(store.begin("x", &a).await.unwrap(), Begin::Busy);
        assert_eq!(store.begin("x", &b).await.unwrap(), Begin::Conflict);

        let done = Remembered {
            outcome: Outcome::InvalidNumber,
            attempts: 1,
        };
        store.remember("x", &claim, &done).await.unwrap();
        let record = on_disk(&store, "x").expect("the result is written");
        assert_eq!(record.result, Some(done.clone()));
        assert_eq!(record.lease_owner, None);
        assert_eq!(store.begin("x", &a).await.unwrap(), Begin::Replay(done));

        // A released claim keeps its fingerprint on disk (the id stays tied to its request),
        // and a marked chat delete is written at once.
        let Begin::Claimed { claim, .. } = store.begin("y", &a).await.unwrap() else {
            panic!("claims y")
        };
        store.mark_chat_deleted("y", &claim).await.unwrap();
        assert!(on_disk(&store, "y").unwrap().chat_deleted);
        store.release("y", &claim).await.unwrap();
        assert_eq!(on_disk(&store, "y").unwrap().lease_owner, None);
        assert_eq!(store.begin("y", &b).await.unwrap(), Begin::Conflict);
        assert!(matches!(
            store.begin("y", &a).await.unwrap(),
            Begin::Claimed {
                chat_deleted: true,
                ..
            }
        ));
    }
}
