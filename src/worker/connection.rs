//! One broker connection's life: declare the topology, start a consumer per queue, and on a
//! stop or a loss drain the commands in flight.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::consume::{self, Consuming, Feed, QueueConsumer, Signals};
use crate::bus::{self, BrokerError, Publisher, topology};
use crate::config::Config;
use crate::http::Readiness;

/// How a connection's life ended.
#[derive(Debug)]
pub enum Ended {
    /// A requested stop: in-flight commands finished or were handed back.
    Stopped,
    /// The connection could not be made, or was lost; `consumed` tells whether it got as far
    /// as consuming (a good connection resets the reconnect backoff).
    Lost { consumed: bool, error: BrokerError },
}

/// Connects (as the `generation`-th connection), consumes until `stop` or a loss, then drains.
pub async fn serve(
    config: &Config,
    consuming: &Arc<Consuming>,
    readiness: &Readiness,
    stop: &CancellationToken,
    generation: u64,
) -> Ended {
    let lost = |error| Ended::Lost {
        consumed: false,
        error,
    };
    let name = format!("{} ({generation})", config.worker.name);
    let connection = match bus::connect(&config.broker, &name).await {
        Ok(connection) => Arc::new(connection),
        Err(error) => return lost(error),
    };
    let instances = consuming.pipeline().instances();
    let names = consuming.names();
    let instance_names: Vec<&str> = instances.iter().map(|i| i.name()).collect();
    let tiers = topology::retry_tiers(&config.retry.broker_delays_ms);
    let declared = topology::Topology::new(&config.broker, names, &instance_names, &tiers)
        .declare(&connection)
        .await;
    if let Err(e) = declared {
        return lost(if bus::is_refused_declaration(&e) {
            BrokerError::Topology(e)
        } else {
            BrokerError::Amqp(e)
        });
    }
    let publisher = match Publisher::open(&connection, &names.events_exchange()).await {
        Ok(publisher) => Arc::new(publisher),
        Err(error) => return lost(error),
    };
    readiness.set_broker_connected(true);

    let signals = Signals::default();
    watch_for_loss(&connection, signals.lost.clone());
    let tracker = TaskTracker::new();
    let started = start_consumers(&connection, consuming, publisher, &tracker, &signals).await;
    let consumers = match started {
        Ok(consumers) => consumers,
        Err(error) => {
            signals.stop_consuming.cancel();
            return lost(error.into());
        }
    };
    signals.all_started.cancel();
    readiness.set_consuming(true);
    tracing::info!(consumers = consumers.len(), "Consuming.");

    let requested = tokio::select! {
        _ = stop.cancelled() => true,
        _ = signals.lost.cancelled() => false,
    };
    readiness.set_consuming(false);
    signals.stop_consuming.cancel();
    if requested {
        for consumer in &consumers {
            consumer.cancel().await;
        }
    }
    drain(&tracker, &signals, config.worker.shutdown_grace_ms).await;
    let _ = connection.close(200, "worker stopping".into()).await;
    if requested {
        Ended::Stopped
    } else {
        Ended::Lost {
            consumed: true,
            error: BrokerError::ConnectionLost,
        }
    }
}

/// A consumer for every instance queue and the unrouted queue, started many at a time (each
/// is a channel and two round trips).
async fn start_consumers(
    connection: &lapin::Connection,
    consuming: &Arc<Consuming>,
    publisher: Arc<Publisher>,
    tracker: &TaskTracker,
    signals: &Signals,
) -> Result<Vec<consume::RunningConsumer>, lapin::Error> {
    let names = consuming.names();
    let mut queues: Vec<(String, Feed)> = consuming
        .pipeline()
        .instances()
        .iter()
        .map(|i| (names.instance_queue(i.name()), Feed::Instance(i.clone())))
        .collect();
    queues.push((names.unrouted_queue(), Feed::Unrouted));
    queues.push((names.dead_queue(), Feed::DeadLettered));
    let starts = queues.into_iter().map(|(queue, feed)| {
        let queue = QueueConsumer {
            consuming: consuming.clone(),
            publisher: publisher.clone(),
            queue,
            feed,
            tracker: tracker.clone(),
            signals: signals.clone(),
        };
        consume::start(connection, queue)
    });
    futures_util::stream::iter(starts)
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

/// Cancels `lost` when the connection reports an error.
fn watch_for_loss(connection: &lapin::Connection, lost: CancellationToken) {
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if matches!(event, lapin::Event::Error(_)) {
                lost.cancel();
                break;
            }
        }
    });
}

/// Lets in-flight commands finish within the grace period, then hands the rest back.
async fn drain(tracker: &TaskTracker, signals: &Signals, grace_ms: u64) {
    tracker.close();
    let grace = Duration::from_millis(grace_ms);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            grace_ms,
            "In-flight commands did not finish in time; handing them back."
        );
        signals.hard_stop.cancel();
        tracker.wait().await;
    }
}
