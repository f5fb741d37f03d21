//! The sections of the config file, one struct each; every field says what it is for.

use std::path::PathBuf;

use serde::Deserialize;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Published as `app_id` on every result event.
    pub name: String,
    /// Commands of one instance processed at the same time (1 keeps strict per-instance order).
    pub concurrency_per_instance: usize,
    /// Unacked deliveries of all instance queues together: with many instances each queue's
    /// prefetch is lowered so that they fit (memory stays bounded whatever the instance count).
    pub max_in_flight: u32,
    /// Commands handled at once by all instances together (the rest wait, prefetched).
    pub max_handling: usize,
    /// Largest command body accepted, in bytes; larger bodies get `Invalid request body`.
    pub max_body_bytes: usize,
    /// Our own bound on one WhatsApp delete call (the crate's IQ timeout is 75 s).
    pub delete_timeout_ms: u64,
    /// How long a number's resolution (the chat the phone holds) is reused.
    pub lookup_cache_ttl_s: u64,
    /// Number lookups (usync queries) per minute and instance; more wait.
    pub lookups_per_minute: u32,
    /// Most chats an instance's chat index keeps (the ones quiet the longest go first); it
    /// picks each delete's key and range and says whether the phone held the chat.
    pub chat_index_max_chats: usize,
    /// How long in-flight commands may take to finish on shutdown before they are handed back.
    pub shutdown_grace_ms: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            name: "chat-delete-worker".into(),
            concurrency_per_instance: 32,
            max_in_flight: 4096,
            max_handling: 512,
            max_body_bytes: 64 * 1024,
            delete_timeout_ms: 30_000,
            lookup_cache_ttl_s: 24 * 3600,
            lookups_per_minute: 60,
            chat_index_max_chats: 20_000,
            shutdown_grace_ms: 10_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// AMQP URL; `amqps://` for TLS. Credentials may come from `CDW__BROKER__URL`.
    pub url: String,
    /// First part of every exchange and queue name (`chat` gives `chat.commands`, `chat.events`...).
    pub namespace: String,
    /// Unacknowledged deliveries per instance queue.
    pub prefetch: u16,
    /// Queue type of the instance, unrouted and parking queues (quorum needs RabbitMQ 3.8+).
    pub queue_type: QueueType,
    /// Quorum queues only: deliveries of one message before it is dead-lettered to the parking
    /// queue. Catches crash loops; set explicitly because RabbitMQ 4 defaults to 20 and 3.x to none.
    pub delivery_limit: u32,
    /// PEM file of the CA that signed the broker's certificate (for `amqps://`).
    pub ca_file: Option<PathBuf>,
    /// PKCS#12 client identity for mutual TLS, and its password.
    pub client_identity_file: Option<PathBuf>,
    pub client_identity_password: Option<String>,
    /// Other nodes of the same cluster, as `host:port`: after a lost connection the worker
    /// tries the next address in turn (credentials, vhost and TLS come from `url`).
    pub nodes: Vec<String>,
    /// RabbitMQ's HTTP API (`http://host:15672`, same credentials as `url`). When set, queues
    /// are declared with only the arguments that can never change, and the delivery limit,
    /// dead-lettering and leader placement are applied as policies (operators may change them
    /// later without redeclaring anything).
    pub management_url: Option<String>,
    /// A queue that holds commands while its idle consumer got nothing for this long is taken
    /// for one the broker stopped feeding (RabbitMQ can strand a consumer's deliveries after a
    /// quorum-queue leader change): the worker reconnects. 0 turns the check off.
    pub stall_after_ms: u64,
    /// AMQP heartbeat (seconds) asked of the broker, unless `url` sets one: a worker that is
    /// frozen (a long pause, a VM stall) or cut off is detected by the broker after two to
    /// three of them (RabbitMQ), which then hands its queues and the deliveries it held to the
    /// instances' next owners: well within the ownership lease. 0 leaves it to the broker (RabbitMQ: 60 s).
    pub heartbeat_secs: u16,
    /// Before declaring its queues (with `management_url`), the worker compares the file
    /// handles they will take on the broker with the broker's free ones: `refuse` stops it
    /// with the fix when they do not fit, `warn` only logs, `off` skips the look.
    pub capacity_check: CapacityCheck,
}

/// What the worker does when the queues it would declare do not fit the broker's file handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapacityCheck {
    Refuse,
    Warn,
    Off,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            namespace: "chat".into(),
            prefetch: 64,
            queue_type: QueueType::Quorum,
            delivery_limit: 20,
            ca_file: None,
            client_identity_file: None,
            client_identity_password: None,
            nodes: Vec::new(),
            management_url: None,
            stall_after_ms: 30_000,
            heartbeat_secs: 3,
            capacity_check: CapacityCheck::Refuse,
        }
    }
}

/// OpenTelemetry traces: a span per command and one per stage, exported over OTLP/HTTP.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracesConfig {
    /// The OTLP/HTTP endpoint (`http://collector:4318`; `/v1/traces` is added unless given).
    /// Empty (the default): no spans are made and nothing is exported.
    pub otlp_endpoint: String,
    /// `service.name` of the spans.
    pub service_name: String,
    /// Share of the commands traced when their publisher sent no sampling decision (no
    /// `traceparent`); a publisher's sampled flag is followed.
    pub sample_ratio: f64,
}

impl Default for TracesConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            service_name: "chat-delete-worker".into(),
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve `/metrics`, `/healthz` and `/readyz`.
    pub enabled: bool,
    pub bind: String,
    /// 0 picks a free port (tests).
    pub port: u16,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            bind: "0.0.0.0".into(),
            port: 9090,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Folder for the worker's own files (idempotency store, WhatsApp sessions by default).
    pub path: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IdempotencyBackend {
    /// A redb file under `store.path`: no server, one worker process per file.
    Embedded,
    /// Redis: shared by several workers.
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencyConfig {
    pub backend: IdempotencyBackend,
    /// Embedded store file; default `<store.path>/idempotency.redb`.
    pub path: Option<PathBuf>,
    /// Redis URL (may carry credentials: prefer `CDW__IDEMPOTENCY__REDIS_URL`).
    pub redis_url: String,
    /// Prefix of the Redis keys; `{namespace}` stands for `broker.namespace`, so deployments
    /// sharing a Redis keep apart.
    pub key_prefix: String,
    /// Redis: replicas that must acknowledge a write that records an effect (a delete, a
    /// result) before it counts (`WAIT`); 0 trusts the primary alone.
    pub redis_wait_replicas: u32,
    /// How long one `WAIT` may take (an unacknowledged write is retried like an outage).
    pub redis_wait_timeout_ms: u64,
    /// How long 200 and 4xx results are remembered and replayed.
    pub keep_secs: u64,
    /// How long a claim on an id excludes other deliveries of it unless renewed: the worker
    /// renews it every third of this while the command runs, so it bounds how long a vanished
    /// worker's commands wait (Redis; the embedded store knows its previous owner is gone).
    /// At least 2.
    pub lease_secs: u64,
    /// How long a command waits in the worker for an unreachable store before it goes back to
    /// the broker (it keeps its retry budget and comes back after the shortest retry delay).
    pub outage_wait_ms: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            backend: IdempotencyBackend::Embedded,
            path: None,
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: "chat-delete:idem:{namespace}:".into(),
            redis_wait_replicas: 0,
            redis_wait_timeout_ms: 400,
            keep_secs: 24 * 3600,
            lease_secs: 30,
            outage_wait_ms: 10_000,
        }
    }
}

/// Several workers sharing the instances (needs the Redis idempotency store, whose Redis
/// holds the leases).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OwnershipConfig {
    /// Share the instances with the other workers of the same namespace: each is owned (queue
    /// consumed, session held) by one of them at a time. Off: this worker owns all of them.
    pub enabled: bool,
    /// Prefix of the Redis keys (the namespace is appended).
    pub key_prefix: String,
    /// How long a worker's lease on an instance (and its membership) lasts unless renewed:
    /// a worker that vanishes is replaced about this long after its last renewal.
    pub lease_ms: u64,
    /// How often a worker renews and rebalances; at most a third of the lease.
    pub tick_ms: u64,
    /// This worker's weight: with capacities 2 and 1, the first owns two thirds.
    pub capacity: u32,
}

impl Default for OwnershipConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            key_prefix: "chat-delete:own:".into(),
            lease_ms: 10_000,
            tick_ms: 1_000,
            capacity: 1,
        }
    }
}

/// Where WhatsApp sessions (keys, identity, app-state versions) are kept.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    pub store: SessionStoreKind,
    /// `postgres://user:password@host/db`; may come from `CDW__SESSIONS__POSTGRES_URL`.
    pub postgres_url: Option<String>,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            store: SessionStoreKind::Sqlite,
            postgres_url: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionStoreKind {
    /// One SQLite file per instance under `store.path/sessions` (one host).
    Sqlite,
    /// PostgreSQL: every worker that gains an instance can open its session.
    Postgres,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries of a transient failure inside one delivery (with exponential backoff and jitter).
    pub in_process_attempts: usize,
    pub in_process_min_delay_ms: u64,
    pub in_process_max_delay_ms: u64,
    /// Then, one delayed redelivery through the broker per entry, waiting that long; when they
    /// are spent the final 503/500 is published and the command parked. The default adds up
    /// to about 5 minutes.
    pub broker_delays_ms: Vec<u64>,
}

impl RetryConfig {
    /// The retry queues' delays: one queue per distinct delay, shortest first.
    pub fn tiers(&self) -> Vec<u64> {
        let mut tiers = self.broker_delays_ms.clone();
        tiers.sort_unstable();
        tiers.dedup();
        tiers
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            in_process_attempts: 3,
            in_process_min_delay_ms: 100,
            in_process_max_delay_ms: 2_000,
            broker_delays_ms: vec![5_000, 30_000, 120_000, 120_000],
        }
    }
}

/// Deletes per minute per token, or `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacingLimit {
    PerMinute(u32),
    Unlimited,
}

impl<'de> Deserialize<'de> for PacingLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u32),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(0) => Err(serde::de::Error::custom("use \"unlimited\" instead of 0")),
            Raw::Number(n) => Ok(PacingLimit::PerMinute(n)),
            Raw::Text(t) if t == "unlimited" => Ok(PacingLimit::Unlimited),
            Raw::Text(_) => Err(serde::de::Error::custom(
                "expected a number or \"unlimited\"",
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PacingConfig {
    /// Deletes each token may start per minute: across all workers with the Redis idempotency
    /// store (kept in Redis), else per worker process.
    pub deletes_per_minute: PacingLimit,
    /// Deletes a quiet token may start at once beyond the first: no sliding minute holds more
    /// than `deletes_per_minute + burst`.
    pub burst: u32,
    /// Prefix of the per-token pacing keys in Redis (apart from the idempotency records, whose
    /// keys end with whatever id a publisher sends); `{namespace}` as for the records.
    pub redis_key_prefix: String,
}

impl Default for PacingConfig {
    fn default() -> Self {
        Self {
            deletes_per_minute: PacingLimit::PerMinute(100),
            burst: 0,
            redis_key_prefix: "chat-delete:pacing:{namespace}:".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    /// SHA-256 (hex) of the account's token; `chat-delete-worker token-hash` prints it.
    pub token_sha256: TokenHash,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceConfig {
    /// The account that owns the instance: its TokenAccount is accepted too.
    pub account: Option<String>,
    /// SHA-256 (hex) of the instance's own token (TokenInstance).
    pub token_sha256: TokenHash,
    pub kind: InstanceKind,
    /// `whatsapp` only: the SQLite session file; default `<store.path>/sessions/<instance>.db`.
    pub session_store: Option<PathBuf>,
    /// `whatsapp` only: another WebSocket endpoint than WhatsApp's (a mock server).
    pub transport_url: Option<String>,
    /// `simulated` only: how the scripted session behaves.
    #[serde(default)]
    pub simulated: SimulatedConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceKind {
    /// A real linked device through whatsapp-rust.
    Whatsapp,
    /// A scripted in-process session: no phone, no WhatsApp. For trying the worker, tests and
    /// benchmarks.
    Simulated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SimulatedFailure {
    NotConnected,
    Timeout,
    ServerError,
    Rejected,
    /// The delete is applied, then its answer times out (as a real send whose reply is late).
    TimeoutAfterEffect,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedConfig {
    /// Whether the simulated session is connected and logged in.
    pub connected: bool,
    /// Time each delete takes.
    pub latency_ms: u64,
    /// Run each delete on a task of its own once its turn comes, as the real session's actor
    /// does: a command dropped while its delete is being sent does not stop the delete.
    pub detached_effects: bool,
    /// The first N deletes fail with `failure`.
    pub fail_first: u32,
    pub failure: SimulatedFailure,
    /// Appends one line per delete performed (time in µs, chat, the mutation's time in ms) to
    /// this file, flushed to disk.
    pub effects_log: Option<PathBuf>,
    /// When set, the session is connected exactly while this file exists (lets tests and
    /// harnesses connect an instance while the worker runs).
    pub connected_flag_file: Option<PathBuf>,
    /// What a phone number resolves to (digits as given -> JID deleted); any other number is
    /// its own `<digits>@s.whatsapp.net`.
    pub resolve: std::collections::BTreeMap<String, crate::contract::ChatJid>,
    /// The instance's chat list (JIDs): a 200 says `chat_known = true` for a chat in it and
    /// `false` for another; without it, `unknown`.
    pub chat_list: Option<std::collections::BTreeSet<String>>,
    /// A folder standing for WhatsApp's servers, shared by every worker: the session is
    /// connected only while it is the instance's latest client there. A delete by a client
    /// another one replaced is refused and logged: to `overlaps.log` when the client checked
    /// its fence after it was replaced, else to `refused.log`; a connect made after the
    /// client's lease ended goes to `stale-connects.log` (harnesses count all three).
    pub world_dir: Option<PathBuf>,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            connected: true,
            latency_ms: 0,
            detached_effects: false,
            fail_first: 0,
            failure: SimulatedFailure::NotConnected,
            effects_log: None,
            connected_flag_file: None,
            resolve: Default::default(),
            chat_list: None,
            world_dir: None,
        }
    }
}

/// A SHA-256 digest of a token, parsed from 64 hex characters.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    pub fn of(token: &[u8]) -> Self {
        Self(Sha256::digest(token).into())
    }
}

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({})", hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for TokenHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut out).map_err(|_| {
            serde::de::Error::custom("expected the SHA-256 of the token as 64 hex characters")
        })?;
        Ok(Self(out))
    }
}
