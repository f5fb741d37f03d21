//! The stages between a delivery and its [`Verdict`], in the contract's order: read the
//! envelope and authenticate ([`crate::auth`]), check idempotency, validate the body
//! ([`crate::contract::request`]), pace ([`pacing`]), delete the chat on the instance's
//! session, purge its media, remember. [`Pipeline::handle`] runs them; it never touches the
//! broker ([`crate::bus::settle`] carries the verdict out).
//!
//! A claimed command is handled while its claim is renewed, and every effect checks the claim
//! first (`crate::fence`): a claim that was lost stops the command before its next effect and
//! hands it back. The store is reached through `memory`, which waits out an outage.

mod memory;
pub mod pacing;
mod verdict;

use verdict::{Done, Failure, replay};
pub use verdict::{Handled, Source, Verdict};

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use backon::{ExponentialBuilder, Retryable};
use tracing::Instrument;

use crate::config::{Config, IdempotencyBackend, RetryConfig, TokenHash};
use crate::contract::{ChatKnown, Deletion, MediaErased, Outcome};
use crate::fence::{Both, Committed, Committing, Fence};
use crate::idempotency::{
    Begin, Claim, Durability, EmbeddedStore, Fingerprint, Held, IdempotencyStore, Lifetimes,
    RedisStore, Remembered, StoreError,
};
use crate::media::{MediaError, MediaStore, PurgeReport};
use crate::session::{Deleted, SessionError};
use crate::telemetry::traces::{self, Kind};
use crate::telemetry::{self, CommandLog};
use memory::{Memory, Patience};

use crate::auth::Envelope;
use crate::contract::{ChatJid, DeleteRequest, parse_body};
use crate::instances::{Instance, Instances};
use pacing::Pacer;

/// Everything the pipeline needs, shared by all consumers.
pub struct Pipeline {
    instances: Arc<Instances>,
    media: MediaStore,
    memory: Memory,
    /// How long a claim lasts unless renewed.
    claim_ttl: Duration,
    pacer: Pacer,
    max_body_bytes: usize,
    retry: RetryConfig,
    session_delete_duration: metrics::Histogram,
    claim_duration: metrics::Histogram,
    remember_duration: metrics::Histogram,
}

impl Pipeline {
    /// Opens every configured instance's session, the media store and the idempotency store.
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let instances = Arc::new(Instances::from_config(config).await?);
        let lifetimes = Lifetimes {
            claim: Duration::from_secs(config.idempotency.lease_secs),
            keep: Duration::from_secs(config.idempotency.keep_secs),
        };
        let limit = config.pacing.deletes_per_minute;
        let burst = config.pacing.burst;
        let (store, pacer): (Box<dyn IdempotencyStore>, _) = match config.idempotency.backend {
            IdempotencyBackend::Embedded => (
                Box::new(EmbeddedStore::open(&config.idempotency_path(), lifetimes)?),
                Pacer::new(limit, burst),
            ),
            IdempotencyBackend::Redis => {
                let durability = Durability {
                    replicas: config.idempotency.redis_wait_replicas,
                    timeout: Duration::from_millis(config.idempotency.redis_wait_timeout_ms),
                };
                let store = RedisStore::connect_durable(
                    &config.idempotency.redis_url,
                    &config.idempotency_prefix(),
                    lifetimes,
                    durability,
                )
                .await?;
                let prefix = config.pacing_prefix();
                let pacer = Pacer::shared(limit, burst, store.connection(), &prefix);
                (Box::new(store), pacer)
            }
        };
        Ok(Self {
            instances,
            media: MediaStore::from_config(&config.media)?,
            memory: Memory::new(
                store,
                Duration::from_millis(config.idempotency.outage_wait_ms),
            ),
            claim_ttl: lifetimes.claim,
            pacer,
            max_body_bytes: config.worker.max_body_bytes,
            retry: config.retry.clone(),
            session_delete_duration: telemetry::stage_duration("session_delete"),
            claim_duration: telemetry::stage_duration("claim"),
            remember_duration: telemetry::stage_duration("remember"),
        })
    }

    pub fn instances(&self) -> &Arc<Instances> {
        &self.instances
    }

    /// Whether the idempotency store answers (`/readyz`).
    pub async fn store_reachable(&self) -> bool {
        self.memory.reachable().await
    }

    /// Runs the contract's checks in order and does the work. `committed` is set once an
    /// effect was let through its fence (the caller then lets the command finish).
    pub async fn handle(
        &self,
        source: &Source,
        envelope: &Envelope,
        body: &[u8],
        log: &CommandLog<'_>,
        committed: &Arc<Committed>,
    ) -> Verdict {
        let first_try = envelope.previous_attempts.saturating_add(1);
        let Some(id) = envelope.idempotency_id.as_deref() else {
            return Verdict::answer(Outcome::MissingIdempotencyId, None, first_try);
        };
        let instance = match source {
            Source::Unrouted | Source::DeadLettered(None) => {
                return Verdict::answer(Outcome::InstanceNotFound, None, first_try);
            }
            Source::Instance(instance) | Source::DeadLettered(Some(instance)) => instance,
        };
        let dead_lettered = matches!(source, Source::DeadLettered(_));
        let Some(token) = instance.authenticate(envelope, body) else {
            return Verdict::answer(Outcome::InvalidToken, None, first_try);
        };
        let parsed = parse_body(body, self.max_body_bytes);
        let fingerprint = if body.len() > self.max_body_bytes {
            Fingerprint::of_oversized(instance.name(), &token, body, self.max_body_bytes)
        } else {
            Fingerprint::new(instance.name(), &token, parsed.as_ref().map_err(|_| body))
        };
        let asked_at = Instant::now();
        let store = self.memory.store();
        if self.memory.is_unrecorded(id) {
            return self.later_without_a_try(envelope);
        }
        // The lease lapsed while the command waited for its turn: it is the next owner's, and
        // a claim taken now would carry no generation for that owner to take it over by.
        let Some(generation) = instance.lease().generation() else {
            return Verdict::HandBack;
        };
        // One name for every ask of this delivery: an ask whose answer was lost is not
        // kept waiting by its own claim.
        let name = store.new_claim();
        let begin = || store.begin_as(id, &fingerprint, generation, &name);
        let claiming = self.memory.call(Patience::Bounded, log, begin);
        let begun = traces::stage("claim", Kind::Internal, claiming).await;
        self.claim_duration.record(asked_at.elapsed().as_secs_f64());
        let (claim, chat_deleted, seen_ms, deletion) = match begun {
            Ok(Begin::Claimed {
                claim,
                chat_deleted,
                seen_ms,
                deletion,
            }) => (claim, chat_deleted, seen_ms, deletion),
            Ok(Begin::Replay(remembered)) => return replay(remembered, parsed.ok()),
            Ok(Begin::Conflict) => {
                return Verdict::answer(Outcome::IdempotencyConflict, None, first_try);
            }
            // Another delivery of this id is at work: come back when it is done. Not a try
            // (a crash-looper's is: it must end).
            Ok(Begin::Busy) if dead_lettered => {
                return self.after_failure(envelope, None, Failure::DeadLettered, first_try);
            }
            Ok(Begin::Busy) => return self.later_without_a_try(envelope),
            Err(error) => return self.without_store(error, parsed, envelope),
        };
        let held = Held {
            id: id.to_owned(),
            claim,
            fingerprint,
            generation,
            seen_ms,
        };
        let claim = Arc::new(Claim::new(held, self.claim_ttl, asked_at));
        if dead_lettered && parsed.is_ok() {
            let release = || store.release(claim.held());
            let _ = self.memory.call(Patience::Bounded, log, release).await;
            let chat = parsed.ok().map(|r| r.chat);
            return Verdict::answer(Failure::DeadLettered.outcome(), chat, first_try);
        }
        let request = match parsed {
            Ok(request) => request,
            Err(outcome) => {
                let answer = Verdict::answer(outcome, None, first_try);
                return self.remember(&claim, answer, Patience::Bounded, log).await;
            }
        };
        let fence: Arc<dyn Fence> = Arc::new(Committing {
            fence: Arc::new(Both(instance.lease().clone(), claim.clone())),
            committed: committed.clone(),
        });
        // A delete an earlier try recorded (without its details in records of earlier versions).
        let before = chat_deleted.then(|| {
            deletion.unwrap_or_else(|| Deletion {
                chat: request.chat.clone(),
                known: ChatKnown::Unknown,
                at_ms: chrono::Utc::now().timestamp_millis(),
            })
        });
        let work = self.work(instance, &token, &request, &claim, before, fence, log);
        let (result, tries) = claim.hold_while(store, work).await;
        let attempts = envelope.previous_attempts.saturating_add(tries.max(1));
        match result {
            Ok(done) => {
                let answer = Verdict::deleted(done, request.delete_media, attempts);
                // The delete happened: its answer waits until it is recorded.
                self.remember(&claim, answer, Patience::Unbounded, log)
                    .await
            }
            Err(Failure::Fenced(fenced)) => {
                metrics::counter!(telemetry::FENCED).increment(1);
                log.in_span(|| {
                    tracing::warn!(reason = %fenced, "Work stopped before its next effect; handing the command back.")
                });
                // The instance went to another worker: its claim goes with the command, so
                // the next owner need not wait for it to expire. (While the lease holds, a
                // redelivery would come straight back here: the claim keeps it waiting.)
                if instance.lease().check().is_err()
                    && let Err(error) = store.release(claim.held()).await
                {
                    log.in_span(|| {
                        tracing::warn!(%error, "Could not release the claim; it expires by itself.")
                    });
                }
                Verdict::HandBack
            }
            Err(failure) => {
                let release = || store.release(claim.held());
                if let Err(error) = self.memory.call(Patience::Bounded, log, release).await {
                    log.in_span(|| {
                        tracing::warn!(%error, "Could not release the claim; it expires by itself.")
                    });
                }
                self.after_failure(envelope, Some(request.chat), failure, attempts)
            }
        }
    }

    /// Remembers a final 200/4xx answer before it is published. What is remembered may be
    /// another delivery's answer to the same request, which is then the one answered; an
    /// answer that cannot be remembered (a 4xx while the store is down, an id another request
    /// took over) is still answered, not remembered.
    async fn remember(
        &self,
        claim: &Claim,
        answer: Verdict,
        patience: Patience,
        log: &CommandLog<'_>,
    ) -> Verdict {
        let Verdict::Answer { handled, .. } = &answer else {
            return answer;
        };
        let result = Remembered {
            outcome: handled.outcome.clone(),
            attempts: handled.attempts,
            receipt: handled.receipt.clone(),
        };
        let store = self.memory.store();
        let remember = || store.remember(claim.held(), &result);
        let started = Instant::now();
        let remembering = async {
            match patience {
                Patience::Bounded => self.memory.call(patience, log, remember).await,
                Patience::Unbounded => self.memory.record(&claim.held().id, log, remember).await,
            }
        };
        let remembered = traces::stage("remember", Kind::Internal, remembering).await;
        self.remember_duration
            .record(started.elapsed().as_secs_f64());
        match remembered {
            Ok(kept) if kept == result => answer,
            Ok(kept) => replay(kept, None),
            Err(error) => {
                log.in_span(|| tracing::warn!(%error, "Answering without remembering the result."));
                answer
            }
        }
    }

    /// The store could not be used for `begin`. A 4xx of the body needs no memory and is
    /// answered; while the store is unreachable, everything else waits for it (through the
    /// broker, without spending a try); an unreadable record is a failure like any other.
    fn without_store(
        &self,
        error: StoreError,
        parsed: Result<DeleteRequest, Outcome>,
        envelope: &Envelope,
    ) -> Verdict {
        let first_try = envelope.previous_attempts.saturating_add(1);
        match parsed {
            Err(outcome) if error.is_outage() => Verdict::answer(outcome, None, first_try),
            _ if error.is_outage() => self.later_without_a_try(envelope),
            parsed => {
                let chat = parsed.ok().map(|r| r.chat);
                self.after_failure(envelope, chat, Failure::Store(error), first_try)
            }
        }
    }

    /// Back through the shortest retry tier, neither a try nor a retry spent.
    fn later_without_a_try(&self, envelope: &Envelope) -> Verdict {
        Verdict::RetryLater {
            delay_ms: self.shortest_delay(),
            tries: envelope.previous_attempts,
            retries: envelope.retries,
        }
    }

    /// A transient failure goes back to the broker while retries are left; the rest is final.
    fn after_failure(
        &self,
        envelope: &Envelope,
        chat: Option<ChatJid>,
        failure: Failure,
        attempts: u32,
    ) -> Verdict {
        let retries = envelope.retries as usize;
        if failure.is_retryable()
            && let Some(&delay_ms) = self.retry.broker_delays_ms.get(retries)
        {
            return Verdict::RetryLater {
                delay_ms,
                tries: attempts,
                retries: envelope.retries + 1,
            };
        }
        Verdict::answer(failure.outcome(), chat, attempts)
    }

    fn shortest_delay(&self) -> u64 {
        self.retry.tiers().first().copied().unwrap_or(1_000)
    }

    /// Pace, delete the chat (unless a previous try did: `before`), purge the media when
    /// asked (under the chat as given and, when it differs, as resolved); every effect checks
    /// `fence` (the lease and the claim) first. Returns what was done and how many tries it
    /// took in this delivery.
    #[allow(clippy::too_many_arguments)]
    async fn work(
        &self,
        instance: &Instance,
        token: &TokenHash,
        request: &DeleteRequest,
        claim: &Arc<Claim>,
        before: Option<Deletion>,
        fence: Arc<dyn Fence>,
        log: &CommandLog<'_>,
    ) -> (Result<Done, Failure>, u32) {
        let mut tries = 0;
        let deletion = match before {
            Some(deletion) => deletion,
            None => {
                let slot = self.pacer.wait(token).await;
                let store = self.memory.store();
                let keep = || store.keep_intent(claim.held());
                if let Err(error) = self.memory.call(Patience::Bounded, log, keep).await {
                    return (Err(Failure::Store(error)), tries);
                }
                let seen_ms = claim.held().seen_ms;
                let deleting = self.delete_chat(instance, request, seen_ms, fence.clone(), log);
                let (result, n) = traces::stage("whatsapp delete", Kind::Client, deleting).await;
                tries = n;
                // The slot was used unless the delete was refused before anything was sent.
                if !matches!(result, Err(SessionError::Fenced(_))) {
                    slot.used();
                }
                let deletion = match result {
                    Ok(Deleted { chat, known }) => Deletion {
                        chat,
                        known,
                        at_ms: chrono::Utc::now().timestamp_millis(),
                    },
                    Err(error) => return (Err(error.into()), tries),
                };
                // A later try after a failed purge starts at the purge (without a purge, the
                // remembered result comes next and says it all). Durable before the purge runs.
                if request.delete_media {
                    let store = self.memory.store();
                    let mark = || store.mark_chat_deleted(claim.held(), &deletion);
                    if let Err(error) = self.memory.record(&claim.held().id, log, mark).await {
                        log.in_span(|| {
                            tracing::warn!(%error, "Could not record the chat delete; a retry repeats it.")
                        });
                    }
                }
                deletion
            }
        };
        let mut media = None;
        if request.delete_media {
            tries = tries.max(1);
            let mut erased = MediaErased::default();
            let mut chats = vec![&request.chat];
            if deletion.chat != request.chat {
                chats.push(&deletion.chat);
            }
            for chat in chats {
                // The purge logs what it did, so it runs in the command's span.
                let purge = self.purge_media(instance, chat, fence.clone());
                let purge = traces::stage("media purge", Kind::Client, purge);
                match purge.instrument(log.span().clone()).await {
                    Ok(report) => {
                        erased.objects += report.objects;
                        erased.bytes += report.bytes;
                    }
                    Err(error) => return (Err(error.into()), tries),
                }
            }
            media = Some(erased);
        }
        (Ok(Done { deletion, media }), tries)
    }

    fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.retry.in_process_min_delay_ms))
            .with_max_delay(Duration::from_millis(self.retry.in_process_max_delay_ms))
            .with_max_times(self.retry.in_process_attempts.saturating_sub(1))
            .with_jitter()
    }

    /// The session delete with in-process retries of transient errors; every try sends the
    /// same mutation (the chat as of `seen_ms`).
    async fn delete_chat(
        &self,
        instance: &Instance,
        request: &DeleteRequest,
        seen_ms: u64,
        fence: Arc<dyn Fence>,
        log: &CommandLog<'_>,
    ) -> (Result<Deleted, SessionError>, u32) {
        let started = Instant::now();
        let mut tries = 0u32;
        let result = (|| {
            tries += 1;
            let session = instance.session();
            session.delete_chat_as_of(&request.chat, request.lookup, seen_ms, fence.clone())
        })
        .retry(self.backoff())
        .when(SessionError::is_retryable)
        .notify(|error, _| {
            metrics::counter!(telemetry::RETRIES, "stage" => "session_delete").increment(1);
            log.in_span(|| tracing::debug!(%error, "Retrying the chat delete."));
        })
        .await;
        self.session_delete_duration
            .record(started.elapsed().as_secs_f64());
        (result, tries)
    }

    /// The media purge (it logs what it did); the media store retries failed batches itself,
    /// and a later call resumes where this one stopped.
    async fn purge_media(
        &self,
        instance: &Instance,
        chat: &ChatJid,
        fence: Arc<dyn Fence>,
    ) -> Result<PurgeReport, MediaError> {
        let started = Instant::now();
        let result = self
            .media
            .purge_chat(instance.name(), chat.as_str(), fence)
            .await;
        metrics::histogram!(telemetry::STAGE_DURATION, "stage" => "media_purge")
            .record(started.elapsed().as_secs_f64());
        result
    }
}
