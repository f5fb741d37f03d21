//! The coordination state in Redis: who is alive (a sorted set of members by expiry, with
//! their capacities) and who holds each instance (a lease key `member|generation` with a TTL,
//! the generation from a counter per instance). Every change is one script, timed on Redis's
//! clock.

use std::time::Duration;

use ::redis::Script;
use ::redis::aio::ConnectionManager;

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

/// `now` on Redis's clock; ARGV[1] is every script's key prefix.
const PREAMBLE: &str = concat!(include_str!("../lua/now.lua"), "local p = ARGV[1]\n");
/// ARGV: prefix, member, capacity (0: not taking part), lease ms, held leases, instances (see
/// the file): refreshes the member and renews its leases, answers what every member sees.
const HEARTBEAT: &str = include_str!("heartbeat.lua");
/// ARGV: prefix, member, lease ms, instances: takes each free lease with the next generation.
const ACQUIRE: &str = include_str!("acquire.lua");
/// ARGV: prefix, member, instance, generation: deletes the lease if it is still ours.
const RELEASE: &str = include_str!("release.lua");

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
        let script = |body: &str| Script::new(&format!("{PREAMBLE}{body}"));
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
