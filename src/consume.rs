//! Consumers: one per hosted instance queue plus the unrouted queue. Each delivery is handled,
//! its result published with a confirm, and only then is the delivery settled.

use std::sync::Arc;
use tokio::time::Instant;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{BrokerError, Publisher};
use crate::config::is_valid_instance_name;
use crate::contract::wire::{
    ATTEMPTS_SO_FAR_HEADER, ORIGINAL_ROUTING_KEY_HEADER, PARKED_OUTCOME_HEADER,
    PARKED_STATUS_HEADER, RETRIES_HEADER, UNNAMED_INSTANCE, with_headers,
};
use crate::contract::{EventContext, Names, render};
use crate::pipeline::envelope::Envelope;
use crate::pipeline::{Instance, Pipeline, Source, Verdict};
use crate::telemetry;

/// Settings shared by all consumers of one worker.
pub struct Consuming {
    pub pipeline: Arc<Pipeline>,
    pub metrics: telemetry::CommandMetrics,
    pub names: Names,
    pub app_id: String,
    pub prefetch: u16,
    pub concurrency: usize,
    /// Commands handled at once by all consumers together: each costs some kilobytes while
    /// it runs, so with many instances this, not their sum, bounds memory.
    pub handling: Arc<Semaphore>,
}

/// What happens to a delivery once its handling is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The result is out: remove the command.
    Ack,
    /// Hand it back to the queue (the result could not be published, or we are stopping).
    Requeue,
}

/// The one place that decides a delivery's fate: acked once everything its verdict asked for
/// is confirmed, handed back otherwise.
fn settle_for(published: &Result<(), BrokerError>) -> Settle {
    match published {
        Ok(()) => Settle::Ack,
        Err(_) => Settle::Requeue,
    }
}

async fn settle(delivery: &Delivery, settle: Settle) {
    let result = match settle {
        Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
    };
    match result {
        Ok(true) => {}
        // A channel from before a reconnect: the broker has requeued the delivery already.
        Ok(false) => tracing::warn!(
            ?settle,
            "Delivery could not be settled on a stale channel; it will come back."
        ),
        Err(error) => {
            tracing::warn!(?settle, %error, "Settling the delivery failed; it will come back.")
        }
    }
}

/// A started consumer: its channel and the task reading it.
pub struct RunningConsumer {
    pub channel: Channel,
    pub tag: String,
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

/// Starts the consumer of one queue on its own channel.
pub async fn start(
    connection: &Connection,
    consuming: Arc<Consuming>,
    publisher: Arc<Publisher>,
    queue: String,
    instance: Option<Arc<Instance>>,
    tracker: TaskTracker,
    signals: Signals,
) -> Result<RunningConsumer, lapin::Error> {
    let channel = connection.create_channel().await?;
    // Re-applied on every (re)connection: lapin's recovery would not.
    channel
        .basic_qos(consuming.prefetch, BasicQosOptions::default())
        .await?;
    let tag = format!("{}-{}", consuming.app_id, uuid::Uuid::new_v4());
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let limit = Arc::new(Semaphore::new(consuming.concurrency));
    let loop_tracker = tracker.clone();
    tracker.spawn(async move {
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
            loop_tracker.spawn(async move {
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
    });
    Ok(RunningConsumer { channel, tag })
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
        let done = carry_out(
            consuming,
            publisher,
            &envelope,
            instance_name,
            &delivery,
            verdict,
            &log,
        )
        .await;
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

/// Publishes what the verdict asks for: the result (and the parked copy), or the command into
/// a retry queue. Every publish is confirmed before the delivery is acked.
async fn carry_out(
    consuming: &Consuming,
    publisher: &Publisher,
    envelope: &Envelope,
    instance_name: &str,
    delivery: &Delivery,
    verdict: Verdict,
    log: &telemetry::CommandLog<'_>,
) -> Result<(), BrokerError> {
    match verdict {
        Verdict::Answer {
            handled,
            replayed,
            park,
        } => {
            let ctx = EventContext {
                instance: instance_name,
                idempotency_id: envelope.idempotency_id.as_deref(),
                correlation_id: envelope.correlation_id.as_deref(),
                chat: handled.chat.as_ref(),
                attempts: handled.attempts,
                replayed,
                traceparent: envelope.traceparent.as_deref(),
                app_id: &consuming.app_id,
                now: chrono::Utc::now(),
            };
            let event = render(&handled.outcome, &ctx);
            publisher
                .publish(event, envelope.reply_to.as_deref())
                .await?;
            let status = handled.outcome.status();
            let label = handled.outcome.label();
            consuming.metrics.completed(&handled.outcome);
            // A bulk run answers thousands a second: successes are logged at debug (the
            // metrics count them), everything else at info. The level is checked first so
            // that a success does not make the command's span for nothing.
            macro_rules! answered {
                ($level:ident) => {
                    log.in_span(|| {
                        tracing::$level!(
                            status,
                            outcome = label,
                            attempts = handled.attempts,
                            replayed,
                            "Command answered."
                        )
                    })
                };
            }
            if status >= 300 {
                answered!(info);
            } else if tracing::enabled!(tracing::Level::DEBUG) {
                answered!(debug);
            }
            if park {
                let headers = vec![
                    (PARKED_STATUS_HEADER, AMQPValue::LongInt(i32::from(status))),
                    (PARKED_OUTCOME_HEADER, AMQPValue::LongString(label.into())),
                    (
                        ORIGINAL_ROUTING_KEY_HEADER,
                        AMQPValue::LongString(instance_name.into()),
                    ),
                    (
                        ATTEMPTS_SO_FAR_HEADER,
                        AMQPValue::LongInt(handled.attempts as i32),
                    ),
                ];
                let props = delivery.properties.clone().with_headers(with_headers(
                    delivery.properties.headers().as_ref(),
                    headers,
                ));
                publisher
                    .publish_confirmed("", &consuming.names.parked_queue(), &delivery.data, props)
                    .await?;
                metrics::counter!(telemetry::PARKED).increment(1);
                log.in_span(|| {
                    tracing::warn!(
                        status,
                        outcome = label,
                        "Command parked after its final failure."
                    )
                });
            }
            Ok(())
        }
        Verdict::RetryLater {
            delay_ms,
            tries,
            retries,
        } => {
            let headers = vec![
                (ATTEMPTS_SO_FAR_HEADER, AMQPValue::LongInt(tries as i32)),
                (RETRIES_HEADER, AMQPValue::LongInt(retries as i32)),
            ];
            let props = delivery.properties.clone().with_headers(with_headers(
                delivery.properties.headers().as_ref(),
                headers,
            ));
            // The retry exchange is a fanout: the routing key (the instance, whatever the
            // command was first sent with) survives the dead-lettering back.
            let routed = publisher
                .publish_confirmed(
                    &consuming.names.retry_exchange(delay_ms),
                    instance_name,
                    &delivery.data,
                    props,
                )
                .await?;
            if !routed {
                return Err(BrokerError::Unroutable(
                    consuming.names.retry_exchange(delay_ms),
                ));
            }
            metrics::counter!(telemetry::RETRIES, "stage" => "broker").increment(1);
            log.in_span(|| {
                tracing::info!(
                    delay_ms,
                    tries,
                    retries,
                    "Command will be tried again later."
                )
            });
            Ok(())
        }
    }
}
