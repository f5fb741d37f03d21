//! The Redis store, for several workers sharing idempotency records. Each record is a hash
//! updated by Lua scripts, so a claim is atomic across workers; Redis's own clock times the
//! leases, so workers' clocks need not agree.

use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;

use super::{Begin, Fingerprint, IdempotencyStore, Lifetimes, Remembered, StoreError, new_claim};

const BEGIN: &str = r#"
local key = KEYS[1]
local fp, claim = ARGV[1], ARGV[2]
local lease_ms, keep_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', key) == 0 then
  redis.call('HSET', key, 'fp', fp, 'lease_owner', claim, 'lease_until', now + lease_ms, 'chat_deleted', '0')
  redis.call('PEXPIRE', key, keep_ms)
  return {'claimed', '0'}
end
local r = redis.call('HMGET', key, 'fp', 'result', 'lease_owner', 'lease_until', 'chat_deleted')
if r[1] ~= fp then return {'conflict'} end
if r[2] then return {'replay', r[2]} end
if r[3] and tonumber(r[4]) > now then return {'busy'} end
redis.call('HSET', key, 'lease_owner', claim, 'lease_until', now + lease_ms)
if redis.call('PTTL', key) < lease_ms then redis.call('PEXPIRE', key, lease_ms) end
return {'claimed', r[5] or '0'}
"#;

const REMEMBER: &str = r#"
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HSET', key, 'result', ARGV[2])
if redis.call('HGET', key, 'lease_owner') == ARGV[1] then redis.call('HDEL', key, 'lease_owner') end
redis.call('PEXPIRE', key, tonumber(ARGV[3]))
return 1
"#;

const RELEASE: &str = r#"
if redis.call('HGET', KEYS[1], 'lease_owner') == ARGV[1] then redis.call('HDEL', KEYS[1], 'lease_owner') end
return 1
"#;

const MARK: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'chat_deleted', '1') end
return 1
"#;

pub struct RedisStore {
    connection: ConnectionManager,
    prefix: String,
    process: String,
    lifetimes: Lifetimes,
    begin: Script,
    remember: Script,
    release: Script,
    mark: Script,
}

impl RedisStore {
    pub async fn connect(
        url: &str,
        prefix: &str,
        lifetimes: Lifetimes,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(url)?;
        let connection =
            tokio::time::timeout(Duration::from_secs(10), ConnectionManager::new(client))
                .await
                .map_err(|_| {
                    redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
                })??;
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
            process: uuid::Uuid::new_v4().simple().to_string(),
            lifetimes,
            begin: Script::new(BEGIN),
            remember: Script::new(REMEMBER),
            release: Script::new(RELEASE),
            mark: Script::new(MARK),
        })
    }

    fn key(&self, id: &str) -> String {
        format!("{}{id}", self.prefix)
    }
}

#[async_trait::async_trait]
impl IdempotencyStore for RedisStore {
    async fn begin(&self, id: &str, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
        let claim = new_claim(&self.process);
        let reply: Vec<String> = self
            .begin
            .key(self.key(id))
            .arg(&fingerprint.0)
            .arg(&claim)
            .arg(self.lifetimes.lease.as_millis() as u64)
            .arg(self.lifetimes.keep.as_millis() as u64)
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
                let result =
                    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(Begin::Replay(result))
            }
            other => Err(StoreError::Corrupt(format!("unexpected reply {other:?}"))),
        }
    }

    async fn mark_chat_deleted(&self, id: &str, _claim: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .mark
            .key(self.key(id))
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    async fn remember(&self, id: &str, claim: &str, result: &Remembered) -> Result<(), StoreError> {
        let json = serde_json::to_string(result).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let _: i64 = self
            .remember
            .key(self.key(id))
            .arg(claim)
            .arg(json)
            .arg(self.lifetimes.keep.as_millis() as u64)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    async fn release(&self, id: &str, claim: &str) -> Result<(), StoreError> {
        let _: i64 = self
            .release
            .key(self.key(id))
            .arg(claim)
            .invoke_async(&mut self.connection.clone())
            .await?;
        Ok(())
    }

    async fn ping(&self) -> bool {
        let pong: Result<String, _> = redis::cmd("PING")
            .query_async(&mut self.connection.clone())
            .await;
        pong.is_ok()
    }
}
