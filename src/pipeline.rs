//! The stages between a decoded delivery and its outcome: authenticate, validate, delete the
//! chat on the instance's session, purge its media.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};

use crate::auth::InstanceCredentials;
use crate::command::{ChatJid, parse_body};
use crate::config::{Config, InstanceKind};
use crate::decode::Envelope;
use crate::media::MediaStore;
use crate::outcome::Outcome;
use crate::session::{ChatSession, SessionError, SimulatedSession, WhatsappSession};
use crate::telemetry;

/// One hosted instance.
pub struct Instance {
    pub name: String,
    pub credentials: InstanceCredentials,
    pub session: Arc<dyn ChatSession>,
}

/// Where a delivery came from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    Instance(&'a Instance),
    /// The unrouted queue: no worker hosts the routing key.
    Unrouted { routing_key: &'a str },
}

/// The outcome of one processing, with what the result event needs to say about it.
#[derive(Debug)]
pub struct Handled {
    pub outcome: Outcome,
    pub chat: Option<ChatJid>,
    /// Tries of the work so far, this delivery's included.
    pub attempts: u32,
}

/// In-process retries of transient failures, before the command is answered or sent back to
/// the broker for a later try.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 3,
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.attempts.saturating_sub(1))
            .with_jitter()
    }
}

/// Everything the pipeline needs, shared by all consumers.
pub struct Pipeline {
    pub instances: HashMap<String, Arc<Instance>>,
    pub media: MediaStore,
    pub max_body_bytes: usize,
    pub retry: RetryPolicy,
}

impl Pipeline {
    /// Opens every configured instance's session and the media store.
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let mut instances = HashMap::new();
        let delete_timeout = Duration::from_millis(config.worker.delete_timeout_ms);
        for (name, cfg) in &config.instances {
            let session: Arc<dyn ChatSession> = match cfg.kind {
                InstanceKind::Simulated => Arc::new(SimulatedSession::new(&cfg.simulated)?),
                InstanceKind::Whatsapp => {
                    let path = config.session_store_path(name);
                    Arc::new(WhatsappSession::open(name, &path, delete_timeout).await?)
                }
            };
            let account_token = cfg
                .account
                .as_ref()
                .and_then(|a| config.accounts.get(a))
                .map(|a| a.token_sha256);
            let instance = Instance {
                name: name.clone(),
                credentials: InstanceCredentials {
                    instance_token: cfg.token_sha256,
                    account_token,
                },
                session,
            };
            instances.insert(name.clone(), Arc::new(instance));
        }
        Ok(Self {
            instances,
            media: MediaStore::from_config(&config.media)?,
            max_body_bytes: config.worker.max_body_bytes,
            retry: RetryPolicy::default(),
        })
    }

    /// Runs the contract's checks in order and does the work.
    pub async fn handle(&self, source: Source<'_>, envelope: &Envelope, body: &[u8]) -> Handled {
        let attempts = envelope.previous_attempts.saturating_add(1);
        let answer = |outcome| Handled {
            outcome,
            chat: None,
            attempts,
        };
        if envelope.idempotency_id.is_none() {
            return answer(Outcome::MissingIdempotencyId);
        }
        let instance = match source {
            Source::Unrouted { .. } => return answer(Outcome::InstanceNotFound),
            Source::Instance(instance) => instance,
        };
        if instance
            .credentials
            .authenticate(envelope.token.as_deref())
            .is_none()
        {
            return answer(Outcome::InvalidToken);
        }
        let request = match parse_body(body, self.max_body_bytes) {
            Ok(request) => request,
            Err(outcome) => return answer(outcome),
        };
        let chat = request.chat;
        let (result, tries) = self.delete_chat(instance, &chat, request.delete_media).await;
        let attempts = envelope.previous_attempts.saturating_add(tries);
        let outcome = match result {
            Err(SessionError::NotConnected) => Outcome::NotConnected,
            Err(err) => Outcome::DeleteChatFailed(err.reason()),
            Ok(()) if request.delete_media => match self.purge_media(instance, &chat).await {
                Ok(()) => Outcome::Deleted {
                    chat: chat.clone(),
                    delete_media: true,
                },
                Err(reason) => Outcome::DeleteMediaFailed(reason),
            },
            Ok(()) => Outcome::Deleted {
                chat: chat.clone(),
                delete_media: false,
            },
        };
        Handled {
            outcome,
            chat: Some(chat),
            attempts,
        }
    }

    /// The session delete with in-process retries of transient errors; returns the last result
    /// and how many tries it took.
    async fn delete_chat(
        &self,
        instance: &Instance,
        chat: &ChatJid,
        delete_media: bool,
    ) -> (Result<(), SessionError>, u32) {
        let started = Instant::now();
        let mut tries = 0u32;
        let result = (|| {
            tries += 1;
            instance.session.delete_chat(chat, delete_media)
        })
        .retry(self.retry.backoff())
        .when(SessionError::is_retryable)
        .notify(|err, _| {
            metrics::counter!(telemetry::RETRIES, "stage" => "session_delete").increment(1);
            tracing::debug!(error = %err, "Retrying the chat delete.");
        })
        .await;
        metrics::histogram!(telemetry::STAGE_DURATION, "stage" => "session_delete")
            .record(started.elapsed().as_secs_f64());
        (result, tries)
    }

    async fn purge_media(&self, instance: &Instance, chat: &ChatJid) -> Result<(), String> {
        let started = Instant::now();
        let result = self.media.purge_chat(&instance.name, chat.as_str()).await;
        metrics::histogram!(telemetry::STAGE_DURATION, "stage" => "media_purge")
            .record(started.elapsed().as_secs_f64());
        match result {
            Ok(report) => {
                tracing::debug!(objects = report.objects, bytes = report.bytes, "Media purged.");
                Ok(())
            }
            Err(err) => Err(err.reason()),
        }
    }
}
