//! The worker's configuration: one typed struct, read from a TOML file and then overridden by
//! environment variables (`CDW__SECTION__KEY=value`). Unknown keys are rejected and every error
//! names the key it is about.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod env;
mod sections;

pub use sections::*;

use crate::contract::wire::is_valid_instance_name;
use crate::media::MediaConfig;
use env::apply_env_override;

/// Prefix of environment overrides: `CDW__BROKER__URL` sets `broker.url`.
pub const ENV_PREFIX: &str = "CDW__";

/// Shortest claim lease: renewals come every third of it, a store round trip each.
pub const MIN_LEASE_SECS: u64 = 2;

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
    #[serde(default)]
    pub ownership: OwnershipConfig,
    #[serde(default)]
    pub sessions: SessionsConfig,
    #[serde(default)]
    pub traces: TracesConfig,
    /// Accounts by name; an account's token (TokenAccount) is valid for every instance it owns.
    #[serde(default)]
    pub accounts: BTreeMap<String, AccountConfig>,
    /// Instances hosted by this worker, by name (the routing key of their commands).
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceConfig>,
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
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| ConfigError::Invalid {
                key: e.path().to_string(),
                message: e.into_inner().message().to_owned(),
            })?;
        // `{namespace}` in the media prefix is the deployment's, fixed for the process.
        let template = &config.media.prefix_template;
        config.media.prefix_template = template.replace("{namespace}", &config.broker.namespace);
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
        let counts = [
            ("broker.prefetch", usize::from(self.broker.prefetch)),
            ("retry.in_process_attempts", self.retry.in_process_attempts),
            ("worker.max_handling", self.worker.max_handling),
            ("worker.max_in_flight", self.worker.max_in_flight as usize),
            (
                "worker.concurrency_per_instance",
                self.worker.concurrency_per_instance,
            ),
        ];
        if let Some((key, _)) = counts.iter().find(|(_, n)| *n == 0) {
            return Err(invalid((*key).into(), "must be at least 1"));
        }
        if self.idempotency.lease_secs < MIN_LEASE_SECS {
            return Err(invalid(
                "idempotency.lease_secs".into(),
                "must be at least 2 (a claim is renewed every third of it)",
            ));
        }
        if self.retry.broker_delays_ms.is_empty() {
            // The retry queues are declared from these delays: a command waiting for another
            // delivery, or for the store, needs at least one.
            return Err(invalid(
                "retry.broker_delays_ms".into(),
                "needs at least one delay",
            ));
        }
        if self.retry.broker_delays_ms.iter().any(|d| *d < 10) {
            return Err(invalid(
                "retry.broker_delays_ms".into(),
                "delays are at least 10 ms",
            ));
        }
        let ownership = &self.ownership;
        if ownership.enabled && self.idempotency.backend != IdempotencyBackend::Redis {
            return Err(invalid(
                "ownership.enabled".into(),
                "workers share instances through Redis: set idempotency.backend = \"redis\"",
            ));
        }
        if ownership.capacity == 0 {
            return Err(invalid("ownership.capacity".into(), "must be at least 1"));
        }
        if ownership.tick_ms == 0 || ownership.tick_ms.saturating_mul(3) > ownership.lease_ms {
            return Err(invalid(
                "ownership.tick_ms".into(),
                "must be between 1 and a third of ownership.lease_ms",
            ));
        }
        if self.sessions.store == SessionStoreKind::Postgres && self.sessions.postgres_url.is_none()
        {
            return Err(invalid(
                "sessions.postgres_url".into(),
                "required when sessions.store = \"postgres\"",
            ));
        }
        if !(0.0..=1.0).contains(&self.traces.sample_ratio) {
            return Err(invalid(
                "traces.sample_ratio".into(),
                "must be between 0 and 1",
            ));
        }
        let endpoint = &self.traces.otlp_endpoint;
        if !endpoint.is_empty()
            && !endpoint.starts_with("http://")
            && !endpoint.starts_with("https://")
        {
            return Err(invalid(
                "traces.otlp_endpoint".into(),
                "must be an http:// or https:// URL (OTLP/HTTP)",
            ));
        }
        if let Some(node) = self.broker.nodes.iter().find(|n| host_port(n).is_none()) {
            return Err(invalid(
                "broker.nodes".into(),
                &format!("`{node}` is not host:port"),
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

    /// The Redis key prefix of this namespace's ownership state.
    pub fn ownership_prefix(&self) -> String {
        format!("{}{}:", self.ownership.key_prefix, self.broker.namespace)
    }

    /// The Redis key prefix of the idempotency records, `{namespace}` filled in.
    pub fn idempotency_prefix(&self) -> String {
        self.in_namespace(&self.idempotency.key_prefix)
    }

    /// The Redis key prefix of the shared pacing schedule, `{namespace}` filled in.
    pub fn pacing_prefix(&self) -> String {
        self.in_namespace(&self.pacing.redis_key_prefix)
    }

    fn in_namespace(&self, prefix: &str) -> String {
        prefix.replace("{namespace}", &self.broker.namespace)
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

/// A `broker.nodes` entry: `host:port`.
pub fn host_port(node: &str) -> Option<(&str, u16)> {
    let (host, port) = node.rsplit_once(':')?;
    Some((host, port.parse().ok()?)).filter(|_| !host.is_empty())
}

fn is_valid_namespace(ns: &str) -> bool {
    (1..=64).contains(&ns.len())
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
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
    fn a_lease_too_short_to_renew_is_refused() {
        let err = Config::load(None, env(&[("CDW__IDEMPOTENCY__LEASE_SECS", "1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("idempotency.lease_secs"), "{err}");
        Config::load(None, env(&[("CDW__IDEMPOTENCY__LEASE_SECS", "2")])).unwrap();
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

    /// Defect (found by review): the idempotency and pacing prefixes did not include the
    /// namespace by default, so two deployments sharing a Redis shared records by id (a reused
    /// id replayed another deployment's answer) and pacing budgets.
    #[test]
    fn default_prefixes_keep_deployments_apart() {
        let toml = |ns: &str| {
            format!(
                "[broker]\nnamespace = \"{ns}\"\n[media]\nprefix_template = \"{{namespace}}/{{instance}}/{{chat_jid}}/\"\n[instances.a]\nkind = \"simulated\"\ntoken_sha256 = \"{}\"\n",
                "0".repeat(64)
            )
        };
        let blue = Config::from_toml(&toml("blue")).unwrap();
        let green = Config::from_toml(&toml("green")).unwrap();
        assert_eq!(blue.idempotency_prefix(), "chat-delete:idem:blue:");
        assert_eq!(blue.pacing_prefix(), "chat-delete:pacing:blue:");
        assert_ne!(blue.idempotency_prefix(), green.idempotency_prefix());
        assert_ne!(blue.pacing_prefix(), green.pacing_prefix());
        assert_ne!(blue.ownership_prefix(), green.ownership_prefix());
        assert_eq!(blue.media.prefix_template, "blue/{instance}/{chat_jid}/");
    }

    #[test]
    fn the_shipped_example_configs_are_valid() {
        let compose = Config::from_toml(include_str!("../../deploy/config.toml")).unwrap();
        assert_eq!(compose.idempotency.backend, IdempotencyBackend::Redis);
        Config::from_toml(include_str!("../../config.example.toml")).unwrap();
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
