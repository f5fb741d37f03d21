//! The coordination state in Redis: who is alive (a sorted set of members by expiry, with
//! their capacities) and who holds each instance (a lease key `member|generation` with a TTL,
//! the generation from a counter per instance). Every change is one script, timed on Redis's
//! clock.

use std::time::Duration;

use ::redis::Script;
use ::redis::aio::ConnectionManager;

const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local p = ARGV[1]
"#;

/// ARGV: prefix, member, capacity (0: not taking part), lease ms, held count, then (instance,
/// generation) per held lease, then every instance the member knows. Refreshes the member and
/// the instances it knows, drops expired members, renews the held leases still ours, and
/// answers (renewed flags, live members, capacities, lease holders, per instance whether every
/// live member knows it, whether the member just (re)joined).
const HEARTBEAT: &str = r#"
local me, lease, held = ARGV[2], tonumber(ARGV[4]), tonumber(ARGV[5])
local first = 6 + 2 * held
local joined = 0
if ARGV[3] == '0' then
  redis.call('ZREM', p .. 'members', me)
  redis.call('HDEL', p .. 'capacity', me)
  redis.call('DEL', p .. 'knows:' .. me)
else
  -- Not a live member before: new, or an entry that outlived its lease (Redis came back from
  -- an outage with its data, or the worker was paused).
  local before = redis.call('ZSCORE', p .. 'members', me)
  if not before or tonumber(before) <= now then joined = 1 end
  redis.call('ZADD', p .. 'members', now + lease, me)
  redis.call('HSET', p .. 'capacity', me, ARGV[3])
  local knows = p .. 'knows:' .. me
  if joined == 1 or redis.call('SCARD', knows) ~= #ARGV - first + 1 then
    redis.call('DEL', knows)
    for i = first, #ARGV, 1000 do
      redis.call('SADD', knows, unpack(ARGV, i, math.min(i + 999, #ARGV)))
    end
  end
  redis.call('PEXPIRE', knows, lease)
end
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', p .. 'members', '-inf', now)) do
  redis.call('ZREM', p .. 'members', gone)
  redis.call('HDEL', p .. 'capacity', gone)
  redis.call('DEL', p .. 'knows:' .. gone)
end
local renewed = {}
for i = 1, held do
  local instance, generation = ARGV[4 + 2 * i], ARGV[5 + 2 * i]
  local key = p .. 'lease:' .. instance
  if redis.call('GET', key) == me .. '|' .. generation then
    redis.call('PEXPIRE', key, lease)
    redis.call('SET', p .. 'seen:' .. instance, now .. '|expired', 'PX', 86400000)
    renewed[i] = 1
  else
    renewed[i] = 0
  end
end
local members = redis.call('ZRANGE', p .. 'members', 0, -1)
local capacities = {}
if #members > 0 then capacities = redis.call('HMGET', p .. 'capacity', unpack(members)) end
-- What every live member knows (a member of an earlier version, without its list, is taken
-- to know everything).
local lists = {}
for _, member in ipairs(members) do
  local knows = p .. 'knows:' .. member
  if redis.call('EXISTS', knows) == 1 then lists[#lists + 1] = knows end
end
local shared = nil
if #lists > 0 then
  shared = {}
  for _, instance in ipairs(redis.call('SINTER', unpack(lists))) do shared[instance] = true end
end
local holders, everyone = {}, {}
for i = first, #ARGV do
  holders[#holders + 1] = redis.call('GET', p .. 'lease:' .. ARGV[i]) or ''
  everyone[#everyone + 1] = (shared == nil or shared[ARGV[i]]) and 1 or 0
end
return {renewed, members, capacities, holders, everyone, joined}
"#;

/// ARGV: prefix, member, lease ms, then instances. Takes each free lease with the next
/// generation; answers (generation or 0, ms since the previous holder last renewed or -1,
/// 1 if it released the lease, 0 if the lease expired) per instance.
const ACQUIRE: &str = r#"
local me, lease = ARGV[2], tonumber(ARGV[3])
local out = {}
for i = 4, #ARGV do
  local instance = ARGV[i]
  local key = p .. 'lease:' .. instance
  if redis.call('EXISTS', key) == 1 then
    out[#out + 1] = 0; out[#out + 1] = -1; out[#out + 1] = 0
  else
    local generation = redis.call('INCR', p .. 'generation:' .. instance)
    redis.call('SET', key, me .. '|' .. generation, 'PX', lease)
    local seen = redis.call('GET', p .. 'seen:' .. instance)
    redis.call('SET', p .. 'seen:' .. instance, now .. '|expired', 'PX', 86400000)
    local gap, released = -1, 0
    if seen then
      local at, how = string.match(seen, '^(%d+)|(%a+)$')
      gap = now - tonumber(at)
      if how == 'released' then released = 1 end
    end
    out[#out + 1] = generation; out[#out + 1] = gap; out[#out + 1] = released
  end
end
return out
"#;

/// ARGV: prefix, member, instance, generation. Deletes the lease if it is still ours.
const RELEASE: &str = r#"
local key = p .. 'lease:' .. ARGV[3]
if redis.call('GET', key) == ARGV[2] .. '|' .. ARGV[4] then
  redis.call('DEL', key)
  redis.call('SET', p .. 'seen:' .. ARGV[3], now .. '|released', 'PX', 86400000)
  return 1
end
return 0
"#;

/// The heartbeat script's answer: renewed flags, members, their capacities, lease holders,
/// per instance whether every member knows it, and whether the member just joined.
type HeartbeatReply = (
    Vec<i64>,
    Vec<String>,
    Vec<Option<String>>,
    Vec<String>,
    Vec<i64>,
    i64,
);

/// What a heartbeat saw.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Per held lease sent, whether it was renewed.
    pub renewed: Vec<bool>,
    /// Live members and their capacities.
    pub members: Vec<(String, u32)>,
    /// Per instance, its holder (`member|generation`), if any.
    pub holders: Vec<Option<(String, u64)>>,
    /// Per instance, whether every live member knows it (they plan only over those).
    pub shared: Vec<bool>,
    /// This member was not a live member before this heartbeat (it joined, or Redis lost it).
    pub joined: bool,
}

/// A lease just taken.
#[derive(Debug, Clone, Copy)]
pub struct Acquired {
    pub generation: u64,
    /// Since the previous holder last renewed (`None` if there was none), and whether it let go.
    pub gap: Option<(Duration, bool)>,
}

#[derive(Clone)]
pub struct Coordination {
    connection: ConnectionManager,
    prefix: String,
    member: String,
    heartbeat: Script,
    acquire: Script,
    release: Script,
}

impl Coordination {
    pub async fn connect(url: &str, prefix: &str, member: &str) -> ::redis::RedisResult<Self> {
        let client = ::redis::Client::open(url)?;
        let config = crate::idempotency::connection_config(crate::idempotency::RESPONSE_TIMEOUT);
        let connect = ConnectionManager::new_with_config(client, config);
        let connection = tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| {
                ::redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut))
            })??;
        let script = |body: &str| Script::new(&format!("{NOW}{body}"));
        Ok(Self {
            connection,
            prefix: prefix.to_owned(),
            member: member.to_owned(),
            heartbeat: script(HEARTBEAT),
            acquire: script(ACQUIRE),
            release: script(RELEASE),
        })
    }

    pub fn member(&self) -> &str {
        &self.member
    }

    pub async fn heartbeat(
        &self,
        capacity: u32,
        lease: Duration,
        held: &[(&str, u64)],
        instances: &[String],
    ) -> ::redis::RedisResult<Snapshot> {
        let mut call = self.heartbeat.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.member)
            .arg(capacity)
            .arg(lease.as_millis() as u64)
            .arg(held.len());
        for (instance, generation) in held {
            call.arg(*instance).arg(*generation);
        }
        for instance in instances {
            call.arg(instance);
        }
        let (renewed, members, capacities, holders, shared, joined): HeartbeatReply =
            call.invoke_async(&mut self.connection.clone()).await?;
        let capacity_of = |c: &Option<String>| c.as_deref().and_then(|c| c.parse().ok());
        Ok(Snapshot {
            renewed: renewed.into_iter().map(|r| r == 1).collect(),
            members: members
                .into_iter()
                .zip(capacities.iter().map(|c| capacity_of(c).unwrap_or(1)))
                .collect(),
            holders: holders.iter().map(|h| parse_holder(h)).collect(),
            shared: shared.into_iter().map(|s| s == 1).collect(),
            joined: joined == 1,
        })
    }

    pub async fn acquire(
        &self,
        lease: Duration,
        instances: &[&str],
    ) -> ::redis::RedisResult<Vec<Option<Acquired>>> {
        let mut call = self.acquire.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.member)
            .arg(lease.as_millis() as u64);
        for instance in instances {
            call.arg(*instance);
        }
        let flat: Vec<i64> = call.invoke_async(&mut self.connection.clone()).await?;
        Ok(flat
            .chunks_exact(3)
            .map(|c| {
                (c[0] > 0).then(|| Acquired {
                    generation: c[0] as u64,
                    gap: (c[1] >= 0).then(|| (Duration::from_millis(c[1] as u64), c[2] == 1)),
                })
            })
            .collect())
    }

    pub async fn release(&self, instance: &str, generation: u64) -> ::redis::RedisResult<bool> {
        let mut call = self.release.prepare_invoke();
        call.arg(&self.prefix)
            .arg(&self.member)
            .arg(instance)
            .arg(generation);
        let released: i64 = call.invoke_async(&mut self.connection.clone()).await?;
        Ok(released == 1)
    }
}

/// `member|generation`; empty or malformed is no holder.
pub fn parse_holder(value: &str) -> Option<(String, u64)> {
    let (member, generation) = value.rsplit_once('|')?;
    Some((member.to_owned(), generation.parse().ok()?))
}
