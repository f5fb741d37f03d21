//! The worker's configuration: one typed struct, read from a TOML file and then overridden by
//! environment variables (`CDW__SECTION__KEY=value`). Unknown keys are rejected and every error
//! names the key it is about.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::media::MediaConfig;

/// Prefix of environment overrides: `CDW__BROKER__URL` sets `broker.url`.
pub const ENV_PREFIX: &str = "CDW__";

/// Token of the built-in `demo` instance used when no config file is given.
pub const DEMO_TOKEN: &str = "demo-token";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub worker: WorkerConfig,
    #[serde(default)]
    pub broker: BrokerConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub media: MediaConfig,
    #[serde(default)]
    pub idempotency: IdempotencyConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub pacing: PacingConfig,
    /// Accounts by name; an account's token (TokenAccount) is valid for every instance it owns.
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountConfig>,
    /// Instances hosted by this worker, by name (the routing key of their commands).
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceConfig>,
}

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
    /// Prefix of the Redis keys.
    pub key_prefix: String,
    /// How long 200 and 4xx results are remembered and replayed.
    pub keep_secs: u64,
    /// How long a claim on an id excludes other deliveries of it when its worker vanished
    /// (Redis; the embedded store knows its previous owner is gone).
    pub lease_secs: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self {
            backend: IdempotencyBackend::Embedded,
            path: None,
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: "chat-delete:idem:".into(),
            keep_secs: 24 * 3600,
            lease_secs: 120,
        }
    }
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
    /// Deletes each token may start per minute (per worker process).
    pub deletes_per_minute: PacingLimit,
}

impl Default for PacingConfig {
    fn default() -> Self {
        Self {
            deletes_per_minute: PacingLimit::PerMinute(100),
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedConfig {
    /// Whether the simulated session is connected and logged in.
    pub connected: bool,
    /// Time each delete takes.
    pub latency_ms: u64,
    /// The first N deletes fail with `failure`.
    pub fail_first: u32,
    pub failure: SimulatedFailure,
    /// Appends one line per delete performed (time, chat) to this file, flushed to disk.
    pub effects_log: Option<PathBuf>,
    /// When set, the session is connected exactly while this file exists (lets tests and
    /// harnesses connect an instance while the worker runs).
    pub connected_flag_file: Option<PathBuf>,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        Self {
            connected: true,
            latency_ms: 0,
            fail_first: 0,
            failure: SimulatedFailure::NotConnected,
            effects_log: None,
            connected_flag_file: None,
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("config key `{key}`: {message}")]
    Invalid { key: String, message: String },
}

/// True for names allowed as instance names: they become queue names, routing keys, metric
/// labels and media paths.
pub fn is_valid_instance_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=64).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
}

impl Config {
    /// Reads `path` (or the embedded demo defaults when `None`), then applies the `CDW__*`
    /// variables of `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                toml::from_str::<toml::Table>(&text).map_err(|e| ConfigError::Syntax {
                    path: path.to_owned(),
                    message: e.message().to_owned(),
                })?
            }
            None => Self::demo_table(),
        };
        for (var, value) in env {
            if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
                apply_env_override(&mut table, &var, rest, &value)?;
            }
        }
        Self::from_table(table)
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let table = toml::from_str::<toml::Table>(text).map_err(|e| ConfigError::Syntax {
            path: PathBuf::from("<inline>"),
            message: e.message().to_owned(),
        })?;
        Self::from_table(table)
    }

    fn from_table(table: toml::Table) -> Result<Self, ConfigError> {
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                ConfigError::Invalid {
                    key: e.path().to_string(),
                    message: e.into_inner().message().to_owned(),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The embedded defaults: one simulated, connected instance `demo` whose token is
    /// `demo-token`, so the worker runs without a phone or a config file.
    fn demo_table() -> toml::Table {
        let hash = hex::encode(TokenHash::of(DEMO_TOKEN.as_bytes()).0);
        toml::from_str(&format!(
            "[instances.demo]\nkind = \"simulated\"\ntoken_sha256 = \"{hash}\"\n"
        ))
        .expect("demo config is valid TOML")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: String, message: &str| ConfigError::Invalid {
            key,
            message: message.to_owned(),
        };
        for (name, instance) in &self.instances {
            if !is_valid_instance_name(name) {
                return Err(invalid(
                    format!("instances.{name}"),
                    "instance names are 1 to 64 letters, digits, '-' or '_', starting with a letter or digit",
                ));
            }
            if let Some(account) = &instance.account
                && !self.accounts.contains_key(account)
            {
                return Err(invalid(
                    format!("instances.{name}.account"),
                    "no such account in [accounts]",
                ));
            }
        }
        if self.instances.is_empty() {
            return Err(invalid(
                "instances".into(),
                "at least one instance is required",
            ));
        }
        if !is_valid_namespace(&self.broker.namespace) {
            return Err(invalid(
                "broker.namespace".into(),
                "1 to 64 letters, digits, '.', '-' or '_'",
            ));
        }
        if self.broker.prefetch == 0 {
            return Err(invalid("broker.prefetch".into(), "must be at least 1"));
        }
        if self.retry.in_process_attempts == 0 {
            return Err(invalid(
                "retry.in_process_attempts".into(),
                "must be at least 1",
            ));
        }
        if self.retry.broker_delays_ms.iter().any(|d| *d < 10) {
            return Err(invalid(
                "retry.broker_delays_ms".into(),
                "delays are at least 10 ms",
            ));
        }
        if self.worker.max_handling == 0 {
            return Err(invalid("worker.max_handling".into(), "must be at least 1"));
        }
        if self.worker.max_in_flight == 0 {
            return Err(invalid("worker.max_in_flight".into(), "must be at least 1"));
        }
        if self.worker.concurrency_per_instance == 0 {
            return Err(invalid(
                "worker.concurrency_per_instance".into(),
                "must be at least 1",
            ));
        }
        self.media.validate().map_err(|e| ConfigError::Invalid {
            key: format!("media.{}", e.key),
            message: e.message,
        })
    }

    /// The prefetch of each of `queues` consumers: `broker.prefetch`, lowered (to 1 at least)
    /// so that all of them together hold at most `worker.max_in_flight` deliveries.
    pub fn prefetch_per_queue(&self, queues: usize) -> u16 {
        let share = self.worker.max_in_flight as usize / queues.max(1);
        self.broker
            .prefetch
            .min(share.clamp(1, usize::from(u16::MAX)) as u16)
    }

    pub fn idempotency_path(&self) -> PathBuf {
        self.idempotency
            .path
            .clone()
            .unwrap_or_else(|| self.store.path.join("idempotency.redb"))
    }

    /// The session file of a `whatsapp` instance.
    pub fn session_store_path(&self, instance: &str) -> PathBuf {
        let configured = self
            .instances
            .get(instance)
            .and_then(|i| i.session_store.clone());
        configured.unwrap_or_else(|| {
            self.store
                .path
                .join("sessions")
                .join(format!("{instance}.db"))
        })
    }
}

fn is_valid_namespace(ns: &str) -> bool {
    (1..=64).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// `CDW__INSTANCES__DEMO__TOKEN_SHA256=...` sets `instances.demo.token_sha256`. Segments match
/// existing keys case-insensitively (environment names are usually upper case); new keys are
/// lower-cased. Values are read as TOML scalars when they parse as one, else as strings.
fn apply_env_override(
    table: &mut toml::Table,
    var: &str,
    path: &str,
    raw: &str,
) -> Result<(), ConfigError> {
    let segments: Vec<&str> = path.split("__").collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::Env {
            var: var.to_owned(),
            message: "empty key segment".into(),
        });
    }
    let mut current = table;
    for (i, segment) in segments.iter().enumerate() {
        let key = current
            .keys()
            .find(|k| k.eq_ignore_ascii_case(segment))
            .cloned()
            .unwrap_or_else(|| segment.to_ascii_lowercase());
        if i + 1 == segments.len() {
            current.insert(key, parse_env_value(raw));
            return Ok(());
        }
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
            var: var.to_owned(),
            message: format!("`{key}` is not a table"),
        })?;
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn embedded_defaults_host_a_connected_simulated_demo_instance() {
        let config = Config::load(None, env(&[])).unwrap();
        let demo = &config.instances["demo"];
        assert_eq!(demo.token_sha256, TokenHash::of(DEMO_TOKEN.as_bytes()));
        assert_eq!(demo.kind, InstanceKind::Simulated);
        assert!(demo.simulated.connected);
        assert_eq!(config.broker.namespace, "chat");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_path() {
        let err = Config::from_toml(
            "[broker]\nurll = \"x\"\n[instances.a]\nkind=\"simulated\"\ntoken_sha256=\"00\"",
        )
        .unwrap_err();
        assert!(err.to_string().contains("broker"), "{err}");
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let text = "[instances.a]\nkind = \"simulated\"\ntoken_sha256 = \"nothex\"\n";
        let err = Config::from_toml(text).unwrap_err().to_string();
        assert!(err.contains("instances.a.token_sha256"), "{err}");
        let text = format!(
            "[instances.\"a/b\"]\nkind = \"simulated\"\ntoken_sha256 = \"{}\"\n",
            "0".repeat(64)
        );
        let err = Config::from_toml(&text).unwrap_err().to_string();
        assert!(err.contains("instances.a/b"), "{err}");
    }

    #[test]
    fn a_bad_media_section_is_a_config_error_naming_its_key() {
        let text = "[media]\nprefix_template = \"{instance}/\"\n[instances.a]\nkind = \"simulated\"\ntoken_sha256 = \"{}\"\n";
        let err = Config::from_toml(&text.replace("{}", &"0".repeat(64))).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Invalid { key, .. } if key == "media.prefix_template"),
            "{err}"
        );
    }

    #[test]
    fn many_queues_share_the_in_flight_budget() {
        let config = Config::load(None, env(&[])).unwrap();
        assert_eq!(config.prefetch_per_queue(2), 64, "the configured prefetch");
        assert_eq!(config.prefetch_per_queue(1_001), 4, "4096 / 1001");
        assert_eq!(config.prefetch_per_queue(10_000), 1, "never 0 (unlimited)");
    }

    #[test]
    fn environment_overrides_existing_and_new_keys() {
        let config = Config::load(
            None,
            env(&[
                ("CDW__BROKER__URL", "amqp://u:p@h:1/%2f"),
                ("CDW__BROKER__PREFETCH", "7"),
                ("CDW__INSTANCES__DEMO__SIMULATED__LATENCY_MS", "5"),
                ("OTHER", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(config.broker.url, "amqp://u:p@h:1/%2f");
        assert_eq!(config.broker.prefetch, 7);
        assert_eq!(config.instances["demo"].simulated.latency_ms, 5);
        let config = Config::load(
            None,
            env(&[("CDW__PACING__DELETES_PER_MINUTE", "unlimited")]),
        )
        .unwrap();
        assert_eq!(config.pacing.deletes_per_minute, PacingLimit::Unlimited);
        let config =
            Config::load(None, env(&[("CDW__RETRY__BROKER_DELAYS_MS", "[100, 200]")])).unwrap();
        assert_eq!(config.retry.broker_delays_ms, vec![100, 200]);
        let err = Config::load(None, env(&[("CDW__BROKER__NOPE", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn the_shipped_example_configs_are_valid() {
        let compose = Config::from_toml(include_str!("../deploy/config.toml")).unwrap();
        assert_eq!(compose.idempotency.backend, IdempotencyBackend::Redis);
        Config::from_toml(include_str!("../config.example.toml")).unwrap();
    }

    #[test]
    fn instance_names_follow_the_contract() {
        for ok in ["a", "demo", "Sales_BR-1", &"x".repeat(64)] {
            assert!(is_valid_instance_name(ok), "{ok}");
        }
        for bad in ["", "-a", "_a", "a.b", "a/b", "a b", &"x".repeat(65), "é"] {
            assert!(!is_valid_instance_name(bad), "{bad}");
        }
    }
}
