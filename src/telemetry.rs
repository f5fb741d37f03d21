//! Metric names and descriptions in one place, the Prometheus recorder, and log setup.
//! Labels are bounded: status, outcome, stage, and instance (bounded by the config).

pub mod traces;

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::contract::Outcome;

pub const COMMANDS_RECEIVED: &str = "chat_delete_commands_received_total";
pub const COMMANDS_COMPLETED: &str = "chat_delete_commands_completed_total";
pub const COMMAND_DURATION: &str = "chat_delete_command_duration_seconds";
pub const STAGE_DURATION: &str = "chat_delete_stage_duration_seconds";
pub const IN_FLIGHT: &str = "chat_delete_in_flight";
pub const RETRIES: &str = "chat_delete_retries_total";
pub const PARKED: &str = "chat_delete_parked_total";
pub const PACING_WAIT: &str = "chat_delete_pacing_wait_seconds";
pub const PACING_STORE_WAITS: &str = "chat_delete_pacing_store_waits_total";
pub const REPLAYS: &str = "chat_delete_replays_total";
pub const RESULTS_UNROUTABLE: &str = "chat_delete_results_unroutable_total";
pub const REPLY_TO_FAILED: &str = "chat_delete_reply_to_failed_total";
pub const INSTANCE_CONNECTED: &str = "chat_delete_instance_connected";
pub const INSTANCE_STATE: &str = "chat_delete_instance_state";
pub const BROKER_CONNECTED: &str = "chat_delete_broker_connected";
pub const BROKER_RECONNECTS: &str = "chat_delete_broker_reconnects_total";
pub const CONSUMER_STALLS: &str = "chat_delete_consumer_stalls_total";
pub const STORE_AVAILABLE: &str = "chat_delete_store_available";
pub const STORE_WAITS: &str = "chat_delete_store_waits_total";
pub const CLAIM_RENEWALS: &str = "chat_delete_claim_renewals_total";
pub const FENCED: &str = "chat_delete_fenced_total";
pub const FENCED_SESSION_WRITES: &str = "chat_delete_fenced_session_writes_total";
pub const OWNED_INSTANCES: &str = "chat_delete_owned_instances";
pub const REBALANCES: &str = "chat_delete_rebalances_total";
pub const OWNERSHIP_GAP: &str = "chat_delete_ownership_gap_seconds";
pub const HANDOVER_DURATION: &str = "chat_delete_handover_seconds";
pub const LEASES_LOST: &str = "chat_delete_leases_lost_total";
pub const SESSIONS_RECONNECTED: &str = "chat_delete_sessions_reconnected_total";
pub const WHATSAPP_THROTTLED: &str = "chat_delete_whatsapp_throttled_total";
pub const APP_STATE_SYNC_FAILED: &str = "chat_delete_app_state_sync_failures_total";
pub const APP_STATE_STUCK: &str = "chat_delete_app_state_stuck";
pub const CHATS_INDEXED: &str = "chat_delete_chats_indexed";
pub const DELETE_KEYS_SENT: &str = "chat_delete_whatsapp_delete_keys_total";
pub const UNPINS_FAILED: &str = "chat_delete_whatsapp_unpin_failures_total";
pub const MEDIA_OBJECTS_DELETED: &str = "chat_delete_media_objects_deleted_total";
pub const MEDIA_BYTES_DELETED: &str = "chat_delete_media_bytes_deleted_total";

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        COMMANDS_RECEIVED,
        "Command deliveries received, by queue kind."
    );
    describe_counter!(
        COMMANDS_COMPLETED,
        "Commands answered with a published result, by HTTP status and outcome."
    );
    describe_histogram!(
        COMMAND_DURATION,
        Unit::Seconds,
        "Time from receiving a command to acking it."
    );
    describe_histogram!(
        STAGE_DURATION,
        Unit::Seconds,
        "Time spent per pipeline stage (claim, session_delete, media_purge, remember, publish_confirm)."
    );
    describe_gauge!(IN_FLIGHT, "Commands being processed right now.");
    describe_counter!(
        RETRIES,
        "Tries repeated after a transient failure, by stage."
    );
    describe_counter!(PARKED, "Commands moved to the parking queue.");
    describe_histogram!(
        PACING_WAIT,
        Unit::Seconds,
        "Time commands waited for their token's pacing budget."
    );
    describe_counter!(
        PACING_STORE_WAITS,
        "Waits for the shared (Redis) pacing schedule while it did not answer (commands wait rather than pace on a budget of their own)."
    );
    describe_counter!(REPLAYS, "Commands answered from a remembered result.");
    describe_counter!(
        RESULTS_UNROUTABLE,
        "Result events the broker returned as unroutable from the events exchange (nobody bound)."
    );
    describe_counter!(
        REPLY_TO_FAILED,
        "reply_to copies of results that did not arrive, by reason (unroutable, nacked, refused); the events exchange copy did."
    );
    describe_gauge!(
        INSTANCE_CONNECTED,
        "1 when the instance's WhatsApp session is connected and logged in."
    );
    describe_gauge!(
        INSTANCE_STATE,
        "1 for the instance's current session state (not_paired, connecting, connected, logged_out, banned, replaced, stopped)."
    );
    describe_gauge!(BROKER_CONNECTED, "1 while the broker connection is up.");
    describe_counter!(
        BROKER_RECONNECTS,
        "Broker connections re-established after a loss."
    );
    describe_counter!(
        CONSUMER_STALLS,
        "Reconnections because a queue held commands while its idle consumer got none."
    );
    describe_gauge!(
        STORE_AVAILABLE,
        "1 while the idempotency store answers; 0 while commands wait for it."
    );
    describe_counter!(
        STORE_WAITS,
        "Commands that had to wait for an unreachable idempotency store."
    );
    describe_counter!(
        CLAIM_RENEWALS,
        "Idempotency claims renewed while their command ran long, by outcome (renewed, taken, failed)."
    );
    describe_counter!(
        FENCED,
        "Commands stopped before an effect because their idempotency claim or this worker's lease on the instance was no longer held; handed back."
    );
    describe_counter!(
        FENCED_SESSION_WRITES,
        "Writes to a shared (PostgreSQL) WhatsApp session refused by the database because another owner opened the session since."
    );
    describe_gauge!(
        OWNED_INSTANCES,
        "Instances this worker owns and serves (with ownership shared through Redis; all of them otherwise)."
    );
    describe_counter!(
        REBALANCES,
        "Times this worker's share of the instances changed (a worker joined or left)."
    );
    describe_histogram!(
        OWNERSHIP_GAP,
        Unit::Seconds,
        "Time an instance this worker took had no serving owner: since its previous owner released it (how=handover) or last renewed its lease (how=failover)."
    );
    describe_histogram!(
        HANDOVER_DURATION,
        Unit::Seconds,
        "Time to hand an instance over: stop consuming, finish in-flight commands, close the session, release the lease."
    );
    describe_counter!(
        LEASES_LOST,
        "Instance leases lost without handing them over, by reason (taken, expired); their work stopped at once."
    );
    describe_counter!(
        SESSIONS_RECONNECTED,
        "Sessions connected again because another client replaced them while this worker held the instance (a worker that lost the lease without knowing, caught in its connect)."
    );
    describe_counter!(
        WHATSAPP_THROTTLED,
        "429s from WhatsApp per instance (wa_instance): its deletes wait out a back-off that doubles while they keep coming."
    );
    describe_counter!(
        APP_STATE_SYNC_FAILED,
        "Syncs of the chat list's app state (regular_high, where deletes go) that failed, per instance (wa_instance) and how (fatal, retryable)."
    );
    describe_gauge!(
        APP_STATE_STUCK,
        "1 while an instance's chat list (regular_high) stays at version 0 with a key to build on: the client cannot sync it, and deletes fail until the instance is paired again."
    );
    describe_gauge!(
        CHATS_INDEXED,
        "Chats in an instance's chat index (wa_instance), which picks each delete's key and range."
    );
    describe_counter!(
        DELETE_KEYS_SENT,
        "deleteChat mutations sent, by how the key was chosen (how: indexed, resolved, candidate)."
    );
    describe_counter!(
        UNPINS_FAILED,
        "Unpins sent with a delete that WhatsApp did not take (the chat is deleted; it would come back pinned)."
    );
    describe_counter!(MEDIA_OBJECTS_DELETED, "Media objects deleted by purges.");
    describe_counter!(
        MEDIA_BYTES_DELETED,
        Unit::Bytes,
        "Bytes freed by media purges."
    );
}

/// Handles of the metrics every command touches, looked up once: the macros hash the name and
/// labels on every call.
pub struct CommandMetrics {
    pub received_instance: metrics::Counter,
    pub received_unrouted: metrics::Counter,
    pub received_dead: metrics::Counter,
    pub in_flight: metrics::Gauge,
    pub duration: metrics::Histogram,
    /// The answer to almost every command of a bulk run, kept to skip the label lookup.
    completed_deleted: OnceLock<metrics::Counter>,
}

impl CommandMetrics {
    pub fn completed(&self, outcome: &Outcome) {
        let counter = || metrics::counter!(COMMANDS_COMPLETED, "status" => outcome.status_label(), "outcome" => outcome.label());
        match outcome {
            Outcome::Deleted { .. } => self.completed_deleted.get_or_init(counter).increment(1),
            _ => counter().increment(1),
        }
    }
}

impl Default for CommandMetrics {
    fn default() -> Self {
        // Handles taken before the recorder exists would record nowhere.
        prometheus();
        Self {
            received_instance: metrics::counter!(COMMANDS_RECEIVED, "queue" => "instance"),
            received_unrouted: metrics::counter!(COMMANDS_RECEIVED, "queue" => "unrouted"),
            received_dead: metrics::counter!(COMMANDS_RECEIVED, "queue" => "dead_lettered"),
            in_flight: metrics::gauge!(IN_FLIGHT),
            duration: metrics::histogram!(COMMAND_DURATION),
            completed_deleted: OnceLock::new(),
        }
    }
}

/// What every log line about a command carries. Its span is made the first time something is
/// logged: making one for every command cost a few percent of a bulk run's CPU, and most
/// commands log nothing at the default level.
pub struct CommandLog<'a> {
    idempotency_id: &'a str,
    instance: &'a str,
    attempt: u32,
    traceparent: &'a str,
    span: OnceLock<tracing::Span>,
}

impl<'a> CommandLog<'a> {
    pub fn new(
        idempotency_id: &'a str,
        instance: &'a str,
        attempt: u32,
        traceparent: &'a str,
    ) -> Self {
        Self {
            idempotency_id,
            instance,
            attempt,
            traceparent,
            span: OnceLock::new(),
        }
    }

    pub fn span(&self) -> &tracing::Span {
        self.span.get_or_init(|| {
            tracing::info_span!(
                "command",
                idempotency_id = self.idempotency_id,
                instance = self.instance,
                attempt = self.attempt,
                traceparent = self.traceparent,
            )
        })
    }

    /// Runs `log` (a logging statement) inside the command's span.
    pub fn in_span<T>(&self, log: impl FnOnce() -> T) -> T {
        self.span().in_scope(log)
    }
}

/// The histogram of one pipeline stage, for a caller that keeps the handle.
pub fn stage_duration(stage: &'static str) -> metrics::Histogram {
    prometheus();
    metrics::histogram!(STAGE_DURATION, "stage" => stage)
}

/// Installs the process-wide recorder once; later calls return the same handle.
pub fn prometheus() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0,
                ])
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

/// `RUST_LOG`, else `default`, with the broker client's own logs capped whatever `RUST_LOG`
/// says: lapin and amq-protocol at info at most (their debug and trace lines dump frames,
/// headers included, and a command's `token` is a header), and lapin's dumps of returned
/// messages left out (we count unroutable results ourselves).
pub fn log_filter<S>(default: &str) -> impl tracing_subscriber::layer::Filter<S> + Send + Sync
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // A static filter, so each call site's interest is still decided once.
    let capped = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_target("lapin", LevelFilter::INFO)
        .with_target("amq_protocol", LevelFilter::INFO)
        .with_target("amq_protocol_types", LevelFilter::INFO)
        .with_target("amq_protocol_tcp", LevelFilter::INFO)
        .with_target("lapin::returned_messages", LevelFilter::ERROR);
    env.and(capped)
}

/// Human-readable logs by default, JSON lines with `json = true`. `RUST_LOG` filters.
pub fn init_logs(json: bool) {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    // Logs go to standard error: standard output is for what commands print.
    let layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry();
    if json {
        let layer = layer.json().flatten_event(true);
        registry.with(layer.with_filter(log_filter("info"))).init();
    } else {
        registry.with(layer.with_filter(log_filter("info"))).init();
    }
}
