//! chat-delete-worker: consumes "delete entire chat" commands from RabbitMQ, applies each to the
//! owning WhatsApp instance, purges the chat's media when asked, and publishes a result event
//! that matches the documented HTTP payloads.
//!
//! # Layout
//! - `config`: the typed configuration (TOML + `CDW__*` environment overrides).
//! - `topology`: exchange and queue names, and their declaration.
//! - `decode` → `auth` → `command` → `session` → `media`: the pipeline stages, driven by
//!   `pipeline`; `outcome` turns the result into the event; `consume` settles deliveries.
//! - `broker`: the RabbitMQ connection and confirmed publishing; `http`: health and metrics.

#![forbid(unsafe_code)]

pub mod batch;
pub mod bus;
pub mod cli;
pub mod config;
pub mod contract;
pub mod http;
pub mod idempotency;
pub mod media;
pub mod pairing;
pub mod parked;
pub mod pipeline;
pub mod session;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::consume::{self, Consuming, ConsumingOptions};
use crate::bus::{BrokerError, Publisher, topology};
use crate::config::Config;
use crate::contract::Names;
use crate::http::Health;
use crate::pipeline::Pipeline;

/// What a started worker tells its caller.
#[derive(Debug, Clone, Default)]
pub struct Started {
    /// Where `/metrics`, `/healthz` and `/readyz` are served, when enabled.
    pub http_addr: Option<SocketAddr>,
}

/// Runs the worker until `shutdown` completes, reconnecting to the broker whenever the
/// connection is lost. `on_started` is called once the HTTP port is bound (tests read it).
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_started: impl FnOnce(Started) + Send,
) -> anyhow::Result<()> {
    let metrics = telemetry::prometheus();
    let pipeline = Arc::new(Pipeline::from_config(&config).await?);
    let health = Arc::new(Health::default());
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.cancel();
    });

    let http_addr = if config.http.enabled {
        let addr = http::serve(
            &config.http.bind,
            config.http.port,
            metrics,
            health.clone(),
            pipeline.clone(),
            stop.clone(),
        )
        .await?;
        tracing::info!(%addr, "Serving /metrics, /healthz and /readyz.");
        Some(addr)
    } else {
        None
    };
    on_started(Started { http_addr });
    tokio::spawn(report_instance_states(pipeline.clone(), stop.clone()));
    tokio::spawn(reload_on_request(
        pipeline.clone(),
        health.clone(),
        stop.clone(),
    ));

    // One consumer per instance, plus the unrouted queue's.
    let queues = pipeline.instances().len() + 1;
    let prefetch = config.prefetch_per_queue(queues);
    if prefetch < config.broker.prefetch {
        tracing::info!(
            prefetch,
            queues,
            max_in_flight = config.worker.max_in_flight,
            "Prefetch per queue lowered to fit worker.max_in_flight."
        );
    }
    let consuming = Arc::new(Consuming::new(
        pipeline.clone(),
        Names::new(&config.broker.namespace),
        ConsumingOptions {
            app_id: config.worker.name.clone(),
            prefetch,
            concurrency: config.worker.concurrency_per_instance,
            max_handling: config.worker.max_handling,
        },
    ));
    let mut delay = Duration::from_millis(250);
    let mut connections = 0u64;
    loop {
        let mut consumed = false;
        let served = serve_connection(
            &config,
            &consuming,
            &health,
            &stop,
            connections,
            &mut consumed,
        )
        .await;
        if consumed {
            delay = Duration::from_millis(250);
        }
        health.broker_connected.store(false, Ordering::SeqCst);
        health.consuming.store(false, Ordering::SeqCst);
        metrics::gauge!(telemetry::BROKER_CONNECTED).set(0.0);
        match served {
            Ok(()) => break,
            Err(error) if !error.is_retryable() => {
                stop.cancel();
                shutdown_sessions(&pipeline).await;
                return Err(error.into());
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "Broker connection lost; reconnecting.");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                connections += 1;
                metrics::counter!(telemetry::BROKER_RECONNECTS).increment(1);
            }
        }
        if stop.is_cancelled() {
            break;
        }
    }
    shutdown_sessions(&pipeline).await;
    tracing::info!("Worker stopped.");
    Ok(())
}

/// One broker connection's life: declare, consume, and on stop or loss drain in-flight work.
/// `Ok` means a requested stop; `Err` a lost or refused connection.
async fn serve_connection(
    config: &Config,
    consuming: &Arc<Consuming>,
    health: &Health,
    stop: &CancellationToken,
    generation: u64,
    consumed: &mut bool,
) -> Result<(), BrokerError> {
    let name = format!("{} ({generation})", config.worker.name);
    let connection = bus::connect(&config.broker, &name).await?;
    let names = consuming.names();
    let instance_names: Vec<&str> = consuming
        .pipeline()
        .instances()
        .iter()
        .map(|i| i.name())
        .collect();
    topology::declare(
        &connection,
        &config.broker,
        names,
        &instance_names,
        &topology::retry_tiers(&config.retry.broker_delays_ms),
    )
    .await
    .map_err(|e| {
        if e.is_amqp_soft_error() {
            BrokerError::Topology(e)
        } else {
            BrokerError::Amqp(e)
        }
    })?;
    let publisher = Arc::new(Publisher::open(&connection, &names.events_exchange()).await?);
    health.broker_connected.store(true, Ordering::SeqCst);
    metrics::gauge!(telemetry::BROKER_CONNECTED).set(1.0);

    let lost = CancellationToken::new();
    let watch_lost = lost.clone();
    let mut events = connection.events_listener();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if matches!(event, lapin::Event::Error(_)) {
                watch_lost.cancel();
                break;
            }
        }
    });

    let tracker = TaskTracker::new();
    let signals = consume::Signals {
        lost: lost.clone(),
        ..Default::default()
    };
    let mut queues: Vec<(String, Option<Arc<pipeline::Instance>>)> = consuming
        .pipeline()
        .instances()
        .iter()
        .map(|i| (names.instance_queue(i.name()), Some(i.clone())))
        .collect();
    queues.push((names.unrouted_queue(), None));
    // Started many at a time: each is a channel and two round trips.
    let starts = queues.into_iter().map(|(queue, instance)| {
        consume::start(
            &connection,
            consuming.clone(),
            publisher.clone(),
            queue,
            instance,
            tracker.clone(),
            signals.clone(),
        )
    });
    let started: Vec<_> = futures_util::stream::iter(starts)
        .buffer_unordered(64)
        .collect()
        .await;
    let consumers = match started.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(consumers) => consumers,
        Err(error) => {
            signals.stop_consuming.cancel();
            return Err(error.into());
        }
    };
    signals.all_started.cancel();
    health.consuming.store(true, Ordering::SeqCst);
    *consumed = true;
    tracing::info!(consumers = consumers.len(), "Consuming.");

    let requested = tokio::select! {
        _ = stop.cancelled() => true,
        _ = lost.cancelled() => false,
    };
    health.consuming.store(false, Ordering::SeqCst);
    signals.stop_consuming.cancel();
    if requested {
        for consumer in &consumers {
            consumer.cancel().await;
        }
    }
    tracker.close();
    let grace = Duration::from_millis(config.worker.shutdown_grace_ms);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            grace_ms = grace.as_millis() as u64,
            "In-flight commands did not finish in time; handing them back."
        );
        signals.hard_stop.cancel();
        tracker.wait().await;
    }
    let _ = connection.close(200, "worker stopping".into()).await;
    if requested {
        Ok(())
    } else {
        Err(BrokerError::ConnectionLost)
    }
}

async fn shutdown_sessions(pipeline: &Pipeline) {
    pipeline.instances().shutdown().await;
}

/// Keeps the per-instance state gauges current.
async fn report_instance_states(pipeline: Arc<Pipeline>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        for instance in pipeline.instances().iter() {
            let current = instance.session().state();
            let connected = current == session::SessionState::Connected;
            metrics::gauge!(telemetry::INSTANCE_CONNECTED, "instance" => instance.name().to_owned())
                .set(if connected { 1.0 } else { 0.0 });
            for state in session::SessionState::ALL {
                metrics::gauge!(
                    telemetry::INSTANCE_STATE,
                    "instance" => instance.name().to_owned(),
                    "state" => state.label()
                )
                .set(if state == current { 1.0 } else { 0.0 });
            }
        }
    }
}

/// On SIGHUP or `POST /admin/reload`, sessions paired meanwhile are opened and connected.
async fn reload_on_request(pipeline: Arc<Pipeline>, health: Arc<Health>, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup()).ok();
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = hup => tracing::info!("SIGHUP received; reloading sessions."),
            _ = health.reload.notified() => tracing::info!("Reload requested; reloading sessions."),
        }
        for instance in pipeline.instances().iter() {
            instance.session().reload().await;
        }
    }
}
