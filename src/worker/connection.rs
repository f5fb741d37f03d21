//! One broker connection's life: declare the topology, consume the queues this worker serves,
//! and on a stop or a loss drain the commands in flight. [`Serving`] holds what is served:
//! instances are added and removed while a connection lives, as ownership moves.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::consume::{self, Activity, Consuming, QueueConsumer, RunningConsumer, Signals};
use crate::bus::{self, BrokerError, Publisher, topology};
use crate::config::Config;
use crate::http::Readiness;
use crate::instances::Instance;
use crate::ownership::{Host, Link};
use crate::pipeline::Source;
use crate::session::Opening;
use crate::telemetry;

/// How a connection's life ended.
#[derive(Debug)]
pub enum Ended {
    /// A requested stop: in-flight commands finished or were handed back.
    Stopped,
    /// The connection could not be made, or was lost; `consumed` tells whether it got as far
    /// as consuming (a good connection resets the reconnect backoff).
    Lost { consumed: bool, error: BrokerError },
}

/// The instances this worker serves, and the consumers of the live connection.
pub struct Serving {
    consuming: Arc<Consuming>,
    grace: Duration,
    state: tokio::sync::Mutex<State>,
    /// The broker connection's state, for ownership: a worker that cannot consume holds
    /// nothing.
    link: std::sync::Mutex<Link>,
}

#[derive(Default)]
struct State {
    /// Instances whose queues are consumed whenever a connection is up.
    owned: BTreeSet<String>,
    live: Option<Live>,
}

/// The live connection's consumers, by queue.
struct Live {
    line: Line,
    queues: HashMap<String, Queue>,
}

/// What starting a consumer on the live connection needs.
#[derive(Clone)]
struct Line {
    connection: Arc<lapin::Connection>,
    publisher: Arc<Publisher>,
    signals: Signals,
}

impl Live {
    fn line(&self) -> Line {
        self.line.clone()
    }
}

/// One queue's consumer, its signals and its commands in flight.
struct Queue {
    consumer: RunningConsumer,
    signals: Signals,
    tracker: TaskTracker,
    activity: Arc<Activity>,
}

impl Queue {
    /// Stops taking deliveries (`cancel`: tells the broker so); in-flight commands may finish
    /// within `grace`, then go back. False when some had to go back.
    async fn stop(&self, cancel: bool, grace: Duration) -> bool {
        // First, so the consumer's end is not taken for a lost connection.
        self.signals.stop_consuming.cancel();
        if cancel {
            self.consumer.cancel().await;
        }
        self.tracker.close();
        let finished = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if !finished {
            self.signals.hard_stop.cancel();
            self.tracker.wait().await;
        }
        finished
    }
}

impl Serving {
    pub fn new(consuming: Arc<Consuming>, grace: Duration) -> Self {
        Self {
            consuming,
            grace,
            state: Default::default(),
            link: std::sync::Mutex::new(Link::Never),
        }
    }

    fn set_link(&self, link: Link) {
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = link;
    }

    /// Serves every hosted instance for good (a lone worker).
    pub async fn own_all(&self) {
        let names = self.consuming.pipeline().instances().iter();
        let mut state = self.state.lock().await;
        state.owned = names.map(|i| i.name().to_owned()).collect();
    }
}

#[async_trait::async_trait]
impl Host for Serving {
    fn link(&self) -> Link {
        *self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn gain(&self, instance: &Arc<Instance>) -> Opening {
        if instance.session().open().await == Opening::Failed {
            return Opening::Failed;
        }
        // The consumer is started outside the lock: after a failover many instances are
        // gained at once, and each start is two round trips to the broker.
        let line = {
            let mut state = self.state.lock().await;
            state.owned.insert(instance.name().to_owned());
            state.live.as_ref().map(Live::line)
        };
        let Some(line) = line else {
            // Not connected: the next connection starts it with the others.
            return Opening::Done;
        };
        let queue = self.consuming.names().instance_queue(instance.name());
        let source = Source::Instance(instance.clone());
        let started = start_queue(&line, &self.consuming, queue, source).await;
        let mut state = self.state.lock().await;
        match (started, &mut state.live) {
            (Ok((queue, running)), Some(live))
                if Arc::ptr_eq(&live.line.connection, &line.connection) =>
            {
                live.queues.insert(queue, running);
            }
            // A new connection came meanwhile: it started the queue with the others.
            (Ok((_, running)), _) => {
                drop(state);
                running.stop(true, Duration::ZERO).await;
                running.consumer.close().await;
            }
            // The connection is failing: the next one starts it with the others.
            (Err(_), _) => line.signals.lost.cancel(),
        }
        Opening::Done
    }

    async fn lose(&self, instance: &Arc<Instance>, graceful: bool) {
        let queue = self.consuming.names().instance_queue(instance.name());
        let running = {
            let mut state = self.state.lock().await;
            state.owned.remove(instance.name());
            state
                .live
                .as_mut()
                .and_then(|live| live.queues.remove(&queue))
        };
        if let Some(running) = running {
            let grace = if graceful { self.grace } else { Duration::ZERO };
            let started = tokio::time::Instant::now();
            let finished = running.stop(true, grace).await;
            running.consumer.close().await;
            tracing::info!(
                instance = %instance.name(),
                finished,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "Stopped consuming the instance's queue."
            );
        }
        instance.session().close().await;
    }
}

/// Starts one queue's consumer on the live connection.
async fn start_queue(
    live: &Line,
    consuming: &Arc<Consuming>,
    queue: String,
    source: Source,
) -> Result<(String, Queue), lapin::Error> {
    let signals = Signals {
        all_started: live.signals.all_started.clone(),
        stop_consuming: live.signals.stop_consuming.child_token(),
        hard_stop: live.signals.hard_stop.child_token(),
        lost: live.signals.lost.clone(),
    };
    let tracker = TaskTracker::new();
    let activity = Arc::new(Activity::default());
    let consumer = QueueConsumer {
        consuming: consuming.clone(),
        publisher: live.publisher.clone(),
        queue: queue.clone(),
        source,
        tracker: tracker.clone(),
        signals: signals.clone(),
        activity: activity.clone(),
    };
    let consumer = consume::start(&live.connection, consumer).await?;
    let running = Queue {
        consumer,
        signals,
        tracker,
        activity,
    };
    Ok((queue, running))
}

/// Connects (as the `attempt`-th connection), consumes until `stop` or a loss, then drains.
pub async fn serve(
    config: &Config,
    serving: &Serving,
    readiness: &Readiness,
    stop: &CancellationToken,
    attempt: u64,
) -> Ended {
    let lost = |error| Ended::Lost {
        consumed: false,
        error,
    };
    let consuming = &serving.consuming;
    let name = format!("{} ({attempt})", config.worker.name);
    let connection = match bus::connect(&config.broker, &name).await {
        Ok(connection) => Arc::new(connection),
        Err(error) => return lost(error),
    };
    let instances = consuming.pipeline().instances();
    let names = consuming.names();
    let instance_names: Vec<&str> = instances.iter().map(|i| i.name()).collect();
    let tiers = config.retry.tiers();
    let topology = topology::Topology::new(&config.broker, names, &instance_names, &tiers);
    if let Err(error) = bus::capacity::enforce(&config.broker, &topology).await {
        return lost(error);
    }
    if let Err(error) = bus::policies::apply(&config.broker, &topology.policies).await {
        return lost(error);
    }
    let declared = topology.declare(&connection).await;
    if let Err(e) = declared {
        return lost(if bus::is_refused_declaration(&e) {
            BrokerError::Topology(e)
        } else {
            BrokerError::Amqp(e)
        });
    }
    // With many queues results go out on a connection of their own: lapin's I/O loop walks
    // every channel of a connection for each frame it sends, and the consuming one has a
    // channel per queue. With few, one connection spares a thread hand-off per frame.
    let results = if instances.len() <= RESULTS_SHARE_CONNECTION_UP_TO {
        None
    } else {
        match bus::connect(&config.broker, &format!("{name} results")).await {
            Ok(results) => Some(Arc::new(results)),
            Err(error) => return lost(error),
        }
    };
    let publishing = results.as_ref().unwrap_or(&connection);
    let publisher = match Publisher::open(publishing, &names.events_exchange()).await {
        Ok(publisher) => Arc::new(publisher),
        Err(error) => return lost(error),
    };
    readiness.set_broker_connected(true);

    let signals = Signals::default();
    for watched in std::iter::once(&connection).chain(&results) {
        watch_for_loss(watched, signals.lost.clone());
    }
    let mut live = Live {
        line: Line {
            connection: connection.clone(),
            publisher,
            signals: signals.clone(),
        },
        queues: HashMap::new(),
    };
    let consumers = {
        let mut state = serving.state.lock().await;
        let started = start_consumers(&mut live, consuming, &state.owned).await;
        if let Err(error) = started {
            signals.stop_consuming.cancel();
            return lost(error.into());
        }
        let consumers = live.queues.len();
        state.live = Some(live);
        consumers
    };
    signals.all_started.cancel();
    readiness.set_consuming(true);
    serving.set_link(Link::Up);
    tracing::info!(consumers, "Consuming.");

    let stall_after = Duration::from_millis(config.broker.stall_after_ms);
    let mut stalled = None;
    let requested = tokio::select! {
        _ = stop.cancelled() => true,
        _ = signals.lost.cancelled() => false,
        error = watch_for_stalls(serving, &connection, stall_after) => {
            stalled = Some(error);
            false
        }
    };
    readiness.set_consuming(false);
    serving.set_link(Link::LostAt(tokio::time::Instant::now()));
    let live = serving.state.lock().await.live.take();
    if let Some(live) = live {
        let grace = serving.grace;
        let stops = live.queues.values().map(|q| q.stop(requested, grace));
        let finished = futures_util::future::join_all(stops).await;
        if finished.contains(&false) {
            tracing::warn!(
                grace_ms = grace.as_millis() as u64,
                "In-flight commands did not finish in time; handed them back."
            );
        }
    }
    // Bounded: a broker that never answers the close must not hold up the next connection.
    let closing = std::iter::once(&connection).chain(&results);
    let closes = closing.map(|c| c.close(200, "worker stopping".into()));
    let _ =
        tokio::time::timeout(consume::ANSWER_WAIT, futures_util::future::join_all(closes)).await;
    if requested {
        Ended::Stopped
    } else {
        Ended::Lost {
            consumed: true,
            error: stalled.unwrap_or(BrokerError::ConnectionLost),
        }
    }
}

/// Most hosted instances whose results share the consuming connection: up to here a shared
/// connection costs less worker CPU per command than one of their own, beyond it more
/// (`bench/run.py`; docs/benchmarks.md).
const RESULTS_SHARE_CONNECTION_UP_TO: usize = 64;

/// Ends when a queue holds commands while its consumer, the queue's only one, had nothing to
/// do for `after`, or when the broker does not answer that look within `after` (never when
/// `after` is 0). A consumer the broker stopped feeding gets nothing more on its channel
/// (RabbitMQ can leave a quorum queue's deliveries checked out to it after a leader change,
/// rabbitmq-server#15473); a new connection ends that. With another consumer on the queue,
/// ours may be waiting its turn: not a stall.
async fn watch_for_stalls(
    serving: &Serving,
    connection: &lapin::Connection,
    after: Duration,
) -> BrokerError {
    if after.is_zero() {
        return std::future::pending().await;
    }
    // Idle counts from the start of this connection's consuming, and a queue looked at is
    // looked at again only after another `after`.
    let started = tokio::time::Instant::now();
    let mut looked_at: HashMap<String, tokio::time::Instant> = HashMap::new();
    loop {
        tokio::time::sleep(after / 2).await;
        if started.elapsed() < after {
            continue;
        }
        let idle: Vec<String> = {
            let state = serving.state.lock().await;
            let Some(live) = &state.live else { continue };
            live.queues
                .iter()
                .filter(|(_, q)| q.activity.idle_for().is_some_and(|idle| idle >= after))
                .filter(|(name, _)| looked_at.get(*name).is_none_or(|at| at.elapsed() >= after))
                .map(|(name, _)| name.clone())
                .collect()
        };
        if idle.is_empty() {
            continue;
        }
        let now = tokio::time::Instant::now();
        looked_at.extend(idle.iter().map(|queue| (queue.clone(), now)));
        let wait_ms = after.as_millis() as u64;
        let stalled = match tokio::time::timeout(after, waiting_commands(connection, idle)).await {
            Ok(None) => continue,
            Ok(Some((queue, ready))) => {
                tracing::warn!(
                    queue,
                    ready,
                    idle_ms = wait_ms,
                    "Commands wait in a queue whose consumer gets nothing; reconnecting."
                );
                BrokerError::ConsumerStalled(queue)
            }
            Err(_) => BrokerError::Unanswered(wait_ms),
        };
        metrics::counter!(telemetry::CONSUMER_STALLS).increment(1);
        return stalled;
    }
}

/// The first of `queues` holding commands with one consumer (ours), and how many it holds.
async fn waiting_commands(
    connection: &lapin::Connection,
    queues: Vec<String>,
) -> Option<(String, u32)> {
    let channel = connection.create_channel().await.ok()?;
    let mut found = None;
    for queue in queues {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await;
        match declared {
            Ok(q) if q.message_count() > 0 && q.consumer_count() <= 1 => {
                found = Some((queue, q.message_count()));
                break;
            }
            Ok(_) => {}
            // The channel is gone (a queue deleted meanwhile): look again next time.
            Err(_) => return None,
        }
    }
    let _ = channel.close(200, "looked".into()).await;
    found
}

/// A consumer for every owned instance queue and the unrouted and dead-letter queues, started
/// many at a time (each is a channel and two round trips).
async fn start_consumers(
    live: &mut Live,
    consuming: &Arc<Consuming>,
    owned: &BTreeSet<String>,
) -> Result<(), lapin::Error> {
    let names = consuming.names();
    let mut queues: Vec<(String, Source)> = consuming
        .pipeline()
        .instances()
        .iter()
        .filter(|i| owned.contains(i.name()))
        .map(|i| (names.instance_queue(i.name()), Source::Instance(i.clone())))
        .collect();
    queues.push((names.unrouted_queue(), Source::Unrouted));
    queues.push((names.dead_queue(), Source::DeadLettered(None)));
    let line = live.line();
    let starts = queues
        .into_iter()
        .map(|(queue, source)| start_queue(&line, consuming, queue, source));
    let started: Vec<_> = futures_util::stream::iter(starts)
        .buffer_unordered(64)
        .collect()
        .await;
    for result in started {
        let (queue, running) = result?;
        live.queues.insert(queue, running);
    }
    Ok(())
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
