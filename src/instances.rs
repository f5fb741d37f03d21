//! The hosted instances: name → credentials and session, built from the config.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::config::{Config, InstanceKind, TokenHash};
use crate::fence::Lease;
use crate::session::postgres::PgSessions;
use crate::session::{ChatSession, SessionOptions, SimulatedSession, WhatsappSession};

use crate::auth::Envelope;
use crate::auth::InstanceCredentials;

/// One hosted instance.
pub struct Instance {
    name: String,
    credentials: InstanceCredentials,
    session: Arc<dyn ChatSession>,
    /// Whether this worker owns the instance: the fence of every effect on it.
    lease: Arc<Lease>,
}

impl Instance {
    /// An instance this worker owns for good (a lone worker).
    pub fn new(
        name: &str,
        credentials: InstanceCredentials,
        session: Arc<dyn ChatSession>,
    ) -> Self {
        Self::with_lease(name, credentials, session, Arc::new(Lease::permanent()))
    }

    fn with_lease(
        name: &str,
        credentials: InstanceCredentials,
        session: Arc<dyn ChatSession>,
        lease: Arc<Lease>,
    ) -> Self {
        Self {
            name: name.to_owned(),
            credentials,
            session,
            lease,
        }
    }

    pub fn lease(&self) -> &Arc<Lease> {
        &self.lease
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn session(&self) -> &dyn ChatSession {
        self.session.as_ref()
    }

    /// The hash of the token that opens this command: the one it carries, or the one its
    /// proof was made with (a retried or parked copy).
    pub fn authenticate(&self, envelope: &Envelope, body: &[u8]) -> Option<TokenHash> {
        if envelope.token.is_some() {
            return self.credentials.authenticate(envelope.token.as_deref());
        }
        let proof = envelope.token_proof.as_ref()?;
        let id = envelope.idempotency_id.as_deref()?;
        self.credentials.verify(proof, &self.name, id, body)
    }
}

/// Every instance this worker hosts, by name.
#[derive(Default)]
pub struct Instances {
    by_name: BTreeMap<String, Arc<Instance>>,
}

impl Instances {
    /// Opens every configured instance's session (a `whatsapp` session connects only when it
    /// is paired). With ownership shared between workers, sessions stay closed and leases
    /// vacant until this worker takes the instance.
    pub async fn from_config(config: &Config) -> std::io::Result<Self> {
        let shared = config.ownership.enabled;
        let database = PgSessions::from_config(config).map_err(std::io::Error::other)?;
        let mut by_name = BTreeMap::new();
        for (name, cfg) in &config.instances {
            let lease = Arc::new(match shared {
                true => Lease::vacant(),
                false => Lease::permanent(),
            });
            let options = || SessionOptions {
                owner: Some(lease.clone()),
                ..SessionOptions::of(config, name, database.as_ref())
            };
            let session: Arc<dyn ChatSession> = match cfg.kind {
                InstanceKind::Simulated => {
                    let mut session = SimulatedSession::new(name, &cfg.simulated)?;
                    if shared {
                        session = session.owned_through(lease.clone());
                    }
                    Arc::new(match &database {
                        Some(db) => session.in_database(name, db.clone()),
                        None => session,
                    })
                }
                InstanceKind::Whatsapp if shared => {
                    Arc::new(WhatsappSession::closed(name, options()))
                }
                InstanceKind::Whatsapp => Arc::new(WhatsappSession::start(name, options()).await),
            };
            if !shared && cfg.kind == InstanceKind::Simulated {
                session.open().await;
            }
            let account_token = cfg
                .account
                .as_ref()
                .and_then(|a| config.accounts.get(a))
                .map(|a| a.token_sha256);
            let credentials = InstanceCredentials {
                instance_token: cfg.token_sha256,
                account_token,
            };
            let instance = Instance::with_lease(name, credentials, session, lease);
            by_name.insert(name.clone(), Arc::new(instance));
        }
        Ok(Self { by_name })
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Instance>> {
        self.by_name.get(name)
    }

    /// In name order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Instance>> {
        self.by_name.values()
    }

    /// Stops every session, flushing what they keep.
    pub async fn shutdown(&self) {
        for instance in self.iter() {
            instance.session().shutdown().await;
        }
    }
}
