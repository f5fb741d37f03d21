//! The embedded store: one redb file, owned by one worker process at a time (redb locks it).
//! Writes from all commands are grouped into shared transactions by one writer thread, so a
//! busy worker pays one fsync per batch, and every caller still hears back only after its
//! write is durable.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::{
    Begin, Fingerprint, IdempotencyStore, Lifetimes, Record, Remembered, StoreError, decide_begin,
    new_claim, now_ms,
};

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
/// (expires_ms, id): lets the writer forget expired records without a full scan.
const EXPIRY: TableDefinition<(u64, &str), ()> = TableDefinition::new("expiry");
/// Most operations committed together.
const MAX_BATCH: usize = 1024;
const SWEEP_EVERY: Duration = Duration::from_secs(60);
const CACHE_BYTES: usize = 32 * 1024 * 1024;
const EXPIRY_SLACK_MS: u64 = 60_000;

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
    ops: mpsc::UnboundedSender<(String, Op)>,
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
            txn.open_table(EXPIRY).map_err(err)?;
            txn.commit().map_err(err)?;
        }
        let (ops, rx) = mpsc::unbounded_channel();
        let process = uuid::Uuid::new_v4().simple().to_string();
        let writer_db = db.clone();
        std::thread::Builder::new()
            .name("idempotency-writer".into())
            .spawn(move || writer(writer_db, rx, process, lifetimes))
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

fn writer(
    db: Arc<Database>,
    mut rx: mpsc::UnboundedReceiver<(String, Op)>,
    process: String,
    lifetimes: Lifetimes,
) {
    let mut last_sweep = Instant::now();
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let sweep = last_sweep.elapsed() >= SWEEP_EVERY;
        if sweep {
            last_sweep = Instant::now();
        }
        let mut replies: Vec<(Reply, Result<Begin, StoreError>)> = Vec::with_capacity(batch.len());
        let committed = apply_batch(&db, batch, &process, lifetimes, sweep, &mut replies);
        for (reply, answer) in replies {
            // A failed commit fails every operation of the batch: none of them is durable.
            let answer = match &committed {
                Ok(()) => answer,
                Err(e) => Err(err(e)),
            };
            let _ = reply.send(answer);
        }
    }
}

fn apply_batch(
    db: &Database,
    batch: Vec<(String, Op)>,
    process: &str,
    lifetimes: Lifetimes,
    sweep: bool,
    replies: &mut Vec<(Reply, Result<Begin, StoreError>)>,
) -> Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut records = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
        let mut expiry = txn.open_table(EXPIRY).map_err(|e| e.to_string())?;
        let now = now_ms();
        // Leases of another process are dead: only one process can have this file open.
        let dead_owner = |owner: &str| !owner.starts_with(process);
        for (id, op) in batch {
            let existing = match records.get(id.as_str()) {
                Ok(Some(bytes)) => match serde_json::from_slice::<Record>(bytes.value()) {
                    Ok(record) => Some(record),
                    Err(e) => {
                        let reply = reply_of(op);
                        replies.push((reply, Err(StoreError::Corrupt(e.to_string()))));
                        continue;
                    }
                },
                Ok(None) => None,
                Err(e) => return Err(e.to_string()),
            };
            let old_expiry = existing.as_ref().map(|r| r.expires_ms);
            let (reply, answer, write) = match op {
                Op::Begin { fingerprint, reply } => {
                    let claim = new_claim(process);
                    let (begin, write) =
                        decide_begin(existing, &fingerprint, &claim, now, lifetimes, dead_owner);
                    // A claim need not be durable: after a crash the dead process's claims are
                    // void anyway, so its answer does not wait for the commit.
                    let _ = reply.send(Ok(begin));
                    if let Some(record) = write {
                        put(&mut records, &mut expiry, &id, old_expiry, &record)?;
                    }
                    continue;
                }
                Op::MarkChatDeleted { reply } => {
                    let write = existing.map(|mut r| {
                        r.chat_deleted = true;
                        r
                    });
                    (reply, Ok(Begin::Busy), write)
                }
                Op::Remember {
                    claim,
                    result,
                    reply,
                } => {
                    let write = existing.map(|mut r| {
                        if r.lease_owner.as_deref() == Some(claim.as_str()) {
                            r.lease_owner = None;
                        }
                        r.result = Some(result);
                        // Kept from the claim's time on; the expiry index is only rewritten
                        // when that is more than a minute short (a command retried for long).
                        let keep_until = now + lifetimes.keep.as_millis() as u64;
                        if r.expires_ms + EXPIRY_SLACK_MS < keep_until {
                            r.expires_ms = keep_until;
                        }
                        r
                    });
                    (reply, Ok(Begin::Busy), write)
                }
                Op::Release { claim, reply } => {
                    let write = existing.and_then(|mut r| {
                        (r.lease_owner.as_deref() == Some(claim.as_str())).then(|| {
                            r.lease_owner = None;
                            r
                        })
                    });
                    (reply, Ok(Begin::Busy), write)
                }
            };
            if let Some(record) = write {
                put(&mut records, &mut expiry, &id, old_expiry, &record)?;
            }
            replies.push((reply, answer));
        }
        if sweep {
            let expired: Vec<(u64, String)> = expiry
                .range(..(now, ""))
                .map_err(|e| e.to_string())?
                .take(10_000)
                .filter_map(|entry| {
                    entry
                        .ok()
                        .map(|(k, _)| (k.value().0, k.value().1.to_owned()))
                })
                .collect();
            for (at, id) in expired {
                expiry
                    .remove((at, id.as_str()))
                    .map_err(|e| e.to_string())?;
                records.remove(id.as_str()).map_err(|e| e.to_string())?;
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

type Records<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type Expiry<'t> = redb::Table<'t, (u64, &'static str), ()>;

/// Writes a record and keeps the expiry index in step.
fn put(
    records: &mut Records<'_>,
    expiry: &mut Expiry<'_>,
    id: &str,
    old_expiry: Option<u64>,
    record: &Record,
) -> Result<(), String> {
    let bytes = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    records
        .insert(id, bytes.as_slice())
        .map_err(|e| e.to_string())?;
    if old_expiry != Some(record.expires_ms) {
        if let Some(old) = old_expiry {
            expiry.remove((old, id)).map_err(|e| e.to_string())?;
        }
        expiry
            .insert((record.expires_ms, id), ())
            .map_err(|e| e.to_string())?;
    }
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
