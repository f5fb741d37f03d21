//! Consumers: one per hosted instance queue plus the unrouted queue. Each delivery is handled,
//! its verdict carried out ([`super::settle`]), and only then is the delivery settled.

use std::sync::Arc;

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
use super::settle::{Carrier, Settle, settle, settle_for};
use crate::config::is_valid_instance_name;
use crate::contract::Names;
use crate::contract::wire::UNNAMED_INSTANCE;
use crate::pipeline::envelope::Envelope;
use crate::pipeline::{Instance, Pipeline, Source};
use crate::telemetry;

/// What all consumers of one worker share.
pub struct Consuming {
    pipeline: Arc<Pipeline>,
    metrics: telemetry::CommandMetrics,
    names: Names,
    app_id: String,
    prefetch: u16,
    concurrency: usize,
    /// Commands handled at once by all consumers together: each costs some kilobytes while
    /// it runs, so with many instances this, not their sum, bounds memory.
    handling: Arc<Semaphore>,
}

/// How consumers take deliveries.
pub struct ConsumingOptions {
    pub app_id: String,
    /// Unacked deliveries per queue.
    pub prefetch: u16,
    /// Commands of one queue handled at once.
    pub concurrency: usize,
    /// Commands handled at once by all queues together.
    pub max_handling: usize,
}

impl Consuming {
    pub fn new(pipeline: Arc<Pipeline>, names: Names, options: ConsumingOptions) -> Self {
        Self {
            pipeline,
            metrics: telemetry::CommandMetrics::default(),
            names,
            app_id: options.app_id,
            prefetch: options.prefetch,
            concurrency: options.concurrency,
            handling: Arc::new(Semaphore::new(options.max_handling)),
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
    tag: String,
}

impl RunningConsumer {
    /// Asks the broker to send no more deliveries (those in flight are still settled).
    pub async fn cancel(&self) {
        let _ = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await;
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

/// One queue's consumer: what it reads, where its results go, and the connection's signals.
pub struct QueueConsumer {
    pub consuming: Arc<Consuming>,
    pub publisher: Arc<Publisher>,
    pub queue: String,
    /// `None` for the unrouted queue.
    pub instance: Option<Arc<Instance>>,
    pub tracker: TaskTracker,
    pub signals: Signals,
}

/// Starts the consumer of one queue on its own channel.
pub async fn start(
    connection: &Connection,
    queue: QueueConsumer,
) -> Result<RunningConsumer, lapin::Error> {
    let consuming = &queue.consuming;
    let channel = connection.create_channel().await?;
    // Re-applied on every (re)connection: lapin's recovery would not.
    channel
        .basic_qos(consuming.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("{}-{}", consuming.app_id, uuid::Uuid::new_v4());
    let consumer = channel
        .basic_consume(
            queue.queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    queue.tracker.clone().spawn(consume_loop(consumer, queue));
    Ok(RunningConsumer { channel, tag })
}

/// Takes the queue's deliveries once every consumer is started, and hands each to its own
/// task within the queue's and the worker's bounds on commands handled at once.
async fn consume_loop(mut consumer: lapin::Consumer, queue: QueueConsumer) {
    let QueueConsumer {
        consuming,
        publisher,
        queue,
        instance,
        tracker,
        signals,
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
            _ = stop_consuming.cancelled() => break,
            next = consumer.next() => next,
        };
        let delivery = match next {
            Some(Ok(delivery)) => delivery,
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
        let instance = instance.clone();
        let hard_stop = hard_stop.clone();
        let lost = lost.clone();
        tracker.spawn(async move {
            let _permit = permit;
            process(
                &consuming,
                &publisher,
                instance.as_deref(),
                delivery,
                &hard_stop,
                &lost,
            )
            .await;
        });
    }
}

async fn process(
    consuming: &Consuming,
    publisher: &Publisher,
    instance: Option<&Instance>,
    delivery: Delivery,
    hard_stop: &CancellationToken,
    lost: &CancellationToken,
) {
    let started = Instant::now();
    let envelope = Envelope::from_properties(&delivery.properties);
    let (source, instance_name) = match instance {
        Some(instance) => (Source::Instance(instance), instance.name()),
        // Anything can be sent as a routing key; only a well-formed name is echoed back.
        None if is_valid_instance_name(delivery.routing_key.as_str()) => {
            (Source::Unrouted, delivery.routing_key.as_str())
        }
        None => (Source::Unrouted, UNNAMED_INSTANCE),
    };
    let log = telemetry::CommandLog::new(
        envelope.idempotency_id.as_deref().unwrap_or(""),
        instance_name,
        envelope.previous_attempts + 1,
        envelope.traceparent.as_deref().unwrap_or(""),
    );
    let metrics = &consuming.metrics;
    match instance {
        Some(_) => metrics.received_instance.increment(1),
        None => metrics.received_unrouted.increment(1),
    }
    metrics.in_flight.increment(1.0);

    let work = async {
        let verdict = consuming
            .pipeline
            .handle(source, &envelope, &delivery.data, &log)
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
    };

    tokio::select! {
        () = work => {}
        () = hard_stop.cancelled() => {
            log.in_span(|| tracing::warn!("Shutdown grace period over; handing the command back."));
            settle(&delivery, Settle::Requeue).await;
        }
    }
    metrics.in_flight.decrement(1.0);
    metrics.duration.record(started.elapsed().as_secs_f64());
}
