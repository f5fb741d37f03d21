//! The writer thread: the only one that writes the file (and opens it again). Operations from
//! all commands are grouped into shared transactions, so a busy worker pays one fsync per
//! group, and every caller hears back only after its write is durable; an answer that reads a
//! write of the same group waits for its commit too. A failed commit fails every write of its
//! group, and the file is opened again before the next one (redb asks for that after an I/O
//! error). Answers that no write can change any more are read beside it ([`settled`]).

use std::collections::{HashMap, HashSet};
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, mpsc};
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
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
/// redb's default cache (1 GiB) would grow with the number of ids; records are small.
const CACHE_BYTES: usize = 8 * 1024 * 1024;
/// An expiry index of earlier versions; dropped on open (the sweep walks the records now,
/// which costs less than one more B-tree insert per command).
const OLD_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");

/// The open file, shared by the writer and the readers of settled answers; `None` after a
/// failed commit, until the writer opens it again.
pub(super) type SharedDb = Arc<RwLock<Option<Database>>>;

fn read(db: &SharedDb) -> RwLockReadGuard<'_, Option<Database>> {
    db.read().unwrap_or_else(PoisonError::into_inner)
}

/// The answer to a begin when the committed records already settle it: a result kept for this
/// request (a replay) or a record of another request (a conflict). Until the record expires,
/// no write changes either (results are never replaced, fingerprints never rewritten), so no
/// claim in the writer's memory can disagree; and a read sees only committed writes, so nothing
/// is replayed that could still be lost. Anything else is the writer's to decide.
pub(super) fn settled(db: &SharedDb, id: &str, fingerprint: &Fingerprint) -> Option<Begin> {
    let open = read(db);
    let txn = open.as_ref()?.begin_read().ok()?;
    let value = txn.open_table(RECORDS).ok()?.get(id).ok()??;
    let record = decode(value.value()).ok()?;
    if record.expires_ms <= now_ms() {
        return None;
    }
    if &record.fingerprint != fingerprint {
        return Some(Begin::Conflict);
    }
    record.result.map(Begin::Replay)
}

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
}

pub(super) enum Change {
    MarkChatDeleted {
        claim: String,
        fingerprint: Fingerprint,
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
    db: SharedDb,
    path: PathBuf,
    process: String,
    lifetimes: Lifetimes,
    /// Records of claimed ids whose latest state is only in memory, by id.
    pending: HashMap<String, Record>,
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
            }
        }
    }
}

impl Writer {
    pub(super) fn new(db: SharedDb, path: PathBuf, process: String, lifetimes: Lifetimes) -> Self {
        Self {
            db,
            path,
            process,
            lifetimes,
            pending: HashMap::new(),
            last_sweep: Instant::now(),
            sweep_from: None,
            puts_since_sweep: 0,
            #[cfg(test)]
            fail_commits: 0,
        }
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<(String, Op)>) {
        let mut busy = false;
        while let Ok(first) = rx.recv() {
            let mut deferred = Deferred::default();
            let committed = self.apply_group(first, &rx, busy, &mut deferred);
            busy = matches!(committed, Ok(writes) if writes >= BUSY_GROUP);
            if let Err(error) = &committed {
                tracing::warn!(%error, "Idempotency store commit failed; reopening the file.");
                // redb wants the file opened again after an I/O error; the claims in memory
                // stay valid.
                self.close();
            }
            deferred.release(committed.err().map(Arc::new));
        }
    }

    /// A write transaction on the open file, opened again after a failed commit.
    fn begin_write(&self) -> Result<redb::WriteTransaction, redb::Error> {
        if let Some(db) = read(&self.db).as_ref() {
            return Ok(db.begin_write()?);
        }
        let mut slot = self.db.write().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(open(&self.path)?);
        }
        Ok(slot.as_ref().expect("just opened").begin_write()?)
    }

    fn close(&self) {
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = None;
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
                writes += usize::from(self.sweep(&mut records, now)?);
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
        // A claim in memory is newer than anything on disk: no need to read it.
        let existing = match self.pending.get(&id) {
            Some(claimed) => Some(claimed.clone()),
            None => match records.get(id.as_str())?.map(|b| decode(b.value())) {
                Some(Ok(record)) => Some(record),
                Some(Err(e)) => {
                    let corrupt = StoreError::Corrupt(e);
                    match op {
                        Op::Begin { reply, .. } => drop(reply.send(Err(corrupt))),
                        Op::Renew { reply, .. } => drop(reply.send(Err(corrupt))),
                        Op::Write { reply, .. } => drop(reply.send(Err(corrupt))),
                        Op::Ping { .. } => unreachable!("answered above"),
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
                if deferred.written.contains(&id) {
                    deferred.begins.push((reply, begin));
                } else {
                    let _ = reply.send(Ok(begin));
                }
                if let Some(record) = claimed {
                    self.pending.insert(id, record);
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
                    self.pending.insert(id, record);
                }
                let _ = reply.send(Ok(renewed.is_some()));
                return Ok(false);
            }
            Op::Write { change, reply } => (change, reply),
            Op::Ping { .. } => unreachable!("answered above"),
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
        // Another delivery's live claim stays in memory; ours ends here.
        if record.lease_owner.is_some() {
            self.pending.insert(id.clone(), record);
        } else {
            self.pending.remove(&id);
        }
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
        let lease_until_ms = now + self.lifetimes.lease.as_millis() as u64;
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
        let lease_until_ms = now + self.lifetimes.lease.as_millis() as u64;
        Record {
            fingerprint,
            expires_ms: now + self.lifetimes.keep.as_millis() as u64,
            lease_owner: claim.map(str::to_owned),
            lease_until_ms,
            chat_deleted: false,
            result: None,
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
            Change::MarkChatDeleted { fingerprint, claim }
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
            Change::MarkChatDeleted { .. } => record.chat_deleted = true,
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
                let keep_until = now + self.lifetimes.keep.as_millis() as u64;
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
    fn sweep(&mut self, records: &mut Records<'_>, now: u64) -> Result<bool, redb::Error> {
        let mut changed = false;
        let lapsed: Vec<(String, Record)> = self
            .pending
            .extract_if(|_, r| r.lease_until_ms <= now)
            .collect();
        let mut written = HashSet::new();
        for (id, record) in lapsed {
            records.insert(id.as_str(), encode(&record).as_slice())?;
            written.insert(id);
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
            // A claim in memory, or one this sweep just wrote out, is not the old record.
            if !self.pending.contains_key(&id) && !written.contains(&id) {
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
    use crate::contract::Outcome;

    const L: Lifetimes = Lifetimes {
        lease: Duration::from_secs(60),
        keep: Duration::from_secs(600),
    };

    fn writer(dir: &tempfile::TempDir) -> Writer {
        let path = dir.path().join("s.redb");
        let db = Arc::new(RwLock::new(Some(open(&path).unwrap())));
        Writer::new(db, path, "p".into(), L)
    }

    fn fp(s: &str) -> Fingerprint {
        Fingerprint(s.into())
    }

    fn begin(fingerprint: &str) -> (Op, oneshot::Receiver<Result<Begin, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        let fingerprint = fp(fingerprint);
        (Op::Begin { fingerprint, reply }, answer)
    }

    fn write(change: Change) -> (Op, oneshot::Receiver<Result<Written, StoreError>>) {
        let (reply, answer) = oneshot::channel();
        (Op::Write { change, reply }, answer)
    }

    fn remember(claim: &str, fingerprint: &str, outcome: Outcome) -> Change {
        Change::Remember {
            claim: claim.into(),
            fingerprint: fp(fingerprint),
            result: Remembered {
                outcome,
                attempts: 1,
            },
        }
    }

    /// Applies `ops` as one group, as the writer thread does, and returns whether it committed.
    fn group(writer: &mut Writer, ops: Vec<(&str, Op)>) -> bool {
        let (tx, rx) = mpsc::channel();
        let mut ops = ops.into_iter().map(|(id, op)| (id.to_owned(), op));
        let first = ops.next().unwrap();
        for op in ops {
            tx.send(op).unwrap();
        }
        let mut deferred = Deferred::default();
        let committed = writer.apply_group(first, &rx, false, &mut deferred);
        if committed.is_err() {
            writer.close();
        }
        let ok = committed.is_ok();
        deferred.release(committed.err().map(Arc::new));
        ok
    }

    fn claim_of(answer: oneshot::Receiver<Result<Begin, StoreError>>) -> String {
        match answer.blocking_recv().unwrap().unwrap() {
            Begin::Claimed { claim, .. } => claim,
            other => panic!("expected a claim, got {other:?}"),
        }
    }

    /// A begin that reads a result written in the same group is not answered before the
    /// commit; when the commit fails, it fails too, instead of replaying a result that was
    /// never stored.
    #[test]
    fn no_replay_from_a_write_that_did_not_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(&dir);
        let (op, answer) = begin("a");
        group(&mut writer, vec![("x", op)]);
        let claim = claim_of(answer);

        writer.fail_commits = 1;
        let (remembered, remember_answer) = write(remember(&claim, "a", Outcome::InvalidNumber));
        let (again, begin_answer) = begin("a");
        assert!(!group(&mut writer, vec![("x", remembered), ("x", again)]));
        assert!(remember_answer.blocking_recv().unwrap().is_err());
        assert!(
            matches!(
                begin_answer.blocking_recv().unwrap(),
                Err(StoreError::Embedded(_))
            ),
            "the begin waited for the commit and failed with it"
        );

        // The file is opened again; the same write now goes through and replays follow.
        let (remembered, remember_answer) = write(remember(&claim, "a", Outcome::InvalidNumber));
        let (again, begin_answer) = begin("a");
        assert!(group(&mut writer, vec![("x", remembered), ("x", again)]));
        assert_eq!(
            remember_answer.blocking_recv().unwrap().unwrap(),
            Written::Done
        );
        assert!(matches!(
            begin_answer.blocking_recv().unwrap().unwrap(),
            Begin::Replay(_)
        ));
    }

    /// Replays and conflicts read beside the writer come from committed records only: not
    /// from a claim in the writer's memory, a write still in its transaction, or an expired
    /// record.
    #[test]
    fn settled_answers_come_from_committed_records_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(&dir);
        let (op, _) = begin("a");
        group(&mut writer, vec![("claimed", op)]);
        assert_eq!(settled(&writer.db, "claimed", &fp("a")), None);
        assert_eq!(settled(&writer.db, "claimed", &fp("b")), None);

        let done = Remembered {
            outcome: Outcome::InvalidNumber,
            attempts: 1,
        };
        let (mine, other) = (fp(&"f".repeat(64)), fp("other"));
        let txn = writer.begin_write().unwrap();
        {
            let mut records = txn.open_table(RECORDS).unwrap();
            let live = encode(&record(now_ms() + 60_000, Some(done.clone())));
            records.insert("done", live.as_slice()).unwrap();
            let expired = encode(&record(now_ms() - 1, Some(done.clone())));
            records.insert("expired", expired.as_slice()).unwrap();
        }
        assert_eq!(
            settled(&writer.db, "done", &mine),
            None,
            "not committed yet"
        );
        txn.commit().unwrap();
        assert_eq!(
            settled(&writer.db, "done", &mine),
            Some(Begin::Replay(done))
        );
        assert_eq!(settled(&writer.db, "done", &other), Some(Begin::Conflict));
        assert_eq!(settled(&writer.db, "expired", &mine), None);
        assert_eq!(settled(&writer.db, "expired", &other), None);
    }

    /// Writes after a claim do not depend on the record still being there, never overwrite
    /// another request's record, and never replace a result already remembered.
    #[test]
    fn writes_recreate_vanished_records_and_respect_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(&dir);
        let (op, answer) = write(remember("p/1", "a", Outcome::InvalidBody));
        assert!(group(&mut writer, vec![("gone", op)]));
        assert_eq!(answer.blocking_recv().unwrap().unwrap(), Written::Done);
        let (op, answer) = begin("a");
        group(&mut writer, vec![("gone", op)]);
        assert!(matches!(
            answer.blocking_recv().unwrap().unwrap(),
            Begin::Replay(_)
        ));

        let (op, answer) = write(remember("p/2", "b", Outcome::InvalidNumber));
        group(&mut writer, vec![("gone", op)]);
        assert!(matches!(
            answer.blocking_recv().unwrap(),
            Err(StoreError::Superseded)
        ));
        let (op, answer) = write(remember("p/3", "a", Outcome::InvalidNumber));
        group(&mut writer, vec![("gone", op)]);
        assert!(
            matches!(answer.blocking_recv().unwrap().unwrap(), Written::Kept(r) if r.outcome == Outcome::InvalidBody)
        );

        let mark = Change::MarkChatDeleted {
            claim: "p/4".into(),
            fingerprint: fp("c"),
        };
        let (op, answer) = write(mark);
        group(&mut writer, vec![("marked", op)]);
        assert_eq!(answer.blocking_recv().unwrap().unwrap(), Written::Done);
        // The record came back with the claim that wrote it: others wait, then resume after
        // the delete.
        let (op, answer) = begin("c");
        group(&mut writer, vec![("marked", op)]);
        assert_eq!(answer.blocking_recv().unwrap().unwrap(), Begin::Busy);
        let (op, _) = write(Change::Release {
            claim: "p/4".into(),
        });
        let (again, answer) = begin("c");
        group(&mut writer, vec![("marked", op), ("marked", again)]);
        assert!(matches!(
            answer.blocking_recv().unwrap().unwrap(),
            Begin::Claimed {
                chat_deleted: true,
                ..
            }
        ));
    }

    #[test]
    fn a_sweep_forgets_expired_records_but_not_live_claims() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = writer(&dir);
        let now = 10_000;
        let txn = writer.begin_write().unwrap();
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
