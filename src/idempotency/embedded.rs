//! The embedded store: one redb file, owned by one worker process at a time (redb locks it).
//! Writes from all commands are grouped into shared transactions by one writer thread, so a
//! busy worker pays one fsync per batch, and every caller still hears back only after its
//! write is durable.
//!
//! Claims live in the writer's memory until there is something to keep (the chat delete
//! happened, a result, a released claim's fingerprint): a lease means nothing after the process
//! is gone, and only this process can have the file open, so a command that is answered at once
//! costs one record write, not two.
//!
//! Records are a small binary layout (expiry first, so the sweep reads it without decoding
//! the rest); records written as JSON by earlier versions are still read.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use tokio::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{
    Begin, Fingerprint, IdempotencyStore, Lifetimes, Record, Remembered, StoreError, decide_begin,
    new_claim, now_ms,
};

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// An expiry index of earlier versions; dropped on open (the sweep walks the records now,
/// which costs less than one more B-tree insert per command).
const OLD_EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
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
const CACHE_BYTES: usize = 8 * 1024 * 1024;
/// First byte of a record in the binary layout (a JSON record starts with `{`).
const FORMAT: u8 = 1;

enum Op {
    Begin {
        fingerprint: Fingerprint,
        reply: oneshot::Sender<Result<Begin, StoreError>>,
    },
    MarkChatDeleted {
        reply: oneshot::Sender<Result<Begin, StoreError>>,
    },
    Remember {
        claim: String,
        result: Remembered,
        reply: oneshot::Sender<Result<Begin, StoreError>>,
    },
    Release {
        claim: String,
        reply: oneshot::Sender<Result<Begin, StoreError>>,
    },
}

pub struct EmbeddedStore {
    ops: mpsc::Sender<(String, Op)>,
    db: Arc<Database>,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Embedded(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file. Fails if another process has it open.
    pub fn open(path: &Path, lifetimes: Lifetimes) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        // redb's default cache (1 GiB) would grow with the number of ids; records are small.
        let db = Arc::new(
            Database::builder()
                .set_cache_size(CACHE_BYTES)
                .create(path)
                .map_err(err)?,
        );
        {
            let txn = db.begin_write().map_err(err)?;
            txn.open_table(RECORDS).map_err(err)?;
            txn.delete_table(OLD_EXPIRY).map_err(err)?;
            txn.commit().map_err(err)?;
        }
        let (ops, rx) = mpsc::channel();
        let process = uuid::Uuid::new_v4().simple().to_string();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("idempotency-writer".into())
            .spawn(move || {
                Writer {
                    db: writer_db,
                    process,
                    lifetimes,
                    pending: HashMap::new(),
                    last_sweep: Instant::now(),
                    sweep_from: None,
                    puts_since_sweep: 0,
                }
                .run(rx)
            })
            .map_err(err)?;
        Ok(Self { ops, db })
    }

    async fn call(
        &self,
        id: &str,
        op: impl FnOnce(oneshot::Sender<Result<Begin, StoreError>>) -> Op,
    ) -> Result<Begin, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.ops
            .send((id.to_owned(), op(reply)))
            .map_err(|_| err("the writer thread stopped"))?;
        answer.await.map_err(|_| err("the writer thread stopped"))?
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for EmbeddedStore {
    async fn begin(&self, id: &str, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        let fingerprint = fingerprint.clone();
        self.call(id, |reply| Op::Begin { fingerprint, reply })
            .await
    }

    async fn mark_chat_deleted(&self, id: &str, _claim: &str) -> Result<(), StoreError> {
        self.call(id, |reply| Op::MarkChatDeleted { reply })
            .await
            .map(drop)
    }

    async fn remember(&self, id: &str, claim: &str, result: &Remembered) -> Result<(), StoreError> {
        let (claim, result) = (claim.to_owned(), result.clone());
        self.call(id, |reply| Op::Remember {
            claim,
            result,
            reply,
        })
        .await
        .map(drop)
    }

    async fn release(&self, id: &str, claim: &str) -> Result<(), StoreError> {
        let claim = claim.to_owned();
        self.call(id, |reply| Op::Release { claim, reply })
            .await
            .map(drop)
    }

    async fn ping(&self) -> bool {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.begin_read().is_ok())
            .await
            .unwrap_or(false)
    }
}

type Reply = oneshot::Sender<Result<Begin, StoreError>>;

/// The writer thread's state.
struct Writer {
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

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<(String, Op)>) {
        let mut busy = false;
        while let Ok(first) = rx.recv() {
            let mut replies = Vec::new();
            let committed = self.apply_group(first, &rx, busy, &mut replies);
            busy = matches!(committed, Ok(writes) if writes >= BUSY_GROUP);
            for (reply, answer) in replies {
                // A failed commit fails every operation of the group: none of them is durable.
                let answer = match &committed {
                    Ok(_) => answer,
                    Err(e) => Err(err(e)),
                };
                let _ = reply.send(answer);
            }
        }
    }

    /// Applies `first` and whatever else is queued (lingering for more when `busy`) in one
    /// transaction, and commits it. Begins are answered at once; the other replies are left
    /// in `replies`, for after the commit. Returns the number of records written.
    fn apply_group(
        &mut self,
        first: (String, Op),
        rx: &mpsc::Receiver<(String, Op)>,
        busy: bool,
        replies: &mut Vec<(Reply, Result<Begin, StoreError>)>,
    ) -> Result<usize, String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        let mut writes = 0;
        {
            let mut records = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
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
            txn.commit().map_err(|e| e.to_string())?;
        } else {
            // Claims and replays alone change nothing on disk: no commit, no fsync.
            txn.abort().map_err(|e| e.to_string())?;
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
        replies: &mut Vec<(Reply, Result<Begin, StoreError>)>,
    ) -> Result<bool, String> {
        // A claim in memory is newer than anything on disk: no need to read it.
        let existing = match self.pending.get(&id) {
            Some(claimed) => Some(claimed.clone()),
            None => match read(records, &id)? {
                Some(Ok(record)) => Some(record),
                Some(Err(e)) => {
                    replies.push((reply_of(op), Err(StoreError::Corrupt(e))));
                    return Ok(false);
                }
                None => None,
            },
        };
        let (reply, write) = match op {
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
            Op::MarkChatDeleted { reply } => (
                reply,
                existing.map(|mut r| {
                    r.chat_deleted = true;
                    r
                }),
            ),
            Op::Remember {
                claim,
                result,
                reply,
            } => (
                reply,
                existing.map(|mut r| {
                    if r.lease_owner.as_deref() == Some(claim.as_str()) {
                        r.lease_owner = None;
                    }
                    r.result = Some(result);
                    // Kept for the keep time from now (a command retried for long is kept
                    // longer than its first claim said).
                    r.expires_ms = r
                        .expires_ms
                        .max(now + self.lifetimes.keep.as_millis() as u64);
                    r
                }),
            ),
            Op::Release { claim, reply } => (
                reply,
                existing.and_then(|mut r| {
                    (r.lease_owner.as_deref() == Some(claim.as_str())).then(|| {
                        r.lease_owner = None;
                        r
                    })
                }),
            ),
        };
        replies.push((reply, Ok(Begin::Busy)));
        let Some(record) = write else {
            return Ok(false);
        };
        put(records, &id, &record)?;
        self.puts_since_sweep += 1;
        // Another delivery's live claim stays in memory; ours ends here.
        if record.lease_owner.is_some() {
            self.pending.insert(id, record);
        } else {
            self.pending.remove(&id);
        }
        Ok(true)
    }

    /// Forgets expired records, walking on from where the last sweep stopped, and writes out
    /// claims past their lease (a delivery stuck or dropped), so memory holds only live work
    /// and a late `remember` still finds its record. Returns whether anything changed.
    fn sweep(&mut self, records: &mut Records<'_>, now: u64) -> Result<bool, String> {
        let mut changed = false;
        let lapsed: Vec<(String, Record)> = self
            .pending
            .extract_if(|_, r| r.lease_until_ms <= now)
            .collect();
        for (id, record) in lapsed {
            put(records, &id, &record)?;
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
            .range::<&str>((start, Bound::Unbounded))
            .map_err(|e| e.to_string())?
            .take(budget)
        {
            let (key, value) = entry.map_err(|e| e.to_string())?;
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
                records.remove(id.as_str()).map_err(|e| e.to_string())?;
                changed = true;
            }
        }
        Ok(changed)
    }
}

/// The stored record of `id`: outer error for a failed read, inner for an undecodable record.
fn read(records: &Records<'_>, id: &str) -> Result<Option<Result<Record, String>>, String> {
    let bytes = records.get(id).map_err(|e| e.to_string())?;
    Ok(bytes.map(|b| decode(b.value())))
}

fn put(records: &mut Records<'_>, id: &str, record: &Record) -> Result<(), String> {
    records
        .insert(id, encode(record).as_slice())
        .map_err(|e| e.to_string())?;
    Ok(())
}

fn reply_of(op: Op) -> Reply {
    match op {
        Op::Begin { reply, .. }
        | Op::MarkChatDeleted { reply }
        | Op::Remember { reply, .. }
        | Op::Release { reply, .. } => reply,
    }
}

/// `FORMAT`, expires_ms, lease_until_ms (u64 LE), chat_deleted (u8), fingerprint and lease
/// owner (u16 LE length + UTF-8; an empty owner is no lease), then the remembered result as
/// JSON, or nothing.
fn encode(record: &Record) -> Vec<u8> {
    let mut out = Vec::with_capacity(160);
    out.push(FORMAT);
    out.extend_from_slice(&record.expires_ms.to_le_bytes());
    out.extend_from_slice(&record.lease_until_ms.to_le_bytes());
    out.push(u8::from(record.chat_deleted));
    for text in [
        record.fingerprint.0.as_str(),
        record.lease_owner.as_deref().unwrap_or(""),
    ] {
        let len = u16::try_from(text.len()).expect("fingerprints and claims are short");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    if let Some(result) = &record.result {
        serde_json::to_writer(&mut out, result).expect("a result serialises");
    }
    out
}

fn decode(bytes: &[u8]) -> Result<Record, String> {
    if bytes.first() == Some(&b'{') {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    }
    let truncated = || "truncated record".to_owned();
    let mut rest = match bytes.split_first() {
        Some((&FORMAT, rest)) => rest,
        _ => return Err("unknown record format".into()),
    };
    let mut take = |n: usize| -> Result<&[u8], String> {
        let (head, tail) = rest.split_at_checked(n).ok_or_else(truncated)?;
        rest = tail;
        Ok(head)
    };
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let expires_ms = u64_at(take(8)?);
    let lease_until_ms = u64_at(take(8)?);
    let chat_deleted = take(1)?[0] != 0;
    let mut text = || -> Result<String, String> {
        let len = u16::from_le_bytes(take(2)?.try_into().expect("2 bytes"));
        String::from_utf8(take(usize::from(len))?.to_vec()).map_err(|e| e.to_string())
    };
    let fingerprint = Fingerprint(text()?);
    let lease_owner = Some(text()?).filter(|owner| !owner.is_empty());
    let result = match rest {
        [] => None,
        json => Some(serde_json::from_slice::<Remembered>(json).map_err(|e| e.to_string())?),
    };
    Ok(Record {
        fingerprint,
        expires_ms,
        lease_owner,
        lease_until_ms,
        chat_deleted,
        result,
    })
}

/// A record's expiry, read without decoding the rest.
fn expires_of(bytes: &[u8]) -> Option<u64> {
    match bytes.first() {
        Some(&FORMAT) => bytes
            .get(1..9)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))),
        _ => decode(bytes).ok().map(|r| r.expires_ms),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::Outcome;

    const L: Lifetimes = Lifetimes {
        lease: Duration::from_secs(60),
        keep: Duration::from_secs(600),
    };

    fn on_disk(store: &EmbeddedStore, id: &str) -> Option<Record> {
        let txn = store.db.begin_read().unwrap();
        let table = txn.open_table(RECORDS).unwrap();
        let bytes = table.get(id).unwrap();
        bytes.map(|b| decode(b.value()).unwrap())
    }

    fn record(expires_ms: u64, result: Option<Remembered>) -> Record {
        Record {
            fingerprint: Fingerprint("f".repeat(64)),
            expires_ms,
            lease_owner: Some("process/7".into()),
            lease_until_ms: 42,
            chat_deleted: true,
            result,
        }
    }

    #[test]
    fn records_round_trip_and_json_records_of_earlier_versions_are_read() {
        let done = Remembered {
            outcome: Outcome::InvalidNumber,
            attempts: 3,
        };
        for original in [record(1_000, None), record(2_000, Some(done))] {
            let bytes = encode(&original);
            let back = decode(&bytes).unwrap();
            assert_eq!(format!("{back:?}"), format!("{original:?}"));
            assert_eq!(expires_of(&bytes), Some(original.expires_ms));
            let json = serde_json::to_vec(&original).unwrap();
            assert_eq!(
                format!("{:?}", decode(&json).unwrap()),
                format!("{original:?}")
            );
            assert_eq!(expires_of(&json), Some(original.expires_ms));
        }
        let bytes = encode(&record(1, None));
        assert!(decode(&bytes[..bytes.len() - 1]).is_err(), "truncated");
        assert!(decode(b"\x07junk").is_err(), "unknown layout");
    }

    #[test]
    fn a_sweep_forgets_expired_records_but_not_live_claims() {
        let dir = tempfile::tempdir().unwrap();
        let db = Arc::new(Database::create(dir.path().join("s.redb")).unwrap());
        let mut writer = Writer {
            db: db.clone(),
            process: "p".into(),
            lifetimes: L,
            pending: HashMap::new(),
            last_sweep: Instant::now(),
            sweep_from: None,
            puts_since_sweep: 0,
        };
        let now = 10_000;
        let txn = db.begin_write().unwrap();
        {
            let mut records = txn.open_table(RECORDS).unwrap();
            put(&mut records, "old", &record(now - 1, None)).unwrap();
            put(&mut records, "live", &record(now + 1, None)).unwrap();
            put(&mut records, "reclaimed", &record(now - 1, None)).unwrap();
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
            let stored = read(&records, "reclaimed").unwrap().unwrap().unwrap();
            assert_eq!(stored.expires_ms, now + 1);
        }
        txn.commit().unwrap();
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
