//! Consumers: one per hosted instance queue plus the unrouted queue. Each delivery is handled,
//! its verdict carried out ([`super::settle`]), and only then is the delivery settled.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Publisher;
use super::prefetch::Prefetch;
use super::settle::{Carrier, Settle, settle, settle_for};
use crate::auth::envelope::Envelope;
use crate::contract::Names;
use crate::contract::wire::UNNAMED_INSTANCE;
use crate::contract::wire::is_valid_instance_name;
use crate::fence::{Committed, Fence};
use crate::pipeline::{Pipeline, Source};
use crate::telemetry;
use crate::telemetry::traces::{self, Attribute};

/// The most unacked deliveries of a queue whose commands are only answered (unrouted, dead).
const ANSWER_ONLY_PREFETCH: u16 = 8;

/// What all consumers of one worker share.
pub struct Consuming {
    pipeline: Arc<Pipeline>,
    metrics: telemetry::CommandMetrics,
    names: Names,
    app_id: String,
    prefetch: u16,
    /// Deliveries larger than this are oversized (answered 400 unread).
    largest_ordinary: usize,
    concurrency: usize,
    /// Commands handled at once by all consumers together: each costs some kilobytes while
    /// it runs, so with many instances this, not their sum, bounds memory.
    handling: Arc<Semaphore>,
    /// How long a stop waits for a command past its point of no return.
    finish_after_effect: Duration,
}

/// How consumers take deliveries.
pub struct ConsumingOptions {
    pub app_id: String,
    /// Unacked deliveries per queue, at most.
    pub prefetch: u16,
    /// The body limit: a larger delivery is oversized.
    pub max_body_bytes: usize,
    /// Commands of one queue handled at once.
    pub concurrency: usize,
    /// Commands handled at once by all queues together.
    pub max_handling: usize,
    /// A command whose effect was let through its fence when a stop comes is finished (and
    /// its result recorded) within this, rather than handed back: its effect may be under way
    /// outside it.
    pub finish_after_effect: Duration,
}

impl Consuming {
    pub fn new(pipeline: Arc<Pipeline>, names: Names, options: ConsumingOptions) -> Self {
        Self {
            pipeline,
            metrics: telemetry::CommandMetrics::default(),
            names,
            app_id: options.app_id,
            prefetch: options.prefetch,
            largest_ordinary: options.max_body_bytes,
            concurrency: options.concurrency,
            handling: Arc::new(Semaphore::new(options.max_handling)),
            finish_after_effect: options.finish_after_effect,
        }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }
}

/// A started consumer: its channel and tag, to cancel it.
pub struct RunningConsumer {
    channel: Channel,
    /// The live consumer's tag: a prefetch change starts a new consumer.
    tag: Tag,
}

/// A consumer tag that changes when the consumer is restarted.
type Tag = Arc<std::sync::Mutex<String>>;

fn new_tag(app_id: &str) -> String {
    format!("{app_id}-{}", uuid::Uuid::new_v4())
}

/// How long the worker waits for the broker to answer a cancel or a close. A broker that
/// stopped answering (out of file handles, a half-open connection) must not hold up a
/// shutdown or a hand-over: what is not settled goes back when the connection ends.
pub const ANSWER_WAIT: Duration = Duration::from_secs(5);

impl RunningConsumer {
    /// Closes the channel: deliveries taken but not settled go back to the queue.
    pub async fn close(&self) {
        let closed = self.channel.close(200, "queue handed over".into());
        let _ = tokio::time::timeout(ANSWER_WAIT, closed).await;
    }

    /// Asks the broker to send no more deliveries (those in flight are still settled).
    pub async fn cancel(&self) {
        let tag = current(&self.tag);
        let cancelled = self
            .channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
        let _ = tokio::time::timeout(ANSWER_WAIT, cancelled).await;
    }
}

/// The signals of one connection's consumers.
#[derive(Clone, Default)]
pub struct Signals {
    /// Every consumer is started: deliveries may be handled. Until then they wait in the
    /// consumer's buffer (at most the prefetch), so starting many queues with a backlog does
    /// not compete with handling their commands.
    pub all_started: CancellationToken,
    pub stop_consuming: CancellationToken,
    /// The shutdown grace period is over: hand back what is still in flight.
    pub hard_stop: CancellationToken,
    /// The connection or a channel is gone: reconnect.
    pub lost: CancellationToken,
}

/// A queue consumer's deliveries not yet settled, and when it last took one or settled one:
/// what tells an idle consumer.
pub struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    held: AtomicUsize,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            held: AtomicUsize::new(0),
        }
    }
}

impl Activity {
    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn took(&self) {
        self.held.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    fn settled(&self) {
        self.held.fetch_sub(1, Ordering::Relaxed);
        self.touch();
    }

    /// How long the consumer has had nothing to do; `None` while it holds a delivery.
    pub fn idle_for(&self) -> Option<Duration> {
        if self.held.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.origin.elapsed().saturating_sub(last))
    }
}

/// One queue's consumer: what it reads, where its results go, and the connection's signals.
pub struct QueueConsumer {
    pub consuming: Arc<Consuming>,
    pub publisher: Arc<Publisher>,
    pub queue: String,
    pub source: Source,
    pub tracker: TaskTracker,
    pub signals: Signals,
    pub activity: Arc<Activity>,
}

/// Starts the consumer of one queue on its own channel.
pub async fn start(
    connection: &Connection,
    queue: QueueConsumer,
) -> Result<RunningConsumer, lapin::Error> {
    let consuming = &queue.consuming;
    let channel = connection.create_channel().await?;
    // Set on every (re)connection: lapin's recovery would not. The unrouted and dead-letter
    // queues need little: they only answer.
    let max = match queue.source {
        Source::Instance(_) => consuming.prefetch,
        Source::Unrouted | Source::DeadLettered(_) => consuming.prefetch.min(ANSWER_ONLY_PREFETCH),
    };
    let prefetch = Prefetch::new(max, consuming.largest_ordinary);
    let first = new_tag(&consuming.app_id);
    let live = subscribe(&channel, &queue.queue, &first, prefetch.current()).await?;
    let tag = Arc::new(std::sync::Mutex::new(first));
    let deliveries = Deliveries {
        channel: channel.clone(),
        app_id: consuming.app_id.clone(),
        tag: tag.clone(),
        draining: VecDeque::new(),
        live,
    };
    queue
        .tracker
        .clone()
        .spawn(consume_loop(deliveries, prefetch, queue));
    Ok(RunningConsumer { channel, tag })
}

async fn subscribe(
    channel: &Channel,
    queue: &str,
    tag: &str,
    prefetch: u16,
) -> Result<lapin::Consumer, lapin::Error> {
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    channel
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
}

fn current(tag: &Tag) -> String {
    tag.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A queue's deliveries across consumer restarts (a prefetch change): what an earlier consumer
/// still holds comes before the new one's, so nothing is reordered or stranded unacked.
struct Deliveries {
    channel: Channel,
    app_id: String,
    tag: Tag,
    draining: VecDeque<lapin::Consumer>,
    live: lapin::Consumer,
}

impl Deliveries {
    async fn next(&mut self) -> Option<Result<Delivery, lapin::Error>> {
        while let Some(old) = self.draining.front_mut() {
            // Ends at once after what it holds: the broker confirmed its cancel.
            match old.next().await {
                Some(delivery) => return Some(delivery),
                None => drop(self.draining.pop_front()),
            }
        }
        self.live.next().await
    }

    /// Starts a consumer with the new prefetch in place of the live one. It gets a tag of its
    /// own: a quorum queue knows a consumer by tag and channel, and would end the new one
    /// with the old one once the old one's deliveries are settled.
    async fn set_prefetch(&mut self, queue: &str, prefetch: u16) -> Result<(), lapin::Error> {
        let old = current(&self.tag);
        let cancel = BasicCancelOptions::default();
        self.channel
            .basic_cancel(old.as_str().into(), cancel)
            .await?;
        let tag = new_tag(&self.app_id);
        let live = subscribe(&self.channel, queue, &tag, prefetch).await?;
        *self.tag.lock().unwrap_or_else(|e| e.into_inner()) = tag;
        self.draining
            .push_back(std::mem::replace(&mut self.live, live));
        Ok(())
    }
}

/// Takes the queue's deliveries once every consumer is started, and hands each to its own
/// task within the queue's and the worker's bounds on commands handled at once.
async fn consume_loop(mut deliveries: Deliveries, mut prefetch: Prefetch, queue: QueueConsumer) {
    let QueueConsumer {
        consuming,
        publisher,
        queue,
        source,
        tracker,
        signals,
        activity,
    } = queue;
    let Signals {
        all_started,
        stop_consuming,
        hard_stop,
        lost,
    } = signals;
    tokio::select! {
        _ = stop_consuming.cancelled() => return,
        _ = all_started.cancelled() => {}
    }
    let limit = Arc::new(Semaphore::new(consuming.concurrency));
    loop {
        let next = tokio::select! {
            biased;
            _ = stop_consuming.cancelled() => break,
            next = deliveries.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
            // Cancelled on purpose (the queue is handed over).
            _ if stop_consuming.is_cancelled() => break,
            Some(Err(error)) => {
                tracing::warn!(%error, queue, "Consumer failed.");
                lost.cancel();
                break;
            }
            None => {
                lost.cancel();
                break;
            }
        };
        activity.took();
        if let Source::Instance(instance) = &source
            && instance.lease().check().is_err()
        {
            // Not ours (any more): leave it unsettled; it goes back to the queue, for the
            // owner, when this consumer is stopped and its channel closed.
            stop_consuming.cancelled().await;
            break;
        }
        if let Some(next) = prefetch.saw(delivery.data.len())
            && let Err(error) = deliveries.set_prefetch(&queue, next).await
        {
            tracing::warn!(%error, queue, "Could not change the prefetch.");
            lost.cancel();
            break;
        }
        let acquire = async {
            let own = limit.clone().acquire_owned().await;
            let all = consuming.handling.clone().acquire_owned().await;
            (
                own.expect("semaphore is never closed"),
                all.expect("semaphore is never closed"),
            )
        };
        let permit = tokio::select! {
            _ = stop_consuming.cancelled() => break,
            permits = acquire => permits,
        };
        let consuming = consuming.clone();
        let publisher = publisher.clone();
        let source = source.clone();
        let hard_stop = hard_stop.clone();
        let lost = lost.clone();
        let done = activity.clone();
        tracker.spawn(async move {
            let _permit = permit;
            // Boxed: a command's future is large, and a spawned future is copied whole.
            Box::pin(process(
                &consuming, &publisher, &source, delivery, &hard_stop, &lost,
            ))
            .await;
            done.settled();
        });
    }
}

async fn process(
    consuming: &Consuming,
    publisher: &Publisher,
    queue_source: &Source,
    delivery: Delivery,
    hard_stop: &CancellationToken,
    lost: &CancellationToken,
) {
    let started = Instant::now();
    let envelope = Envelope::from_properties(&delivery.properties);
    // Anything can be sent as a routing key; only a well-formed name is echoed back.
    let key = delivery.routing_key.as_str();
    let named = if is_valid_instance_name(key) {
        key
    } else {
        UNNAMED_INSTANCE
    };
    let source = match queue_source {
        Source::DeadLettered(_) => {
            Source::DeadLettered(consuming.pipeline.instances().get(key).cloned())
        }
        other => other.clone(),
    };
    let instance_name = match &source {
        Source::Instance(instance) => instance.name(),
        Source::Unrouted | Source::DeadLettered(_) => named,
    };
    let log = telemetry::CommandLog::new(
        envelope.idempotency_id.as_deref().unwrap_or(""),
        instance_name,
        envelope.previous_attempts + 1,
        envelope.traceparent.as_deref().unwrap_or(""),
    );
    let metrics = &consuming.metrics;
    match &source {
        Source::Instance(_) => metrics.received_instance.increment(1),
        Source::Unrouted => metrics.received_unrouted.increment(1),
        Source::DeadLettered(_) => metrics.received_dead.increment(1),
    }
    metrics.in_flight.increment(1.0);

    let span = traces::command(
        || format!("process {}", delivery.exchange),
        envelope.traceparent.as_deref(),
        envelope.tracestate.as_deref(),
        || {
            let mut attributes = vec![
                Attribute::new("messaging.system", "rabbitmq"),
                Attribute::new("messaging.operation.type", "process"),
                Attribute::new("messaging.operation.name", "process"),
                Attribute::new("messaging.destination.name", delivery.exchange.to_string()),
                Attribute::new("messaging.rabbitmq.destination.routing_key", key.to_owned()),
                Attribute::new("messaging.message.body.size", delivery.data.len() as i64),
                Attribute::new("chat_delete.instance", instance_name.to_owned()),
                Attribute::new(
                    "chat_delete.attempt",
                    i64::from(envelope.previous_attempts + 1),
                ),
            ];
            if let Some(id) = &envelope.idempotency_id {
                attributes.push(Attribute::new("messaging.message.id", id.clone()));
            }
            if let Some(correlation) = &envelope.correlation_id {
                let conversation = correlation.clone();
                attributes.push(Attribute::new(
                    "messaging.message.conversation_id",
                    conversation,
                ));
            }
            attributes
        },
    );
    let committed = Arc::new(Committed::default());
    let work = traces::within(span, async {
        let verdict = consuming
            .pipeline
            .handle(&source, &envelope, &delivery.data, &log, &committed)
            .await;
        let carrier = Carrier {
            publisher,
            names: &consuming.names,
            metrics,
            app_id: &consuming.app_id,
            envelope: &envelope,
            instance: instance_name,
            delivery: &delivery,
            log: &log,
        };
        let done = carrier.carry_out(verdict).await;
        if let Err(error) = &done {
            log.in_span(
                || tracing::warn!(%error, "Could not publish; the command goes back to the queue."),
            );
            // The publishing channel may be gone: rebuild the connection rather than spin.
            lost.cancel();
        }
        settle(&delivery, settle_for(&done)).await;
    });

    tokio::pin!(work);
    tokio::select! {
        () = &mut work => {}
        () = hard_stop.cancelled() => {
            // Past its point of no return the effect may be happening outside this future (a
            // session's actor sends it): handing the command back would leave it unrecorded
            // and the next try would act again. It is finished and recorded instead, bounded.
            let finished = committed.is_set()
                && tokio::time::timeout(consuming.finish_after_effect, &mut work)
                    .await
                    .is_ok();
            if !finished {
                log.in_span(|| tracing::warn!("Shutdown grace period over; handing the command back."));
                settle(&delivery, Settle::Requeue).await;
            }
        }
    }
    metrics.in_flight.decrement(1.0);
    metrics.duration.record(started.elapsed().as_secs_f64());
}
