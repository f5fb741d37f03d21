//! What the writer and the commands share: the open file, and the claims in memory. At a
//! trickle a claim is decided here, beside the writer ([`Claims::begin`]), so a command does not
//! wait behind another group's fsync to start.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard};

use redb::{Database, ReadableDatabase};

use super::RECORDS;
use crate::idempotency::embedded::codec::decode;
use crate::idempotency::{
    Begin, Fingerprint, Lifetimes, Record, StoreError, claim_name, decide_begin, now_ms,
};

/// The open file, shared by the writer and the readers of settled answers; `None` after a
/// failed commit, until the writer opens it again.
pub(in crate::idempotency::embedded) type SharedDb = Arc<RwLock<Option<Database>>>;

pub(super) fn read(db: &SharedDb) -> RwLockReadGuard<'_, Option<Database>> {
    db.read().unwrap_or_else(PoisonError::into_inner)
}

/// The latest state of one claimed id that is not (or not yet) on disk.
#[derive(Debug, Clone)]
pub(super) struct Entry {
    pub(super) record: Record,
    /// Written in the group being committed: a begin that reads it waits for the commit, so
    /// nothing is replayed that could still be lost.
    pub(super) unsettled: bool,
}

/// What the writer and the commands share: the file, and the ids whose latest state is in
/// memory (live claims, and writes of the group being committed). An id absent from `pending`
/// has all its writes committed, so its committed record is its state.
pub(in crate::idempotency::embedded) struct Claims {
    pub(super) db: SharedDb,
    pending: Mutex<HashMap<String, Entry>>,
    process: String,
    pub(super) lifetimes: Lifetimes,
    /// The writer's last commit carried a busy group: claims are cheaper answered by it, in
    /// bulk, than read one by one beside it.
    pub(super) busy: AtomicBool,
}

impl Claims {
    pub(in crate::idempotency::embedded) fn new(
        db: SharedDb,
        process: String,
        lifetimes: Lifetimes,
    ) -> Self {
        Self {
            db,
            pending: Mutex::default(),
            process,
            lifetimes,
            busy: AtomicBool::new(false),
        }
    }

    /// Whether begins should go to the writer: under load a read transaction per command
    /// costs more CPU than the hand-off, and waiting behind a commit costs little; at a
    /// trickle that wait is most of a command's latency.
    pub(in crate::idempotency::embedded) fn writer_is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed)
    }

    pub(super) fn pending(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides a begin in the asking task: from the claim in memory, else from the committed
    /// record. `None` when the writer must decide: the id has a write being committed, or the
    /// file is closed after a failed commit.
    pub(in crate::idempotency::embedded) fn begin(
        &self,
        id: &str,
        fingerprint: &Fingerprint,
        claim: &str,
    ) -> Option<Result<Begin, StoreError>> {
        // Held across the read, so two deliveries of one id cannot both claim it.
        let mut pending = self.pending();
        let existing = match pending.get(id) {
            Some(entry) if entry.unsettled => return None,
            Some(entry) => Some(entry.record.clone()),
            None => match committed(&self.db, id)? {
                Ok(record) => record,
                Err(corrupt) => return Some(Err(corrupt)),
            },
        };
        let (begin, claimed) = self.decide(existing, fingerprint, now_ms(), claim);
        if let Some(record) = claimed {
            let unsettled = false;
            pending.insert(id.to_owned(), Entry { record, unsettled });
        }
        Some(Ok(begin))
    }

    pub(super) fn decide(
        &self,
        existing: Option<Record>,
        fingerprint: &Fingerprint,
        now: u64,
        claim: &str,
    ) -> (Begin, Option<Record>) {
        // Leases of another process are dead: only one process can have this file open.
        let dead_owner = |owner: &str| !owner.starts_with(&self.process);
        decide_begin(
            existing,
            fingerprint,
            claim,
            now,
            self.lifetimes,
            dead_owner,
        )
    }

    /// A claim name of this process.
    pub(in crate::idempotency::embedded) fn new_claim(&self) -> String {
        claim_name(&self.process)
    }
}

/// The committed record of `id`, or why it is unreadable; `None` when the file cannot be read
/// now (the writer reports that).
pub(super) fn committed(db: &SharedDb, id: &str) -> Option<Result<Option<Record>, StoreError>> {
    let open = read(db);
    let txn = open.as_ref()?.begin_read().ok()?;
    let value = txn.open_table(RECORDS).ok()?.get(id).ok()?;
    Some(match value {
        Some(bytes) => decode(bytes.value()).map(Some).map_err(StoreError::Corrupt),
        None => Ok(None),
    })
}
