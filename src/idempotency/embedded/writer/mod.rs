//! The writer thread: the only one that writes the file (and opens it again). Operations from
//! all commands are grouped into shared transactions, so a busy worker pays one fsync per
//! group, and every caller hears back only after its write is durable; an answer that reads a
//! write of the same group waits for its commit too. A failed commit fails every write of its
//! group, and the file is opened again before the next one (redb asks for that after an I/O
//! error). At a trickle, claims are decided beside it ([`Claims::begin`]), so a command does
//! not wait behind another group's fsync to start.

use std::collections::HashSet;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, mpsc};
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::oneshot;
use tokio::time::Instant;

mod claims;

pub(super) use claims::Claims;
use claims::{Entry, read};

use super::codec::{decode, encode, expires_of};
use crate::contract::Deletion;
use crate::idempotency::{Begin, Fingerprint, Record, Remembered, StoreError, now_ms};

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
/// redb's default cache (1 GiB) would grow with the number of ids; records are small.
const CACHE_BYTES: usize = 8 * 1024 * 1024;
/// An expiry index of earlier versions; dropped on open (the sweep walks the records now,
/// which costs less than one more B-tree insert per command).
const OLD_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");

/// Opens (or creates) the file; fails if another process has it open.
pub(super) fn open(path: &std::path::Path) -> Result<Database, redb::Error> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)?;
    let txn = db.begin_write()?;
    txn.open_table(RECORDS)?;
    txn.delete_table(OLD_EXPIRY)?;
    txn.commit()?;
    Ok(db)
}

/// What a command asks of the writer, with where the answer goes.
pub(super) enum Op {
    /// May this fingerprint work on the id? Answered at once, unless the answer reads a write
    /// that is not committed yet.
    Begin {
        fingerprint: Fingerprint,
        claim: String,
        reply: oneshot::Sender<Result<Begin, StoreError>>,
    },
    /// Is the claim still this one? Extends its lease (claims live in memory).
    Renew {
        claim: String,
        fingerprint: Fingerprint,
        reply: oneshot::Sender<Result<bool, StoreError>>,
    },
    /// A change to the id's record, answered once it is committed.
    Write {
        change: Change,
        reply: oneshot::Sender<Result<Written, StoreError>>,
    },
    /// Whether the file can be read (`/readyz`).
    Ping { reply: oneshot::Sender<bool> },
    /// Holds the writer until the sender is dropped, as a slow fsync would (tests).
    #[cfg(test)]
    Stall(mpsc::Receiver<()>),
}

pub(super) enum Change {
    /// The claim's record, written as it is (its first-seen time made durable).
    Intent {
        claim: String,
        fingerprint: Fingerprint,
        seen_ms: u64,
    },
    MarkChatDeleted {
        claim: String,
        fingerprint: Fingerprint,
        deletion: Deletion,
    },
    Remember {
        claim: String,
        fingerprint: Fingerprint,
        result: Remembered,
    },
    Release {
        claim: String,
    },
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Written {
    Done,
    /// Another delivery of the same request remembered this result first; it stays.
    Kept(Remembered),
}

/// The writer thread's state.
pub(super) struct Writer {
    claims: Arc<Claims>,
    path: PathBuf,
    last_sweep: Instant,
    /// Where the next sweep goes on walking the records (`None`: from the start).
    sweep_from: Option<String>,
    /// Records written since the last sweep.
    puts_since_sweep: usize,
    /// Commits still to fail, as a full disk would (tests).
    #[cfg(test)]
    fail_commits: usize,
}

type Records<'t> = redb::Table<'t, &'static str, &'static [u8]>;

/// Answers held back until their group's commit.
#[derive(Default)]
struct Deferred {
    writes: Vec<(oneshot::Sender<Result<Written, StoreError>>, Written)>,
    begins: Vec<(oneshot::Sender<Result<Begin, StoreError>>, Begin)>,
    /// Ids written in this group: a begin that reads one waits for the commit.
    written: HashSet<String>,
    /// Operations that could not be applied (the file could not be opened).
    unapplied: Vec<Op>,
}

impl Deferred {
    /// Sends every held answer: as decided when the commit went through, else the error.
    fn release(self, failed: Option<Arc<redb::Error>>) {
        let fail = |e: &Arc<redb::Error>| StoreError::Embedded(e.clone());
        for (reply, written) in self.writes {
            let _ = reply.send(failed.as_ref().map_or(Ok(written), |e| Err(fail(e))));
        }
        for (reply, begin) in self.begins {
            let _ = reply.send(failed.as_ref().map_or(Ok(begin), |e| Err(fail(e))));
        }
        let Some(error) = failed else {
            return;
        };
        for op in self.unapplied {
            match op {
                Op::Begin { reply, .. } => drop(reply.send(Err(fail(&error)))),
                Op::Renew { reply, .. } => drop(reply.send(Err(fail(&error)))),
                Op::Write { reply, .. } => drop(reply.send(Err(fail(&error)))),
                Op::Ping { reply } => drop(reply.send(false)),
                #[cfg(test)]
                Op::Stall(_) => {}
            }
        }
    }
}

impl Writer {
    pub(super) fn new(claims: Arc<Claims>, path: PathBuf) -> Self {
        Self {
            claims,
            path,
            last_sweep: Instant::now(),
            sweep_from: None,
            puts_since_sweep: 0,
            #[cfg(test)]
            fail_commits: 0,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<(String, Op)>) {
        while let Ok(first) = rx.recv() {
            let written = self.commit_group(first, &rx, self.claims.writer_is_busy());
            let busy = written.is_some_and(|writes| writes >= BUSY_GROUP);
            self.claims.busy.store(busy, Ordering::Relaxed);
        }
    }

    /// One group: applied, committed, settled, answered. Returns the number of records
    /// written, `None` when the commit failed.
    fn commit_group(
        &mut self,
        first: (String, Op),
        rx: &mpsc::Receiver<(String, Op)>,
        busy: bool,
    ) -> Option<usize> {
        let mut deferred = Deferred::default();
        let committed = self.apply_group(first, rx, busy, &mut deferred);
        if let Err(error) = &committed {
            tracing::warn!(%error, "Idempotency store commit failed; reopening the file.");
            // redb wants the file opened again after an I/O error; the claims in memory stay
            // valid.
            self.close();
        }
        self.settle(&deferred.written);
        let written = committed.as_ref().ok().copied();
        deferred.release(committed.err().map(Arc::new));
        written
    }

    /// A write transaction on the open file, opened again after a failed commit.
    fn begin_write(&self) -> Result<redb::WriteTransaction, redb::Error> {
        if let Some(db) = read(&self.claims.db).as_ref() {
            return Ok(db.begin_write()?);
        }
        let mut slot = self
            .claims
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(open(&self.path)?);
        }
        Ok(slot.as_ref().expect("just opened").begin_write()?)
    }

    fn close(&self) {
        *self
            .claims
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// After a group's commit (or its failure): what it wrote is on disk (or not at all), so
    /// its ids leave memory unless a live claim holds them.
    fn settle(&self, written: &HashSet<String>) {
        let now = now_ms();
        let mut pending = self.claims.pending();
        for id in written {
            let Some(entry) = pending.get_mut(id) else {
                continue;
            };
            if entry.record.lease_owner.is_some() && entry.record.lease_until_ms > now {
                entry.unsettled = false;
            } else {
                pending.remove(id);
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
        deferred: &mut Deferred,
    ) -> Result<usize, redb::Error> {
        let txn = match self.begin_write() {
            Ok(txn) => txn,
            Err(error) => {
                // Nothing can be read or written: every operation of the group fails.
                deferred.unapplied.push(first.1);
                deferred.unapplied.extend(rx.try_iter().map(|(_, op)| op));
                return Err(error);
            }
        };
        let mut writes = 0;
        {
            let mut records = txn.open_table(RECORDS)?;
            let now = now_ms();
            let mut next = Some(first);
            let (mut ops, mut lingered) = (0, false);
            while let Some((id, op)) = next {
                writes += usize::from(self.apply(&mut records, id, op, now, deferred)?);
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
                writes += usize::from(self.sweep(&mut records, now, &mut deferred.written)?);
            }
        }
        if writes > 0 {
            #[cfg(test)]
            if self.fail_commits > 0 {
                self.fail_commits -= 1;
                txn.abort()?;
                let full = std::io::Error::from(std::io::ErrorKind::StorageFull);
                return Err(redb::StorageError::Io(full).into());
            }
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
        deferred: &mut Deferred,
    ) -> Result<bool, redb::Error> {
        if let Op::Ping { reply } = op {
            let _ = reply.send(true);
            return Ok(false);
        }
        #[cfg(test)]
        if let Op::Stall(until) = op {
            let _ = until.recv();
            return Ok(false);
        }
        let mut pending = self.claims.pending();
        // A claim in memory is newer than anything on disk: no need to read it.
        let existing = match pending.get(&id) {
            Some(entry) => Some(entry.record.clone()),
            None => match records.get(id.as_str())?.map(|b| decode(b.value())) {
                Some(Ok(record)) => Some(record),
                Some(Err(e)) => {
                    let corrupt = StoreError::Corrupt(e);
                    match op {
                        Op::Begin { reply, .. } => drop(reply.send(Err(corrupt))),
                        Op::Renew { reply, .. } => drop(reply.send(Err(corrupt))),
                        Op::Write { reply, .. } => drop(reply.send(Err(corrupt))),
                        Op::Ping { .. } => unreachable!("answered above"),
                        #[cfg(test)]
                        Op::Stall(_) => unreachable!("answered above"),
                    }
                    return Ok(false);
                }
                None => None,
            },
        };
        let (change, reply) = match op {
            Op::Begin {
                fingerprint,
                claim,
                reply,
            } => {
                let (begin, claimed) = self.claims.decide(existing, &fingerprint, now, &claim);
                let unsettled = deferred.written.contains(&id);
                if unsettled {
                    deferred.begins.push((reply, begin));
                } else {
                    let _ = reply.send(Ok(begin));
                }
                if let Some(record) = claimed {
                    pending.insert(id, Entry { record, unsettled });
                }
                return Ok(false);
            }
            Op::Renew {
                claim,
                fingerprint,
                reply,
            } => {
                let renewed = self.renew(existing, &claim, fingerprint, now);
                if let Some(record) = renewed.clone() {
                    let unsettled = deferred.written.contains(&id);
                    pending.insert(id, Entry { record, unsettled });
                }
                let _ = reply.send(Ok(renewed.is_some()));
                return Ok(false);
            }
            Op::Write { change, reply } => (change, reply),
            Op::Ping { .. } => unreachable!("answered above"),
            #[cfg(test)]
            Op::Stall(_) => unreachable!("answered above"),
        };
        let (written, write) = match self.changed(existing, change, now) {
            Ok(changed) => changed,
            Err(error) => {
                let _ = reply.send(Err(error));
                return Ok(false);
            }
        };
        deferred.writes.push((reply, written));
        let Some(record) = write else {
            return Ok(false);
        };
        records.insert(id.as_str(), encode(&record).as_slice())?;
        self.puts_since_sweep += 1;
        // In memory until the commit is over ([`Writer::settle`]).
        let unsettled = true;
        pending.insert(id.clone(), Entry { record, unsettled });
        deferred.written.insert(id);
        Ok(true)
    }

    /// The claim's record with its lease extended, when the claim is still `claim`'s; a record
    /// that vanished is claimed again (nobody else holds it).
    fn renew(
        &self,
        existing: Option<Record>,
        claim: &str,
        fingerprint: Fingerprint,
        now: u64,
    ) -> Option<Record> {
        let lease_until_ms = now + self.claims.lifetimes.claim.as_millis() as u64;
        let Some(mut record) = existing else {
            return Some(self.fresh(fingerprint, Some(claim), now));
        };
        let ours = record.fingerprint == fingerprint
            && record.result.is_none()
            && record.lease_owner.as_deref() == Some(claim);
        ours.then(|| {
            record.lease_until_ms = lease_until_ms;
            record.expires_ms = record.expires_ms.max(lease_until_ms);
            record
        })
    }

    /// A new record of this request.
    fn fresh(&self, fingerprint: Fingerprint, claim: Option<&str>, now: u64) -> Record {
        let lease_until_ms = now + self.claims.lifetimes.claim.as_millis() as u64;
        Record {
            fingerprint,
            expires_ms: now + self.claims.lifetimes.keep.as_millis() as u64,
            lease_owner: claim.map(str::to_owned),
            lease_until_ms,
            chat_deleted: false,
            result: None,
            seen_ms: now,
            deletion: None,
        }
    }

    /// What `change` makes of the record: the answer, and the record to write when there is
    /// one. A record that vanished (swept, or never written) is written again; a record of
    /// another request is never overwritten; a result already remembered stays.
    fn changed(
        &self,
        existing: Option<Record>,
        change: Change,
        now: u64,
    ) -> Result<(Written, Option<Record>), StoreError> {
        let (fingerprint, claim) = match &change {
            Change::MarkChatDeleted {
                fingerprint, claim, ..
            }
            | Change::Intent {
                fingerprint, claim, ..
            }
            | Change::Remember {
                fingerprint, claim, ..
            } => (Some(fingerprint), claim),
            Change::Release { claim } => (None, claim),
        };
        let mut record = match (existing, fingerprint) {
            (Some(record), Some(fingerprint)) if &record.fingerprint != fingerprint => {
                return Err(StoreError::Superseded);
            }
            (Some(record), _) => record,
            (None, Some(fingerprint)) => self.fresh(fingerprint.clone(), Some(claim), now),
            (None, None) => return Ok((Written::Done, None)),
        };
        let ours = record.lease_owner.as_deref() == Some(claim.as_str());
        match change {
            Change::Intent { seen_ms, .. } => {
                if seen_ms != 0 {
                    record.seen_ms = seen_ms;
                }
            }
            Change::MarkChatDeleted { deletion, .. } => {
                record.chat_deleted = true;
                record.deletion = Some(deletion);
            }
            Change::Remember { result, .. } => {
                if ours {
                    record.lease_owner = None;
                }
                if let Some(kept) = &record.result {
                    let kept = Written::Kept(kept.clone());
                    return Ok((kept, ours.then_some(record)));
                }
                record.result = Some(result);
                // Kept for the keep time from now (a command retried for long is kept longer
                // than its first claim said).
                let keep_until = now + self.claims.lifetimes.keep.as_millis() as u64;
                record.expires_ms = record.expires_ms.max(keep_until);
            }
            Change::Release { .. } => {
                if !ours {
                    return Ok((Written::Done, None));
                }
                record.lease_owner = None;
            }
        }
        Ok((Written::Done, Some(record)))
    }

    /// Forgets expired records, walking on from where the last sweep stopped, and writes out
    /// claims past their lease (a delivery stuck or dropped), so memory holds only live work
    /// and a late `remember` still finds its record. Returns whether anything changed.
    fn sweep(
        &mut self,
        records: &mut Records<'_>,
        now: u64,
        written: &mut HashSet<String>,
    ) -> Result<bool, redb::Error> {
        let mut changed = false;
        // Written out, and out of memory once committed ([`Writer::settle`]).
        for (id, entry) in self.claims.pending().iter_mut() {
            if entry.record.lease_until_ms <= now && !entry.unsettled {
                records.insert(id.as_str(), encode(&entry.record).as_slice())?;
                entry.unsettled = true;
                written.insert(id.clone());
                changed = true;
            }
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
        // A claim in memory (or one this sweep just wrote out) is not the old record. A claim
        // made after this look read the record as expired, as if it were gone already.
        let pending = self.claims.pending();
        expired.retain(|id| !pending.contains_key(id));
        drop(pending);
        for id in &expired {
            records.remove(id.as_str())?;
        }
        Ok(changed || !expired.is_empty())
    }
}

#[cfg(test)]
mod tests;
