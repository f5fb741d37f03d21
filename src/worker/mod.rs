//! The worker's life: [`run`] opens the pipeline, serves HTTP, then keeps one broker
//! connection at a time ([`connection`]) until it is told to stop, reconnecting with backoff
//! ([`reconnect`]) when one is lost.

mod background;
pub mod connection;
pub mod reconnect;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::bus::consume::{Consuming, ConsumingOptions};
use crate::config::Config;
use crate::contract::Names;
use crate::http::{self, Readiness};
use crate::ownership::{self, Coordination};
use crate::pipeline::Pipeline;
use crate::telemetry;
use connection::{Ended, Serving};
use reconnect::Reconnect;

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
    let traces = &config.traces;
    let exporting = telemetry::traces::start(
        &traces.otlp_endpoint,
        &traces.service_name,
        traces.sample_ratio,
    )?;
    if exporting.is_some() {
        tracing::info!(endpoint = %config.traces.otlp_endpoint, "Exporting traces over OTLP.");
    }
    let pipeline = Arc::new(Pipeline::from_config(&config).await?);
    let instances = pipeline.instances().clone();
    let readiness = Arc::new(Readiness::default());
    let reload = Arc::new(Notify::new());
    let stop = CancellationToken::new();
    let stopper = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stopper.cancel();
    });

    let http_addr = if config.http.enabled {
        let state = http::State {
            metrics,
            readiness: readiness.clone(),
            pipeline: pipeline.clone(),
            reload: reload.clone(),
        };
        let addr = http::serve(&config.http.bind, config.http.port, state, stop.clone()).await?;
        tracing::info!(%addr, "Serving /metrics, /healthz and /readyz.");
        Some(addr)
    } else {
        None
    };
    on_started(Started { http_addr });
    tokio::spawn(background::report_instance_states(
        instances.clone(),
        stop.clone(),
    ));
    tokio::spawn(background::reload_on_request(
        instances.clone(),
        reload,
        stop.clone(),
    ));

    let consuming = Arc::new(Consuming::new(
        pipeline.clone(),
        Names::new(&config.broker.namespace),
        consuming_options(&config, instances.len()),
    ));
    let grace = Duration::from_millis(config.worker.shutdown_grace_ms);
    let serving = Arc::new(Serving::new(consuming, grace));
    // With shared ownership, a stop first hands every instance over (which needs the broker
    // connection: in-flight commands finish and are answered), then closes the connection.
    let connection_stop = if config.ownership.enabled {
        let coordination = Coordination::connect(
            &config.idempotency.redis_url,
            &config.ownership_prefix(),
            &format!(
                "{}-{}",
                config.worker.name,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
        )
        .await?;
        tracing::info!(
            member = coordination.member(),
            "Sharing the instances with the other workers."
        );
        let coordinator = tokio::spawn(ownership::coordinate(
            coordination,
            ownership::Timing::of(&config.ownership),
            instances.clone(),
            serving.clone(),
            stop.clone(),
        ));
        let connection_stop = CancellationToken::new();
        let handed_over = connection_stop.clone();
        tokio::spawn(async move {
            let _ = coordinator.await;
            handed_over.cancel();
        });
        connection_stop
    } else {
        serving.own_all().await;
        metrics::gauge!(telemetry::OWNED_INSTANCES).set(instances.len() as f64);
        stop.clone()
    };
    let mut reconnect = Reconnect::default();
    let failed = loop {
        let ended = connection::serve(
            &config,
            &serving,
            &readiness,
            &connection_stop,
            reconnect.connections(),
        )
        .await;
        readiness.set_broker_connected(false);
        match ended {
            Ended::Stopped => break None,
            Ended::Lost { error, .. } if !error.is_retryable() => break Some(error),
            Ended::Lost { consumed, error } => {
                let delay = reconnect.delay_after(consumed);
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "Broker connection lost; reconnecting.");
                if !reconnect.wait(delay, &connection_stop).await {
                    break None;
                }
                metrics::counter!(telemetry::BROKER_RECONNECTS).increment(1);
            }
        }
    };
    stop.cancel();
    instances.shutdown().await;
    if let Some(exporting) = exporting {
        let _ = tokio::task::spawn_blocking(move || exporting.shutdown()).await;
    }
    match failed {
        Some(error) => Err(error.into()),
        None => {
            tracing::info!("Worker stopped.");
            Ok(())
        }
    }
}

/// One consumer per instance, plus the unrouted queue's; prefetch split to fit the budget.
fn consuming_options(config: &Config, instances: usize) -> ConsumingOptions {
    let queues = instances + 1;
    let prefetch = config.prefetch_per_queue(queues);
    if prefetch < config.broker.prefetch {
        tracing::info!(
            prefetch,
            queues,
            max_in_flight = config.worker.max_in_flight,
            "Prefetch per queue lowered to fit worker.max_in_flight."
        );
    }
    ConsumingOptions {
        app_id: config.worker.name.clone(),
        prefetch,
        max_body_bytes: config.worker.max_body_bytes,
        concurrency: config.worker.concurrency_per_instance,
        max_handling: config.worker.max_handling,
        // The delete's own bound, then the wait for an unreachable store to record it.
        finish_after_effect: Duration::from_millis(
            config.worker.delete_timeout_ms + config.idempotency.outage_wait_ms,
        ),
    }
}
