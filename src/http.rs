//! `/metrics`, `/healthz` and `/readyz` on one HTTP port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

/// What `/readyz` reports.
#[derive(Debug, Default)]
pub struct Health {
    pub broker_connected: AtomicBool,
    pub consuming: AtomicBool,
}

impl Health {
    pub fn is_ready(&self) -> bool {
        self.broker_connected.load(Ordering::SeqCst) && self.consuming.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
}

/// Binds the port and serves until `stop`; returns the bound address (port 0 picks one).
pub async fn serve(
    bind: &str,
    port: u16,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind((bind, port)).await?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move { s.metrics.render() }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server failed.");
        }
    });
    Ok(addr)
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let broker = s.health.broker_connected.load(Ordering::SeqCst);
    let consuming = s.health.consuming.load(Ordering::SeqCst);
    let status = if s.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        format!("broker_connected={broker} consuming={consuming}\n"),
    )
}
