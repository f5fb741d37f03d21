//! The writer thread: the only one that writes the file. Operations from all commands are
//! grouped into shared transactions, so a busy worker pays one fsync per group, and every
//! caller hears back only after its write is durable.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::codec::{decode, encode, expires_of};
use crate::idempotency::{
    Begin, Fingerprint, Lifetimes, Record, Remembered, StoreError, decide_begin, new_claim, now_ms,
};

pub(super) const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// Most operations committed together.
const MAX_BATCH: usize = 1024;
/// Under load (the last commit carried at least `BUSY_GROUP` writes), a commit with fewer than
/// `FULL_GROUP` writes waits `LINGER` for more: each fsync costs the same CPU whatever it
/// carries, so fewer, larger commits leave more of the machine to the broker. At a steady
/// trickle commits stay small and nothing waits.
const BUSY_GROUP: usize = 8;
const FULL_GROUP: usize = 256;
const LINGER: Duration = Duration::from_millis(2);
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Records looked at per sweep, at least; more when more were written since the last one.
const SWEEP_MIN: usize = 10_000;

/// What a command asks of the writer, with where the answer goes.
pub(super) enum Op {
    /// May this fingerprint work on the id? Answered at once.
    Begin {
        fingerprint: Fingerprint,
        reply: oneshot::Sender<Result<Begin, StoreError>>,
    },
    /// A change to the id's record, answered once it is committed.
    Write {
        change: Change,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

pub(super) enum Change {
    MarkChatDeleted,
    Remember { claim: String, result: Remembered },
    Release { claim: String },
}

/// The writer thread's state.
pub(super) struct Writer {
    db: Arc<Database>,
    process: String,
    lifetimes: Lifetimes,
    /// Records of claimed ids whose latest state is only in memory, by id.
    pending: HashMap<String, Record>,
    last_sweep: Instant,
    /// Where the next sweep goes on walking the records (`None`: from the start).
    sweep_from: Option<String>,
    /// Records written since the last sweep.
    puts_since_sweep: usize,
}

type Records<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type WriteReply = (
    oneshot::Sender<Result<(), StoreError>>,
    Result<(), StoreError>,
);

impl Writer {
    pub(super) fn new(db: Arc<Database>, process: String, lifetimes: Lifetimes) -> Self {
        Self {
            db,
            process,
            lifetimes,
            pending: HashMap::new(),
            last_sweep: Instant::now(),
            sweep_from: None,
            puts_since_sweep: 0,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<(String, Op)>) {
        let mut busy = false;
        while let Ok(first) = rx.recv() {
            let mut replies = Vec::new();
            let committed = self.apply_group(first, &rx, busy, &mut replies);
            busy = matches!(committed, Ok(writes) if writes >= BUSY_GROUP);
            let failed = committed.err().map(Arc::new);
            for (reply, answer) in replies {
                // A failed commit fails every operation of the group: none of them is durable.
                let answer = match &failed {
                    Some(e) => Err(StoreError::Embedded(e.clone())),
                    None => answer,
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Applies `first` and whatever else is queued (lingering for more when `busy`) in one
    /// transaction, and commits it. Begins are answered at once; the writes' replies are left
    /// in `replies`, for after the commit. Returns the number of records written.
    fn apply_group(
        &mut self,
        first: (String, Op),
        rx: &mpsc::Receiver<(String, Op)>,
        busy: bool,
        replies: &mut Vec<WriteReply>,
    ) -> Result<usize, redb::Error> {
        let txn = self.db.begin_write()?;
        let mut writes = 0;
        {
            let mut records = txn.open_table(RECORDS)?;
            let now = now_ms();
            let mut next = Some(first);
            let (mut ops, mut lingered) = (0, false);
            while let Some((id, op)) = next {
                writes += usize::from(self.apply(&mut records, id, op, now, replies)?);
                ops += 1;
                next = match rx.try_recv() {
                    _ if ops >= MAX_BATCH => None,
                    Ok(op) => Some(op),
                    Err(_) if busy && !lingered && writes > 0 && writes < FULL_GROUP => {
                        // Sleeping rather than waiting on the channel: senders need not wake
                        // this thread for each operation.
                        std::thread::sleep(LINGER);
                        lingered = true;
                        rx.try_recv().ok()
                    }
                    Err(_) => None,
                };
            }
            if self.last_sweep.elapsed() >= SWEEP_EVERY {
                self.last_sweep = Instant::now();
                writes += usize::from(self.sweep(&mut records, now)?);
            }
        }
        if writes > 0 {
            txn.commit()?;
        } else {
            // Claims and replays alone change nothing on disk: no commit, no fsync.
            txn.abort()?;
        }
        Ok(writes)
    }

    /// Applies one operation; returns whether it wrote a record.
    fn apply(
        &mut self,
        records: &mut Records<'_>,
        id: String,
        op: Op,
        now: u64,
        replies: &mut Vec<WriteReply>,
    ) -> Result<bool, redb::Error> {
        // A claim in memory is newer than anything on disk: no need to read it.
        let existing = match self.pending.get(&id) {
            Some(claimed) => Some(claimed.clone()),
            None => match records.get(id.as_str())?.map(|b| decode(b.value())) {
                Some(Ok(record)) => Some(record),
                Some(Err(e)) => {
                    let corrupt = StoreError::Corrupt(e);
                    match op {
                        Op::Begin { reply, .. } => drop(reply.send(Err(corrupt))),
                        Op::Write { reply, .. } => replies.push((reply, Err(corrupt))),
                    }
                    return Ok(false);
                }
                None => None,
            },
        };
        let (change, reply) = match op {
            Op::Begin { fingerprint, reply } => {
                // Leases of another process are dead: only one process can have this file
                // open.
                let dead_owner = |owner: &str| !owner.starts_with(&self.process);
                let claim = new_claim(&self.process);
                let (begin, claimed) = decide_begin(
                    existing,
                    &fingerprint,
                    &claim,
                    now,
                    self.lifetimes,
                    dead_owner,
                );
                let _ = reply.send(Ok(begin));
                if let Some(record) = claimed {
                    self.pending.insert(id, record);
                }
                return Ok(false);
            }
            Op::Write { change, reply } => (change, reply),
        };
        let write = self.changed(existing, change, now);
        replies.push((reply, Ok(())));
        let Some(record) = write else {
            return Ok(false);
        };
        records.insert(id.as_str(), encode(&record).as_slice())?;
        self.puts_since_sweep += 1;
        // Another delivery's live claim stays in memory; ours ends here.
        if record.lease_owner.is_some() {
            self.pending.insert(id, record);
        } else {
            self.pending.remove(&id);
        }
        Ok(true)
    }

    /// The record after `change`, when there is one to write: a remembered result is kept for
    /// the keep time from now (a command retried for long is kept longer than its first claim
    /// said); a release only ends this claim.
    fn changed(&self, existing: Option<Record>, change: Change, now: u64) -> Option<Record> {
        let mut record = existing?;
        match change {
            Change::MarkChatDeleted => record.chat_deleted = true,
            Change::Remember { claim, result } => {
                if record.lease_owner.as_deref() == Some(claim.as_str()) {
                    record.lease_owner = None;
                }
                record.result = Some(result);
                let keep_until = now + self.lifetimes.keep.as_millis() as u64;
                record.expires_ms = record.expires_ms.max(keep_until);
            }
            Change::Release { claim } => {
                if record.lease_owner.as_deref() != Some(claim.as_str()) {
                    return None;
                }
                record.lease_owner = None;
            }
        }
        Some(record)
    }

    /// Forgets expired records, walking on from where the last sweep stopped, and writes out
    /// claims past their lease (a delivery stuck or dropped), so memory holds only live work
    /// and a late `remember` still finds its record. Returns whether anything changed.
    fn sweep(&mut self, records: &mut Records<'_>, now: u64) -> Result<bool, redb::Error> {
        let mut changed = false;
        let lapsed: Vec<(String, Record)> = self
            .pending
            .extract_if(|_, r| r.lease_until_ms <= now)
            .collect();
        for (id, record) in lapsed {
            records.insert(id.as_str(), encode(&record).as_slice())?;
            changed = true;
        }
        // Walking twice as many records as were written since the last sweep keeps up with
        // any write rate.
        let budget = SWEEP_MIN.max(2 * self.puts_since_sweep);
        self.puts_since_sweep = 0;
        let start = match &self.sweep_from {
            Some(key) => Bound::Excluded(key.as_str()),
            None => Bound::Unbounded,
        };
        let mut expired = Vec::new();
        let mut last = String::new();
        let mut seen = 0;
        for entry in records
            .range::<&str>((start, Bound::Unbounded))?
            .take(budget)
        {
            let (key, value) = entry?;
            seen += 1;
            if expires_of(value.value()).is_some_and(|at| at <= now) {
                expired.push(key.value().to_owned());
            }
            last.clear();
            last.push_str(key.value());
        }
        // A walk that ran out of records starts over next time.
        self.sweep_from = (seen == budget).then_some(last);
        for id in expired {
            if !self.pending.contains_key(&id) {
                records.remove(id.as_str())?;
                changed = true;
            }
        }
        Ok(changed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::codec::tests::record;
    use super::*;

    const L: Lifetimes = Lifetimes {
        lease: Duration::from_secs(60),
        keep: Duration::from_secs(600),
    };

    #[test]
    fn a_sweep_forgets_expired_records_but_not_live_claims() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("s.redb")).unwrap());
        let mut writer = Writer::new(db.clone(), "p".into(), L);
        let now = 10_000;
        let txn = db.begin_write().unwrap();
        {
            let mut records = txn.open_table(RECORDS).unwrap();
            let put = |records: &mut Records<'_>, id: &str, r: &Record| {
                records.insert(id, encode(r).as_slice()).unwrap();
            };
            put(&mut records, "old", &record(now - 1, None));
            put(&mut records, "live", &record(now + 1, None));
            put(&mut records, "reclaimed", &record(now - 1, None));
            // Claimed again in memory (its lease runs): the sweep leaves it to the claim.
            let mut claim = record(now + 1, None);
            claim.lease_until_ms = now + 1;
            writer.pending.insert("reclaimed".into(), claim);
            assert!(writer.sweep(&mut records, now).unwrap());
            assert!(records.get("old").unwrap().is_none());
            assert!(records.get("live").unwrap().is_some());
            assert!(records.get("reclaimed").unwrap().is_some());
            assert_eq!(writer.sweep_from, None, "the walk reached the end");
            // A claim past its lease goes to disk and leaves memory.
            writer.pending.get_mut("reclaimed").unwrap().lease_until_ms = now;
            writer.sweep(&mut records, now).unwrap();
            assert!(writer.pending.is_empty());
            let stored = decode(records.get("reclaimed").unwrap().unwrap().value()).unwrap();
            assert_eq!(stored.expires_ms, now + 1);
        }
        txn.commit().unwrap();
    }
}
