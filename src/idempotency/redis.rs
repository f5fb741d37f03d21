//! The Redis store, for several workers sharing idempotency records. Each record is a hash
//! updated by Lua scripts, so a claim is atomic across workers; Redis's own clock times the
//! leases, so workers' clocks need not agree.
//!
//! Records carry their expiry as a field and in one sorted set (the key that is the prefix
//! alone: an id is never empty), swept by the workers, rather than as a key TTL: under a
//! `volatile-*` eviction policy Redis evicts only keys with a TTL, so a remembered result or a
//! half-done command is never evicted; a full Redis refuses writes instead, and commands wait.
//! Records written by earlier versions (with a TTL) are read as they are.

use std::time::Duration;

use ::redis::Script;
use ::redis::aio::ConnectionManager;

use super::{
    Begin, Fingerprint, Held, IdempotencyStore, Lifetimes, Remembered, StoreError, new_claim,
};

/// `now` in ms on Redis's clock.
const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// A fresh record of this request, claimed by ARGV[2]; KEYS[2] is the expiry index, ARGV[5]
/// the id.
const CREATE: &str = r#"
local function create(key, index, fp, claim, lease_ms, keep_ms, id, now)
  redis.call('DEL', key)
  redis.call('HSET', key, 'fp', fp, 'lease_owner', claim, 'lease_until', now + lease_ms,
    'chat_deleted', '0', 'expires', now + keep_ms)
  redis.call('ZADD', index, now + keep_ms, id)
end
"#;

/// ARGV: fingerprint, claim, lease_ms, keep_ms, id.
const BEGIN: &str = r#"
local key, index = KEYS[1], KEYS[2]
local fp, claim = ARGV[1], ARGV[2]
local lease_ms, keep_ms, id = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local r = redis.call('HMGET', key, 'fp', 'result', 'lease_owner', 'lease_until', 'chat_deleted', 'expires')
if not r[1] or (r[6] and tonumber(r[6]) <= now) then
  create(key, index, fp, claim, lease_ms, keep_ms, id, now)
  return {'claimed', '0'}
end
if r[1] ~= fp then return {'conflict'} end
if r[2] then return {'replay', r[2]} end
if r[3] and tonumber(r[4]) > now then return {'busy'} end
redis.call('HSET', key, 'lease_owner', claim, 'lease_until', now + lease_ms)
if not r[6] then
  -- A record of an earlier version, kept alive by a TTL: give it an expiry of ours.
  redis.call('HSET', key, 'expires', now + keep_ms)
  redis.call('ZADD', index, now + keep_ms, id)
  redis.call('PERSIST', key)
end
return {'claimed', r[5] or '0'}
"#;

/// ARGV: fingerprint, claim, lease_ms, keep_ms, id. 1 when the claim is (again) ours.
const RENEW: &str = r#"
local key, index = KEYS[1], KEYS[2]
local fp, claim = ARGV[1], ARGV[2]
local lease_ms, keep_ms, id = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local r = redis.call('HMGET', key, 'fp', 'lease_owner', 'result')
if not r[1] then
  -- The record vanished (lost, or an earlier version's TTL ran out): nobody else holds it.
  create(key, index, fp, claim, lease_ms, keep_ms, id, now)
  return 1
end
if r[1] ~= fp or r[3] or r[2] ~= claim then return 0 end
redis.call('HSET', key, 'lease_until', now + lease_ms)
if redis.call('PTTL', key) >= 0 and redis.call('PTTL', key) < lease_ms then
  redis.call('PEXPIRE', key, lease_ms)
end
return 1
"#;

/// ARGV: fingerprint, claim, lease_ms, keep_ms, id.
const MARK: &str = r#"
local key, index = KEYS[1], KEYS[2]
local fp, claim = ARGV[1], ARGV[2]
local lease_ms, keep_ms, id = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local current = redis.call('HGET', key, 'fp')
if current and current ~= fp then return 'superseded' end
if not current then create(key, index, fp, claim, lease_ms, keep_ms, id, now) end
redis.call('HSET', key, 'chat_deleted', '1')
return 'ok'
"#;

/// ARGV: fingerprint, claim, result, keep_ms, id.
const REMEMBER: &str = r#"
local key, index = KEYS[1], KEYS[2]
local fp, claim, result = ARGV[1], ARGV[2], ARGV[3]
local keep_ms, id = tonumber(ARGV[4]), ARGV[5]
local r = redis.call('HMGET', key, 'fp', 'result', 'lease_owner')
if r[1] and r[1] ~= fp then return {'superseded'} end
if r[3] == claim then redis.call('HDEL', key, 'lease_owner', 'lease_until') end
if r[2] then return {'kept', r[2]} end
redis.call('HSET', key, 'fp', fp, 'result', result, 'expires', now + keep_ms)
redis.call('ZADD', index, now + keep_ms, id)
redis.call('PERSIST', key)
return {'stored'}
"#;

/// ARGV: claim.
const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'lease_owner') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'lease_owner', 'lease_until')
end
return 1
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

/// How often each worker sweeps, and how many records at most per sweep (more sweeps follow
/// at once while there is more to do).
const SWEEP_EVERY: Duration = Duration::from_secs(10);
const SWEEP_BATCH: usize = 1_000;

pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    process: String,
    lifetimes: Lifetimes,
    begin: Script,
    renew: Script,
    mark: Script,
    remember: Script,
    release: Script,
}

impl RedisStore {
    pub async fn connect(
        url: &str,
        prefix: &str,
        lifetimes: Lifetimes,
    ) -> Result<Self, StoreError> {
        let client = ::redis::Client::open(url)?;
        let connection =
            tokio::time::timeout(Duration::from_secs(10), ConnectionManager::new(client))
                .await
                .map_err(|_| {
                    ::redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                })??;
        let with_helpers = |body: &str| Script::new(&format!("{NOW}{CREATE}{body}"));
        tokio::spawn(sweep(
            connection.clone(),
            prefix.to_owned(),
            with_helpers(SWEEP),
        ));
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
            process: uuid::Uuid::new_v4().simple().to_string(),
            lifetimes,
            begin: with_helpers(BEGIN),
            renew: with_helpers(RENEW),
            mark: with_helpers(MARK),
            remember: with_helpers(REMEMBER),
            release: Script::new(RELEASE),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }

    /// The script's invocation on the id's record and the expiry index.
    fn call<'a>(&self, script: &'a Script, id: &str) -> ::redis::ScriptInvocation<'a> {
        let mut invocation = script.key(self.key(id));
        invocation.key(&self.prefix);
        invocation
    }

    fn lease_ms(&self) -> u64 {
        self.lifetimes.lease.as_millis() as u64
    }

    fn keep_ms(&self) -> u64 {
        self.lifetimes.keep.as_millis() as u64
    }

    /// The common arguments of the claim scripts.
    async fn on_claim<T: ::redis::FromRedisValue>(
        &self,
        script: &Script,
        held: &Held,
    ) -> Result<T, StoreError> {
        Ok(self
            .call(script, &held.id)
            .arg(&held.fingerprint.0)
            .arg(&held.claim)
            .arg(self.lease_ms())
            .arg(self.keep_ms())
            .arg(&held.id)
            .invoke_async(&mut self.connection.clone())
            .await?)
    }
}

fn decode_result(json: &str) -> Result<Remembered, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))
}

#[async_trait::async_trait]
impl IdempotencyStore for RedisStore {
    async fn begin(&self, id: &str, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        let claim = new_claim(&self.process);
        let reply: Vec<String> = self
            .call(&self.begin, id)
            .arg(&fingerprint.0)
            .arg(&claim)
            .arg(self.lease_ms())
            .arg(self.keep_ms())
            .arg(id)
            .invoke_async(&mut self.connection.clone())
            .await?;
        match reply.first().map(String::as_str) {
            Some("claimed") => Ok(Begin::Claimed {
                claim,
                chat_deleted: reply.get(1).map(String::as_str) == Some("1"),
            }),
            Some("conflict") => Ok(Begin::Conflict),
            Some("busy") => Ok(Begin::Busy),
            Some("replay") => {
                let json = reply
                    .get(1)
                    .ok_or_else(|| StoreError::Corrupt("replay without result".into()))?;
                Ok(Begin::Replay(decode_result(json)?))
            }
            other => Err(StoreError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    async fn renew(&self, held: &Held) -> Result<bool, StoreError> {
        let renewed: i64 = self.on_claim(&self.renew, held).await?;
        Ok(renewed == 1)
    }

    async fn mark_chat_deleted(&self, held: &Held) -> Result<(), StoreError> {
        let reply: String = self.on_claim(&self.mark, held).await?;
        match reply.as_str() {
            "ok" => Ok(()),
            _ => Err(StoreError::Superseded),
        }
    }

    async fn remember(&self, held: &Held, result: &Remembered) -> Result<Remembered, StoreError> {
        let json = serde_json::to_string(result).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let reply: Vec<String> = self
            .call(&self.remember, &held.id)
            .arg(&held.fingerprint.0)
            .arg(&held.claim)
            .arg(json)
            .arg(self.keep_ms())
            .arg(&held.id)
            .invoke_async(&mut self.connection.clone())
            .await?;
        match (
            reply.first().map(String::as_str),
            reply.get(1).map(String::as_str),
        ) {
            (Some("stored"), _) => Ok(result.clone()),
            (Some("kept"), Some(json)) => decode_result(json),
            (Some("superseded"), _) => Err(StoreError::Superseded),
            other => Err(StoreError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    async fn release(&self, held: &Held) -> Result<(), StoreError> {
        let _: i64 = self
            .release
            .key(self.key(&held.id))
            .arg(&held.claim)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(())
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
