//! The Redis store, for several workers sharing idempotency records. Each record is a hash
//! updated by Lua scripts, so a claim is atomic across workers; Redis's own clock times the
//! leases, so workers' clocks need not agree. Operations from all commands share script calls,
//! and looks for settled answers share pipelines: those queued while earlier calls are out go
//! together in the next one.
//!
//! Records carry their expiry as a field and in one sorted set (the key that is the prefix
//! alone: an id is never empty), swept by the workers, rather than as a key TTL: under a
//! `volatile-*` eviction policy Redis evicts only keys with a TTL, so a remembered result or a
//! half-done command is never evicted; a full Redis refuses writes instead, and commands wait.
//! Records written by earlier versions (with a TTL) are read as they are.

use std::sync::Arc;
use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{ErrorKind, Script};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    Begin, Fingerprint, Held, IdempotencyStore, Lifetimes, Remembered, SettledHint, StoreError,
    claim_name, now_ms,
};
use crate::contract::Deletion;

/// How long a Redis call may take before it counts as unanswered (the client's default).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_millis(500);

/// How the workers' Redis connections behave: calls answered within `response`, and after a
/// lost connection attempts a quarter of a second apart at most, so that a Redis back from an
/// outage is used again within a tick (the client's default backoff waits up to 3.2 s).
pub fn connection_config(response: Duration) -> ::redis::aio::ConnectionManagerConfig {
    ::redis::aio::ConnectionManagerConfig::new()
        .set_response_timeout(Some(response))
        .set_max_delay(Duration::from_millis(250))
}

/// `now` on Redis's clock, first in every script ([`crate::idempotency`]'s and ownership's).
pub const NOW: &str = include_str!("../../lua/now.lua");
/// The record operations (see the file), applied in order in one call.
const OPERATIONS: &str = include_str!("operations.lua");
/// Deletes expired records from the index, a batch at a time.
const SWEEP: &str = include_str!("sweep.lua");

/// How often each worker sweeps, and how many records at most per sweep (more sweeps follow
/// at once while there is more to do).
const SWEEP_EVERY: Duration = Duration::from_secs(10);
const SWEEP_BATCH: usize = 1_000;
/// Most operations (or looks) sent in one call, and most calls of each kind on their way at
/// once. They queue while calls are out, so under load each call carries many (one script run,
/// or one read of a pipeline, and one round trip for all of them); a lone one goes out at once.
const BATCH_MAX: usize = 256;
const CALLS_IN_FLIGHT: usize = 4;
/// Expiry times are on Redis's clock: a settled answer is read only from a record that this
/// worker's clock says has at least this long to live, so clocks that disagree by less change
/// nothing.
const CLOCK_MARGIN_MS: u64 = 60_000;

/// One record operation on its way to Redis: the script's nine values after the record's key.
struct Operation {
    name: &'static str,
    id: String,
    fingerprint: String,
    claim: String,
    a: String,
    b: String,
    /// The generation of the claim's instance lease (the asker's, for a begin).
    generation: u64,
    /// When the id was first seen, for a record written again (0 for a begin).
    seen: u64,
    /// A mark's: what the delete did (JSON).
    deletion: String,
    reply: oneshot::Sender<Result<Vec<String>, StoreError>>,
}

/// What a write that records an effect waits for before it counts as done: `replicas`
/// replicas acknowledging it (`WAIT`), within `timeout` (an unacknowledged write is an outage:
/// its command waits and asks again).
#[derive(Debug, Clone, Copy, Default)]
pub struct Durability {
    pub replicas: u32,
    pub timeout: Duration,
}

/// A record's fingerprint, result and expiry, as a look reads them.
type Settled = (Option<String>, Option<String>, Option<u64>);

/// One look for a settled answer on its way to Redis.
struct Look {
    key: String,
    reply: oneshot::Sender<Result<Settled, StoreError>>,
}

pub struct RedisStore {
    connection: ConnectionManager,
    operations: mpsc::UnboundedSender<Operation>,
    looks: mpsc::UnboundedSender<Look>,
    prefix: String,
    process: String,
    lifetimes: Lifetimes,
    hint: SettledHint,
}

impl RedisStore {
    pub async fn connect(
        url: &str,
        prefix: &str,
        lifetimes: Lifetimes,
    ) -> Result<Self, StoreError> {
        Self::connect_durable(url, prefix, lifetimes, Durability::default()).await
    }

    /// As [`Self::connect`], with writes that record an effect waiting for `durability`.
    pub async fn connect_durable(
        url: &str,
        prefix: &str,
        lifetimes: Lifetimes,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let client = ::redis::Client::open(url)?;
        // A `WAIT` must be answered before the connection gives up on it.
        let answer_within = RESPONSE_TIMEOUT.max(durability.timeout + Duration::from_millis(200));
        let config = connection_config(answer_within);
        let connecting = ConnectionManager::new_with_config(client, config);
        let connection = tokio::time::timeout(Duration::from_secs(10), connecting)
            .await
            .map_err(|_| {
                ::redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
            })??;
        warn_unless_durable(&mut connection.clone(), durability).await;
        tokio::spawn(sweep(
            connection.clone(),
            prefix.to_owned(),
            Script::new(&format!("{NOW}{SWEEP}")),
        ));
        let script = Arc::new(Script::new(&format!("{NOW}{OPERATIONS}")));
        let (operations, queued) = mpsc::unbounded_channel();
        let (to_script, owned_prefix) = (connection.clone(), prefix.to_owned());
        tokio::spawn(send_batches(queued, move |batch| {
            run_script(
                script.clone(),
                owned_prefix.clone(),
                to_script.clone(),
                durability,
                batch,
            )
        }));
        let (looks, queued) = mpsc::unbounded_channel();
        let to_read = connection.clone();
        tokio::spawn(send_batches(queued, move |batch| {
            read_records(to_read.clone(), batch)
        }));
        Ok(Self {
            connection,
            operations,
            looks,
            prefix: prefix.to_owned(),
            process: uuid::Uuid::new_v4().simple().to_string(),
            lifetimes,
            hint: SettledHint::default(),
        })
    }

    /// The connection, for other state the workers share in the same Redis (pacing).
    pub fn connection(&self) -> ConnectionManager {
        self.connection.clone()
    }

    /// A replay or a conflict read with a plain `HMGET` (no script; in whatever pipeline it
    /// joins), when the record settles it: a result is never replaced and a fingerprint never
    /// rewritten before the record expires. Records of earlier versions (timed by a TTL) are
    /// left to the script.
    async fn settled(
        &self,
        id: &str,
        fingerprint: &Fingerprint,
    ) -> Result<Option<Begin>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let key = format!("{}{id}", self.prefix);
        self.looks
            .send(Look { key, reply })
            .map_err(|_| stopped())?;
        let (stored, result, expires) = answer.await.map_err(|_| stopped())??;
        let (Some(stored), Some(expires)) = (stored, expires) else {
            return Ok(None);
        };
        if expires <= now_ms() + CLOCK_MARGIN_MS {
            return Ok(None);
        }
        if stored != fingerprint.0 {
            return Ok(Some(Begin::Conflict));
        }
        result
            .map(|json| decode_result(&json).map(Begin::Replay))
            .transpose()
    }

    /// Runs one operation on `held`'s record (in whatever batch it joins) and returns its
    /// answer.
    async fn run(
        &self,
        name: &'static str,
        held: Held,
        a: String,
        b: String,
    ) -> Result<Vec<String>, StoreError> {
        self.run_with(name, held, a, b, String::new()).await
    }

    async fn run_with(
        &self,
        name: &'static str,
        held: Held,
        a: String,
        b: String,
        deletion: String,
    ) -> Result<Vec<String>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let operation = Operation {
            name,
            id: held.id,
            fingerprint: held.fingerprint.0,
            claim: held.claim,
            a,
            b,
            generation: held.generation,
            seen: held.seen_ms,
            deletion,
            reply,
        };
        self.operations.send(operation).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// An operation on a held claim whose two extra values are the lease and keep times.
    async fn on_claim(&self, name: &'static str, held: &Held) -> Result<Vec<String>, StoreError> {
        let (lease, keep) = (self.claim_ms(), self.keep_ms());
        let (a, b) = (lease.to_string(), keep.to_string());
        self.run(name, held.clone(), a, b).await
    }

    fn claim_ms(&self) -> u64 {
        self.lifetimes.claim.as_millis() as u64
    }

    fn keep_ms(&self) -> u64 {
        self.lifetimes.keep.as_millis() as u64
    }
}

/// Says so when a remembered result could be lost while its answer is out: a Redis that does
/// not fsync every write (a host crash loses up to a second of them) and no replica to wait
/// for. Managed servers that refuse `CONFIG` are left alone.
async fn warn_unless_durable(connection: &mut ConnectionManager, durability: Durability) {
    if durability.replicas > 0 {
        return;
    }
    let config: ::redis::RedisResult<Vec<String>> = ::redis::cmd("CONFIG")
        .arg("GET")
        .arg("append*")
        .query_async(connection)
        .await;
    let Ok(config) = config else { return };
    let get = |key: &str| {
        let at = config.iter().position(|k| k == key)?;
        config.get(at + 1).map(String::as_str)
    };
    if get("appendonly") != Some("yes") || get("appendfsync") != Some("always") {
        tracing::warn!(
            appendonly = get("appendonly").unwrap_or("?"),
            appendfsync = get("appendfsync").unwrap_or("?"),
            "The idempotency Redis does not fsync every write and no replica is waited for \
             (idempotency.redis_wait_replicas): a crash of its host can forget answered results, \
             and a duplicate of one would be deleted again."
        );
    }
}

fn stopped() -> StoreError {
    StoreError::Corrupt("the Redis batching task stopped".into())
}

/// Sends what is queued in calls made by `call`: all that waits (up to `BATCH_MAX`) when a
/// call may go out goes in it.
async fn send_batches<T, F, Sending>(mut queued: mpsc::UnboundedReceiver<T>, mut call: F)
where
    T: Send + 'static,
    F: FnMut(Vec<T>) -> Sending,
    Sending: Future<Output = ()> + Send + 'static,
{
    let calls = Arc::new(Semaphore::new(CALLS_IN_FLIGHT));
    while let Some(first) = queued.recv().await {
        let Ok(place) = calls.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match queued.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let sending = call(batch);
        tokio::spawn(async move {
            sending.await;
            drop(place);
        });
    }
}

/// Runs a batch of operations in one script call; when the batch records an effect (a mark,
/// a result) and `durability` asks for replicas, its answers wait for them.
async fn run_script(
    script: Arc<Script>,
    prefix: String,
    mut connection: ConnectionManager,
    durability: Durability,
    scripted: Vec<Operation>,
) {
    let mut invocation = script.key(&prefix);
    for op in &scripted {
        invocation.key(format!("{prefix}{}", op.id));
        invocation
            .arg(op.name)
            .arg(&op.fingerprint)
            .arg(&op.claim)
            .arg(&op.a)
            .arg(&op.b)
            .arg(&op.id)
            .arg(op.generation)
            .arg(op.seen)
            .arg(&op.deletion);
    }
    let answers: ::redis::RedisResult<Vec<Vec<String>>> =
        invocation.invoke_async(&mut connection).await;
    let mut answers: ::redis::RedisResult<Vec<Result<Vec<String>, StoreError>>> =
        answers.map(|each| each.into_iter().map(failed_alone).collect());
    let records_effects = |op: &Operation| matches!(op.name, "mark" | "remember");
    if durability.replicas > 0
        && scripted.iter().any(records_effects)
        && let Ok(each) = &mut answers
    {
        // WAIT covers every write sent before it on this connection, this batch's included.
        let acked: ::redis::RedisResult<u32> = ::redis::cmd("WAIT")
            .arg(durability.replicas)
            .arg(durability.timeout.as_millis() as u64)
            .query_async(&mut connection)
            .await;
        if !acked.as_ref().is_ok_and(|n| *n >= durability.replicas) {
            let why = match acked {
                Ok(n) => format!("{n} of {} replicas acknowledged", durability.replicas),
                Err(e) => e.to_string(),
            };
            for (answer, op) in each.iter_mut().zip(&scripted) {
                if records_effects(op) && answer.is_ok() {
                    *answer = Err(not_durable(&why));
                }
            }
        }
    }
    answer_each(scripted.into_iter().map(|op| op.reply).collect(), answers);
}

/// A write the replicas did not acknowledge in time: an outage (the command waits).
fn not_durable(why: &str) -> StoreError {
    let error = std::io::Error::new(std::io::ErrorKind::TimedOut, format!("not durable: {why}"));
    StoreError::Redis(error.into())
}

/// Reads the records of a batch of looks in one pipeline; each look fails alone.
async fn read_records(mut connection: ConnectionManager, looks: Vec<Look>) {
    let mut pipe = ::redis::pipe();
    for look in &looks {
        pipe.cmd("HMGET")
            .arg(&look.key)
            .arg("fp")
            .arg("result")
            .arg("expires");
    }
    let answers: ::redis::RedisResult<Vec<::redis::RedisResult<Settled>>> =
        pipe.ignore_errors().query_async(&mut connection).await;
    let answers = answers.map(|each| {
        let each = each.into_iter();
        each.map(|answer| answer.map_err(StoreError::Redis))
            .collect()
    });
    answer_each(looks.into_iter().map(|look| look.reply).collect(), answers);
}

/// Hands each caller its answer, or the error of the call that carried them all.
fn answer_each<A>(
    replies: Vec<oneshot::Sender<Result<A, StoreError>>>,
    answers: ::redis::RedisResult<Vec<Result<A, StoreError>>>,
) {
    match answers {
        Ok(answers) if answers.len() == replies.len() => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Ok(answers) => {
            let wrong = format!("{} answers to {} requests", answers.len(), replies.len());
            for reply in replies {
                let _ = reply.send(Err(StoreError::Corrupt(wrong.clone())));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Redis(error.clone())));
            }
        }
    }
}

/// An operation's answer, or the error Redis gave it alone.
fn failed_alone(answer: Vec<String>) -> Result<Vec<String>, StoreError> {
    match answer.as_slice() {
        [kind, message] if kind == "error" => {
            let detail = (
                ErrorKind::Extension,
                "record operation failed",
                message.clone(),
            );
            Err(StoreError::Redis(detail.into()))
        }
        _ => Ok(answer),
    }
}

fn decode_result(json: &str) -> Result<Remembered, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn unexpected(reply: &[String]) -> StoreError {
    StoreError::Corrupt(format!("unexpected reply {reply:?}"))
}

#[async_trait::async_trait]
impl IdempotencyStore for RedisStore {
    fn new_claim(&self) -> String {
        claim_name(&self.process)
    }

    async fn begin_as(
        &self,
        id: &str,
        fingerprint: &Fingerprint,
        generation: u64,
        claim: &str,
    ) -> Result<Begin, StoreError> {
        // A replay (re-running a batch) costs Redis one HMGET instead of a script.
        if self.hint.should_look() {
            let settled = self.settled(id, fingerprint).await?;
            self.hint.looked(settled.is_some());
            if let Some(settled) = settled {
                return Ok(settled);
            }
        }
        let held = Held {
            id: id.to_owned(),
            claim: claim.to_owned(),
            fingerprint: fingerprint.clone(),
            generation,
            seen_ms: 0,
        };
        let (lease, keep) = (self.claim_ms().to_string(), self.keep_ms().to_string());
        let reply = self.run("begin", held, lease, keep).await?;
        match reply.first().map(String::as_str) {
            Some("claimed") => Ok(Begin::Claimed {
                claim: claim.to_owned(),
                chat_deleted: reply.get(1).map(String::as_str) == Some("1"),
                seen_ms: reply
                    .get(2)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(now_ms),
                // Unreadable (an earlier version's): the delete happened, its details are lost.
                deletion: reply
                    .get(3)
                    .filter(|json| !json.is_empty())
                    .and_then(|json| serde_json::from_str(json).ok()),
            }),
            Some("conflict") => Ok(Begin::Conflict),
            Some("busy") => Ok(Begin::Busy),
            Some("replay") => {
                let json = reply
                    .get(1)
                    .ok_or_else(|| StoreError::Corrupt("replay without result".into()))?;
                Ok(Begin::Replay(decode_result(json)?))
            }
            _ => Err(unexpected(&reply)),
        }
    }

    async fn renew(&self, held: &Held) -> Result<bool, StoreError> {
        let reply = self.on_claim("renew", held).await?;
        Ok(reply.first().map(String::as_str) == Some("1"))
    }

    async fn mark_chat_deleted(&self, held: &Held, deletion: &Deletion) -> Result<(), StoreError> {
        let (lease, keep) = (self.claim_ms().to_string(), self.keep_ms().to_string());
        let deletion =
            serde_json::to_string(deletion).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let reply = self
            .run_with("mark", held.clone(), lease, keep, deletion)
            .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(()),
            _ => Err(StoreError::Superseded),
        }
    }

    async fn remember(&self, held: &Held, result: &Remembered) -> Result<Remembered, StoreError> {
        let json = serde_json::to_string(result).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let keep = self.keep_ms().to_string();
        let reply = self.run("remember", held.clone(), json, keep).await?;
        match (
            reply.first().map(String::as_str),
            reply.get(1).map(String::as_str),
        ) {
            (Some("stored"), _) => Ok(result.clone()),
            (Some("kept"), Some(json)) => decode_result(json),
            (Some("superseded"), _) => Err(StoreError::Superseded),
            _ => Err(unexpected(&reply)),
        }
    }

    async fn release(&self, held: &Held) -> Result<(), StoreError> {
        let (a, b) = (String::new(), String::new());
        self.run("release", held.clone(), a, b).await.map(drop)
    }

    async fn ping(&self) -> bool {
        let pong: Result<String, _> = ::redis::cmd("PING")
            .query_async(&mut self.connection.clone())
            .await;
        pong.is_ok()
    }
}

/// Deletes expired records, a batch at a time, for as long as the process runs.
async fn sweep(connection: ConnectionManager, prefix: String, script: Script) {
    loop {
        let swept: Result<usize, _> = script
            .key(&prefix)
            .arg(&prefix)
            .arg(SWEEP_BATCH)
            .invoke_async(&mut connection.clone())
            .await;
        match swept {
            Ok(n) if n >= SWEEP_BATCH => continue,
            Ok(_) => {}
            Err(error) => tracing::debug!(%error, "Idempotency sweep failed; trying later."),
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

#[cfg(test)]
mod tests;
