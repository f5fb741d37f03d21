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

/// `now` in ms on Redis's clock.
const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// The record operations, applied in order in one call: KEYS[1] is the expiry index, KEYS[i+1]
/// the record of the i-th operation, and ARGV holds nine values per operation: its name, the
/// fingerprint, the claim, two operation-specific values, the id, the generation of the
/// claim's instance lease, when the id was first seen, and what a delete did (a mark's). Each
/// operation answers with a list of strings.
const OPERATIONS: &str = r#"
local index = KEYS[1]

-- A fresh record of this request, claimed by `claim` under generation `gen` of its
-- instance's lease, where there is none (or only an expired one, which the caller deletes
-- first). `seen` is when the id was first seen: now for a new id, the claim's own for a
-- record written again.
local function create(key, fp, claim, lease_ms, keep_ms, id, gen, seen)
  if tonumber(seen or '0') == 0 then seen = now end
  redis.call('HSET', key, 'fp', fp, 'lease_owner', claim, 'lease_until', now + lease_ms,
    'chat_deleted', '0', 'expires', now + keep_ms, 'gen', gen, 'seen', seen)
  redis.call('ZADD', index, now + keep_ms, id)
  return seen
end

-- A claim taken under an older generation of the instance's lease (the fingerprint names the
-- instance) was its previous owner's, whose every effect its fence refuses now. Generation 0
-- is no ownership: such a claim ends only with its own lease.
local function outlived(held, gen)
  held = tonumber(held or '0')
  return held > 0 and held < tonumber(gen)
end

local op = {}

function op.begin(key, fp, claim, lease_ms, keep_ms, id, gen)
  lease_ms, keep_ms = tonumber(lease_ms), tonumber(keep_ms)
  local r = redis.call('HMGET', key, 'fp', 'result', 'lease_owner', 'lease_until', 'chat_deleted',
    'expires', 'gen', 'seen', 'deletion')
  if not r[1] or (r[6] and tonumber(r[6]) <= now) then
    if r[1] then redis.call('DEL', key) end
    local seen = create(key, fp, claim, lease_ms, keep_ms, id, gen, '0')
    return {'claimed', '0', tostring(seen), ''}
  end
  if r[1] ~= fp then return {'conflict'} end
  if r[2] then return {'replay', r[2]} end
  -- A live claim of another asker waits; the asker's own (its earlier answer was lost) is its.
  if r[3] and r[3] ~= claim and tonumber(r[4]) > now and not outlived(r[7], gen) then
    return {'busy'}
  end
  local seen = r[8]
  if not seen then
    seen = tostring(now)
    redis.call('HSET', key, 'seen', seen)
  end
  redis.call('HSET', key, 'lease_owner', claim, 'lease_until', now + lease_ms, 'gen', gen)
  if not r[6] then
    -- A record of an earlier version, kept alive by a TTL: give it an expiry of ours.
    redis.call('HSET', key, 'expires', now + keep_ms)
    redis.call('ZADD', index, now + keep_ms, id)
    redis.call('PERSIST', key)
  end
  return {'claimed', r[5] or '0', seen, r[9] or ''}
end

-- '1' when the claim is (again) ours.
function op.renew(key, fp, claim, lease_ms, keep_ms, id, gen, seen)
  lease_ms, keep_ms = tonumber(lease_ms), tonumber(keep_ms)
  local r = redis.call('HMGET', key, 'fp', 'lease_owner', 'result')
  if not r[1] then
    -- The record vanished (lost, or an earlier version's TTL ran out): nobody else holds it.
    create(key, fp, claim, lease_ms, keep_ms, id, gen, seen)
    return {'1'}
  end
  if r[1] ~= fp or r[3] or r[2] ~= claim then return {'0'} end
  redis.call('HSET', key, 'lease_until', now + lease_ms)
  local ttl = redis.call('PTTL', key)
  if ttl >= 0 and ttl < lease_ms then redis.call('PEXPIRE', key, lease_ms) end
  return {'1'}
end

function op.mark(key, fp, claim, lease_ms, keep_ms, id, gen, seen, deletion)
  local current = redis.call('HGET', key, 'fp')
  if current and current ~= fp then return {'superseded'} end
  if not current then
    create(key, fp, claim, tonumber(lease_ms), tonumber(keep_ms), id, gen, seen)
  end
  redis.call('HSET', key, 'chat_deleted', '1', 'deletion', deletion)
  return {'ok'}
end

-- The lease fields stay: once there is a result nothing reads them. The record is kept for the
-- keep time from its claim; only an answer that came later than a hundredth of it moves the
-- expiry (and its place in the index), so a quick answer costs no index update.
function op.remember(key, fp, claim, result, keep_ms, id)
  keep_ms = tonumber(keep_ms)
  local r = redis.call('HMGET', key, 'fp', 'result', 'expires')
  if r[1] and r[1] ~= fp then return {'superseded'} end
  if r[2] then return {'kept', r[2]} end
  local expires = tonumber(r[3])
  if not expires or now + keep_ms - expires > keep_ms / 100 then
    expires = now + keep_ms
    redis.call('ZADD', index, expires, id)
  end
  redis.call('HSET', key, 'fp', fp, 'result', result, 'expires', expires)
  -- A record of an earlier version, kept alive by a TTL, is ours to time now.
  if r[1] and not r[3] then redis.call('PERSIST', key) end
  return {'stored'}
end

function op.release(key, fp, claim)
  if redis.call('HGET', key, 'lease_owner') == claim then
    redis.call('HDEL', key, 'lease_owner', 'lease_until')
  end
  return {'ok'}
end

-- Each operation fails alone (a full Redis refusing its write), so no operation is told
-- another's error after its own effect happened.
local answers = {}
for i = 2, #KEYS do
  local a = (i - 2) * 9
  local ok, answer = pcall(op[ARGV[a + 1]], KEYS[i], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4],
    ARGV[a + 5], ARGV[a + 6], ARGV[a + 7], ARGV[a + 8], ARGV[a + 9])
  if not ok then
    if type(answer) == 'table' then answer = answer.err end
    answer = {'error', tostring(answer)}
  end
  answers[i - 1] = answer
end
return answers
"#;

/// KEYS[1]: the index; ARGV: key prefix, most records to look at. Deletes expired records.
const SWEEP: &str = r#"
local index, prefix, limit = KEYS[1], ARGV[1], tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', index, '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(due) do
  local key = prefix .. id
  local expires = redis.call('HGET', key, 'expires')
  if not expires or tonumber(expires) <= now then redis.call('DEL', key) end
  redis.call('ZREM', index, id)
end
return #due
"#;

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
        let (lease, keep) = (self.lease_ms(), self.keep_ms());
        let (a, b) = (lease.to_string(), keep.to_string());
        self.run(name, held.clone(), a, b).await
    }

    fn lease_ms(&self) -> u64 {
        self.lifetimes.lease.as_millis() as u64
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
        let (lease, keep) = (self.lease_ms().to_string(), self.keep_ms().to_string());
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
        let (lease, keep) = (self.lease_ms().to_string(), self.keep_ms().to_string());
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
mod tests {
    use futures_util::future::join_all;

    use super::*;
    use crate::contract::Outcome;

    /// The local Redis (the test suite's `scripts/services` starts it), under a prefix of its own.
    async fn store() -> (RedisStore, String) {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("test:batch:{}:", uuid::Uuid::new_v4().simple());
        let lifetimes = Lifetimes {
            lease: Duration::from_secs(60),
            keep: Duration::from_secs(600),
        };
        (
            RedisStore::connect(&url, &prefix, lifetimes).await.unwrap(),
            prefix,
        )
    }

    /// Operations sent together share script calls and looks share pipelines, yet each gets its
    /// own answer: one claim per id however many ask at once, and a record Redis refuses to
    /// read fails only its own operation or look.
    #[tokio::test]
    async fn batched_operations_answer_one_by_one() {
        let (store, prefix) = store().await;
        let fp = Fingerprint("a".into());
        let ids: Vec<String> = (0..300).map(|i| format!("id{}", i % 100)).collect();
        let begins = join_all(ids.iter().map(|id| store.begin(id, &fp, 0))).await;
        let claimed = begins
            .iter()
            .filter(|b| matches!(b, Ok(Begin::Claimed { .. })))
            .count();
        let busy = begins
            .iter()
            .filter(|b| matches!(b, Ok(Begin::Busy)))
            .count();
        assert_eq!((claimed, busy), (100, 200));

        let held: Vec<Held> = ids
            .iter()
            .zip(begins)
            .filter_map(|(id, begin)| match begin {
                Ok(Begin::Claimed { claim, .. }) => Some(Held {
                    id: id.clone(),
                    claim,
                    fingerprint: fp.clone(),
                    generation: 0,
                    seen_ms: 0,
                }),
                _ => None,
            })
            .collect();
        let done = Remembered {
            outcome: Outcome::InvalidNumber,
            attempts: 1,
            receipt: None,
        };
        let remembered = join_all(held.iter().map(|h| store.remember(h, &done))).await;
        assert!(remembered.iter().all(|r| r.as_ref().ok() == Some(&done)));

        let mut conn = store.connection.clone();
        let _: () = ::redis::cmd("SET")
            .arg(format!("{prefix}wrongtype"))
            .arg("x")
            .query_async(&mut conn)
            .await
            .unwrap();
        // Replays and conflicts, whether read with HMGET or asked of the script.
        let again = join_all(ids[..100].iter().map(|id| store.begin(id, &fp, 0))).await;
        assert!(
            again
                .iter()
                .all(|b| matches!(b, Ok(Begin::Replay(r)) if r == &done))
        );
        let other = Fingerprint("b".into());
        let conflicts = join_all(ids[..100].iter().map(|id| store.begin(id, &other, 0))).await;
        assert!(conflicts.iter().all(|b| matches!(b, Ok(Begin::Conflict))));
        // The conflicts were all read, so every begin now looks first: the pipeline of looks
        // that carries a record Redis refuses to read answers every other look.
        let mut replaying: Vec<&str> = ids[..100].iter().map(String::as_str).collect();
        replaying.insert(50, "wrongtype");
        let again = join_all(replaying.iter().map(|id| store.begin(id, &fp, 0))).await;
        for (id, begin) in replaying.iter().zip(&again) {
            match (*id, begin) {
                ("wrongtype", Err(StoreError::Redis(_))) => {}
                (_, Ok(Begin::Replay(r))) if r == &done => {}
                other => panic!("unexpected answer {other:?}"),
            }
        }

        // Renewals always go through the script: the batch that carries a record Redis
        // refuses to read answers every other renewal.
        let mut renewing = held.clone();
        renewing.insert(
            50,
            Held {
                id: "wrongtype".into(),
                claim: "c".into(),
                fingerprint: fp.clone(),
                generation: 0,
                seen_ms: 0,
            },
        );
        let renewed = join_all(renewing.iter().map(|h| store.renew(h))).await;
        for (h, renewed) in renewing.iter().zip(&renewed) {
            match (h.id.as_str(), renewed) {
                ("wrongtype", Err(StoreError::Redis(_))) => {}
                (_, Ok(false)) => {}
                other => panic!("unexpected answer {other:?}"),
            }
        }

        let keys: Vec<String> = ::redis::cmd("KEYS")
            .arg(format!("{prefix}*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = ::redis::cmd("DEL")
            .arg(keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    fn test_deletion() -> Deletion {
        Deletion {
            chat: crate::pipeline::request::normalise_number("5511999999999").unwrap(),
            known: crate::contract::ChatKnown::Unknown,
            at_ms: 1_733_000_000_000,
        }
    }

    /// A live claim taken under an older generation of the instance's lease (its previous
    /// owner's, whose fence refuses its effects now) is taken over at once by a begin under a
    /// newer one, keeping its progress; the claim of a lone worker (generation 0) and one of
    /// the same generation are waited out.
    #[tokio::test]
    async fn a_newer_owner_takes_over_the_claims_its_predecessor_left() {
        let (store, prefix) = store().await;
        let fp = Fingerprint("a".into());
        let mut held = Vec::new();
        for (id, generation) in [("left", 3), ("lone", 0)] {
            let Ok(Begin::Claimed { claim, .. }) = store.begin(id, &fp, generation).await else {
                panic!("not claimed");
            };
            let fingerprint = fp.clone();
            let (id, claim) = (id.into(), claim);
            held.push(Held {
                id,
                claim,
                fingerprint,
                generation,
                seen_ms: 0,
            });
        }
        store
            .mark_chat_deleted(&held[0], &test_deletion())
            .await
            .unwrap();
        for generation in [0, 3] {
            let again = store.begin("left", &fp, generation).await.unwrap();
            assert_eq!(again, Begin::Busy, "asked under generation {generation}");
        }
        let taken = store.begin("left", &fp, 4).await.unwrap();
        assert!(
            matches!(
                &taken,
                Begin::Claimed {
                    chat_deleted: true,
                    deletion: Some(deletion),
                    ..
                } if *deletion == test_deletion()
            ),
            "{taken:?}"
        );
        assert!(
            !store.renew(&held[0]).await.unwrap(),
            "the old claim is over"
        );
        assert_eq!(store.begin("lone", &fp, 7).await.unwrap(), Begin::Busy);
        assert!(store.renew(&held[1]).await.unwrap());

        let _: () = ::redis::cmd("DEL")
            .arg(&prefix)
            .arg(format!("{prefix}left"))
            .arg(format!("{prefix}lone"))
            .query_async(&mut store.connection.clone())
            .await
            .unwrap();
    }

    /// Defect (found by review): a renewal (or a mark) that found the record gone wrote it
    /// again under generation 0, "no ownership", so the next owner's begin under a newer
    /// generation waited for the claim to end instead of taking it over.
    #[tokio::test]
    async fn a_record_written_again_keeps_the_generation_of_its_claim() {
        let (store, prefix) = store().await;
        let fp = Fingerprint("a".into());
        let Ok(Begin::Claimed { claim, seen_ms, .. }) = store.begin("again", &fp, 3).await else {
            panic!("not claimed");
        };
        let held = Held {
            id: "again".into(),
            claim,
            fingerprint: fp.clone(),
            generation: 3,
            seen_ms,
        };
        let key = format!("{prefix}again");
        let mut conn = store.connection.clone();
        let _: () = ::redis::cmd("DEL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(
            store.renew(&held).await.unwrap(),
            "renewed by writing it again"
        );
        let taken = store.begin("again", &fp, 4).await.unwrap();
        assert!(
            matches!(taken, Begin::Claimed { seen_ms: s, .. } if s == seen_ms),
            "taken over with the first try's time: {taken:?}"
        );
        let _: () = ::redis::cmd("DEL")
            .arg(&prefix)
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }

    /// A result answered soon after its claim keeps the claim's expiry (no index update); one
    /// answered later than a hundredth of the keep time is kept for the keep time from then.
    /// Either way the expiry field and the index agree, which the sweep relies on.
    #[tokio::test]
    async fn a_late_answer_moves_the_expiry_and_a_quick_one_does_not() {
        let (store, prefix) = store().await;
        let mut conn = store.connection.clone();
        let fp = Fingerprint("a".into());
        let done = Remembered {
            outcome: Outcome::InvalidNumber,
            attempts: 1,
            receipt: None,
        };
        let mut expiry = async |id: &str| -> (u64, u64) {
            let field: u64 = ::redis::cmd("HGET")
                .arg(format!("{prefix}{id}"))
                .arg("expires")
                .query_async(&mut conn)
                .await
                .unwrap();
            let score: u64 = ::redis::cmd("ZSCORE")
                .arg(&prefix)
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap();
            (field, score)
        };
        let mut held = Vec::new();
        for id in ["quick", "late"] {
            let Ok(Begin::Claimed { claim, .. }) = store.begin(id, &fp, 0).await else {
                panic!("not claimed");
            };
            held.push(Held {
                id: id.into(),
                claim,
                fingerprint: fp.clone(),
                generation: 0,
                seen_ms: 0,
            });
        }
        let (claimed, indexed) = expiry("quick").await;
        assert_eq!(claimed, indexed);
        let (late, _) = expiry("late").await;
        // As if "quick" was claimed a second ago (within a hundredth of the keep time, 600 s)
        // and "late" a minute ago.
        let claimed = claimed - 1_000;
        let mut pipe = ::redis::pipe();
        for (id, at) in [("quick", claimed), ("late", late - 60_000)] {
            pipe.hset(format!("{prefix}{id}"), "expires", at)
                .zadd(&prefix, id, at);
        }
        let _: () = pipe
            .query_async(&mut store.connection.clone())
            .await
            .unwrap();

        for h in &held {
            assert_eq!(store.remember(h, &done).await.unwrap(), done);
        }
        assert_eq!(
            expiry("quick").await,
            (claimed, claimed),
            "a quick answer moves nothing"
        );
        let (moved, indexed) = expiry("late").await;
        assert_eq!(moved, indexed);
        assert!(
            moved >= late,
            "kept the keep time from the answer: {moved} < {late}"
        );
        let _: () = ::redis::cmd("DEL")
            .arg(&prefix)
            .arg(format!("{prefix}quick"))
            .arg(format!("{prefix}late"))
            .query_async(&mut store.connection.clone())
            .await
            .unwrap();
    }
}
